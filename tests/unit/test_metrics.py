"""Metrics accumulators (WorkerStats, StepTimer), snapshot summing and the API-server folder (CPU).

CUDA timing is checked with a fake event class standing in for ``torch.cuda.Event``: recording
must never wait for the device, and the events are resolved at flush time only.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_seer import metrics_server
from vllm_seer.backend.common import StepTimer
from vllm_seer.metrics import DIR_ENV, WorkerStats
from vllm_seer.metrics_server import FOLDER_PREFIX, LOCK, families, remove_stale_folders

LABELS = {"model_name": "m", "engine": "0"}


@pytest.fixture
def snapshot_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    return tmp_path


def stats(num_layers: int = 2, count_requests: bool = True, flush_interval: float = 0.0
          ) -> WorkerStats:
    s = WorkerStats(LABELS, {"gates": "g"}, num_layers, torch.device("cpu"), count_requests)
    s.flush_interval = flush_interval  # CPU stats flush every step; CUDA ones every interval
    return s


def snapshot(folder: Path) -> dict:
    (f,) = folder.glob("*.json")
    return json.loads(f.read_text())


class FakeEvent:
    """``torch.cuda.Event`` stand-in on a fake device clock (seconds, advanced by the test)."""

    clock = 0.0
    synchronized: list[FakeEvent] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.t: float | None = None

    def record(self) -> None:
        self.t = FakeEvent.clock

    def synchronize(self) -> None:
        FakeEvent.synchronized.append(self)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert FakeEvent.synchronized, "elapsed_time before any synchronize"
        return (end.t - self.t) * 1e3  # milliseconds, like CUDA


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeEvent.clock, FakeEvent.synchronized = 0.0, []
    capturing = {"on": False}
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    return capturing


def run_layers(timer: StepTimer, gate_s: list[float], attn_s: list[float], computed: list[int]
               ) -> None:
    """Mark around a fake gate and attention per layer, advancing the clock by the given times."""
    for g, a in zip(gate_s, attn_s, strict=True):
        t0 = timer.mark()
        FakeEvent.clock += g
        t1 = timer.mark()
        FakeEvent.clock += a
        t2 = timer.mark()
        timer.add_layer(torch.tensor(computed), t0, t1, t2)


def test_cpu_timer_sums_host_clock(monkeypatch) -> None:
    ticks = iter([0.0, 1.0, 3.0, 10.0, 10.5, 12.0])
    monkeypatch.setattr("vllm_seer.backend.common.time.perf_counter", lambda: next(ticks))
    timer = StepTimer()
    for _ in range(2):
        marks = timer.mark(), timer.mark(), timer.mark()
        timer.add_layer(torch.tensor([4, 2]), *marks)
    assert timer.seconds() == (1.5, 3.5)
    assert timer.computed.tolist() == [8, 4]


def test_cuda_events_resolved_at_flush_only(snapshot_dir, fake_cuda) -> None:
    s = stats(flush_interval=3600.0)
    s.maybe_flush(force=True)  # the info snapshot at start
    for step in (1, 2):
        timer = StepTimer.for_step(step, cuda_events=True)
        assert StepTimer.for_step(step, cuda_events=True) is timer
        run_layers(timer, [0.25, 0.25], [1.0, 2.0], [3, 1])
        s.end_step(timer.computed, [8, 8], timer)
    assert FakeEvent.synchronized == []  # nothing waited for the device on the hot path
    assert snapshot(snapshot_dir)["gate_seconds"]["counts"] == [0] * 16  # not flushed yet
    s.maybe_flush(force=True)
    assert len(FakeEvent.synchronized) == 2  # one wait per step, on its last event
    snap = snapshot(snapshot_dir)
    assert snap["gate_seconds"]["sum"] == pytest.approx(1.0)
    assert snap["sparse_attention_seconds"]["sum"] == pytest.approx(6.0)
    assert sum(snap["gate_seconds"]["counts"]) == 2
    assert snap["prefill_density"]["sum"] == pytest.approx(2 * (6 / 8 + 2 / 8))


def test_step_under_graph_capture_is_not_timed(snapshot_dir, fake_cuda) -> None:
    s = stats()
    timer = StepTimer(cuda_events=True)
    run_layers(timer, [0.1], [0.1], [2])
    fake_cuda["on"] = True
    run_layers(timer, [0.1], [0.1], [2])
    assert timer.seconds() is None
    s.end_step(timer.computed, [8], timer)
    snap = snapshot(snapshot_dir)
    assert sum(snap["gate_seconds"]["counts"]) == 0  # time not observed ...
    assert snap["prefill_density"]["sum"] == pytest.approx(0.5)  # ... blocks still are


def test_untimed_step_and_other_ranks(snapshot_dir) -> None:
    s = stats(count_requests=False)  # a tensor-parallel rank other than 0
    s.add_tokens(100, 5)
    s.add_layer(1, torch.tensor(7), 9)
    s.end_step(torch.tensor([7]), [9], None)
    snap = snapshot(snapshot_dir)
    assert snap["tokens"] == {"sparse": 0, "dense": 0}
    assert (snap["computed"], snap["possible"]) == ([0, 7], [0, 9])
    assert sum(snap["prefill_density"]["counts"]) == 0 and not snap["count_requests"]


def test_families_sum_ranks_and_count_tokens_once() -> None:
    def snap(rank: int) -> dict:
        return {"labels": LABELS, "info": {"gates": "g"}, "computed": [3, 4],
                "possible": [10, 10], "tokens": {"sparse": 64, "dense": 1},
                "prefill_density": {"counts": [0] * 10 + [1], "sum": 0.35},
                "gate_seconds": {"counts": [1] + [0] * 15, "sum": 0.1},
                "sparse_attention_seconds": {"counts": [0] * 16, "sum": 0.0},
                "count_requests": rank == 0}

    fams = {f.name: f for f in families([snap(0), snap(1)])}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    layer0 = tuple(sorted({**LABELS, "layer": "0"}.items()))
    assert samples[("vllm:seer_blocks_computed_total", layer0)] == 6  # heads of both ranks
    assert samples[("vllm:seer_blocks_possible_total", layer0)] == 20
    sparse = tuple(sorted({**LABELS, "path": "sparse"}.items()))
    assert samples[("vllm:seer_prefill_tokens_total", sparse)] == 64  # rank 0 only
    lab = tuple(sorted(LABELS.items()))
    assert samples[("vllm:seer_gate_seconds_count", lab)] == 1
    assert samples[("vllm:seer_prefill_density_count", lab)] == 1


def locked_folder(root: Path, name: str) -> int:
    folder = root / (FOLDER_PREFIX + name)
    folder.mkdir()
    fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_stale_folders_removed_live_ones_kept(tmp_path) -> None:
    live = locked_folder(tmp_path, "live")
    os.close(locked_folder(tmp_path, "dead"))  # owner gone: lock released
    (tmp_path / (FOLDER_PREFIX + "young")).mkdir()  # no lock yet: maybe being created
    old = tmp_path / (FOLDER_PREFIX + "old")
    old.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (tmp_path / "unrelated").mkdir()
    try:
        removed = remove_stale_folders(tmp_path)
    finally:
        os.close(live)
    assert sorted(p.name for p in removed) == [FOLDER_PREFIX + "dead", FOLDER_PREFIX + "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        FOLDER_PREFIX + "live", FOLDER_PREFIX + "young", "unrelated"])


CHILD = """
import os, sys, time
from vllm_seer.metrics_server import setup_api_server_metrics
print(setup_api_server_metrics(), flush=True)
if sys.argv[1] == "hang":
    time.sleep(60)
