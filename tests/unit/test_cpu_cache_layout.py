"""The CPU KV cache views read exactly what vLLM's CPU cache writer stored."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page", [32, 128])
def test_cpu_kv_views_read_what_vllm_wrote(dtype, page):
    from vllm import _custom_ops as ops

    from vllm_seer.backend.compat import cpu_kv_views

    nb, hkv, d, T = 5, 3, 64, 3 * page - 7
    kv = torch.full((nb, hkv, page, 2 * d), float("nan"), dtype=dtype)
    kc, vc = kv.view(nb, hkv, 2 * page, d).chunk(2, dim=2)
    k = torch.randn(T, hkv, d).to(dtype)
    v = torch.randn(T, hkv, d).to(dtype)
    slots = torch.arange(T) + page  # pages 1 .. 3
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    K, V = cpu_kv_views(kv, "vec")
    assert K.shape == V.shape == (nb, page, hkv, d)
    assert torch.equal(K.reshape(-1, hkv, d)[page:page + T], k)
    assert torch.equal(V.reshape(-1, hkv, d)[page:page + T], v)


def test_cpu_kv_views_refuse_other_isas():
    from vllm_seer.backend.compat import cpu_kv_views

    with pytest.raises(NotImplementedError, match="ISA 'amx' is not supported"):
        cpu_kv_views(torch.zeros(1, 1, 32, 128), "amx")
