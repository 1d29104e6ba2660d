"""One profiled launch of the block-sparse prefill kernel (Llama-3.1-8B shapes, 32k, density ~0.1).

Run under Nsight Compute with ``--profile-from-start off`` (and ``-k regex:_sparse_prefill_kernel``:
at 32k long rows are split, so the plan and combine kernels launch too): autotuning happens before
``cudaProfilerStart`` so exactly the tuned kernel is profiled.
"""

from __future__ import annotations

import torch
from vllm_seer.kernels.sparse_prefill import masks_to_block_lists
from vllm_seer.kernels.sparse_prefill.triton import sparse_prefill_paged


def main(T: int = 32768, hq: int = 32, hkv: int = 8, d: int = 128, page: int = 64,
         density: float = 0.1, packed: bool = True) -> None:
    """``packed``: K and V as views of one ``[P, page, Hkv, 2D]`` tensor of K|V token rows, as
    vLLM 0.26+ CUDA keeps them (with ``page % 64 == 0`` the kernel then loads key blocks by TMA,
    the served path); else two contiguous caches."""
    dev = "cuda"
    torch.manual_seed(0)
    n_pages = T // page
    if packed:
        kv = torch.randn(n_pages, page, hkv, 2 * d, device=dev, dtype=torch.bfloat16)
        kc, vc = kv[..., :d], kv[..., d:]
    else:
        kc = torch.randn(n_pages, page, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
    table = torch.randperm(n_pages, device=dev, dtype=torch.int32)[None]
    q = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    nb = T // 64
    qb = torch.arange(nb, device=dev)
    causal = torch.arange(nb, device=dev)[None, :] <= qb[:, None]
    mask = (torch.rand(hq, nb, nb, device=dev) < density) & causal
    mask |= torch.eye(nb, dtype=torch.bool, device=dev)
    index, count = masks_to_block_lists([mask])
    cu = torch.tensor([0, T], device=dev, dtype=torch.int32)
    lens = torch.tensor([T], device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    args = (q, kc, vc, table, cu, lens, index, count, out, d ** -0.5, 64)
    sparse_prefill_paged(*args)  # autotune
    torch.cuda.synchronize()
    print(f"density {mask.sum().item() / causal.sum().item() / hq:.3f}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    sparse_prefill_paged(*args)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--page", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--separate", action="store_true", help="separate K and V caches")
    a = ap.parse_args()
    main(T=a.tokens, page=a.page, packed=not a.separate)
