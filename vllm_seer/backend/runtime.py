"""The per-process :class:`SeerRuntime` singleton (created by the first attention impl)."""

from __future__ import annotations

from typing import Any

import torch

from vllm_seer.backend import compat
from vllm_seer.backend.common import SeerRuntime

_RUNTIME: SeerRuntime | None = None


def get_runtime(vllm_config: Any = None, num_heads: int = 0, num_kv_heads: int = 0,
                head_dim: int = 0, device: torch.device | None = None) -> SeerRuntime:
    """Return the process's runtime, creating it on the first call (which must pass the config)."""
    global _RUNTIME
    if _RUNTIME is None:
        if vllm_config is None or device is None:
            raise RuntimeError("Seer backend: runtime used before any Seer attention layer was built")
        _RUNTIME = SeerRuntime(vllm_config, num_heads, num_kv_heads, head_dim, compat.tp_rank(),
                               device)
    return _RUNTIME
