"""Rotary position embeddings (NeoX rotate-half layout) for the gate.

vLLM hands the attention backend q/k *after* RoPE; the gate needs them *before* RoPE (max/min pooling
does not commute with rotation). This module rebuilds the served model's own RoPE exactly as vLLM's
rotary-embedding classes do (default, linear, llama3, YaRN, Phi-3 LongRoPE; partial rotary dims) and
rotates forward or backward by a position.

Every variant is ``y = scale * R(pos * inv_freq) x`` on the first ``rotary_dim`` channels (the rest
pass through): ``inv_freq`` ``[rotary_dim // 2]`` from :meth:`RopeSpec.inv_freq` and a constant
``scale`` from :meth:`RopeSpec.attention_scale` (YaRN's ``mscale`` / ``attention_factor``, LongRoPE's
``mscale``, 1 otherwise) that vLLM folds into its cos/sin cache. :func:`rotate` with ``inverse=True``
divides it out again. inv_freq is computed in fp32 with vLLM's operations in vLLM's order, so the
angles ``pos * inv_freq`` are bit-identical to vLLM's cache up to the model's maximum length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# RoPE variants vLLM implements that the gate refuses, and why (named in the error)
REFUSED_ROPE_TYPES = {
    "dynamic": "dynamic NTK (vLLM's fixed-base variant; no released gates, not validated)",
    "ntk": "NTK scaling (not validated against vLLM)",
    "deepseek_yarn": "DeepSeek YaRN (MLA models, refused anyway)",
    "mrope": "multimodal M-RoPE (3-D positions)",
    "proportional": "Gemma-4 proportional RoPE (mixes the two halves)",
}


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE variant of a served model.

    Attributes:
        rotary_dim: number of channels rotated (``head_dim * partial_rotary_factor``).
        theta: the base (``rope_theta``).
        rope_type: one of :data:`SUPPORTED_ROPE_TYPES`.
        scaling: the ``rope_scaling`` / ``rope_parameters`` items of scaled variants (sorted).
        head_dim: the head size (``rotary_dim`` when ``None``).
        max_position: ``max_position_embeddings`` (LongRoPE's mscale needs it).
        max_model_len: the served length (vLLM's LongRoPE picks the long factors when it exceeds
            ``original_max_position_embeddings``).
    """

    rotary_dim: int
    theta: float
    rope_type: str = "default"
    scaling: tuple[tuple[str, Any], ...] | None = None
    head_dim: int | None = None
    max_position: int | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"RoPE rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.head_dim is not None and self.rotary_dim > self.head_dim:
            raise ValueError(f"RoPE rotary_dim {self.rotary_dim} > head_dim {self.head_dim}")
        if not self.theta > 0:
            raise ValueError(f"RoPE theta (rope_theta) must be > 0, got {self.theta}")
        if self.rope_type in REFUSED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported by the Seer "
                             f"gate ({REFUSED_ROPE_TYPES[self.rope_type]}); supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_type!r} is not supported by the Seer gate; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def partial(self) -> bool:
        """Only the first ``rotary_dim`` of ``head_dim`` channels are rotated."""
        return self.head_dim is not None and self.rotary_dim < self.head_dim

    @classmethod
    def from_hf_config(cls, hf_config: Any, head_dim: int,
                       max_model_len: int | None = None) -> RopeSpec:
        """Build from a transformers ``PretrainedConfig`` (or anything with the same attributes).

        Reads ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` and the newer
        ``rope_parameters`` dict (transformers 5, what vLLM 0.32 hands ``get_rope``).
        """
        params = getattr(hf_config, "rope_parameters", None) or {}
        scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
        if isinstance(params, dict) and "rope_theta" in params:
            theta = float(params["rope_theta"])
            scaling = scaling or dict(params)
        else:
            theta = float(getattr(hf_config, "rope_theta", 10000.0))
        partial = scaling.get("partial_rotary_factor",
                              getattr(hf_config, "partial_rotary_factor", None))
        partial = float(partial if partial is not None else 1.0)
        if not 0.0 < partial <= 1.0:
            raise ValueError(f"partial_rotary_factor={partial} must be in (0, 1]")
        rotary_dim = int(scaling.get("rope_dim") or int(head_dim * partial))
        if "mrope_section" in scaling:
            raise ValueError("rope_scaling has mrope_section: multimodal M-RoPE "
                             f"({REFUSED_ROPE_TYPES['mrope']}) is not supported by the Seer gate")
        rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
        drop = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "rope_dim")
        items = tuple(sorted((k, _hashable(v)) for k, v in scaling.items() if k not in drop))
        if rope_type == "longrope" and "original_max_position_embeddings" not in dict(items):
            orig = getattr(hf_config, "original_max_position_embeddings", None)
            items = tuple(sorted((*items, ("original_max_position_embeddings", orig))))
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        return cls(rotary_dim, theta, rope_type, items or None, head_dim,
                   int(max_pos) if max_pos else None, max_model_len)

    def _params(self) -> dict[str, Any]:
        return dict(self.scaling or ())

    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies, ``[rotary_dim // 2]`` fp32, with the variant's scaling applied."""
        d = self.rotary_dim
        s = self._params()
        if self.rope_type == "yarn":
            return _yarn_inv_freq(self.theta, d, s)
        if self.rope_type == "longrope":
            return 1.0 / (_longrope_factors(s, d, self._use_long()) * _pos_freqs(self.theta, d))
        inv = 1.0 / _pos_freqs(self.theta, d)
        if self.rope_type == "linear":
            inv = inv / float(_need(s, "factor"))
        elif self.rope_type == "llama3":
            inv = _llama3_scale(inv, s)
        return inv

    def attention_scale(self) -> float:
        """The constant vLLM multiplies its cos/sin cache by (``mscale``); 1 for unscaled variants."""
        s = self._params()
        if self.rope_type == "yarn":
            factor = float(_need(s, "factor"))
            if s.get("attention_factor") is not None:
                m = float(s["attention_factor"])
            elif s.get("mscale") and s.get("mscale_all_dim"):
                m = _yarn_mscale(factor, float(s["mscale"])) / _yarn_mscale(
                    factor, float(s["mscale_all_dim"]))
            else:
                m = _yarn_mscale(factor)
        elif self.rope_type == "longrope":
            key = "long_mscale" if self._use_long() else "short_mscale"
            if s.get(key) is not None:
                m = float(s[key])
            else:
                orig = int(_need(s, "original_max_position_embeddings"))
                if self.max_position is None:
                    raise ValueError("longrope needs max_position_embeddings")
                ratio = self.max_position / orig
                m = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(orig))
        else:
            return 1.0
        if not m > 0:
            raise ValueError(f"RoPE {self.rope_type} attention scale (mscale) must be > 0, got {m}")
        return m

    def _use_long(self) -> bool:
        orig = int(_need(self._params(), "original_max_position_embeddings"))
        if self.max_model_len is None:
            raise ValueError("longrope needs the served max_model_len (vLLM picks the long factors "
                             "when it exceeds original_max_position_embeddings)")
        return self.max_model_len > orig


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _need(scaling: dict[str, Any], key: str) -> Any:
    if scaling.get(key) is None:
        raise ValueError(f"rope_scaling is missing {key!r}")
    return scaling[key]


