"""StepTimer with real CUDA events (GPU host): no host sync while marking, resolved at flush time,
no events recorded under graph capture. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_seer.backend.common import StepTimer
from vllm_seer.metrics import DIR_ENV, WorkerStats

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def spin(ms: float) -> None:
    """Keep the GPU busy about ``ms`` milliseconds (one kernel, no host wait)."""
    torch.cuda._sleep(int(ms * 1e-3 * torch.cuda.get_device_properties(0).clock_rate * 1e3))


def test_cuda_step_timing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    dev = torch.device("cuda")
    stats = WorkerStats({"model_name": "m", "engine": "0"}, {}, 2, dev)
    assert stats.flush_interval == 1.0
    stats.flush_interval = 3600.0
    stats.maybe_flush(force=True)
    # made before the check: a tensor built from a host list is a synchronous pageable copy,
    # which is the test's own doing, not the step path's
    per_request = torch.tensor([3, 5], device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call on the hot path raises
    try:
        for step in range(3):
            timer = StepTimer.for_step(step, cuda_events=True)
            for layer in range(2):
                t0 = timer.mark()
                spin(20)
                t1 = timer.mark()
                spin(40)
                t2 = timer.mark()
                computed = per_request * 1  # a device op, like the backend's block_count sum
                stats.add_layer(layer, computed.sum(), 16)
                timer.add_layer(computed, t0, t1, t2)
            stats.end_step(timer.computed, [16, 16], timer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats.maybe_flush(force=True)
    snap = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sum(snap["gate_seconds"]["counts"]) == 3
    gate, attn = snap["gate_seconds"]["sum"], snap["sparse_attention_seconds"]["sum"]
    assert 0.06 < gate < 0.6 and 1.5 < attn / gate < 2.5  # 3 steps x 2 layers x 20 / 40 ms
    assert snap["computed"] == [24, 24]
    assert snap["prefill_density"]["sum"] == pytest.approx(3 * (6 / 16 + 10 / 16))


def test_no_events_under_graph_capture() -> None:
    timer = StepTimer(cuda_events=True)
    x = torch.zeros(4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t0 = timer.mark()
        x += 1
        timer.add_layer(torch.ones(1, dtype=torch.int64, device="cuda"), t0, timer.mark(),
                        timer.mark())
    graph.replay()
    torch.cuda.synchronize()
    assert t0 is None and timer.seconds() is None
