"""API-server side of the Seer metrics (snapshot route): the folder workers write to and the
collector that sums their snapshots on ``/metrics``.

The folder (``$TMPDIR/vllm-seer-metrics-XXXX``) belongs to the top-level process of one server. A
fresh one is made at every start (an inherited ``VLLM_SEER_METRICS_DIR`` is followed only while a
live process owns that folder), so a restarted server starts from zero. It is removed at exit
(``atexit``: vLLM's API server exits normally on SIGTERM/SIGINT). The owner holds an ``flock`` on
``.lock`` inside it for its whole life; a folder whose lock can be taken belongs to a process that
died without cleaning up (SIGKILL, crash, killed during start-up) and is removed by the next server
that starts.
"""

from __future__ import annotations

import atexit
import fcntl
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

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from vllm_seer.metrics import DENSITY_BUCKETS, DIR_ENV, HELP, HIST_NAMES, PREFIX, SECONDS_BUCKETS

logger = logging.getLogger(__name__)

FOLDER_PREFIX = "vllm-seer-metrics-"
LOCK = ".lock"
UNLOCKED_GRACE_S = 600.0  # a folder without a lock file this young may be one being created
_state: dict[str, Any] = {}  # this process's folder, lock descriptor and collector


def setup_api_server_metrics() -> Path | None:
    """In the top-level (API-server) process: create the snapshot folder and register the collector.

    Idempotent; a no-op in spawned children (they inherit ``VLLM_SEER_METRICS_DIR`` from the API
    server, however they were started) and when ``PROMETHEUS_MULTIPROC_DIR`` is set. Returns the
    folder, or ``None`` where there is none.
    """
    if "folder" in _state:
        return _state["folder"]
    if not is_top_level_process() or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    inherited = os.environ.get(DIR_ENV)
    if inherited and is_live(Path(inherited)):
        return None  # a child of a live server started some other way: report there
    if inherited:
        logger.debug("ignoring stale %s=%s: this server gets its own folder", DIR_ENV, inherited)
    root = Path(tempfile.gettempdir())
    remove_stale_folders(root)
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=root))
    fd = os.open(folder / (LOCK + ".tmp"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # locked before it gets its name: never seen unlocked
    os.rename(folder / (LOCK + ".tmp"), folder / LOCK)
    os.environ[DIR_ENV] = str(folder)
    atexit.register(remove_folder, folder)
    from prometheus_client import REGISTRY

    collector = SnapshotCollector(folder)
    REGISTRY.register(collector)
    _state.update(folder=folder, fd=fd, collector=collector)
    return folder


def is_top_level_process() -> bool:
    """Not a multiprocessing child. The name test matters: vLLM's spawned children run this
    plugin while unpickling their arguments, before ``parent_process()`` is set."""
    return (multiprocessing.parent_process() is None
            and multiprocessing.current_process().name == "MainProcess")


def is_live(folder: Path) -> bool:
    """Whether a live process owns ``folder`` (holds the lock of its ``.lock``)."""
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def remove_stale_folders(root: Path) -> list[Path]:
    """Remove snapshot folders under ``root`` whose owner process is gone; returns them."""
    removed = []
    for folder in root.glob(FOLDER_PREFIX + "*"):
        try:
            fd = os.open(folder / LOCK, os.O_RDWR)
        except FileNotFoundError:
            try:  # no lock: being created now, or left by a version without locks
                old = time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
            except OSError:
                continue
            if old:
                remove_folder(folder)
                removed.append(folder)
            continue
        except OSError:  # not ours to touch (permissions)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live server
            continue
        finally:
            os.close(fd)
        remove_folder(folder)
        removed.append(folder)
    if removed:
        logger.info("removed %d stale Seer metrics folder(s) in %s", len(removed), root)
    return removed


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
                counts, total = hist_state.get((name, *lab), ([], 0.0))
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
