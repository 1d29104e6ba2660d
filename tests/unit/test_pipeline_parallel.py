"""Pipeline parallelism (CPU, in-process): vLLM's own configs and stage-to-layer mapping.

Each stage of a ``--pipeline-parallel-size N`` engine gets a real ``VllmConfig`` for the tiny
4-layer model (built by vLLM's ``EngineArgs``, with ``parallel_config.rank`` set as vLLM's workers
set it) and builds the Seer runtime the way a worker does: every plugin start-up check, then the
gates of its own layers only. The per-step accounting is then run through the real routing
(``build_step``) and the real CPU sparse path (``run_sparse_reference``) on random data, layer by
layer on the stage that owns the layer, and the workers' snapshots are summed by the API server's
collector (``families``) and compared with a single-stage engine fed the same data.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_seer.backend import compat
from vllm_seer.backend.common import (
    SeerRuntime,
    StepTimer,
    build_step,
    finish_step,
    run_sparse_reference,
)
from vllm_seer.backend.runtime import check_startup
from vllm_seer.backend.stage import PipelineStage, reporting_stage
from vllm_seer.checkpoint import GateCheckpointError, load_gates
from vllm_seer.metrics import DIR_ENV
from vllm_seer.metrics_server import families
from vllm_seer.testing import ensure_test_model

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 4, 2, 64  # the tiny model's
LONG, PAGE = 1024, 16
SPARSE = {"sparsity_method": "threshold", "threshold": 0.08, "last_block_dense": False,
          "min_prefill_tokens": 64}


@pytest.fixture(scope="module")
def model():
    return ensure_test_model()


@pytest.fixture(scope="module")
def engine_configs(model):
    """``pp`` → a real ``VllmConfig`` of the tiny model at ``--pipeline-parallel-size pp``."""
    from vllm.engine.arg_utils import EngineArgs

    made: dict[tuple[int, str], object] = {}

    def make(pp: int, dense_layers: tuple[int, ...] = ()) -> object:
        key = (pp, ",".join(map(str, dense_layers)))
        if key not in made:
            seer = {"gates": str(model / "gates"), **SPARSE, "dense_layers": list(dense_layers)}
            args = EngineArgs(model=str(model), pipeline_parallel_size=pp, dtype="float32",
                              max_model_len=4096, enforce_eager=True,
                              additional_config={"seer": seer})
            made[key] = args.create_engine_config()
        return made[key]

    return make


@pytest.fixture(autouse=True)
def snapshot_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    return tmp_path


def stage_runtimes(cfg) -> list[SeerRuntime]:
    """One runtime per pipeline stage, each built as its worker builds it (rank set by vLLM's
    layout DP x PP x TP, tensor-parallel size 1 here)."""
    pc = cfg.parallel_config
    out = []
    for rank in range(pc.pipeline_parallel_size):
        pc.rank = rank
        try:
            start, end = cfg.model_config.get_layers_start_end_indices(pc)  # vLLM's own, per rank
            stage = PipelineStage.of(compat.total_num_layers(cfg.model_config), rank,
                                     pc.pipeline_parallel_size)
            assert stage.layers == range(start, end)
            assert cfg.model_config.get_num_layers(pc) == len(stage.layers)  # one stage's count
            config = check_startup(cfg)  # settings, served model, base model
            out.append(SeerRuntime(cfg, config, HEADS, KV_HEADS, HEAD_DIM, 0,
                                   torch.device("cpu"), stage))  # gate checkpoint vs model
        finally:
            pc.rank = 0
    return out


@pytest.mark.parametrize(("pp", "split"), [(2, [[0, 1], [2, 3]]), (3, [[0], [1, 2], [3]])],
                         ids=["pp2", "pp3-uneven"])
def test_each_stage_passes_the_checks_and_holds_its_own_gates(engine_configs, model, pp, split):
    runtimes = stage_runtimes(engine_configs(pp))
    ckpt = load_gates(model / "gates")
    assert [list(rt.stage.layers) for rt in runtimes] == split  # vLLM's split, [1, 2, 1] for 3
    for rt in runtimes:
        assert rt.num_layers == LAYERS  # validated against the whole model
        assert sorted(rt.weights) == list(rt.stage.layers)  # exactly its layers, global indices
        for i, w in rt.weights.items():
            torch.testing.assert_close(w, ckpt.weights[i].float(), rtol=0, atol=0)
        assert rt.sparse_layers == tuple(rt.stage.layers)
        assert rt.last_sparse_layer == rt.stage.layers[-1]
        assert not rt.has_dense_layers
        for i in rt.stage.layers:  # the names vLLM's Llama gives its attention layers
            assert rt.layer_of(f"model.layers.{i}.self_attn.attn") == i
        other = next(i for i in range(LAYERS) if i not in rt.stage.layers)
        with pytest.raises(RuntimeError, match=rf"model\.layers\.{other}\..*not a layer of "
                                               rf"pipeline stage {rt.stage.rank}/{pp}"):
            rt.layer_of(f"model.layers.{other}.self_attn.attn")
    assert [rt.stats.count_requests for rt in runtimes] == [True] + [False] * (pp - 1)


def test_gates_of_another_depth_are_refused_on_every_stage(engine_configs, tmp_path):
    from vllm_seer.tiny_model import build_random_gates

    cfg = engine_configs(2)
    hf = {k: getattr(cfg.model_config.hf_config, k) for k in
          ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim")}
    gates = build_random_gates(tmp_path / "gates2", {**hf, "num_hidden_layers": 2})
    config = dataclasses.replace(check_startup(cfg), gates=gates, gates_source=str(gates))
    for rank in range(2):  # a 2-layer checkpoint matches one stage's count but not the model's
        with pytest.raises(GateCheckpointError, match="num_hidden_layers=2 but the served model "
                                                      ".* has num_hidden_layers=4"):
            SeerRuntime(cfg, config, HEADS, KV_HEADS, HEAD_DIM, 0, torch.device("cpu"),
                        PipelineStage.of(LAYERS, rank, 2))


def test_outside_a_worker_there_is_one_stage():
    assert compat.pp_rank_and_size() == (0, 1)  # no pipeline group in this process
    with pytest.raises(ValueError, match="pipeline stage 2 of 2 does not exist"):
        PipelineStage.of(LAYERS, 2, 2)


def test_stage_mapping_follows_vllm_partition_override(monkeypatch):
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,3")
    assert [PipelineStage.of(LAYERS, r, 2).layers for r in range(2)] == [range(0, 1),
                                                                        range(1, 4)]


def test_dense_layers_across_stages(engine_configs):
    rts = stage_runtimes(engine_configs(2, (1, 2)))  # one dense layer on each stage
    assert [rt.sparse_layers for rt in rts] == [(0,), (3,)]
    assert [rt.last_sparse_layer for rt in rts] == [0, 3]
    assert all(rt.has_dense_layers for rt in rts)
    assert [rt.stats.count_requests for rt in rts] == [True, False]
    rts = stage_runtimes(engine_configs(2, (0, 1)))  # stage 0 all dense: stage 1 reports
    assert [rt.sparse_layers for rt in rts] == [(), (2, 3)]
    assert [rt.last_sparse_layer for rt in rts] == [None, 3]
    assert [rt.stats.count_requests for rt in rts] == [False, True]
    assert reporting_stage(LAYERS, 3, (0, 1, 2, 3)) == 0  # nothing sparse: stage 0 counts


def common_metadata(qlen: int, seq_len: int):
    """vLLM's ``CommonAttentionMetadata`` of one prefill request (pages in order)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    pages = -(-seq_len // PAGE)
    qsl = torch.tensor([0, qlen], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl,
        seq_lens=torch.tensor([seq_len], dtype=torch.int32), num_reqs=1, num_actual_tokens=qlen,
        max_query_len=qlen, max_seq_len=seq_len,
        block_table_tensor=torch.arange(pages, dtype=torch.int32)[None],
        slot_mapping=torch.arange(seq_len - qlen, seq_len, dtype=torch.int64), causal=True)


