"""The SeerAttention prefill gate (``Qavg_Kmaxminavg``) on plain torch tensors.

Used directly by the CPU backend and as the reference for the Triton kernels. Shapes per request:

* ``L`` context length (tokens already in the cache plus this step's new tokens), ``n`` new tokens,
  ``B`` the gate block size (64), ``nkb = ceil(L / B)`` key blocks, ``nqb`` query blocks touched by
  the ``n`` new tokens (absolute block ids ``qb0 .. qb0 + nqb - 1`` with ``qb0 = (L - n) // B``).
* ``Hq`` query heads, ``Hkv`` KV heads, ``D`` head dim, ``G`` gate hidden size (``G == D``).

Semantics follow upstream's ``AttnGate`` (``docs/upstream-semantics.md``): top-k ranks the causally
masked logits, threshold compares their softmax. Deviations (documented there and in the README):
the diagonal block is always active, ``last_block_dense`` applies to the last two query-block rows
of each prefill step, top-k ties go to the lowest block index, and the gate runs in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_seer.rope import cos_sin as rope_cos_sin
from vllm_seer.rope import rotate

SPARSITY_METHODS = ("threshold", "nz_ratio")


@dataclass(frozen=True)
class Selection:
    """How active blocks are chosen from gate probabilities."""

    method: str
    threshold: float
    nz_ratio: float
    last_block_dense: bool
    # the first ``sink_blocks`` key blocks are active in every row (0: upstream's selection).
    # Under ``nz_ratio`` they rank above every other causal block, so they count in the row's k
    # (a row grows only where a sink displaces its diagonal, which stays forced, or N > k); under
    # ``threshold`` they are kept whatever their probability.
    sink_blocks: int = 0

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            raise ValueError(f"sparsity_method must be one of {SPARSITY_METHODS}, got {self.method!r}")
        if isinstance(self.sink_blocks, bool) or not isinstance(self.sink_blocks, int) or (
                self.sink_blocks < 0):
            raise ValueError(f"sink_blocks must be an integer >= 0, got {self.sink_blocks!r}")


def pool_k(k_pre: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool pre-RoPE keys per block aligned to position 0.

    Args:
        k_pre: ``[L, Hkv, D]`` keys of positions ``0 .. L-1`` (pre-RoPE).
    Returns:
        ``[nkb, Hkv, 3D]`` fp32: ``[max | min | avg]``; the partial last block uses its real tokens.
    """
    L, h, d = k_pre.shape
    nkb = -(-L // block_size)
    pad = nkb * block_size - L
    kf = k_pre.to(torch.float32)
    blocks = torch.nn.functional.pad(kf, (0, 0, 0, 0, 0, pad)).view(nkb, block_size, h, d)
    valid = torch.arange(nkb * block_size, device=k_pre.device).view(nkb, block_size) < L
    valid = valid[:, :, None, None]
    kmax = blocks.masked_fill(~valid, float("-inf")).amax(dim=1)
    kmin = blocks.masked_fill(~valid, float("inf")).amin(dim=1)
    counts = valid.sum(dim=1).to(torch.float32)
    kavg = blocks.sum(dim=1) / counts
    return torch.cat((kmax, kmin, kavg), dim=-1)


def pool_q(q_pre: torch.Tensor, start: int, block_size: int) -> tuple[torch.Tensor, int]:
    """Average pre-RoPE queries per absolute block, over the tokens present.

    Args:
        q_pre: ``[n, Hq, D]`` queries of positions ``start .. start + n - 1``.
    Returns:
        (``[nqb, Hq, D]`` fp32, ``qb0``) where ``qb0`` is the absolute index of the first block.
    """
    n, h, d = q_pre.shape
    qb0 = start // block_size
    offset = start - qb0 * block_size
    nqb = -(-(offset + n) // block_size)
    pad_back = nqb * block_size - offset - n
    qf = torch.nn.functional.pad(q_pre.to(torch.float32), (0, 0, 0, 0, offset, pad_back))
    pos = torch.arange(nqb * block_size, device=q_pre.device)
    valid = ((pos >= offset) & (pos < offset + n)).view(nqb, block_size)
    counts = valid.sum(dim=1).to(torch.float32)[:, None, None]
    return qf.view(nqb, block_size, h, d).sum(dim=1) / counts, qb0


def gate_scores(q_pooled: torch.Tensor, qb0: int, k_pooled: torch.Tensor, weight: torch.Tensor,
                inv_freq: torch.Tensor, block_size: int, rope_scale: float = 1.0) -> torch.Tensor:
    """Causally masked gate logits (upstream ``AttnGate`` without its softmax).

    Args:
        q_pooled: ``[nqb, Hq, D]`` from :func:`pool_q`.
        k_pooled: ``[nkb, Hkv, 3D]`` from :func:`pool_k`.
        weight: ``[Hq, 3D, G]`` the layer's ``mask_linear_k`` weight (``x @ W`` layout).
        inv_freq: ``[rotary_dim // 2]`` RoPE inverse frequencies of the served model.
        rope_scale: the model's RoPE ``attention_scale`` (YaRN / LongRoPE mscale): the gate's RoPE at
            block starts is the model's own, cos/sin scaled by it as upstream does.
    Returns:
        ``[Hq, nqb, nkb]`` fp32 ``q_gate . k_gate / sqrt(G)`` for key blocks ``<=`` the query
        block, ``-inf`` elsewhere (upstream fills ``-1e9``; same order, same softmax).
    """
    nqb, hq, _ = q_pooled.shape
    nkb, hkv, _ = k_pooled.shape
    g = weight.shape[-1]
    k_rep = k_pooled.repeat_interleave(hq // hkv, dim=1)  # [nkb, Hq, 3D]
    k_proj = torch.einsum("nhc,hcg->nhg", k_rep, weight.to(torch.float32))
    dev = q_pooled.device
    k_gate = rotate(k_proj, torch.arange(nkb, device=dev) * block_size, inv_freq, scale=rope_scale)
    q_gate = rotate(q_pooled, (qb0 + torch.arange(nqb, device=dev)) * block_size, inv_freq,
                    scale=rope_scale)
    scores = torch.einsum("qhg,khg->hqk", q_gate, k_gate) / math.sqrt(g)
    return scores.masked_fill(~_causal(qb0, nqb, nkb, dev), float("-inf"))


def gate_probs(q_pooled: torch.Tensor, qb0: int, k_pooled: torch.Tensor, weight: torch.Tensor,
               inv_freq: torch.Tensor, block_size: int, rope_scale: float = 1.0) -> torch.Tensor:
    """Gate probabilities: softmax over key blocks of :func:`gate_scores` (same arguments).

    Returns:
        ``[Hq, nqb, nkb]`` fp32; non-causal entries are 0.
    """
    scores = gate_scores(q_pooled, qb0, k_pooled, weight, inv_freq, block_size, rope_scale)
    return torch.softmax(scores, dim=-1)


def _causal(qb0: int, nqb: int, nkb: int, device: torch.device) -> torch.Tensor:
    """``[nqb, nkb]`` bool: key block ``<=`` absolute query block."""
    qb = qb0 + torch.arange(nqb, device=device)
    return torch.arange(nkb, device=device)[None, :] <= qb[:, None]


def topk_count(nkb: int, nz_ratio: float) -> int:
    """Key blocks kept per query block by ``nz_ratio`` top-k over ``nkb`` key blocks (upstream:
    ``1 - sqrt(1 - r)`` of them, at least one)."""
    return max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * nkb))


def select_scores(scores: torch.Tensor, qb0: int, sel: Selection) -> torch.Tensor:
    """Active-block mask from gate logits, as upstream selects.

    ``threshold`` compares the softmax of the logits; ``nz_ratio`` ranks the causally masked
    logits themselves, so a row whose probabilities underflow to 0 still keeps its ``k`` largest
    causal blocks. Ties go to the lowest block index (as the Triton select kernel).

    Args:
        scores: ``[Hq, nqb, nkb]`` from :func:`gate_scores` (non-causal entries are ignored).
    Returns:
        ``[Hq, nqb, nkb]`` bool, causal, diagonal always active.
    """
    if sel.method == "threshold":
        causal = _causal(qb0, scores.shape[1], scores.shape[2], scores.device)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return _finish(probs > sel.threshold, qb0, sel)
    return _finish(_topk(_sinks_first(scores, sel.sink_blocks), qb0, sel.nz_ratio), qb0, sel)


def select(probs: torch.Tensor, qb0: int, sel: Selection) -> torch.Tensor:
    """Active-block mask from block probabilities (the oracle's ground truth).

    ``threshold`` and ``nz_ratio`` both act on ``probs``; top-k ranks the causal entries only,
    ties to the lowest block index. For the gate's own output use :func:`select_scores`.

    Args:
        probs: ``[Hq, nqb, nkb]`` block probabilities (e.g. the distillation target).
    Returns:
        ``[Hq, nqb, nkb]`` bool, causal, diagonal always active.
    """
    if sel.method == "threshold":
        return _finish(probs > sel.threshold, qb0, sel)
    return _finish(_topk(_sinks_first(probs, sel.sink_blocks), qb0, sel.nz_ratio), qb0, sel)


def _sinks_first(values: torch.Tensor, sink_blocks: int) -> torch.Tensor:
    """``values [Hq, nqb, nkb]`` with the first ``sink_blocks`` key blocks raised to ``+inf`` (ranked
    first by top-k, ties among them to the lowest index); non-causal entries are masked later."""
    if sink_blocks == 0:
        return values
    out = values.to(torch.float32).clone()
    out[..., :sink_blocks] = float("inf")
    return out


def _topk(values: torch.Tensor, qb0: int, nz_ratio: float) -> torch.Tensor:
    """``[Hq, nqb, nkb]`` bool: the ``topk_count`` largest causal values per row (non-causal
    entries count as ``-inf``), ties to the lowest block index (stable descending sort)."""
    _, nqb, nkb = values.shape
    causal = _causal(qb0, nqb, nkb, values.device)
    ranked = values.to(torch.float32).masked_fill(~causal, float("-inf"))
    k = min(topk_count(nkb, nz_ratio), nkb)
    top = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)


