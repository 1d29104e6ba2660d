"""The accuracy suite, offline: a transformers model under every selector, results kept incrementally.

Three families of cells, each run for every selector of :func:`suite_selectors` (dense; Seer at the
top-k budgets ``nz_ratios`` and at ``thresholds``; Seer with the sink block forced at the top-k
budgets (``seer+sink``, setting ``sink_blocks`` 1); A-shape, oracle top-k and MInference
vertical-slash at the same top-k budgets, so top-k selectors are matched in block budget; every
cell records the density it achieved, active / causal blocks over all layers and heads):

* ``ppl``: perplexity of held-out windows of code (stdlib ``.py``) and prose
  (:func:`vllm_seer.train.data.prose_root`), per corpus and length;
* ``gen``: pass-key and RULER-style samples (:mod:`vllm_seer.eval.ruler`), greedy generation
  (:mod:`vllm_seer.eval.decode`) scored on the decoded text. Dense runs first; a task/length cell
  where dense scores below :data:`DENSE_PASS` is *excluded* and its sparse selectors are not run
  (it cannot tell selectors apart);
* ``heatmap``: per-layer x per-head density of the trained gates, with the checkpoint's own
  sparsity setting, on real held-out windows.

Results live in one JSON file (:func:`run_offline` skips every key already there, so an interrupted
run resumes). Keys: ``ppl``: ``corpus|length|window|selector``; ``gen``: ``task|length|sample|
selector``. :mod:`vllm_seer.eval.suite_report` turns the file into tables, goals and plots.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_seer.eval.decode import eos_ids, greedy
from vllm_seer.eval.ruler import RULER_TASKS, Sample, make_sample, score, vocabulary
from vllm_seer.eval.sparse import STATE, Selector
from vllm_seer.eval.tasks import perplexity
from vllm_seer.train.data import list_documents, prose_root, stdlib_root

log = logging.getLogger(__name__)
CORPORA = ("code", "prose")
DENSE_PASS = 0.8  # a generation cell counts only where dense scores at least this


@dataclass(frozen=True)
class SuiteSize:
    """How many cells the suite runs (``ci``: minutes on a 2-core CPU; ``full``: the GPU run)."""

    ppl_lengths: tuple[int, ...]
    ppl_windows: int
    passkey_lengths: tuple[int, ...]
    depths: tuple[float, ...]
    passkey_seeds: int
    ruler_lengths: tuple[int, ...]
    ruler_samples: int
    ruler_tasks: tuple[str, ...]
    nz_ratios: tuple[float, ...]
    thresholds: tuple[float, ...]
    heatmap_length: int
    heatmap_windows: int


SIZES = {
    "full": SuiteSize((2048, 4096, 8192), 32, (2048, 4096, 8192),
                      tuple(round(i / 9, 3) for i in range(10)), 3, (4096, 8192), 10, RULER_TASKS,
                      (0.5, 0.3, 0.1), (5e-4, 2e-3), 8192, 4),
    # CI: two RULER tasks (one SmolLM2 passes at 1k, one it fails, so one cell is excluded);
    # tests/eval/test_ruler.py builds every task's prompts
    "ci": SuiteSize((1024,), 1, (1024,), (0.5,), 1, (1024,), 1,
                    ("niah_single", "vt"), (0.3,), (), 1024, 1),
}


def suite_selectors(weights: dict[int, torch.Tensor], inv_freq: torch.Tensor,
                    nz_ratios: tuple[float, ...], thresholds: tuple[float, ...],
                    block_size: int = 64) -> list[Selector]:
    """dense, Seer top-k and threshold, Seer top-k with the sink block forced (``seer+sink``,
    setting ``sink_blocks`` 1), then A-shape / oracle / vertical-slash at each top-k."""
    sels = [Selector("dense", block_size=block_size)]
    sels += [Selector("seer", "nz_ratio", nz_ratio=r, block_size=block_size, weights=weights,
                      inv_freq=inv_freq) for r in nz_ratios]
    sels += [Selector("seer", "threshold", threshold=t, block_size=block_size, weights=weights,
                      inv_freq=inv_freq) for t in thresholds]
    sels += [Selector("seer", "nz_ratio", nz_ratio=r, block_size=block_size, weights=weights,
                      inv_freq=inv_freq, sink_blocks=1) for r in nz_ratios]
    for kind in ("ashape", "oracle", "vslash"):
        sels += [Selector(kind, "nz_ratio", nz_ratio=r, block_size=block_size) for r in nz_ratios]
    return sels


def corpus_root(corpus: str) -> tuple[Path, tuple[str, ...]]:
    """(folder, file suffixes) of ``code`` or ``prose``."""
    if corpus == "code":
        return stdlib_root(), (".py",)
    if corpus == "prose":
        return prose_root(), (".txt",)
    raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")


def corpus_windows(tok: Any, corpus: str, length: int, count: int
                   ) -> list[tuple[str, torch.Tensor]]:
    """``count`` non-overlapping held-out windows ``(doc#w, [length] ids)``, round-robin over
    documents (every document's first window, then every second window, ...) for diversity."""
    root, suffixes = corpus_root(corpus)
    per_doc: list[tuple[str, list[int]]] = []
    for doc in list_documents("heldout", root=root, min_bytes=length * 2, suffixes=suffixes):
        if len(per_doc) == count:
            break  # enough documents for one window each: the others are not needed
        ids = tok(doc.text(), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            per_doc.append((doc.name, ids))
    out: list[tuple[str, torch.Tensor]] = []
    w = 0
    while len(out) < count:
        took = False
        for name, ids in per_doc:
            if (w + 1) * length <= len(ids) and len(out) < count:
                out.append((f"{name}#{w}", torch.tensor(ids[w * length:(w + 1) * length])))
                took = True
        if not took:
            break
        w += 1
    if len(out) < count:
        log.warning("%s: only %d held-out windows of %d tokens (asked for %d)", corpus, len(out),
                    length, count)
    return out


def gen_samples(tok: Any, size: SuiteSize) -> list[Sample]:
    """Every pass-key and RULER-style sample of the suite size, in a fixed order."""
    words = vocabulary(tok)
    out = [make_sample(tok, words, "passkey", n, seed, depth)
           for n in size.passkey_lengths for depth in size.depths
           for seed in range(size.passkey_seeds)]
    out += [make_sample(tok, words, task, n, seed) for n in size.ruler_lengths
            for task in size.ruler_tasks for seed in range(size.ruler_samples)]
    return out


def dense_accuracy(results: dict[str, Any]) -> dict[tuple[str, int], float]:
    """(task, length) → dense mean score over the samples done so far."""
    acc: dict[tuple[str, int], list[float]] = {}
    for key, v in results.get("gen", {}).items():
        task, length, _, label = key.split("|", 3)
        if label == "dense":
            acc.setdefault((task, int(length)), []).append(v["score"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


class Suite:
    """One model + gates + results file; :meth:`run` fills in what is missing."""

    def __init__(self, model: Any, tok: Any, selectors: list[Selector], size: SuiteSize,
                 results_path: Path, heatmap_selector: Selector | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.model, self.tok, self.selectors, self.size = model, tok, selectors, size
        self.path = results_path
        self.heatmap_selector = heatmap_selector
        self.results: dict[str, Any] = (json.loads(results_path.read_text())
                                        if results_path.is_file() else {})
        for part in ("ppl", "gen"):
            self.results.setdefault(part, {})
        self.results["meta"] = {**self.results.get("meta", {}), **(meta or {}),
                                "size": asdict(size), "dense_pass": DENSE_PASS,
                                "selectors": [s.label for s in selectors]}
        self.stop = eos_ids(model, tok)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.path)

    def run(self) -> dict[str, Any]:
        self.run_ppl()
        self.run_gen()
        self.run_heatmap()
        return self.results

    def run_ppl(self) -> None:
        s = self.size
        cells = [(c, n) for c in CORPORA for n in s.ppl_lengths]
        for corpus, n in tqdm(cells, desc="perplexity cells"):
            for wid, ids in corpus_windows(self.tok, corpus, n, s.ppl_windows):
                for sel in self.selectors:
                    key = f"{corpus}|{n}|{wid}|{sel.label}"
                    if key not in self.results["ppl"]:
                        ppl, dens = perplexity(self.model, ids, sel)
                        self.results["ppl"][key] = {"ppl": ppl, "density": dens}
                self.save()

    def _gen_one(self, sample: Sample, sel: Selector) -> None:
        key = f"{sample.key}|{sel.label}"
        if key in self.results["gen"]:
            return
        toks, dens = greedy(self.model, sample.prompt, sel, sample.max_new_tokens, self.stop)
        text = self.tok.decode(toks, skip_special_tokens=True)
        self.results["gen"][key] = {"text": text, "tokens": toks, "answers": list(sample.answers),
                                    "score": score(sample.task, text, sample.answers),
                                    "density": dens, "prompt_tokens": len(sample.prompt)}

    def run_gen(self) -> None:
        samples = gen_samples(self.tok, self.size)
        dense = [s for s in self.selectors if s.kind == "dense"]
        sparse = [s for s in self.selectors if s.kind != "dense"]
        for sample in tqdm(samples, desc="generation: dense"):
            for sel in dense:
                self._gen_one(sample, sel)
            self.save()
        acc = dense_accuracy(self.results)
        passing = [s for s in samples if acc.get((s.task, s.length), 0.0) >= DENSE_PASS]
        excluded = sorted({f"{t}|{n}" for (t, n), a in acc.items() if a < DENSE_PASS})
        self.results["meta"]["excluded_cells"] = excluded
        if excluded:
            log.info("dense fails these cells (not run sparse): %s", ", ".join(excluded))
        for sample in tqdm(passing, desc="generation: sparse"):
            for sel in sparse:
                self._gen_one(sample, sel)
            self.save()

    @torch.no_grad()
    def run_heatmap(self) -> None:
        sel = self.heatmap_selector
        if sel is None or "heatmap" in self.results:
            return
        n = self.size.heatmap_length
        dev = next(self.model.parameters()).device
        active: dict[int, torch.Tensor] = {}
        causal: dict[int, float] = {}
        windows = []  # heatmap_windows in all, alternating code and prose
        for i, corpus in enumerate(CORPORA):
            count = (self.size.heatmap_windows + len(CORPORA) - 1 - i) // len(CORPORA)
            windows += [(corpus, w) for w in corpus_windows(self.tok, corpus, n, count)]
        for _, (_, ids) in tqdm(windows, desc="density heatmap"):
            STATE.reset(sel, track_heads=True)
            self.model.model(input_ids=ids[None].to(dev), use_cache=False)
            for layer, a in STATE.heads.items():
                active[layer] = active.get(layer, 0) + a
                causal[layer] = causal.get(layer, 0.0) + STATE.head_causal[layer]
        grid = [(active[i] / causal[i]).tolist() for i in sorted(active)]
        self.results["heatmap"] = {"selector": sel.label, "length": n, "density": grid,
                                   "windows": [f"{c}:{w[0]}" for c, w in windows]}
        self.save()