def layer_data(layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s queries ``[LONG, Hq, D]`` and paged K/V ``[pages, PAGE, Hkv, D]``."""
    gen = torch.Generator().manual_seed(100 + layer)
    q = torch.randn(LONG, HEADS, HEAD_DIM, generator=gen) * 3
    k = torch.randn(LONG // PAGE, PAGE, KV_HEADS, HEAD_DIM, generator=gen) * 3
    return q, k, torch.randn(k.shape, generator=gen)


def run_prefill(runtimes: list[SeerRuntime], step: int) -> list[dict]:
    """One 1024-token prefill through every stage in pipeline order, as each stage's builder and
    impls run it; returns the workers' snapshots."""
    built: list[object] = []

    def parent_build(common_prefix_len: int, cm: object, fast_build: bool) -> None:
        built.append(cm)  # the CPU parent builder's metadata is not needed for the counts

    for rt in runtimes:
        built.clear()
        md = build_step(parent_build, 0, common_metadata(LONG, LONG), False, rt,
                        rt.num_heads, True, step + rt.stage.rank, "cpu")
        # the parent builder's metadata is built for the whole batch only where a dense layer of
        # this stage needs it
        assert md.plan is not None and bool(built) == rt.has_dense_layers
        timer = StepTimer.for_step(md.step)
        for layer in rt.stage.layers:
            if layer in rt.config.dense_layers:
                continue  # the inherited CPU kernel's work: not counted
            q, k, v = layer_data(layer)
            out = torch.zeros_like(q)
            run_sparse_reference(rt, layer, q, k, v, md.plan, out, HEAD_DIM ** -0.5, timer)
            assert torch.isfinite(out).all()
            if layer == rt.last_sparse_layer:
                finish_step(rt, md.plan, timer)
        rt.stats.maybe_flush(force=True)
    return [rt.stats.snapshot() for rt in runtimes]


def summed(snaps: list[dict]) -> dict[tuple[str, str], float]:
    """``(sample name, layer or path) → value`` as the API server's collector sums them."""
    out = {}
    for fam in families(snaps):
        for s in fam.samples:
            out[(s.name, s.labels.get("layer") or s.labels.get("path") or "")] = s.value
    return out


@pytest.mark.parametrize(("pp", "dense"), [(2, ()), (3, ()), (2, (0, 1))],
                         ids=["pp2", "pp3-uneven", "pp2-stage0-dense"])
def test_stage_counts_sum_to_the_single_stage_totals(engine_configs, pp, dense):
    single = summed(run_prefill(stage_runtimes(engine_configs(1, dense)), step=10_000))
    snaps = run_prefill(stage_runtimes(engine_configs(pp, dense)), step=20_000)
    staged = summed(snaps)
    possible = HEADS * sum(range(1, LONG // 64 + 1))
    for layer in map(str, range(LAYERS)):
        comp = ("vllm:seer_blocks_computed_total", layer)
        poss = ("vllm:seer_blocks_possible_total", layer)
        want = 0 if int(layer) in dense else possible
        assert single[poss] == staged[poss] == want
        assert staged[comp] == single[comp]  # the same gates on the same data, any stage
        if int(layer) not in dense:
            assert 0 < staged[comp] < possible
    for rt_snap, layers in zip(snaps, [compat.stage_layers(LAYERS, r, pp) for r in range(pp)],
                               strict=True):  # each worker counted its own layers only
        assert all(rt_snap["possible"][i] == 0 for i in range(LAYERS) if i not in layers)
    tokens = ("vllm:seer_prefill_tokens_total", "sparse")
    assert single[tokens] == staged[tokens] == LONG  # counted once, not once per stage
    assert sum(s["count_requests"] for s in snaps) == 1
    assert sum(s["tokens"]["sparse"] for s in snaps) == LONG
    for hist in ("prefill_density", "gate_seconds", "sparse_attention_seconds"):
        assert staged[(f"vllm:seer_{hist}_count", "")] == 1  # one step, observed once
    counting = next(s for s in snaps if s["count_requests"])
    stage_density = sum(counting["computed"]) / sum(counting["possible"])
    assert staged[("vllm:seer_prefill_density_sum", "")] == pytest.approx(stage_density)
