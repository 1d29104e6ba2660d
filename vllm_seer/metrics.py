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
  double count; tensor-parallel ranks other than 0 report blocks only (their own heads), not tokens.

Blocks computed are counted on the device and read back at flush time only (at most every
``flush_interval`` seconds on CUDA; on CPU reading is free and every prefill step is flushed).
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

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


class WorkerStats:
    """Per-worker accumulators; fed by the backend, flushed to a sink.

    Args:
        labels: ``{"model_name": ..., "engine": ...}``.
        info: the config info labels.
        num_layers: layers of the model.
        device: where the per-layer block counters live.
        count_requests: False on tensor-parallel ranks other than 0 (tokens/histograms counted once).
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
        self._pending: list[tuple[torch.Tensor, list[int], float | None, float | None]] = []
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
                 gate_s: float | None, attn_s: float | None) -> None:
        """Close a step that took the sparse path. ``per_request_computed``: ``[R]`` device;
        times ``None`` where they were not measured (they are then not observed)."""
        if self.count_requests:
            self._pending.append((per_request_computed, per_request_possible, gate_s, attn_s))
        self.maybe_flush()

    def maybe_flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._dirty or (not force and now - self._last_flush < self.flush_interval):
            return
        self._last_flush = now
        self.computed = self.computed_dev.tolist()
        new: dict[str, list[float]] = {name: [] for name in HIST_NAMES}
        for comp, poss, gate_s, attn_s in self._pending:
            new["prefill_density"] += [c / p for c, p in zip(comp.tolist(), poss, strict=True) if p]
            if gate_s is not None and attn_s is not None:
                new["gate_seconds"].append(gate_s)
                new["sparse_attention_seconds"].append(attn_s)
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
    """In the top-level (API-server) process: create the snapshot folder and register the collector.

    Idempotent; a no-op in spawned children (they inherit ``VLLM_SEER_METRICS_DIR`` from the API
    server, however they were started) and when ``PROMETHEUS_MULTIPROC_DIR`` is set.
    """
    if (multiprocessing.parent_process() is not None or os.environ.get(DIR_ENV)
            or os.environ.get("PROMETHEUS_MULTIPROC_DIR")):
        return
    folder = tempfile.mkdtemp(prefix="vllm-seer-metrics-")
    os.environ[DIR_ENV] = folder
    atexit.register(shutil.rmtree, folder, True)
    from prometheus_client import REGISTRY

    REGISTRY.register(SnapshotCollector(Path(folder)))


class SnapshotCollector(Collector):
    """Sums the worker snapshots in a folder into Prometheus metric families at scrape time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Any]:
        snaps = []
        for f in sorted(self.folder.glob("*.json")):
            try:
                snaps.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError) as e:  # a file being replaced; next scrape
                logger.debug("skipping metrics snapshot %s: %s", f, e)
        yield from families(snaps)


def families(snaps: list[dict[str, Any]]) -> Iterator[Any]:
    """Metric families from worker snapshots (summed over processes with equal labels)."""
    base = ["model_name", "engine"]
    blocks = {k: CounterMetricFamily(PREFIX + k, HELP[k], labels=[*base, "layer"])
              for k in ("blocks_computed", "blocks_possible")}
    tokens = CounterMetricFamily(PREFIX + "prefill_tokens", HELP["prefill_tokens"],
                                 labels=[*base, "path"])
    sums: dict[tuple[str, ...], float] = {}
    hist_state: dict[tuple[str, str, str], tuple[list[int], float]] = {}
    infos: dict[tuple[str, ...], dict[str, str]] = {}
    for s in snaps:
        lab = (s["labels"]["model_name"], s["labels"]["engine"])
        for key, fam in (("computed", "blocks_computed"), ("possible", "blocks_possible")):
            for layer, v in enumerate(s[key]):
                k = (fam, *lab, str(layer))
                sums[k] = sums.get(k, 0) + v
        if s["count_requests"]:
            for path, v in s["tokens"].items():
                k = ("tokens", *lab, path)
                sums[k] = sums.get(k, 0) + v
            for name in HIST_NAMES:
                counts, total = hist_state.get((name, *lab), ([0] * 0, 0.0))
                new = s[name]["counts"]
                counts = [a + b for a, b in zip(counts, new, strict=True)] if counts else list(new)
                hist_state[(name, *lab)] = (counts, total + s[name]["sum"])
        infos[lab] = s["info"]
    for k, v in sums.items():
        (tokens if k[0] == "tokens" else blocks[k[0]]).add_metric(list(k[1:]), v)
    yield from blocks.values()
    yield tokens
    for name in HIST_NAMES:
        bounds = DENSITY_BUCKETS if name == "prefill_density" else SECONDS_BUCKETS
        fam = HistogramMetricFamily(PREFIX + name, HELP[name], labels=base)
        for (n, *lab), (counts, total) in hist_state.items():
            if n != name:
                continue
            cum, buckets = 0, []
            for bound, c in zip([*map(str, bounds), "+Inf"], counts, strict=True):
                cum += c
                buckets.append((bound, cum))
            fam.add_metric(lab, buckets, total)
        yield fam
    if infos:
        keys = sorted(next(iter(infos.values())))
        info = GaugeMetricFamily(PREFIX + "config_info", HELP["config_info"], labels=[*base, *keys])
        for lab, i in infos.items():
            info.add_metric([*lab, *(i[k] for k in keys)], 1)
        yield info
