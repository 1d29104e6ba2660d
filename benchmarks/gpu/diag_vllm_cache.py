"""Which side is wrong when the Seer kernels read NaN from a cache vLLM wrote (GPU host, bundle).

Writes K/V with vLLM's own ``reshape_and_cache_flash`` into a NaN-filled cache laid out as vLLM's
FlashAttention backend asks (as ``tests/kernels/test_vllm_cache_gpu.py`` does), then reports per KV
head the NaN fraction of the written token slots as seen through
``vllm_seer.backend.compat.cuda_kv_views``, and whether vLLM's own FA3 reading that cache agrees with
SDPA on the original K/V (if FA3 agrees and the views show NaN, the views or the writer's views
in the test are wrong; if FA3 disagrees too, the test writes the cache wrongly).
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "tests/kernels")
from _paged import make_batch  # noqa: E402
from test_vllm_cache_gpu import _vllm_cache  # noqa: E402

from vllm_seer.backend.compat import cuda_kv_views  # noqa: E402


def main() -> None:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    for page in (16, 64):
        lens, n_new, hq, hkv, d = [5000, 1300], [1200, 1300], 32, 8, 128
        batch = make_batch(lens, n_new, hq, hkv, d, page, torch.bfloat16, "token", "cuda")
        kv = _vllm_cache(batch, hkv, d, page, torch.bfloat16)
        k_cache, v_cache = cuda_kv_views(kv, d)
        print(f"page {page}: kv {tuple(kv.shape)} strides {kv.stride()}; k view "
              f"{tuple(k_cache.shape)} {k_cache.stride()}", flush=True)
        for b, L in enumerate(lens):
            t = torch.arange(L, device="cuda")
            pages = batch.block_table[b, t // page].long()
            k = k_cache[pages, t % page]  # [L, Hkv, D]
            v = v_cache[pages, t % page]
            kn = k.isnan().float().mean(dim=(0, 2)).tolist()
            vn = v.isnan().float().mean(dim=(0, 2)).tolist()
            ok = torch.equal(torch.nan_to_num(k), torch.nan_to_num(batch.keys[b]))
            print(f"  req {b}: NaN per head K {[round(x, 3) for x in kn]} V "
                  f"{[round(x, 3) for x in vn]}; K equals the written keys: {ok}", flush=True)
        # vLLM's FA3 on that cache vs SDPA on the original K/V (request 0, its new rows)
        L, n = lens[0], n_new[0]
        q = batch.q[:n]
        out = torch.empty_like(q)
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        fa_k, fa_v = kv.transpose(1, 2).split(d, dim=-1)
        flash_attn_varlen_func(q, fa_k, fa_v, n, cu, L, seqused_k=batch.seq_lens[:1],
                               softmax_scale=d ** -0.5, causal=True,
                               block_table=batch.block_table[:1], out=out, fa_version=3)
        t = torch.arange(L, device="cuda")
        kk = batch.keys[0].transpose(0, 1)[None].repeat_interleave(hq // hkv, 1).float()
        vv = batch.v_cache.reshape(-1, hkv, d)[batch.block_table[0, t // page].long() * page
                                              + t % page].transpose(0, 1)[None]
        vv = vv.repeat_interleave(hq // hkv, 1).float()
        qq = q.transpose(0, 1)[None].float()
        mask = torch.arange(L, device="cuda")[None, :] <= torch.arange(L - n, L, device="cuda")[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        err = float((out.float() - ref[0].transpose(0, 1)).norm() / ref.norm())
        print(f"  FA3 over the vLLM-written cache vs SDPA on the original K/V: rel err {err:.2e}"
              f" (NaN in FA3 output: {bool(out.isnan().any())})", flush=True)


if __name__ == "__main__":
    main()
