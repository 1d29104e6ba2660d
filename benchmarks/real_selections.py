"""Block selections for the kernel benchmark: real SmolLM2 gate masks, structured ones, overlap stats.

Needs only ``torch`` and ``safetensors`` to load (the GPU host imports it from
``benchmarks/bench_kernels.py``); producing the data file needs the CPU venv with transformers and
the prepared SmolLM2 model (:mod:`selection_extract`). Masks are ``[H, nqb, nkb]`` bool over
64-token blocks, causal, diagonal always on.

* :func:`load_real_selection`: the block masks the distilled SmolLM2-135M gates
  (``vllm_seer/assets/gates/smollm2-135m``) produced on 8192 tokens of real text, stored in
  ``benchmarks/data/smollm2-selections-8k.safetensors`` (+ ``.json`` sidecar), mapped to Llama shapes
  (see :func:`real_selection_sources`) and to longer lengths by nearest-neighbour upscaling in block
  space (see the function's docstring for why and what it does to the overlap).
* :func:`structured_selection`: sink + local window + vertical stripes per head, with the gate's own
  top-k budget per row.
* :func:`adjacent_overlap`: Jaccard overlap of adjacent query-block rows, GQA-group union ratio.

Usage (CPU venv)::

    python benchmarks/real_selections.py extract   # runs SmolLM2, writes the data file (3-6 min)
    python benchmarks/real_selections.py overlap   # writes benchmarks/results/selection-overlap.md
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

BLOCK = 64
DATA = Path(__file__).resolve().parent / "data" / "smollm2-selections-8k.safetensors"
LAYOUT = "lower-triangle-rowmajor-packbits-msb"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def selection_key(source: str, nz_ratio: float | None = None, threshold: float | None = None) -> str:
    """Tensor name in the data file, e.g. ``code/nz_ratio=0.1`` or ``code/threshold=0.0005``."""
    if (nz_ratio is None) == (threshold is None):
        raise ValueError("give exactly one of nz_ratio and threshold")
    return f"{source}/nz_ratio={nz_ratio:g}" if threshold is None else f"{source}/threshold={threshold:g}"


def pack_lower(mask: torch.Tensor) -> torch.Tensor:
    """``[..., nb, nb]`` bool causal mask → ``[..., ceil(nb(nb+1)/2 / 8)]`` uint8 (lower triangle)."""
    nb = mask.shape[-1]
    rows, cols = torch.tril_indices(nb, nb)
    bits = mask[..., rows, cols].to(torch.uint8)
    pad = -bits.shape[-1] % 8
    bits = torch.nn.functional.pad(bits, (0, pad)).view(*bits.shape[:-1], -1, 8)
    return (bits * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_lower(packed: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of :func:`pack_lower`: ``[..., nbytes]`` uint8 → ``[..., nb, nb]`` bool."""
    n = nb * (nb + 1) // 2
    if packed.shape[-1] != -(-n // 8):
        raise ValueError(f"packed mask has {packed.shape[-1]} bytes, expected {-(-n // 8)} for nb={nb}")
    bits = ((packed[..., None] & _BIT_WEIGHTS) != 0).flatten(-2)[..., :n]
    rows, cols = torch.tril_indices(nb, nb)
    out = torch.zeros(*packed.shape[:-1], nb, nb, dtype=torch.bool)
    out[..., rows, cols] = bits
    return out


def real_selection_sources(n_heads: int, n_kv_heads: int, n_layers: int = 30, src_heads: int = 9,
                           src_kv_heads: int = 3) -> list[tuple[int, int]]:
    """Which stored SmolLM2 (layer, query head) feeds each target query head.

    KV group ``g`` of the target (``n_heads // n_kv_heads`` query heads) comes from one layer,
    ``round(g * (n_layers - 1) / (n_kv_heads - 1))`` (evenly spread, first and last included), and
    from SmolLM2 KV group ``g % src_kv_heads`` of that layer: its query heads in order, continuing into
    the next SmolLM2 group when the target group is larger (Llama's 4 per group vs SmolLM2's 3, so
    the 4th head of a Llama group is the first head of the neighbouring KV group of the same layer).
    For Llama-3.1-8B (32 / 8): layers 0, 4, 8, 12, 17, 21, 25, 29.
    """
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    gs, per_src = n_heads // n_kv_heads, src_heads // src_kv_heads
    if gs > src_heads:
        raise ValueError(f"a KV group of {gs} query heads cannot be filled from one {src_heads}-head layer")
    out = []
    for g in range(n_kv_heads):
        layer = round(g * (n_layers - 1) / (n_kv_heads - 1)) if n_kv_heads > 1 else n_layers // 2
        first = (g % src_kv_heads) * per_src
        out += [(layer, (first + m) % src_heads) for m in range(gs)]
    return out


def read_selection(path: str | Path, key: str) -> tuple[torch.Tensor, dict[str, str]]:
    """``[layers, heads, nb, nb]`` bool masks (as stored, last rows not forced dense) and metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: selection file not found (make it with "
                                "`python benchmarks/real_selections.py extract`)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("layout") != LAYOUT:
            raise ValueError(f"{path}: layout {meta.get('layout')!r}, expected {LAYOUT!r}")
        if key not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise KeyError(f"{path} has no selection {key!r}; it holds {sorted(f.keys())}")
        packed = f.get_tensor(key)
    return unpack_lower(packed, int(meta["nqb"])), meta


def causal_blocks(nqb: int, nkb: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[nqb, nkb]`` bool: the query blocks are the last ``nqb`` of ``nkb``."""
    qb = nkb - nqb + torch.arange(nqb, device=device)
    return torch.arange(nkb, device=device)[None, :] <= qb[:, None]


def dense_last_rows(mask: torch.Tensor, rows: int = 2) -> torch.Tensor:
    """``mask`` with its last ``rows`` query-block rows fully active (causally): ``last_block_dense``."""
    nqb, nkb = mask.shape[-2:]
    causal = causal_blocks(nqb, nkb, mask.device)
    out = mask.clone()
    out[..., nqb - rows:, :] = causal[nqb - rows:]
    return out


def load_real_selection(path: str | Path = DATA, n_heads: int = 32, seq_len: int = 8192,
                        nz_ratio: float | None = 0.1, *, threshold: float | None = None,
                        source: str = "code", n_kv_heads: int = 8, last_block_dense: bool = True,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """A real SmolLM2 gate selection for ``n_heads`` query heads at ``seq_len`` tokens.

    Args:
        path: the data file (default ``benchmarks/data/smollm2-selections-8k.safetensors``).
        n_heads, n_kv_heads: target shape; heads are taken as :func:`real_selection_sources` says.
        seq_len: a multiple of the stored 8192 tokens (8k, 32k, 128k, ...).
        nz_ratio / threshold: which stored gate setting (exactly one); ``source``: ``code`` or ``prose``.
        last_block_dense: force the last two query-block rows dense at the target length (upstream).
        device: where the mask is built and returned (a GPU builds the 128k one much faster).
    Returns:
        ``[n_heads, seq_len // 64, seq_len // 64]`` bool on ``device``, causal, diagonal on.

    Longer lengths (factor ``f = seq_len / 8192``), :func:`upscale_selection`: nearest-neighbour
    upscaling in block space, target block ``(i, j)`` = stored block ``(i // f, j // f)`` (causal),
    then re-thresholded to the stored row's density. A sink stays a sink, a stripe a stripe and a
    local window a local window ``f`` times as wide; every target row ``i`` made from stored row
    ``s = i // f`` of ``c`` of ``s + 1`` blocks holds ``min(i + 1, round(c (i + 1) / (s + 1)))`` blocks,
    the shortfall of the diagonal square (only its causal half survives) made up by the nearest
    inactive blocks left of the diagonal (a wider local window). So the per-row density and the
    growth of the row lists with ``L`` (a top-k gate keeps ``k`` proportional to ``L``) carry over.
    Tiling along the diagonal was not chosen: it would cut every row's reach to its own 8k tile (or
    need invented off-diagonal content) and repeat the sink in every tile. The price: the ``f`` rows
    made from one stored row share their off-diagonal lists, so the adjacent-row overlap at 32k / 128k
    is higher than the native 8k figure by construction (an upper bound for what pair tiles gain);
    compare with the 8k rows of ``benchmarks/results/selection-overlap.md``.
    """
    stored, meta = read_selection(path, selection_key(source, nz_ratio, threshold))
    base = int(meta["nqb"]) * int(meta["block_size"])
    if seq_len % base or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive multiple of the stored {base} tokens")
    f = seq_len // base
    srcs = real_selection_sources(n_heads, n_kv_heads, stored.shape[0], stored.shape[1],
                                  int(meta["num_kv_heads"]))
    m = upscale_selection(torch.stack([stored[layer, head] for layer, head in srcs]).to(device), f)
    return dense_last_rows(m) if last_block_dense else m


def upscale_selection(mask: torch.Tensor, f: int) -> torch.Tensor:
    """``[H, nb, nb]`` causal mask → ``[H, f nb, f nb]``, as :func:`load_real_selection` describes."""
    if f == 1:
        return mask.clone()
    h, nb, _ = mask.shape
    nt = nb * f
    causal = causal_blocks(nt, nt, mask.device)
    up = mask.repeat_interleave(f, 1).repeat_interleave(f, 2) & causal
    i = torch.arange(nt, device=mask.device)
    src = i // f
    count = mask.sum(-1, dtype=torch.float64)[:, src]  # [H, nt]
    want = torch.minimum(torch.round(count * (i + 1) / (src + 1)).long(), i + 1)
    short = (want - up.sum(-1)).clamp(min=0)  # [H, nt]
    for k in range(h):
        free = causal & ~up[k]
        rank = free.flip(-1).int().cumsum(-1, dtype=torch.int32).flip(-1)  # free blocks in [j, i]
        up[k] |= free & (rank <= short[k, :, None])
    return up


def topk_blocks(nkb: int, nz_ratio: float) -> int:
    """Blocks per row the gate's ``nz_ratio`` top-k keeps (``vllm_seer.gate.select``, as upstream)."""
    return max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * nkb))


