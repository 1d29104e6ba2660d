"""Plain-PyTorch ground truth for gate distillation (the reference).

Same signature as :func:`vllm_seer.kernels.ground_truth.triton.block_attn_ground_truth`.

For one sequence of ``T`` tokens with post-RoPE ``q: [T, Hq, D]`` and ``k: [T, Hkv, D]``
(``Hq % Hkv == 0``, GQA by head repetition), the true causal attention probabilities
``P[h, i, j] = softmax_j(q_i . k_j * scale)`` (``j <= i``) are max-pooled over each
``block_size x block_size`` tile aligned to position 0 (partial last blocks pool over their real
tokens), then each query-block row is renormalised to sum to 1. Tiles above the block diagonal
are 0.

The full ``[Hq, T, T]`` map is never materialised: query rows are processed ``chunk`` at a time.
"""

from __future__ import annotations

import math

import torch


def block_attn_ground_truth(q: torch.Tensor, k: torch.Tensor, block_size: int = 64,
                            sm_scale: float | None = None, chunk: int = 512) -> torch.Tensor:
    """Block max-pooled, row-normalised causal attention probabilities.

    Args:
        q: ``[T, Hq, D]`` post-RoPE queries of positions ``0 .. T-1``.
        k: ``[T, Hkv, D]`` post-RoPE keys of the same positions.
        block_size: tile edge ``B``.
        sm_scale: softmax scale (default ``1 / sqrt(D)``).
        chunk: query rows per step (rounded up to a multiple of ``block_size``); bounds memory.
    Returns:
        ``[Hq, nqb, nkb]`` fp32 with ``nqb = nkb = ceil(T / B)``; each row sums to 1.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    nb = -(-t // block_size)
    tp = nb * block_size
    chunk = max(block_size, -(-chunk // block_size) * block_size)
    kf = k.to(torch.float32).repeat_interleave(hq // hkv, dim=1).permute(1, 2, 0)  # [Hq, D, T]
    qf = q.to(torch.float32).transpose(0, 1)  # [Hq, T, D]
    out = torch.zeros(hq, nb, nb, dtype=torch.float32, device=q.device)
    cols = torch.arange(t, device=q.device)
    for r0 in range(0, t, chunk):
        r1 = min(r0 + chunk, t)
        s = torch.matmul(qf[:, r0:r1], kf) * scale  # [Hq, rows, T]
        rows = torch.arange(r0, r1, device=q.device)
        s = s.masked_fill(cols[None, None, :] > rows[None, :, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        rpad = -(-(r1 - r0) // block_size) * block_size - (r1 - r0)
        p = torch.nn.functional.pad(p, (0, tp - t, 0, rpad))  # zeros never win a max of probs
        pooled = p.view(hq, -1, block_size, nb, block_size).amax(dim=(2, 4))
        out[:, r0 // block_size:r0 // block_size + pooled.shape[1]] = pooled
    return out / out.sum(dim=-1, keepdim=True)
