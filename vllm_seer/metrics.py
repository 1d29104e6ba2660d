"""Seer metrics: accumulated in the worker, exported on the API server's ``/metrics``.

vLLM's workers are separate processes from the API server that serves ``/metrics``. Two routes,
picked per worker process, neither needing the user to set an environment variable:

* ``PROMETHEUS_MULTIPROC_DIR`` set (vLLM sets it for ``--api-server-count > 1``; users may set it):
  the worker updates plain ``prometheus_client`` metrics, which vLLM's multiprocess registry
  aggregates.
* otherwise the plugin's ``register()`` in the API-server process creates a private folder
  (``VLLM_SEER_METRICS_DIR``, inherited by the spawned workers) and registers a collector that reads
  the per-process JSON snapshots workers write there at flush time. Each process writes only its own
  cumulative file (atomic rename), so restarts of a server (new folder) and several workers never
  double count.

Several workers per engine: every worker counts the blocks of its own heads (tensor parallelism)
and its own layers (pipeline parallelism; labels are global layer indices), so the per-layer
counters sum to the single-worker totals. Prefill tokens and the per-step histograms are counted by
one worker only (``count_requests``): tensor-parallel rank 0 of the reporting pipeline stage
(``vllm_seer.backend.stage.reporting_stage``), since every worker sees every step.

Blocks computed are counted on the device and read back at flush time only (at most every
``flush_interval`` seconds on CUDA; on CPU reading is free and every prefill step is flushed). Gate
and attention times arrive as :class:`StepTiming` objects (host clock on CPU, CUDA event pairs on
CUDA) that are turned into seconds at flush time too. The API-server side (folder, collector) is in
``vllm_seer.metrics_server``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch

DIR_ENV = "VLLM_SEER_METRICS_DIR"
PREFIX = "vllm:seer_"
DENSITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
HIST_NAMES = ("prefill_density", "gate_seconds", "sparse_attention_seconds")
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
HELP = {
    "blocks_computed": "Attention blocks (64x64) computed by the Seer sparse path, per layer.",
    "blocks_possible": "Causal attention blocks a dense computation of the same rows would compute.",
    "prefill_tokens": "Prefill tokens by path (sparse = gate + block-sparse attention).",
    "prefill_density": "Density (computed / possible blocks) of each sparse prefill step.",
    "gate_seconds": "Gate time per prefill step, all layers.",
    "sparse_attention_seconds": "Sparse attention time per prefill step, all layers.",
    "config_info": "Active Seer configuration.",
}


class Histogram:
    """Cumulative histogram state (bucket counts, sum, count) that serialises to JSON."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "sum": self.sum}


class StepTiming(Protocol):
    """Gate / attention time of one step, resolved lazily (``backend.common.StepTimer``)."""

    def seconds(self) -> tuple[float, float] | None:
        """``(gate_s, attn_s)`` summed over layers, or ``None`` where the step was not timed.
        May wait for the device (called at flush time only)."""
        ...


class WorkerStats:
    """Per-worker accumulators; fed by the backend, flushed to a sink.

    Args:
        labels: ``{"model_name": ..., "engine": ...}``.
        info: the config info labels.
        num_layers: layers of the whole model (all pipeline stages; indices are global).
        device: where the per-layer block counters live.
        count_requests: whether this worker counts prefill tokens and the per-step histograms:
            True on exactly one worker of an engine (tensor-parallel rank 0 of the reporting
            pipeline stage), so they are counted once.
    """

    def __init__(self, labels: dict[str, str], info: dict[str, str], num_layers: int,
                 device: torch.device, count_requests: bool = True,
                 flush_interval: float = 1.0) -> None:
        self.labels, self.info = labels, info
        self.count_requests = count_requests
        self.flush_interval = flush_interval if device.type != "cpu" else 0.0
        self.computed_dev = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.computed = [0] * num_layers
        self.possible = [0] * num_layers
        self.tokens = {"sparse": 0, "dense": 0}
        self.density = Histogram(DENSITY_BUCKETS)
        self.gate = Histogram(SECONDS_BUCKETS)
        self.attn = Histogram(SECONDS_BUCKETS)
        self._pending: list[tuple[torch.Tensor, list[int], StepTiming | None]] = []
        self._last_flush = 0.0
        self._dirty = True  # publish the info metric once at start
        self.sink = make_sink(self)

    def add_tokens(self, sparse: int, dense: int) -> None:
        """Prefill tokens of one step by path (host-known, counted in the metadata builder)."""
        if self.count_requests and (sparse or dense):
            self.tokens["sparse"] += sparse
            self.tokens["dense"] += dense
            self._dirty = True

    def add_layer(self, layer: int, computed: torch.Tensor, possible: int) -> None:
        """Blocks of one layer of one step; ``computed`` is a device scalar (no sync)."""
        self.computed_dev[layer] += computed
        self.possible[layer] += possible
        self._dirty = True

    def end_step(self, per_request_computed: torch.Tensor, per_request_possible: list[int],
                 timing: StepTiming | None) -> None:
        """Close a step that took the sparse path. ``per_request_computed``: ``[R]`` device;
        ``timing`` is resolved at flush time (``None``, or resolving to ``None``: not observed).
        Only the ranks that count requests keep steps (and their device events) pending."""
        if self.count_requests:
            self._pending.append((per_request_computed, per_request_possible, timing))
            self._dirty = True
        self.maybe_flush()

    def maybe_flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last_flush < self.flush_interval):
            return
        self._last_flush = now
        self.computed = self.computed_dev.tolist()
        new: dict[str, list[float]] = {name: [] for name in HIST_NAMES}
        for comp, poss, timing in self._pending:
            new["prefill_density"] += [c / p for c, p in zip(comp.tolist(), poss, strict=True) if p]
            seconds = timing.seconds() if timing is not None else None
            if seconds is not None:
                new["gate_seconds"].append(seconds[0])
                new["sparse_attention_seconds"].append(seconds[1])
        for name, hist in self.histograms().items():
            for value in new[name]:
                hist.observe(value)
        self._pending.clear()
        self._dirty = False
        self.sink.publish(self, new)

    def histograms(self) -> dict[str, Histogram]:
        return dict(zip(HIST_NAMES, (self.density, self.gate, self.attn), strict=True))

    def snapshot(self) -> dict[str, Any]:
        return {
            "labels": self.labels, "info": self.info, "computed": self.computed,
            "possible": self.possible, "tokens": self.tokens,
            **{name: h.to_json() for name, h in self.histograms().items()},
            "count_requests": self.count_requests,
        }