def topk_density(nb: int, nz_ratio: float, last_block_dense: bool = True) -> float:
    """Density of a ``[nb, nb]`` mask with ``min(k + 1, i + 1)`` blocks in row ``i`` (last rows dense)."""
    k = topk_blocks(nb, nz_ratio)
    rows = [i + 1 if last_block_dense and i >= nb - 2 else min(k + 1, i + 1) for i in range(nb)]
    return sum(rows) / (nb * (nb + 1) / 2)


def structured_selection(n_heads: int, seq_len: int, density: float, seed: int = 0,
                         stripe_share: tuple[float, float] = (0.2, 0.6),
                         last_block_dense: bool = True,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """Sink + local window + vertical stripes per head, with the gate's top-k budget per row.

    ``density`` means what ``nz_ratio`` means for the gate: every row ``i`` holds exactly
    ``min(k + 1, i + 1)`` blocks with ``k = topk_blocks(nb, density)`` (the top-k plus the forced
    diagonal, as a gate whose top-k misses the diagonal), so the achieved density is that of the
    random-gate rows of ``bench_kernels.py`` at the same setting (with the last two rows dense:
    0.1 → 0.135 / 0.110 / 0.103, 0.05 → 0.091 / 0.058 / 0.052 at 8k / 32k / 128k; see
    :func:`topk_density`). Per head: the diagonal, the sink block 0, ``n = round(s * k)`` stripes at
    random key blocks ``1 .. nb-1`` (``s`` uniform in ``stripe_share``; a stripe at column ``c`` is on
    in rows ``> c``, the earliest-drawn stripes first when a row has no room), and a local window
    ending at the diagonal, as wide as the row's remaining budget.

    Random draws come from a CPU generator seeded with ``seed``, so the mask is the same on every
    ``device`` (building it there is faster at 128k).

    Returns:
        ``[n_heads, nb, nb]`` bool on ``device``, ``nb = ceil(seq_len / 64)``, causal, diagonal on.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    nb = -(-seq_len // BLOCK)
    k = topk_blocks(nb, density)
    gen = torch.Generator().manual_seed(seed)
    i = torch.arange(nb, device=device)
    budget = torch.clamp(i + 1, max=k + 1)  # [nb]
    cols = i[None, :]
    out = torch.empty(n_heads, nb, nb, dtype=torch.bool, device=device)
    for h in range(n_heads):
        share = stripe_share[0] + (stripe_share[1] - stripe_share[0]) * torch.rand(1, generator=gen).item()
        n_str = min(max(1, round(share * k)), nb - 1)
        stripes = (1 + torch.randperm(nb - 1, generator=gen)[:n_str]).to(device)  # priority = draw order
        sink = (i > 0) & (budget >= 2)
        room = budget - 1 - sink.long()
        on = stripes[None, :] < i[:, None]  # [nb, n_str]
        keep = on & (on.int().cumsum(1) <= room[:, None])
        base = cols == i[:, None]
        base[:, 0] |= sink
        base.scatter_(1, torch.where(keep, stripes[None, :], i[:, None]), True)
        # window [j, i]: the largest j with |base before j| + (i - j + 1) >= budget
        before = torch.nn.functional.pad(base.int().cumsum(1, dtype=torch.int32), (1, 0))[:, :nb]
        total = before + (i[:, None] - cols + 1)
        ok = (total >= budget[:, None]) & (cols <= i[:, None])
        start = torch.where(ok, cols, 0).amax(1)
        out[h] = (base | ((cols >= start[:, None]) & (cols <= i[:, None]))) & (cols <= i[:, None])
    return dense_last_rows(out) if last_block_dense else out


@dataclass(frozen=True)
class Overlap:
    """Selection statistics of one mask (see :func:`adjacent_overlap`)."""

    adjacent_jaccard: float
    group_union_ratio: float
    density: float
    pair_work_ratio: float


def adjacent_overlap(mask: torch.Tensor, group_size: int = 4, skip_last: int = 0) -> Overlap:
    """Overlap statistics of a block mask ``[H, nqb, nkb]`` (query blocks = the last ``nqb``).

    ``skip_last`` leaves the last query-block rows out of the pair statistics (``2``: the dense
    ``last_block_dense`` rows, which the kernels treat apart); density and group union use all rows.

    * ``adjacent_jaccard``: mean over heads and adjacent query-block pairs ``(j, j + 1)`` of
      ``|A ∩ B| / |A ∪ B|`` of their key-block sets (1 for two empty rows); every pair counts,
      the dense last rows too.
    * ``group_union_ratio``: density of the union over the ``group_size`` query heads of a KV group
      divided by the per-head density (1 = the heads agree, ``group_size`` = disjoint).
    * ``density``: active / causal blocks.
    * ``pair_work_ratio``: ``sum 2|A ∪ B| / sum (|A| + |B|)`` over the pairs: the blocks a 128-row
      tile over the union iterates relative to two 64-row tiles (1 = free, 2 = doubled).
    """
    h, nqb, nkb = mask.shape
    if h % group_size:
        raise ValueError(f"{h} heads are not a multiple of group_size={group_size}")
    rows = mask[:, : nqb - skip_last]
    a, b = rows[:, :-1], rows[:, 1:]
    inter = (a & b).sum(-1, dtype=torch.float64)
    union = (a | b).sum(-1, dtype=torch.float64)
    jac = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    active = mask.sum(dtype=torch.float64)
    causal = float(causal_blocks(nqb, nkb, mask.device).sum()) * h
    grouped = mask.view(h // group_size, group_size, nqb, nkb).any(1).sum(dtype=torch.float64)
    sizes = a.sum(-1, dtype=torch.float64) + b.sum(-1, dtype=torch.float64)
    return Overlap(adjacent_jaccard=float(jac.mean()) if jac.numel() else 1.0,
                   group_union_ratio=float(grouped * group_size / active) if active else 1.0,
                   density=float(active / causal),
                   pair_work_ratio=float(2 * union.sum() / sizes.sum()) if sizes.sum() else 1.0)


def read_sidecar(path: str | Path = DATA) -> dict:
    """The JSON sidecar written next to the data file."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text())


def main(argv: list[str] | None = None) -> int:
    """``extract`` (run SmolLM2, write the data file) or ``overlap`` (write the overlap table)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("extract", "overlap"):
        print("usage: python benchmarks/real_selections.py {extract|overlap} [options]", file=sys.stderr)
        return 2
    import selection_extract  # needs transformers + vllm_seer (CPU venv)

    return selection_extract.main(argv)


if __name__ == "__main__":
    sys.exit(main())
