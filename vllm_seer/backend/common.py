"""Prefill routing and the sparse path, shared by the CPU and CUDA backends.

The metadata builder splits each batch into requests that take the Seer path (prefill rows whose
context is at least ``min_prefill_tokens``) and the rest (decodes, short prefills), which go to the
inherited dense backend on their own slice of the batch: no row is computed twice.

A row is a decode, as vLLM's own spec-as-decode backends classify rows, when its query has at most
``decode_max_query_len`` tokens: 1 without speculative decoding, ``1 + num_speculative_tokens`` with
it (the verification row: :func:`vllm_seer.backend.compat.max_decode_query_len`). So under
speculation a genuine prefill chunk of at most that many tokens (the short tail of a chunked prompt,
or a prefix-cache hit that leaves a few tokens to compute) also takes the dense path, as it does in
vLLM's own backends; dense is exact, and those few query rows cost little either way.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_seer.backend import compat
from vllm_seer.backend.stage import PipelineStage, reporting_stage
from vllm_seer.checkpoint import GateCheckpoint, load_gates
from vllm_seer.config import SeerConfig
from vllm_seer.gate import block_rope_table, gate_mask, group_gate_weight
from vllm_seer.kernels.paged_pool.key_cache import LayerKeyCache, PooledKeyCache
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists, sparse_prefill_paged_ref
from vllm_seer.metrics import WorkerStats
from vllm_seer.rope import RopeSpec

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class SparsePlan:
    """The requests of one batch that take the Seer path (host-side plan, built once per step).

    Attributes:
        req_ids: ``[R]`` indices of the requests in the batch.
        token_rows: ``[T_sparse]`` long, their query rows in the batch (in request order).
        cu_seqlens_q: ``[R + 1]`` int32 offsets into ``token_rows``.
        seq_lens: ``[R]`` int32 context + new tokens.
        block_table: ``[R, max_pages]`` int32.
        query_lens / context_lens: host lists.
        possible: per request, causal blocks a dense computation would touch (all local q heads).
        row_span: ``(start, end)`` when ``token_rows`` is exactly ``start .. end - 1`` (the usual
            case: vLLM puts decodes first, so the prefills are one run of rows); the CUDA path then
            reads the query and writes the output in place through views (no gather, no copy).
    """

    req_ids: list[int]
    token_rows: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    possible: list[int]
    row_span: tuple[int, int] | None = None


def plan_sparse(query_start_loc: list[int], seq_lens: list[int], block_table: torch.Tensor,
                min_prefill_tokens: int, block_size: int, num_heads: int,
                causal: bool, decode_max_query_len: int = 1) -> tuple[SparsePlan | None, list[int]]:
    """Pick the Seer requests of a batch: causal rows with more than ``decode_max_query_len``
    query tokens (not a decode or speculative verification row) on a context of at least
    ``min_prefill_tokens``.

    Returns:
        (plan or ``None``, dense request indices).
    """
    sparse, dense = [], []
    for i, L in enumerate(seq_lens):
        n = query_start_loc[i + 1] - query_start_loc[i]
        seer_row = causal and n > decode_max_query_len and min_prefill_tokens <= L
        (sparse if seer_row else dense).append(i)
    if not sparse:
        return None, dense
    dev = block_table.device
    rows = [torch.arange(query_start_loc[i], query_start_loc[i + 1]) for i in sparse]
    qlens = [query_start_loc[i + 1] - query_start_loc[i] for i in sparse]
    ctx = [seq_lens[i] - n for i, n in zip(sparse, qlens, strict=True)]
    possible = []
    for n, c in zip(qlens, ctx, strict=True):
        qb0, qb1 = c // block_size, (c + n - 1) // block_size
        possible.append(num_heads * sum(qb + 1 for qb in range(qb0, qb1 + 1)))
    cu = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    contiguous = all(query_start_loc[a + 1] == query_start_loc[b]
                     for a, b in itertools.pairwise(sparse))
    span = (query_start_loc[sparse[0]], query_start_loc[sparse[-1] + 1]) if contiguous else None
    plan = SparsePlan(
        req_ids=sparse,
        token_rows=compat.to_device(torch.cat(rows), dev),
        cu_seqlens_q=compat.to_device(cu, dev),
        seq_lens=compat.to_device(torch.tensor([seq_lens[i] for i in sparse], dtype=torch.int32), dev),
        block_table=block_table[compat.to_device(torch.tensor(sparse), dev)],
        query_lens=qlens,
        context_lens=ctx,
        possible=possible,
        row_span=span,
    )
    return plan, dense


@dataclass
class SeerStepMetadata:
    """Per-step metadata of both Seer backends.

    Attributes:
        full: the inherited metadata for the whole batch (no Seer rows, or dense layers present).
        dense: the inherited metadata for the dense sub-batch (when Seer rows exist).
        dense_rows: ``[T_dense]`` rows of the dense sub-batch in the batch.
        plan: the Seer requests, or ``None``.
        dense_prefix: the dense rows are rows ``0 .. n-1`` of the batch (no gather needed).
        bufs: the CUDA kernels' persistent buffers for this step (``None`` on CPU).
    """

    num_actual_tokens: int
    plan: SparsePlan | None
    causal: bool
    step: int
    full: Any | None = None
    dense: Any | None = None
    dense_rows: torch.Tensor | None = None
    dense_prefix: bool = False
    bufs: Any | None = None


def build_step(inherited_build: Callable[[int, Any, bool], Any], common_prefix_len: int,
               cm: Any, fast_build: bool, rt: SeerRuntime, num_heads: int, causal: bool,
               step: int, rows_device: torch.device | str) -> SeerStepMetadata:
    """The metadata builders' shared routing, once per step: plan the Seer requests, count the
    prefill tokens by path, and build the inherited metadata for the whole batch (when it has no
    Seer rows or some layers stay dense) and for the dense sub-batch.

    Args:
        inherited_build: the parent builder's ``build(common_prefix_len, cm, fast_build)``.
        cm: vLLM's ``CommonAttentionMetadata`` of the step.
        rows_device: where the dense sub-batch's row indices are used.
    """
    seq_host = compat.host_seq_lens(cm)
    qsl = cm.query_start_loc_cpu.tolist()
    decode_len = rt.decode_max_query_len
    plan, dense = plan_sparse(qsl, seq_host.tolist(), cm.block_table_tensor,
                              rt.config.min_prefill_tokens, rt.block_size, num_heads, causal,
                              decode_len)
    # decode and verification rows are no prefill tokens
    dense_prefill = sum(qsl[i + 1] - qsl[i] for i in dense if qsl[i + 1] - qsl[i] > decode_len)
    rt.stats.add_tokens(sum(plan.query_lens) if plan else 0, dense_prefill)
    rt.stats.maybe_flush()
    md = SeerStepMetadata(cm.num_actual_tokens, plan, causal, step)
    if plan is None or rt.has_dense_layers:
        md.full = inherited_build(common_prefix_len, cm, fast_build)
    if plan is not None and dense:
        rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in dense])
        sub = compat.subset_common_metadata(cm, dense, rows, seq_host)
        md.dense = inherited_build(0, sub, fast_build)
        md.dense_rows = compat.to_device(rows, rows_device)
        md.dense_prefix = int(rows[-1]) == rows.numel() - 1
    return md


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` along dim 0. A float8 tensor (vLLM's FP8 query) is gathered as its bytes: not
    every indexing kernel of every torch build takes float8."""
    if x.element_size() == 1 and x.is_floating_point():
        return x.view(torch.uint8).index_select(0, rows).view(x.dtype)
    return x.index_select(0, rows)