def _finish(mask: torch.Tensor, qb0: int, sel: Selection) -> torch.Tensor:
    """Force the diagonal, the ``sink_blocks`` first key blocks and (``last_block_dense``) the last
    two rows; keep it causal."""
    _, nqb, nkb = mask.shape
    dev = mask.device
    qb = qb0 + torch.arange(nqb, device=dev)
    kb = torch.arange(nkb, device=dev)[None, :]
    mask = mask | (kb == qb[:, None]) | (kb < sel.sink_blocks)
    if sel.last_block_dense:
        last_rows = qb >= (qb0 + nqb - 2)
        mask = mask | last_rows[:, None]
    return mask & _causal(qb0, nqb, nkb, dev)


def gate_scores_post(q_post: torch.Tensor, k_post_ctx: torch.Tensor, weight: torch.Tensor,
                     inv_freq: torch.Tensor, block_size: int, rope_scale: float = 1.0
                     ) -> tuple[torch.Tensor, int]:
    """The gate's logits for one request, from the post-RoPE tensors vLLM has.

    The un-rotation divides ``rope_scale`` out (exact pre-RoPE q/k, as upstream pools them) and the
    RoPE at block starts multiplies it back in. Because max / min / avg pooling and the projection
    commute with a positive constant, leaving ``rope_scale`` at 1 on both sides (what the Triton
    kernels do) gives the same scores up to rounding when every channel is rotated; with partial
    rotary the pass-through channels are unscaled, so the scale must then be explicit.

    Args:
        q_post: ``[n, Hq, D]`` this step's queries (post-RoPE), positions ``L-n .. L-1``.
        k_post_ctx: ``[L, Hkv, D]`` every key of the context (post-RoPE), positions ``0 .. L-1``.
    Returns:
        (``[Hq, nqb, nkb]`` :func:`gate_scores` logits, ``qb0``).
    """
    n, L = q_post.shape[0], k_post_ctx.shape[0]
    dev = q_post.device
    start = L - n
    q_pre = rotate(q_post, torch.arange(start, L, device=dev), inv_freq, inverse=True,
                   scale=rope_scale)
    k_pre = rotate(k_post_ctx, torch.arange(L, device=dev), inv_freq, inverse=True,
                   scale=rope_scale)
    q_pooled, qb0 = pool_q(q_pre, start, block_size)
    scores = gate_scores(q_pooled, qb0, pool_k(k_pre, block_size), weight, inv_freq, block_size,
                         rope_scale)
    return scores, qb0


