"""Seer attention backends. ``SeerBackend`` / ``SeerCustomBackend`` resolve to the class for the
current vLLM platform (CPU or CUDA) when vLLM imports them by path."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name not in ("SeerBackend", "SeerCustomBackend"):
        raise AttributeError(name)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm_seer.backend import cpu

        return {"SeerBackend": cpu.SeerCPUBackend, "SeerCustomBackend": cpu.SeerCPUCustomBackend}[name]
    if current_platform.is_cuda():
        from vllm_seer.backend import cuda

        return {"SeerBackend": cuda.SeerCUDABackend, "SeerCustomBackend": cuda.SeerCUDACustomBackend}[name]
    raise RuntimeError(f"Seer backend: platform {current_platform.device_name!r} is not supported "
                       "(CPU and CUDA are)")