"""


def test_api_server_folder_fresh_removed_at_exit_and_after_sigkill(tmp_path) -> None:
    """Each top-level process gets a new folder even when one is inherited; a normal exit removes
    it; a SIGKILLed owner's folder is removed by the next process that sets up."""
    env = {**os.environ, "TMPDIR": str(tmp_path), DIR_ENV: str(tmp_path / "inherited")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def child(mode: str) -> tuple[subprocess.Popen[str], Path]:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], env=env, text=True,
                                stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return proc, Path(proc.stdout.readline().strip())

    proc, killed = child("hang")
    try:
        assert killed.parent == tmp_path and killed.name.startswith(FOLDER_PREFIX)
        assert (killed / LOCK).is_file()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed.is_dir()  # atexit cannot run on SIGKILL
    proc, folder = child("exit")
    assert proc.wait(timeout=60) == 0
    assert folder != killed
    assert not folder.exists()  # atexit
    assert not killed.exists()  # collected at the second set-up
    assert not (tmp_path / "inherited").exists()


def test_setup_is_a_no_op_in_multiprocess_mode(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(metrics_server, "_state", {})
    assert metrics_server.setup_api_server_metrics() is None
    assert not list(tmp_path.iterdir())


SPAWNER = """
import multiprocessing as mp, sys
from pathlib import Path
from vllm_seer.metrics_server import setup_api_server_metrics

class OnUnpickle:  # runs the plugin while the child unpickles its arguments, like vLLM's config
    def __setstate__(self, state):
        self.__dict__.update(state)
        Path(state["out"]).write_text(repr(setup_api_server_metrics()))

def noop(arg):
    pass

if __name__ == "__main__":
    print(setup_api_server_metrics())
    arg = OnUnpickle()
    arg.out = sys.argv[1]
    child = mp.get_context("spawn").Process(target=noop, args=(arg,))
    child.start()
    child.join(60)
"""


def test_spawned_children_keep_the_servers_folder(tmp_path) -> None:
    """vLLM's spawned processes run the plugin before ``parent_process()`` is set: they must not
    make (and switch their workers to) a folder of their own."""
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop(DIR_ENV, None)
    out = tmp_path / "child.txt"
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip().startswith(str(tmp_path / FOLDER_PREFIX))
    assert out.read_text() == "None"
    assert list(tmp_path.glob(FOLDER_PREFIX + "*")) == []  # the parent's removed, no other made
