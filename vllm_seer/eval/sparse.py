"""Block-sparse attention for evaluation, plugged into a transformers model.

A :class:`Selector` turns one layer's post-RoPE ``q: [T, Hq, D]`` / ``k: [T, Hkv, D]`` into an
active-block mask ``[Hq, nqb, nkb]``; :func:`masked_attention` computes exact softmax attention
restricted to those blocks (and causal inside them), ``chunk`` query rows at a time so the
``[Hq, T, T]`` map never exists whole. :func:`register` installs it as the transformers attention
implementation ``"seer_eval"``, reading the active selector from :data:`STATE`.

Selectors (all keep the diagonal block, and the last two query-block rows dense, like Seer):

* ``seer``: the trained gate (:func:`vllm_seer.gate.gate_mask`) with threshold or nz_ratio top-k,
  optionally with ``sink_blocks`` (the first key blocks always active, inside the top-k budget);
* ``ashape``: sink block 0 plus a local window of the most recent blocks, ``k`` blocks per row;
* ``oracle``: top-``k`` blocks of the true block max-pooled attention (the distillation target);
* ``vslash``: MInference's vertical-slash pattern estimated from the last 64 queries, at the same
  block budget (:mod:`vllm_seer.eval.vslash`, which says how faithfully).

For ``nz_ratio`` selectors ``k = max(1, int((1 - sqrt(1 - r)) * nkb))`` as upstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_seer.eval.vslash import vertical_slash_mask
from vllm_seer.gate import Selection, gate_mask, select
from vllm_seer.kernels.ground_truth import block_attn_ground_truth_ref

KINDS = ("dense", "seer", "ashape", "oracle", "vslash")


@dataclass
class Selector:
    """How active blocks are chosen. ``kind`` in :data:`KINDS`.

    ``weights``/``inv_freq`` are needed for ``seer`` (layer → ``[Hq, 3D, G]``, ``[G // 2]``).
    """

    kind: str
    method: str = "nz_ratio"
    nz_ratio: float = 0.1
    threshold: float = 5e-4
    block_size: int = 64
    weights: dict[int, torch.Tensor] | None = None
    inv_freq: torch.Tensor | None = None
    sink_blocks: int = 0  # seer only: Selection.sink_blocks

    def __post_init__(self) -> None:
        if self.sink_blocks and self.kind != "seer":
            raise ValueError(f"sink_blocks applies to the seer selector only, not {self.kind!r}")

    @property
    def label(self) -> str:
        """``dense``, ``seer nz=0.1``, ``seer thr=0.002``, ``seer+sink nz=0.1`` (one sink block),
        ``seer+sink2 nz=0.1``, ``oracle nz=0.1``..."""
        if self.kind == "dense":
            return "dense"
        name = self.kind
        if self.sink_blocks:
            name += "+sink" + (str(self.sink_blocks) if self.sink_blocks > 1 else "")
        return f"{name} thr={self.threshold:g}" if self.method == "threshold" else (
            f"{name} nz={self.nz_ratio:g}")

    def selection(self) -> Selection:
        return Selection(self.method, self.threshold, self.nz_ratio, last_block_dense=True,
                         sink_blocks=self.sink_blocks)

    def mask(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """``[Hq, nqb, nkb]`` bool mask for one layer, or ``None`` for dense."""
        b = self.block_size
        if self.kind == "dense":
            return None
        if self.kind == "seer":
            if self.weights is None or self.inv_freq is None:
                raise ValueError("the seer selector needs gate weights and inv_freq")
            w = self.weights[layer].to(q.device)
            return gate_mask(q, k, w, self.inv_freq.to(q.device), b, self.selection())[0]
        if self.kind == "oracle":
            return select(block_attn_ground_truth_ref(q, k, block_size=b), 0, self.selection())
        if self.kind == "ashape":
            return ashape_mask(q.shape[1], -(-q.shape[0] // b), self.nz_ratio, q.device)
        if self.kind == "vslash":
            if self.method != "nz_ratio":
                raise ValueError("the vslash selector supports sparsity method nz_ratio only, "
                                 f"got {self.method!r}")
            return vertical_slash_mask(q, k, self.nz_ratio, b)
        raise ValueError(f"unknown selector kind {self.kind!r}; expected one of {KINDS}")


def ashape_mask(heads: int, nb: int, nz_ratio: float, device: torch.device) -> torch.Tensor:
    """Sink block + local window, ``k`` blocks per row, last two rows dense → ``[H, nb, nb]``."""
    k = max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * nb))
    qb = torch.arange(nb, device=device)[:, None]
    kb = torch.arange(nb, device=device)[None, :]
    m = (kb == 0) | ((qb - kb) < max(1, k - 1)) | (qb >= nb - 2)
    return (m & (kb <= qb))[None].expand(heads, nb, nb)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, block_size: int = 64, chunk: int = 512) -> torch.Tensor:
    """Causal attention restricted to active blocks.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]``; mask: ``[Hq, nqb, nkb]`` bool or ``None`` (dense).
    Returns:
        ``[T, Hq, D]`` in ``q.dtype`` (computed in fp32).
    """
    t, hq, _ = q.shape
    rep = hq // k.shape[1]
    qf = q.to(torch.float32).transpose(0, 1)
    kf = k.to(torch.float32).repeat_interleave(rep, dim=1).transpose(0, 1)
    vf = v.to(torch.float32).repeat_interleave(rep, dim=1).transpose(0, 1)
    out = torch.empty_like(qf)
    chunk = max(block_size, chunk // block_size * block_size)
    for r0 in range(0, t, chunk):
        r1 = min(r0 + chunk, t)
        s = torch.matmul(qf[:, r0:r1], kf[:, :r1].transpose(1, 2)) * scale  # [Hq, rows, r1]
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        allowed = torch.arange(r1, device=q.device)[None, :] <= rows
        if mask is not None:
            blk = mask[:, r0 // block_size:-(-r1 // block_size), :-(-r1 // block_size)]
            tok = blk.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
            allowed = allowed & tok[:, : r1 - r0, :r1]
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, r0:r1] = torch.matmul(torch.softmax(s, dim=-1), vf[:, :r1])
    return out.transpose(0, 1).to(q.dtype)


@dataclass
class EvalState:
    """The active selector and the density it achieved (active / causal blocks, all layers).

    With ``track_heads`` it also keeps, per layer, the active blocks of each query head
    (``heads[layer]``: ``[Hq]`` fp64) and that layer's causal blocks per head (``head_causal``).
    """

    selector: Selector = field(default_factory=lambda: Selector("dense"))
    active: float = 0.0
    causal: float = 0.0
    track_heads: bool = False
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    head_causal: dict[int, float] = field(default_factory=dict)

    def reset(self, selector: Selector, track_heads: bool = False) -> None:
        self.selector, self.active, self.causal = selector, 0.0, 0.0
        self.track_heads, self.heads, self.head_causal = track_heads, {}, {}

    @property
    def density(self) -> float:
        return self.active / self.causal if self.causal else 1.0


STATE = EvalState()
ATTN_NAME = "seer_eval"


def seer_eval_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [1, Hq, T, D]`` → ``([1, T, Hq, D], None)``."""
    if query.shape[0] != 1:
        raise ValueError("seer_eval attention supports batch size 1")
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    sel = STATE.selector
    scale = scaling if scaling is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[0] != k.shape[0]:  # decode step(s) on a KV cache: dense (Seer is prefill-only)
        tq, tk = q.shape[0], k.shape[0]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        o = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scale, enable_gqa=True)
        return o.transpose(1, 2), None
    layer = int(module.layer_idx)
    mask = sel.mask(layer, q, k)
    nb = -(-q.shape[0] // sel.block_size)
    causal = nb * (nb + 1) / 2 * q.shape[1]
    STATE.causal += causal
    STATE.active += causal if mask is None else float(mask.sum())
    if STATE.track_heads:
        per = (torch.full((q.shape[1],), causal / q.shape[1], dtype=torch.float64) if mask is None
               else mask.sum((1, 2)).to("cpu", torch.float64))
        STATE.heads[layer] = STATE.heads.get(layer, 0) + per
        STATE.head_causal[layer] = STATE.head_causal.get(layer, 0.0) + causal / q.shape[1]
    if mask is None:
        o = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(1, 2), None
    return masked_attention(q, k, v, mask, scale, sel.block_size)[None], None


def register() -> str:
    """Register :func:`seer_eval_attention` with transformers; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, seer_eval_attention)
    return ATTN_NAME
