"""Offline long-document corpus for gate training and evaluation.

Documents are the ``.py`` source files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded): long, real, licence-clean
text that every machine has without network access. Each document is identified by its path
relative to the stdlib root, and the train / held-out split is decided per document by a hash of
that relative path, so it is deterministic and independent of file order or Python patch version.
English prose (Debian documentation packages as plain text, ``scripts/get-prose.sh``) lives in
:func:`prose_root` and is split the same way (``suffixes=(".txt",)``).

Sequences are non-overlapping windows of ``seq_len`` tokens cut from a single document (no document
boundaries inside a sequence); documents shorter than ``seq_len`` tokens are skipped.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Document:
    """One source file: ``name`` is its path relative to the corpus root."""

    name: str
    path: Path

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


def stdlib_root() -> Path:
    """The standard-library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def prose_root() -> Path:
    """The plain-text prose corpus written by ``scripts/get-prose.sh`` (``.cache/prose/text``).

    ``$VLLM_SEER_PROSE`` overrides the folder. Raises ``FileNotFoundError`` (naming the script)
    when it has not been fetched.
    """
    env = os.environ.get("VLLM_SEER_PROSE")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "prose" / "text"
    if not (root.is_dir() and any(root.rglob("*.txt"))):
        raise FileNotFoundError(f"prose corpus {root} is missing or empty: run scripts/get-prose.sh "
                                "(Debian documentation packages, needs a Debian mirror)")
    return root


def split_of(name: str, heldout_permille: int = 100) -> str:
    """``"heldout"`` for about ``heldout_permille``/1000 of document names, else ``"train"``."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 1000
    return "heldout" if h < heldout_permille else "train"


def list_documents(split: str, root: Path | None = None, min_bytes: int = 4096,
                   heldout_permille: int = 100,
                   suffixes: tuple[str, ...] = (".py",)) -> list[Document]:
    """Documents of one split, sorted by name.

    Args:
        split: ``"train"`` or ``"heldout"``.
        root: corpus folder (default :func:`stdlib_root`).
        min_bytes: skip smaller files (they cannot fill a sequence anyway).
        suffixes: file name endings that count as documents (``(".py",)`` for code,
            ``(".txt",)`` for a prose folder of plain-text files).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = root or stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"corpus root {base} is not a folder")
    docs = []
    for path in base.rglob("*"):
        if not path.name.endswith(suffixes):
            continue
        rel = path.relative_to(base).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not path.is_file():
            continue
        if path.stat().st_size < min_bytes or split_of(rel, heldout_permille) != split:
            continue
        docs.append(Document(rel, path))
    return sorted(docs, key=lambda d: d.name)


def document_windows(tokenizer: Any, doc: Document, seq_len: int,
                     max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping ``[seq_len]`` int64 token windows of one document (no special tokens)."""
    ids = tokenizer(doc.text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return [torch.tensor(ids[i * seq_len:(i + 1) * seq_len], dtype=torch.long) for i in range(n)]


def sequences(tokenizer: Any, split: str, seq_len: int, count: int, seed: int = 0,
              max_windows_per_doc: int = 4, root: Path | None = None,
              suffixes: tuple[str, ...] = (".py",)) -> Iterator[tuple[str, torch.Tensor]]:
    """Up to ``count`` ``(id, [seq_len] ids)`` pairs from a split, in a seeded document order.

    At most ``max_windows_per_doc`` windows come from one document so a few huge files do not
    dominate; ``id`` is ``"<doc name>#<window>"`` (stable, used as a cache key).
    """
    docs = list_documents(split, root=root, min_bytes=seq_len * 2, suffixes=suffixes)
    random.Random(seed).shuffle(docs)
    made = 0
    for doc in docs:
        for w, window in enumerate(document_windows(tokenizer, doc, seq_len, max_windows_per_doc)):
            if made >= count:
                return
            yield f"{doc.name}#{w}", window
            made += 1