def gate_mask(q_post: torch.Tensor, k_post_ctx: torch.Tensor, weight: torch.Tensor,
              inv_freq: torch.Tensor, block_size: int, sel: Selection,
              rope_scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """The whole gate for one request: :func:`gate_scores_post` (same tensors) then
    :func:`select_scores`.

    Returns:
        (``[Hq, nqb, nkb]`` bool mask, ``qb0``).
    """
    scores, qb0 = gate_scores_post(q_post, k_post_ctx, weight, inv_freq, block_size, rope_scale)
    return select_scores(scores, qb0, sel), qb0


def block_rope_table(inv_freq: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """cos / sin of the gate's RoPE at block starts, for the Triton scores kernel.

    Args:
        inv_freq: ``[G // 2]`` RoPE inverse frequencies.
        num_blocks: blocks covered (``ceil(max_model_len / block_size)``: a request's blocks).
    Returns:
        ``[num_blocks, 2, G // 2]`` fp32 on ``inv_freq``'s device: ``[:, 0]`` cos and ``[:, 1]``
        sin of ``(j * block_size) * inv_freq``, the same values :func:`vllm_seer.rope.cos_sin` gives.
    """
    pos = torch.arange(num_blocks, device=inv_freq.device) * block_size
    cos, sin = rope_cos_sin(pos, inv_freq.to(torch.float32))
    return torch.stack((cos, sin), dim=1).contiguous()


def group_gate_weight(weight: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A layer's ``mask_linear_k`` weight laid out per KV group for one batched projection.

    Args:
        weight: ``[Hq, 3D, G]``.
    Returns:
        ``[Hkv, 3D, (Hq // Hkv) * G]`` fp32 contiguous: column block ``i`` of group ``h`` is query
        head ``h * (Hq // Hkv) + i``'s projection.
    """
    hq, c3, g = weight.shape
    if hq % num_kv_heads:
        raise ValueError(f"gate weight has {hq} query heads, not a multiple of {num_kv_heads} KV heads")
    group = hq // num_kv_heads
    w = weight.to(torch.float32).view(num_kv_heads, group, c3, g).permute(0, 2, 1, 3)
    return w.reshape(num_kv_heads, c3, group * g).contiguous()
