"""The Seer backend on vLLM's CPU platform (built on ``CPUAttentionBackend``).

Dense rows (decodes, short prefills, dense layers) go through the inherited CPU kernel on their own
sub-batch; Seer rows through the PyTorch gate and the reference block-sparse attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_seer.backend import compat
from vllm_seer.backend.common import (
    SeerStepMetadata,
    StepTimer,
    build_step,
    finish_step,
    forward_dense,
    run_sparse_reference,
)
from vllm_seer.backend.kv_dequant import dequantize_pages
from vllm_seer.backend.runtime import get_runtime


class SeerCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    _steps = 0

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], *args: Any,
                 **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, *args, **kwargs)
        compat.cpu_builder_isa(self, layer_names)  # 'amx' -> 'vec'; others refused at start-up

    def build(self, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> SeerStepMetadata:
        SeerCPUMetadataBuilder._steps += 1
        causal = common_attn_metadata.causal is True and not self.is_cross_attention
        return build_step(super().build, common_prefix_len, common_attn_metadata, fast_build,
                          get_runtime(), self.num_heads, causal, SeerCPUMetadataBuilder._steps,
                          "cpu")


class SeerCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # validates the config and the gates against the model: bad input stops start-up here
        get_runtime(get_current_vllm_config(), self.num_heads, self.num_kv_heads,
                    self.head_size, torch.device("cpu"))
        self._layer: int | None = None
        self._fp8 = compat.fp8_cache_dtype(str(self.kv_cache_dtype))  # None: unquantized cache

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: SeerStepMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if attn_metadata is None:  # profiling run
            return output
        md = attn_metadata
        rt = get_runtime()
        if self._layer is None:
            self._layer = rt.layer_of(layer.layer_name)  # global index, this stage's
        if forward_dense(super().forward, md, self._layer in rt.config.dense_layers, layer, query,
                         key, value, kv_cache, output, output_scale, output_block_scale):
            return output
        k_cache, v_cache = compat.cpu_kv_views(kv_cache, getattr(layer, "isa", "vec"))
        timer = StepTimer.for_step(md.step)
        plan = md.plan
        if self._fp8 is not None:  # gate and attention read float8 * vLLM's per-layer scale
            k_cache, v_cache, table = dequantize_pages(k_cache, v_cache, plan.block_table,
                                                       plan.seq_lens, self._fp8,
                                                       *compat.kv_scales(layer))
            plan = dataclasses.replace(plan, block_table=table)
        run_sparse_reference(rt, self._layer, query, k_cache, v_cache, plan, output,
                             self.scale, timer)
        if self._layer == rt.last_sparse_layer:
            finish_step(rt, md.plan, timer)
        return output


class SeerCPUBackend(CPUAttentionBackend):
    """``--attention-backend seer`` on the CPU platform."""

    @staticmethod
    def get_name() -> str:
        return compat.SEER_NAME

    @staticmethod
    def get_impl_cls() -> type[SeerCPUImpl]:
        return SeerCPUImpl

    @staticmethod
    def get_builder_cls() -> type[SeerCPUMetadataBuilder]:
        return SeerCPUMetadataBuilder


class SeerCPUCustomBackend(SeerCPUBackend):
    """The same backend selected through vLLM's ``CUSTOM`` slot."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"