def _pos_freqs(theta: float, d: int) -> torch.Tensor:
    """``theta ** (2i / d)``, fp32, as vLLM's ``RotaryEmbedding._compute_inv_freq`` computes it."""
    return theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)


def _llama3_scale(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(_need(s, "factor"))
    low = float(_need(s, "low_freq_factor"))
    high = float(_need(s, "high_freq_factor"))
    old_len = float(_need(s, "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low) if low != high else 0.0
    smoothed = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen < high_wavelen, inv,
                       torch.where(wavelen > low_wavelen, inv / factor, smoothed))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(rotations: float, d: int, theta: float, max_pos: int) -> float:
    return (d * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def _yarn_inv_freq(theta: float, d: int, s: dict[str, Any]) -> torch.Tensor:
    """vLLM's ``YaRNScalingRotaryEmbedding._compute_inv_freq``: interpolated low frequencies,
    extrapolated high ones, a linear ramp between the correction dims."""
    factor = float(_need(s, "factor"))
    orig = int(_need(s, "original_max_position_embeddings"))
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)
    pos = _pos_freqs(theta, d)
    extrap, interp = 1.0 / pos, 1.0 / (factor * pos)
    low = _yarn_correction_dim(beta_fast, d, theta, orig)
    high = _yarn_correction_dim(beta_slow, d, theta, orig)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp  # 1 = extrapolate (high frequencies), 0 = interpolate
    return interp * (1 - mask) + extrap * mask


def _longrope_factors(s: dict[str, Any], d: int, long: bool) -> torch.Tensor:
    key = "long_factor" if long else "short_factor"
    f = _need(s, key)
    if len(f) != d // 2:
        raise ValueError(f"longrope {key} has {len(f)} entries, expected rotary_dim / 2 = {d // 2}")
    return torch.tensor(f, dtype=torch.float32)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``positions`` ``[N]`` → two ``[N, rotary_dim // 2]`` fp32 tensors."""
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           inverse: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Apply ``scale * R(pos)`` (or undo it, ``inverse=True``: ``R(-pos) / scale``), NeoX layout.

    Args:
        x: ``[N, H, D]`` (any float dtype); the first ``2 * len(inv_freq)`` channels are rotated,
            the rest (partial rotary) pass through unscaled, as in vLLM.
        positions: ``[N]`` integer positions of the rows.
        inv_freq: ``[rotary_dim // 2]`` from :meth:`RopeSpec.inv_freq`.
        scale: :meth:`RopeSpec.attention_scale` (the constant in vLLM's cos/sin cache).
    Returns:
        ``[N, H, D]`` fp32.
    """
    cos, sin = cos_sin(positions, inv_freq)
    if inverse:
        sin = -sin
    cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.to(torch.float32)
    half = inv_freq.shape[0]
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if scale != 1.0:
        out = out / scale if inverse else out * scale
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
