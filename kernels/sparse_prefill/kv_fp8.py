"""FP8 inputs of the Seer kernels: which float8 encoding they read, and the per-layer scales.

vLLM stores an FP8 KV cache (``--kv-cache-dtype fp8`` / ``fp8_e4m3``) as uint8 holding ``x / scale``
in ``float8_e4m3fn``, with one K and one V scale per layer (``Attention._k_scale`` / ``_v_scale``,
0-dim fp32 device tensors); its FlashAttention backend also hands the attention impl a query
quantized the same way (``_q_scale``). The kernels take the cache (and optionally the query) viewed
as ``torch.float8_e4m3fn`` plus those scales, and compute with ``float8 * scale``. Scales are read
in-kernel from their device tensors (no host sync); a Python float is turned into a tensor for
convenience (tests, benchmarks), which allocates.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def check_dtype(x: torch.Tensor, name: str) -> bool:
    """``True`` for a ``float8_e4m3fn`` tensor, ``False`` for a 16/32-bit float one.

    Raises:
        TypeError: for raw uint8 (vLLM's storage: view it as ``torch.float8_e4m3fn``) or another
            float8 encoding (e5m2 / fnuz: not read by these kernels).
    """
    if x.dtype == FP8:
        return True
    if x.dtype == torch.uint8:
        raise TypeError(f"{name} is uint8: view vLLM's FP8 storage as torch.float8_e4m3fn "
                        "(the kernels read e4m3 only)")
    if x.dtype in FLOAT8:
        raise TypeError(f"{name} is {x.dtype}; the Seer kernels read float8_e4m3fn only "
                        "(--kv-cache-dtype fp8 / fp8_e4m3)")
    return False


def check_presence(scale: torch.Tensor | float | None, name: str, needed: bool) -> bool:
    """A scale is given exactly when its input is float8; returns ``needed``.

    Raises:
        ValueError: a scale missing for a float8 input, or given for a 16/32-bit one.
    """
    if needed and scale is None:
        raise ValueError(f"{name} is required for a float8_e4m3fn input (vLLM's per-layer scale)")
    if not needed and scale is not None:
        raise ValueError(f"{name} is given but its input is not float8 (scales apply to "
                         "float8_e4m3fn inputs only)")
    return needed


def scale_arg(scale: torch.Tensor | float | None, name: str, needed: bool,
              device: torch.device) -> torch.Tensor | None:
    """The one-element fp32 device tensor a kernel reads ``scale`` from.

    Args:
        scale: vLLM's per-layer scale (0-dim or ``[1]`` fp32 tensor), a float, or ``None``.
        needed: the matching input is float8 (a scale is then required; otherwise refused).
    Returns:
        ``None`` when not ``needed``.
    Raises:
        ValueError: see :func:`check_presence`; or the tensor is not one fp32 value on ``device``.
    """
    if not check_presence(scale, name, needed):
        return None
    if not isinstance(scale, torch.Tensor):
        return torch.full((1,), float(scale), dtype=torch.float32, device=device)
    if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != device:
        raise ValueError(f"{name} must be one fp32 value on {device} (a per-tensor scale), got "
                         f"shape {tuple(scale.shape)} {scale.dtype} on {scale.device}")
    return scale


def dequantize(x: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
    """``x`` in fp32, times ``scale`` when given (the references' reading of a float8 input)."""
    x = x.to(torch.float32)
    if scale is None:
        return x
    if isinstance(scale, torch.Tensor):
        return x * scale.to(device=x.device, dtype=torch.float32).reshape(())
    return x * float(scale)
