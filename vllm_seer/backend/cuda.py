"""The Seer backend on CUDA (built on vLLM's FlashAttention backend).

Dense rows (decodes, short prefills, dense layers) stay on FlashAttention (FA3 on Hopper) through the
inherited impl on their own sub-batch; Seer rows go through the Triton gate and block-sparse kernels
(``vllm_seer.kernels.planning.seer_prefill``). Buffers are planned once per step in the builder; the
per-layer path only launches kernels (no ``.item()``; the Seer rows are read and written in place
when they are one run of rows, as vLLM orders batches, else gathered and scattered back). Full CUDA
graphs are declared for pure decode batches only; mixed and prefill batches run eagerly between
graph pieces.

FP8 KV cache (``--kv-cache-dtype fp8`` / ``fp8_e4m3``): the kernels read the uint8 cache as
``float8_e4m3fn`` with the layer's ``_k_scale`` / ``_v_scale`` device tensors (no host copy of a
scale). vLLM's attention layer then quantizes the query to float8 with ``_q_scale`` before the impl
sees it (FlashAttention's FP8 path needs an FP8 query); the Seer kernels read that query as it is.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from vllm_seer.backend import compat, pooled_keys
from vllm_seer.backend.common import (
    SeerStepMetadata,
    StepTimer,
    build_step,
    finish_step,
    forward_dense,
    take_rows,
)
from vllm_seer.backend.runtime import get_runtime
from vllm_seer.kernels.planning import SeerBuffers, plan_batch, seer_gate, warm_up

logger = logging.getLogger(__name__)
WARMUP_TOKENS = 16384  # synthetic prefill used to compile and autotune the kernels at start-up
# KV page size the backend asks vLLM for when the user gives no --block-size: with pages of one gate
# block a key block is one contiguous run of one page (one page id per block instead of one per
# token); measured on the H200 (2026-12-02, Llama-3.1-8B shapes, density 0.1) the sparse kernel
# runs 8-12 % faster than with vLLM's default 16-token pages. FlashAttention 3 (the dense rows)
# takes any multiple of 16. Prefix caching then shares prompts in 64-token blocks.
PREFERRED_PAGE_SIZE = 64


class SeerCUDAMetadataBuilder(FlashAttentionMetadataBuilder):
    # full CUDA graphs for uniform batches only, i.e. decodes of 1 query token, or of 1 + k under
    # speculative decoding (verification rows): the routing keeps every row of up to
    # ``decode_max_query_len`` (= 1 + k) tokens on the inherited FlashAttention path, so a uniform
    # batch never reaches the Seer kernels; mixed batches with prefills run piecewise (the Seer
    # path eagerly). UNIFORM_SINGLE_TOKEN_DECODE would leave speculative verification batches
    # without full graphs.
    _cudagraph_support = compat.attention_cg_support().UNIFORM_BATCH
    _steps = 0

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> Any:
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, *args, **kwargs)
        page = int(kv_cache_spec.block_size)  # the cache's real page size, known from here on
        if SeerCUDAImpl.warmed_pages and page not in SeerCUDAImpl.warmed_pages:
            logger.warning("Seer: the KV cache has %d-token pages but the start-up warm-up built "
                           "the kernels for %s: the first long request will compile and autotune "
                           "them (seconds)", page, SeerCUDAImpl.warmed_pages)

    def build(self, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> SeerStepMetadata:
        rt = get_runtime()
        SeerCUDAMetadataBuilder._steps += 1
        if rt.key_cache is not None:  # this step's K/V writes make their entries stale
            rt.key_cache.begin_step(common_attn_metadata.slot_mapping)
        md = build_step(super().build, common_prefix_len, common_attn_metadata, fast_build, rt,
                        rt.num_heads, common_attn_metadata.causal is True,
                        SeerCUDAMetadataBuilder._steps, self.device)
        if md.plan is not None:
            plan = md.plan  # host lists: no device read-back in the builder
            cu = list(itertools.accumulate(plan.query_lens, initial=0))
            lens = [c + n for c, n in zip(plan.context_lens, plan.query_lens, strict=True)]
            md.bufs = SeerBuffers.allocate(plan_batch(cu, lens, rt.block_size), rt.num_heads,
                                           rt.num_kv_heads, rt.head_dim, self.device,
                                           pair_max_ratio=rt.config.pair_max_ratio)
            md.bufs.set_topk(lens, rt.config.selection)
        return md


class SeerCUDAImpl(FlashAttentionImpl):
    _warmed_up = False  # once per process
    warmed_pages: tuple[int, ...] = ()  # page sizes the warm-up built the kernels for

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = get_current_vllm_config()
        get_runtime(cfg, self.num_heads, self.num_kv_heads, self.head_size,
                    torch.device(f"cuda:{torch.cuda.current_device()}"))
        # the page size(s) vLLM will pick (it asks the backend after the layers exist)
        self._page_sizes = compat.expected_page_sizes(cfg.cache_config,
                                                      SeerCUDABackend.get_preferred_block_size)
        rt = get_runtime()
        if rt.config.pooled_key_cache:
            pooled_keys.check_pages(self._page_sizes, rt.block_size)
        self._cache_config = cfg.cache_config
        self._layer: int | None = None
        # None: a 16-bit cache; e4m3 for fp8 / fp8_e4m3 (start-up refused the other encodings)
        self._fp8 = compat.fp8_cache_dtype(str(self.kv_cache_dtype))

    def _warm_up(self, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
        """Compile and autotune every Seer kernel variant during vLLM's profiling run
        (:func:`vllm_seer.kernels.planning.warm_up`: this model's heads, page size, dtype, longest
        request and the cache layout vLLM allocates), so no user request compiles or autotunes
        (otherwise ~25 s on an H100 for the first long request, and more at each new power of two
        of its key blocks; with the warm-up on separate K/V caches instead of vLLM's packed K|V
        rows, the first long request still compiled the pointer-load variant: 6.5 s on the H200
        on 2026-12-04)."""
        if SeerCUDAImpl._warmed_up or torch.cuda.is_current_stream_capturing():
            return
        SeerCUDAImpl._warmed_up = True
        rt = get_runtime()
        layer = rt.last_sparse_layer  # a layer of this pipeline stage
        if layer is None:  # every layer of this stage is dense: no Seer kernel will run here
            return
        assert rt.block_rope is not None
        t0 = time.perf_counter()
        max_blocks = rt.block_rope.shape[0]
        kv_dtype = self._fp8 or out_dtype
        # before vLLM sizes its KV cache from what this run leaves free
        pooled_keys.reserve(rt, self._cache_config, self._page_sizes, kv_dtype.itemsize,
                            rt.inv_freq.device)
        for page in self._page_sizes:
            def kv_views(pages: int, page: int = page) -> tuple[torch.Tensor, torch.Tensor]:
                cache = compat.synthetic_kv_cache(SeerCUDABackend, pages, page, self.num_kv_heads,
                                                  self.head_size, kv_dtype, rt.inv_freq.device)
                return compat.cuda_kv_views(cache, self.head_size, self._fp8)

            warm_up(dtype, self.num_heads, self.num_kv_heads, self.head_size, page,
                    rt.weights[layer], rt.inv_freq, rt.config.selection, max_blocks,
                    rt.inv_freq.device, rt.block_size, WARMUP_TOKENS, rt.block_rope,
                    rt.grouped_weights[layer], kv_dtype=kv_dtype, out_dtype=out_dtype,
                    kv_views=kv_views, rope_positions=rt.token_rope,
                    pair_max_ratio=rt.config.pair_max_ratio,
                    key_cache=rt.config.pooled_key_cache)
        torch.cuda.synchronize()
        SeerCUDAImpl.warmed_pages = tuple(self._page_sizes)
        logger.info("Seer kernels compiled and autotuned in %.1f s (synthetic prefills on %s-token "
                    "pages, selection widths up to %d key blocks)", time.perf_counter() - t0,
                    "/".join(map(str, self._page_sizes)), max_blocks)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: SeerStepMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        if attn_metadata is None:  # profiling run: compile + autotune the Seer kernels once
            self._warm_up(query.dtype, output.dtype)
            return output
        md = attn_metadata
        rt = get_runtime()
        if self._layer is None:
            self._layer = rt.layer_of(layer.layer_name)  # global index, this stage's
        if (rt.key_cache is None and rt.key_cache_reserve is not None
                and not torch.cuda.is_current_stream_capturing()):
            # the first forward after vLLM allocated the KV cache: entries laid out in the reserve
            pooled_keys.ensure(rt, compat.cuda_kv_views(kv_cache, self.head_size, self._fp8)[0])
        if forward_dense(super().forward, md, self._layer in rt.config.dense_layers, layer, query,
                         key, value, kv_cache, output, output_scale, output_block_scale, *args,
                         **kwargs):
            return output
        plan, bufs = md.plan, md.bufs
        assert bufs is not None
        k_cache, v_cache = compat.cuda_kv_views(kv_cache, self.head_size, self._fp8)
        from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged

        timer = StepTimer.for_step(md.step, cuda_events=True)
        span = plan.row_span
        if span is not None:  # one run of rows: read and write in place (views, no copies)
            q, out = query[span[0]:span[1]], output[span[0]:span[1]]
        else:
            q = take_rows(query, plan.token_rows)
            out = torch.empty(q.shape, dtype=output.dtype, device=q.device)  # q may be float8
        scales = fp8_scales(layer, q, self._fp8)
        t0 = timer.mark()  # CUDA events on the current stream: no host sync here
        seer_gate(q, k_cache, plan.block_table, plan.cu_seqlens_q, plan.seq_lens,
                  rt.weights[self._layer], rt.inv_freq, rt.config.selection, bufs,
                  rt.block_rope, rt.grouped_weights[self._layer], q_scale=scales["q_scale"],
                  k_scale=scales["k_scale"], rope_positions=rt.token_rope,
                  key_cache=rt.layer_key_cache(self._layer))
        t1 = timer.mark()
        sparse_prefill_paged(q, k_cache, v_cache, plan.block_table, plan.cu_seqlens_q,
                             plan.seq_lens, bufs.block_index, bufs.block_count, out, self.scale,
                             bufs.plan.block_size, bufs.split, pairs=bufs.pairs, **scales)
        t2 = timer.mark()
        if span is None:
            output.index_copy_(0, plan.token_rows, out)
        computed = bufs.block_count.sum(dim=(1, 2)).to(torch.int64)
        rt.stats.add_layer(self._layer, computed.sum(), sum(plan.possible))
        timer.add_layer(computed, t0, t1, t2)
        if self._layer == rt.last_sparse_layer:
            finish_step(rt, plan, timer)  # events resolved at flush time (WorkerStats)
        return output


def fp8_scales(layer: Any, q: torch.Tensor, fp8: torch.dtype | None
               ) -> dict[str, torch.Tensor | None]:
    """The kernels' ``q_scale`` / ``k_scale`` / ``v_scale``: the layer's device tensors for the
    float8 inputs (the cache when ``fp8``, the query when vLLM quantized it), ``None`` otherwise."""
    if fp8 is None and q.dtype != torch.float8_e4m3fn:
        return {"q_scale": None, "k_scale": None, "v_scale": None}
    q_s, k_s, v_s = compat.kv_scale_tensors(layer)
    kv = fp8 is not None
    return {"q_scale": q_s if q.dtype == torch.float8_e4m3fn else None,
            "k_scale": k_s if kv else None, "v_scale": v_s if kv else None}


class SeerCUDABackend(FlashAttentionBackend):
    """``--attention-backend seer`` on CUDA."""

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """vLLM (0.26+) asks the selected backend for its page size unless ``--block-size`` was
        given: a multiple of ``PREFERRED_PAGE_SIZE`` (see there)."""
        if default_block_size % PREFERRED_PAGE_SIZE == 0:
            return default_block_size
        return PREFERRED_PAGE_SIZE

    @staticmethod
    def get_name() -> str:
        return compat.SEER_NAME

    @staticmethod
    def get_impl_cls() -> type[SeerCUDAImpl]:
        return SeerCUDAImpl

    @staticmethod
    def get_builder_cls() -> type[SeerCUDAMetadataBuilder]:
        return SeerCUDAMetadataBuilder


class SeerCUDACustomBackend(SeerCUDABackend):
    @staticmethod
    def get_name() -> str:
        return "CUSTOM"
