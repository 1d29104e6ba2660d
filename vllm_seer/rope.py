"""Rotary position embeddings (NeoX rotate-half layout) for the gate.

vLLM hands the attention backend q/k *after* RoPE; the gate needs them *before* RoPE (max/min pooling
does not commute with rotation). This module rebuilds the served model's own RoPE frequencies
(default theta, linear scaling, llama3 scaling) and rotates forward or backward by a position.

Everything is computed in fp32; callers cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE variant of a served model.

    Attributes:
        rotary_dim: number of channels rotated (equals head_dim; partial rotary is refused).
        theta: the base (``rope_theta``).
        rope_type: one of :data:`SUPPORTED_ROPE_TYPES`.
        scaling: the ``rope_scaling`` dict for scaled variants (``None`` for default).
    """

    rotary_dim: int
    theta: float
    rope_type: str = "default"
    scaling: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"RoPE rotary_dim must be a positive even number, got {self.rotary_dim}")
        if not self.theta > 0:
            raise ValueError(f"RoPE theta (rope_theta) must be > 0, got {self.theta}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported by the Seer gate; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf_config(cls, hf_config: Any, head_dim: int) -> RopeSpec:
        """Build from a transformers ``PretrainedConfig`` (or anything with the same attributes).

        Reads ``rope_theta`` / ``rope_scaling`` and the newer ``rope_parameters`` dict.
        """
        params = getattr(hf_config, "rope_parameters", None) or {}
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        if isinstance(params, dict) and "rope_theta" in params:
            theta = float(params["rope_theta"])
            scaling = scaling or {k: v for k, v in params.items() if k != "rope_theta"}
        else:
            theta = float(getattr(hf_config, "rope_theta", 10000.0))
        partial = float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0)
        if partial != 1.0:
            raise ValueError(
                f"partial_rotary_factor={partial} is not supported by the Seer gate (needs 1.0)"
            )
        rope_type = str(scaling.get("rope_type", scaling.get("type", "default"))) if scaling else (
            "default"
        )
        items = tuple(sorted((k, v) for k, v in scaling.items() if k not in ("rope_type", "type")))
        return cls(head_dim, theta, rope_type, items or None)

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies, ``[rotary_dim // 2]`` fp32, with the variant's scaling applied."""
        d = self.rotary_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        s = dict(self.scaling or ())
        if self.rope_type == "linear":
            inv = inv / float(_need(s, "factor"))
        elif self.rope_type == "llama3":
            inv = _llama3_scale(inv, s)
        return inv.to(torch.float32)


def _need(scaling: dict[str, Any], key: str) -> Any:
    if key not in scaling:
        raise ValueError(f"rope_scaling is missing {key!r}")
    return scaling[key]


def _llama3_scale(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(_need(s, "factor"))
    low = float(_need(s, "low_freq_factor"))
    high = float(_need(s, "high_freq_factor"))
    old_len = float(_need(s, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` ``[N]`` → two ``[N, rotary_dim // 2]`` fp32 tensors."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           inverse: bool = False) -> torch.Tensor:
    """Apply (or undo, ``inverse=True``) NeoX RoPE.

    Args:
        x: ``[N, H, D]`` (any float dtype); ``D`` equals ``2 * len(inv_freq)``.
        positions: ``[N]`` integer positions of the rows.
        inv_freq: ``[D // 2]`` from :meth:`RopeSpec.inv_freq`.
    Returns:
        ``[N, H, D]`` fp32.
    """
    cos, sin = cos_sin(positions, inv_freq)
    if inverse:
        sin = -sin
    cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.to(torch.float32)
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