def forward_dense(inherited_forward: Callable[..., Any], md: SeerStepMetadata, dense_layer: bool,
                  layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  kv_cache: torch.Tensor, output: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    """The dense part of one layer's forward through the inherited impl (``args`` / ``kwargs``:
    its trailing arguments after ``output``). Returns ``True`` when that was the whole batch (no
    Seer rows, or ``dense_layer``); otherwise it ran the dense sub-batch, if any, and the caller
    runs the Seer rows."""
    if md.plan is None or dense_layer:
        inherited_forward(layer, query, key, value, kv_cache, md.full, output, *args, **kwargs)
        return True
    if md.dense is not None:
        rows = md.dense_rows
        assert rows is not None
        n = rows.numel()
        if md.dense_prefix:  # no copies
            inherited_forward(layer, query[:n], key[:n], value[:n], kv_cache, md.dense,
                              output[:n], *args, **kwargs)
        else:
            out = torch.empty_like(output[:n])
            inherited_forward(layer, take_rows(query, rows), key[rows], value[rows], kv_cache,
                              md.dense, out, *args, **kwargs)
            output[rows] = out
    return False


def layer_index(layer_name: str) -> int:
    """``model.layers.7.self_attn.attn`` → 7."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"Seer backend: cannot find a layer index in layer name {layer_name!r}")
    return int(m.group(1))


class SeerRuntime:
    """Per-process state: validated config, this stage's gate weights on the device, RoPE table,
    stats.

    Attributes:
        num_layers: the whole model's layer count (all pipeline stages).
        stage: this worker's pipeline stage (its layers by global index).
        weights: global layer index → ``[Hq_local, 3 * head_dim, head_dim]`` fp32, for this
            stage's layers only (this tensor-parallel rank's query heads).
        sparse_layers: this stage's layers that take the sparse path (ascending).
        last_sparse_layer: the last of them, where a step's accounting ends; ``None`` when every
            layer of this stage is dense.
    """

    def __init__(self, vllm_config: Any, config: SeerConfig, num_heads: int, num_kv_heads: int,
                 head_dim: int, tp_rank: int, device: torch.device,
                 stage: PipelineStage | None = None) -> None:
        """``config``: the settings as parsed and checked at start-up (with the served model, by
        :func:`vllm_seer.backend.runtime.check_startup`); the device default fills in
        ``min_prefill_tokens`` when it was not given. ``stage``: this worker's pipeline stage
        (the only one when ``None``)."""
        self.config = config.for_device(device.type)
        model_config = vllm_config.model_config
        hf = model_config.hf_text_config if hasattr(model_config, "hf_text_config") else (
            model_config.hf_config)
        ckpt: GateCheckpoint = load_gates(self.config.gates)
        parallel = vllm_config.parallel_config
        total_q = num_heads * parallel.tensor_parallel_size
        model_layers = compat.total_num_layers(model_config)  # every stage, not only this one
        ckpt.check_against(num_layers=model_layers, num_q_heads=total_q,
                           num_kv_heads=model_config.get_total_num_kv_heads(),
                           head_dim=head_dim, where=f"the served model {model_config.model}")
        self.stage = stage or PipelineStage.of(model_layers)
        if self.stage.num_layers != model_layers:
            raise ValueError(f"Seer backend: pipeline {self.stage.describe()} is of a "
                             f"{self.stage.num_layers}-layer model; the served model has "
                             f"{model_layers}")
        self.block_size = ckpt.block_size
        self.num_layers = ckpt.num_layers
        lo, hi = tp_rank * num_heads, (tp_rank + 1) * num_heads
        self.weights = {i: ckpt.weights[i][lo:hi].to(device=device, dtype=torch.float32)
                        .contiguous() for i in self.stage.layers}
        self.sparse_layers = self.stage.sparse_layers(self.config.dense_layers)
        self.last_sparse_layer = self.sparse_layers[-1] if self.sparse_layers else None
        self.has_dense_layers = len(self.sparse_layers) < len(self.stage.layers)
        rope = RopeSpec.from_hf_config(hf, head_dim, int(model_config.max_model_len))
        self.inv_freq = rope.inv_freq().to(device)  # [rotary_dim // 2]
        self.rope_scale = rope.attention_scale()  # YaRN / LongRoPE mscale in vLLM's cos/sin
        # start-up tables of the Triton gate (CUDA): cos / sin at every block start of the longest
        # request, [ceil(max_model_len / block), 2, rotary_dim // 2] fp32, and each layer's
        # weight laid out per KV group (a second copy of the gate weights: 4 * Hq * 3D * G bytes
        # per layer, 3 MiB for Llama-3.1-8B's 32 x 384 x 64)
        self.grouped_weights: dict[int, torch.Tensor] = {}
        self.block_rope: torch.Tensor | None = None
        # and cos / sin at every position up to max_model_len for the pooling kernel's un-rotation
        # (no per-element trigonometry): [max_model_len, 2, rotary_dim // 2] fp32, 4 * rotary_dim
        # bytes per position (64 MiB at 128k positions and rotary_dim 128), shared by all layers
        self.token_rope: torch.Tensor | None = None
        if device.type == "cuda":
            max_blocks = -(-int(model_config.max_model_len) // self.block_size)
            self.block_rope = block_rope_table(self.inv_freq, max_blocks, self.block_size)
            self.token_rope = block_rope_table(self.inv_freq, int(model_config.max_model_len), 1)
            self.grouped_weights = {i: group_gate_weight(self.weights[i], num_kv_heads)
                                    for i in self.stage.layers}
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # the pooled-key cache (``pooled_key_cache``, CUDA; vllm_seer.backend.pooled_keys): its
        # memory reserved in vLLM's profiling run, its entries laid out once the KV cache exists
        self.key_cache_reserve: torch.Tensor | None = None
        self.key_cache: PooledKeyCache | None = None
        self.sparse_index = {layer: i for i, layer in enumerate(self.sparse_layers)}
        # rows up to this many query tokens are decodes (speculative verification rows included)
        self.decode_max_query_len = compat.max_decode_query_len(vllm_config)
        served = model_config.served_model_name
        model_name = served[0] if isinstance(served, list | tuple) else str(served)
        engine = str(getattr(parallel, "data_parallel_rank", 0) or 0)
        counting = reporting_stage(self.num_layers, self.stage.size, self.config.dense_layers)
        self.stats = WorkerStats({"model_name": model_name, "engine": engine},
                                 {**self.config.describe(), "block_size": str(self.block_size)},
                                 self.num_layers, device,
                                 count_requests=tp_rank == 0 and self.stage.rank == counting)
        logger.info("Seer backend ready: gates %s (%d layers; pipeline %s, sparse layers %s), %s, "
                    "min_prefill_tokens=%d, decode rows up to %d query tokens",
                    self.config.gates_source, self.num_layers, self.stage.describe(),
                    list(self.sparse_layers), self.config.selection,
                    self.config.min_prefill_tokens, self.decode_max_query_len)

    def layer_key_cache(self, layer: int) -> LayerKeyCache | None:
        """This step's view of ``layer``'s pooled-key entries (``None`` without the cache)."""
        if self.key_cache is None:
            return None
        return self.key_cache.layer(self.sparse_index[layer])

    def layer_of(self, layer_name: str) -> int:
        """The global layer index of one of this stage's attention layers, by its vLLM name.

        Raises:
            RuntimeError: the layer is not one of this stage's (vLLM assigned layers differently
                from ``get_pp_indices``, or renamed them).
        """
        index = layer_index(layer_name)
        if index not in self.stage.layers:
            raise RuntimeError(f"Seer backend: attention layer {layer_name!r} is not a layer of "
                               f"pipeline {self.stage.describe()} (vLLM's get_pp_indices); its "
                               "gate weights are not loaded on this worker")
        return index


class StepTimer:
    """One prefill step's Seer accumulators over its layers: blocks computed per request (device
    tensor, no sync) and gate / sparse-attention time, shared by the CPU and CUDA paths.

    Time marks are host clock readings (``perf_counter``) on CPU and ``torch.cuda.Event(
    enable_timing=True)`` recorded on the current stream on CUDA: recording never waits for the
    device. :meth:`seconds` turns them into seconds; :class:`WorkerStats` calls it at flush time only
    (at most every ``flush_interval``), where it synchronizes on the step's last event. A step of
    which any mark fell inside CUDA graph capture is not timed (no events are recorded then).
    """

    _current: tuple[int, StepTimer] | None = None  # one live step per process

    def __init__(self, cuda_events: bool = False) -> None:
        self.cuda_events = cuda_events
        self.computed: torch.Tensor | None = None
        self.marks: list[tuple[Any, Any, Any]] = []  # (start, gate done, attention done) per layer
        self.timed = True

    @classmethod
    def for_step(cls, step: int, cuda_events: bool = False) -> StepTimer:
        """The timer of step ``step``; a new one when the step changes."""
        if cls._current is None or cls._current[0] != step:
            cls._current = (step, cls(cuda_events))
        return cls._current[1]

    def mark(self) -> Any:
        """A time mark now (on the current stream for CUDA); ``None`` during graph capture."""
        if not self.cuda_events:
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add_layer(self, computed: torch.Tensor, start: Any, gate_done: Any,
                  attn_done: Any) -> None:
        """One layer: ``computed`` ``[R]`` blocks per request (device) and its three marks."""
        self.computed = computed if self.computed is None else self.computed + computed
        if start is None or gate_done is None or attn_done is None:
            self.timed = False
        else:
            self.marks.append((start, gate_done, attn_done))

    def seconds(self) -> tuple[float, float] | None:
        """``(gate_s, attn_s)`` summed over layers, or ``None`` if the step was not timed."""
        if not self.timed or not self.marks:
            return None
        if not self.cuda_events:
            return (sum(g - s for s, g, _ in self.marks), sum(a - g for _, g, a in self.marks))
        self.marks[-1][2].synchronize()  # events complete in stream order: all are done then
        gate = sum(s.elapsed_time(g) for s, g, _ in self.marks) / 1e3
        attn = sum(g.elapsed_time(a) for _, g, a in self.marks) / 1e3
        return gate, attn


def run_sparse_reference(rt: SeerRuntime, layer_idx: int, query: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, plan: SparsePlan,
                         output: torch.Tensor, scale: float, timer: StepTimer) -> None:
    """The sparse path with the PyTorch gate and reference attention (CPU).

    Args:
        query: ``[T, Hq, D]`` the whole batch's queries (post-RoPE).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` views.
        output: ``[T, Hq, D]``; rows ``plan.token_rows`` are written.
    """
    from vllm_seer.kernels.sparse_prefill import gather_paged

    t0 = timer.mark()
    weight = rt.weights[layer_idx]
    q = query.index_select(0, plan.token_rows)
    masks = []
    cu = plan.cu_seqlens_q.tolist()
    for r in range(len(plan.req_ids)):
        L = plan.context_lens[r] + plan.query_lens[r]
        k_ctx = gather_paged(k_cache, plan.block_table[r], L)
        mask, _ = gate_mask(q[cu[r]:cu[r + 1]], k_ctx, weight, rt.inv_freq, rt.block_size,
                            rt.config.selection, rt.rope_scale)
        masks.append(mask)
    index, count = masks_to_block_lists(masks)
    t1 = timer.mark()
    out = torch.empty_like(q)
    sparse_prefill_paged_ref(q, k_cache, v_cache, plan.block_table, plan.cu_seqlens_q,
                             plan.seq_lens, index, count, out, scale, rt.block_size)
    output.index_copy_(0, plan.token_rows, out)
    t2 = timer.mark()
    computed = count.sum(dim=(1, 2)).to(torch.int64)  # [R]
    rt.stats.add_layer(layer_idx, computed.sum(), sum(plan.possible))
    timer.add_layer(computed, t0, t1, t2)


def finish_step(rt: SeerRuntime, plan: SparsePlan, timer: StepTimer) -> None:
    """After this stage's last sparse layer of a step: hand the step to the stats (resolved at
    flush); a request's possible blocks are those of this stage's sparse layers."""
    assert timer.computed is not None
    n_layers = len(rt.sparse_layers)
    rt.stats.end_step(timer.computed, [p * n_layers for p in plan.possible], timer)
