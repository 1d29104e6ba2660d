"""The Seer backend on vLLM's CPU platform (built on ``CPUAttentionBackend``).

Dense rows (decodes, short prefills, dense layers) go through the inherited CPU kernel on their own
sub-batch; Seer rows through the PyTorch gate and the reference block-sparse attention.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    SparsePlan,
    StepTimer,
    finish_step,
    last_sparse_layer,
    layer_index,
    plan_sparse,
    run_sparse_reference,
)
from vllm_seer.backend.runtime import get_runtime


@dataclass
class SeerCPUMetadata:
    """Per-step metadata.

    Attributes:
        full: the inherited metadata for the whole batch (no Seer rows, or dense layers present).
        dense: the inherited metadata for the dense sub-batch (when Seer rows exist).
        dense_rows: ``[T_dense]`` rows of the dense sub-batch in the batch.
        plan: the Seer requests, or ``None``.
    """

    num_actual_tokens: int
    full: Any | None
    dense: Any | None
    dense_rows: torch.Tensor | None
    plan: SparsePlan | None
    causal: bool = True
    step: int = 0
    dense_prefix: bool = False  # the dense rows are rows 0 .. n-1 of the batch (no gather)


class SeerCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    _steps = 0

    def build(self, common_prefix_len: int, common_attn_metadata: Any,
              fast_build: bool = False) -> SeerCPUMetadata:
        cm = common_attn_metadata
        rt = get_runtime()
        seq_host = compat.host_seq_lens(cm)
        qsl = cm.query_start_loc_cpu.tolist()
        causal = cm.causal is True and not self.is_cross_attention
        plan, dense = plan_sparse(qsl, seq_host.tolist(), cm.block_table_tensor,
                                  rt.config.min_prefill_tokens, rt.block_size, self.num_heads,
                                  causal)
        dense_prefill = sum(qsl[i + 1] - qsl[i] for i in dense if qsl[i + 1] - qsl[i] > 1)
        rt.stats.add_tokens(sum(plan.query_lens) if plan else 0, dense_prefill)
        rt.stats.maybe_flush()
        SeerCPUMetadataBuilder._steps += 1
        md = SeerCPUMetadata(cm.num_actual_tokens, None, None, None, plan, causal,
                             SeerCPUMetadataBuilder._steps)
        if plan is None or rt.config.dense_layers:
            md.full = super().build(common_prefix_len, cm, fast_build)
        if plan is not None and dense:
            rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in dense])
            sub = compat.subset_common_metadata(cm, dense, rows, seq_host)
            md.dense = super().build(0, sub, fast_build)
            md.dense_rows = rows
            md.dense_prefix = int(rows[-1]) == rows.numel() - 1
        return md


class SeerCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # validates the config and the gates against the model: bad input stops start-up here
        get_runtime(get_current_vllm_config(), self.num_heads, self.num_kv_heads,
                    self.head_size, torch.device("cpu"))
        self._layer: int | None = None

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: SeerCPUMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if attn_metadata is None:  # profiling run
            return output
        md = attn_metadata
        rt = get_runtime()
        if self._layer is None:
            self._layer = layer_index(layer.layer_name)
        if md.plan is None or self._layer in rt.config.dense_layers:
            return super().forward(layer, query, key, value, kv_cache, md.full, output,
                                   output_scale, output_block_scale)
        if md.dense is not None:
            rows = md.dense_rows
            n = rows.numel()
            if md.dense_prefix:  # no copies
                super().forward(layer, query[:n], key[:n], value[:n], kv_cache, md.dense,
                                output[:n], output_scale, output_block_scale)
            else:
                out = torch.empty_like(output[:n])
                super().forward(layer, query[rows], key[rows], value[rows], kv_cache, md.dense,
                                out, output_scale, output_block_scale)
                output[rows] = out
        k_cache, v_cache = compat.cpu_kv_views(kv_cache, getattr(layer, "isa", "vec"))
        timer = StepTimer.for_step(md.step)
        run_sparse_reference(rt, self._layer, query, k_cache, v_cache, md.plan, output,
                             self.scale, timer)
        if self._layer == last_sparse_layer(rt.num_layers, rt.config.dense_layers):
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
