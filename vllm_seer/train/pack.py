"""Tokenize a training corpus once into compact, compressed shards with a manifest.

The GPU host never sees raw text: ``pack`` turns every document of every corpus into token ids
(``uint16`` when the vocabulary fits, else ``uint32``), concatenates the documents of one
(corpus, split) pair, each followed by the tokenizer's EOS id, and writes the stream as
xz-compressed raw little-endian integers (Python's stdlib ``lzma``: no extra package on either
machine; about 0.31 of the raw size on SmolLM2-tokenized code, against 0.40 for gzip) in shards of
at most ``shard_tokens`` tokens. ``manifest.json`` lists every document (corpus, name, split,
token count, shard and offset), every shard (file, split, token count, compressed bytes, sha256)
and the totals; :class:`PackedCorpus` verifies each shard's sha256 before use.

A corpus is ``NAME:DIR:SUFFIXES`` (suffixes joined with ``+``), e.g.
``code:/usr/lib/python3.11:.py,prose:.cache/prose/text:.txt``. The train / held-out split is
:func:`vllm_seer.train.data.split_of` of the document's path relative to its root, so no document
is in both.

Training windows (:meth:`PackedCorpus.windows`) are consecutive, non-overlapping ``seq_len``-token
slices of a corpus's split stream in name order: long documents fill whole windows, short ones
share a window (separated by EOS). Windows never mix corpora.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vllm_seer.train import data as corpus_data
from vllm_seer.train.data import SPLITS, list_documents, stdlib_root

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vllm-seer-packed-1"


class PackError(ValueError):
    """A corpus specification, a packed folder or a shard is missing or inconsistent."""


@dataclass(frozen=True)
class Corpus:
    """One document collection: ``name`` (e.g. ``code``), its root folder and file suffixes."""

    name: str
    root: Path
    suffixes: tuple[str, ...]

    def spec(self) -> str:
        return f"{self.name}:{self.root}:{'+'.join(self.suffixes)}"


def prose_root() -> Path:
    """The prose folder filled by ``scripts/get-prose.sh`` (``data.prose_root`` when present)."""
    fn = getattr(corpus_data, "prose_root", None)
    if callable(fn):
        try:
            return Path(fn())
        except FileNotFoundError:  # not fetched: the default folder, which the caller reports
            pass
    return Path(__file__).resolve().parents[2] / ".cache" / "prose" / "text"


def default_corpora() -> list[Corpus]:
    """Stdlib code, plus the prose folder when it exists (a warning says how to get it if not)."""
    out = [Corpus("code", stdlib_root(), (".py",))]
    prose = prose_root()
    if prose.is_dir() and any(prose.rglob("*.txt")):
        out.append(Corpus("prose", prose, (".txt",)))
    else:
        log.warning("no prose corpus at %s (run scripts/get-prose.sh to fetch it); packing code only",
                    prose)
    return out


def parse_corpora(spec: str | None) -> list[Corpus]:
    """Parse ``NAME:DIR:SUFFIXES[,NAME:DIR:SUFFIXES...]``; ``None`` gives :func:`default_corpora`.

    Raises:
        PackError: malformed entry, duplicate name, or a folder that does not exist.
    """
    if spec is None:
        return default_corpora()
    out: list[Corpus] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, rest = item.partition(":")
        folder, sep2, suffixes = rest.rpartition(":")
        if not (sep and sep2 and name and folder and suffixes):
            raise PackError(f"--corpus entry {item!r}: expected NAME:DIR:SUFFIXES, e.g. "
                            "prose:.cache/prose/text:.txt")
        sfx = tuple(s if s.startswith(".") else "." + s for s in suffixes.split("+") if s)
        root = Path(folder).expanduser()
        if not root.is_dir():
            hint = " (run scripts/get-prose.sh)" if name == "prose" else ""
            raise PackError(f"--corpus {name}: folder {root} does not exist{hint}")
        if any(c.name == name for c in out):
            raise PackError(f"--corpus: the name {name!r} appears twice")
        out.append(Corpus(name, root, sfx))
    if not out:
        raise PackError("--corpus is empty")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _ShardWriter:
    """Accumulates one (corpus, split) token stream and flushes it in compressed shards."""

    def __init__(self, out: Path, corpus: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.corpus, self.split = out, corpus, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> tuple[int, int]:
        """Append one document; returns (shard index, offset inside that shard)."""
        if self.pending and self.pending + len(ids) > self.shard_tokens:
            self.flush()
        where = (len(self.shards), self.pending)
        self.parts.append(ids.astype(self.dtype))
        self.pending += len(ids)
        return where

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.corpus}-{self.split}-{len(self.shards):03d}.tok.xz"
        raw = np.concatenate(self.parts).astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        tmp = self.out / (name + ".tmp")
        tmp.write_bytes(lzma.compress(raw, preset=6))
        tmp.replace(self.out / name)
        self.shards.append({"file": name, "corpus": self.corpus, "split": self.split,
                            "tokens": self.pending, "bytes": (self.out / name).stat().st_size,
                            "sha256": _sha256(self.out / name)})
        self.parts, self.pending = [], 0


def pack(tokenizer: Any, corpora: Iterable[Corpus], out: Path, shard_tokens: int = 4 << 20,
         max_train_tokens: int | None = None, heldout_permille: int = 100,
         min_bytes: int = 1024, tokenizer_name: str = "") -> dict[str, Any]:
    """Tokenize ``corpora`` into ``out`` (shards + ``manifest.json``); returns the manifest.

    Args:
        max_train_tokens: stop adding training documents of a corpus once the train split as a
            whole holds this many tokens (documents are taken in name order, corpora in turn).
        shard_tokens: tokens per shard (``4 << 20`` uint16 ids are ~2.6 MB compressed).
    """
    corpora = list(corpora)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PackError(f"tokenizer {tokenizer_name!r} has no eos_token_id (needed as separator)")
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is written last: its presence = done
    docs_out: list[dict[str, Any]] = []
    shards: list[dict[str, Any]] = []
    train_used = 0
    for ci, c in enumerate(corpora):
        # a corpus may take an equal share of what the earlier ones left of max_train_tokens
        share = None if max_train_tokens is None else (
            (max_train_tokens - train_used) // (len(corpora) - ci))
        for split in SPLITS:
            docs = list_documents(split, root=c.root, min_bytes=min_bytes,
                                  heldout_permille=heldout_permille, suffixes=c.suffixes)
            writer = _ShardWriter(out, c.name, split, dtype, shard_tokens)
            used = 0
            for doc in tqdm(docs, desc=f"pack[{c.name}/{split}]", unit="doc"):
                if split == "train" and share is not None and used >= share:
                    break
                ids = tokenizer(doc.text(), add_special_tokens=False)["input_ids"]
                arr = np.asarray([*ids, eos], dtype=np.int64)
                if arr.max() >= vocab:
                    raise PackError(f"{doc.path}: token id {int(arr.max())} >= vocab {vocab}")
                shard, offset = writer.add(arr)
                docs_out.append({"corpus": c.name, "name": doc.name, "split": split,
                                 "tokens": len(arr),
                                 "shard": f"{c.name}-{split}-{shard:03d}.tok.xz",
                                 "offset": offset})
                used += len(arr)
            writer.flush()
            shards.extend(writer.shards)
            if split == "train":
                train_used += used
    totals = {f"{s}_tokens": sum(d["tokens"] for d in docs_out if d["split"] == s) for s in SPLITS}
    totals.update({f"{s}_documents": sum(d["split"] == s for d in docs_out) for s in SPLITS})
    manifest = {"format": FORMAT, "tokenizer": tokenizer_name, "vocab_size": vocab,
                "eos_token_id": eos, "dtype": dtype.name, "heldout_permille": heldout_permille,
                "corpora": [c.spec() for c in corpora], "totals": totals, "shards": shards,
                "documents": docs_out}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out / MANIFEST)
    log.info("packed %s: %d train / %d held-out tokens in %d shards (%.1f MB)", out,
             totals["train_tokens"], totals["heldout_tokens"], len(shards),
             sum(s["bytes"] for s in shards) / 1e6)
    return manifest


class PackedCorpus:
    """Read side of :func:`pack`: verified shards, token streams and training windows."""

    def __init__(self, folder: Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise PackError(f"{path} not found: pack the corpus first "
                            "(`vllm-seer train-gates pack --out {self.folder}`)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise PackError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._cache: dict[str, np.ndarray] = {}
        if verify:
            for s in self.manifest["shards"]:
                self._check(s)

    def _check(self, shard: dict[str, Any]) -> Path:
        f = self.folder / shard["file"]
        if not f.is_file():
            raise PackError(f"shard {f} listed in {self.folder / MANIFEST} is missing")
        got = _sha256(f)
        if got != shard["sha256"]:
            raise PackError(f"shard {f}: sha256 {got} != manifest {shard['sha256']}")
        return f

    def shard_tokens(self, name: str) -> np.ndarray:
        """The decompressed token ids of one shard (cached)."""
        if name not in self._cache:
            entry = next((s for s in self.manifest["shards"] if s["file"] == name), None)
            if entry is None:
                raise PackError(f"{self.folder}: no shard named {name}")
            arr = np.frombuffer(lzma.decompress((self.folder / name).read_bytes()), self.dtype)
            if len(arr) != entry["tokens"]:
                raise PackError(f"shard {name}: {len(arr)} tokens, manifest says {entry['tokens']}")
            self._cache[name] = arr
        return self._cache[name]

    def corpora(self) -> list[str]:
        return sorted({d["corpus"] for d in self.manifest["documents"]})

    def stream(self, corpus: str, split: str) -> np.ndarray:
        """All tokens of one (corpus, split) in document-name order."""
        parts = [self.shard_tokens(s["file"]) for s in self.manifest["shards"]
                 if s["corpus"] == corpus and s["split"] == split]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def windows(self, split: str, seq_len: int, limit: int | None = None) -> list[torch.Tensor]:
        """Non-overlapping ``[seq_len]`` int64 windows of ``split``, corpora interleaved.

        With ``limit``, at most that many, taken round-robin over corpora (for a held-out set
        balanced between code and prose).
        """
        per = []
        for c in self.corpora():
            s = self.stream(c, split)
            n = len(s) // seq_len
            per.append([torch.from_numpy(s[i * seq_len:(i + 1) * seq_len].astype(np.int64))
                        for i in range(n)])
        out: list[torch.Tensor] = []
        for i in range(max((len(p) for p in per), default=0)):
            out.extend(p[i] for p in per if i < len(p))
        return out[:limit] if limit is not None else out

    def document(self, corpus: str, name: str) -> np.ndarray:
        """Token ids of one document (EOS included)."""
        d = next((d for d in self.manifest["documents"]
                  if d["corpus"] == corpus and d["name"] == name), None)
        if d is None:
            raise PackError(f"{self.folder}: no document {corpus}:{name}")
        return self.shard_tokens(d["shard"])[d["offset"]:d["offset"] + d["tokens"]]