class FileSink:
    """Writes this process's cumulative snapshot to ``$VLLM_SEER_METRICS_DIR/<pid>.json``."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"{os.getpid()}.json"

    def publish(self, stats: WorkerStats, new: dict[str, list[float]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats.snapshot()))
        os.replace(tmp, self.path)


class PrometheusSink:
    """Plain prometheus_client metrics (multiprocess mode); increments by the delta since last."""

    def __init__(self, stats: WorkerStats) -> None:
        from prometheus_client import Counter, Gauge
        from prometheus_client import Histogram as PHist

        names = ["model_name", "engine"]
        self.blocks = {k: Counter(PREFIX + k, HELP[k], [*names, "layer"])
                       for k in ("blocks_computed", "blocks_possible")}
        self.tokens = Counter(PREFIX + "prefill_tokens", HELP["prefill_tokens"], [*names, "path"])
        self.hists = {
            "prefill_density": PHist(PREFIX + "prefill_density", HELP["prefill_density"], names,
                                     buckets=DENSITY_BUCKETS),
            "gate_seconds": PHist(PREFIX + "gate_seconds", HELP["gate_seconds"], names,
                                  buckets=SECONDS_BUCKETS),
            "sparse_attention_seconds": PHist(PREFIX + "sparse_attention_seconds",
                                              HELP["sparse_attention_seconds"], names,
                                              buckets=SECONDS_BUCKETS),
        }
        info = Gauge(PREFIX + "config_info", HELP["config_info"], [*names, *stats.info],
                     multiprocess_mode="max")
        info.labels(**stats.labels, **stats.info).set(1)
        self._last: dict[str, Any] = json.loads(json.dumps(stats.snapshot()))

    def publish(self, stats: WorkerStats, new: dict[str, list[float]]) -> None:
        snap, last, lab = stats.snapshot(), self._last, stats.labels
        for key, fam in (("computed", "blocks_computed"), ("possible", "blocks_possible")):
            for layer, (a, b) in enumerate(zip(snap[key], last[key], strict=True)):
                if a > b:
                    self.blocks[fam].labels(**lab, layer=str(layer)).inc(a - b)
        for path in ("sparse", "dense"):
            delta = snap["tokens"][path] - last["tokens"][path]
            if delta:
                self.tokens.labels(**lab, path=path).inc(delta)
        for name, hist in self.hists.items():
            for value in new[name]:
                hist.labels(**lab).observe(value)
        self._last = json.loads(json.dumps(snap))


def make_sink(stats: WorkerStats) -> FileSink | PrometheusSink:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return PrometheusSink(stats)
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise RuntimeError(f"{DIR_ENV} is not set: the vllm-seer plugin's register() did not run "
                           "in the API-server process")
    return FileSink(Path(folder))


def setup_api_server_metrics() -> None:
    """In the API-server process: the snapshot folder and its collector (see ``metrics_server``)."""
    from vllm_seer.metrics_server import setup_api_server_metrics as setup

    setup()
