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


class _Builder:
    """The two things of vLLM's CPU metadata builder that ``cpu_builder_isa`` touches."""

    def __init__(self, isa: str | None) -> None:
        if isa is not None:
            self.isa = isa
        self.layers: tuple[list[str], str] | None = None

    def _set_isa_to_layers(self, names: list[str]) -> None:
        self.layers = (names, self.isa)


def test_cpu_builder_isa_serves_amx_as_vec_and_refuses_the_rest():
    """On x86 CPUs with AMX tiles vLLM picks 'amx' for bf16 (its cache layout is not the one Seer
    reads): the builder and every layer are switched to 'vec'; 'vec' stays; an ISA Seer cannot
    read stops start-up naming it; a builder without an ISA (older CPU backends) is left alone."""
    from vllm_seer.backend.compat import cpu_builder_isa

    b = _Builder("amx")
    cpu_builder_isa(b, ["model.layers.0.self_attn.attn"])
    assert b.isa == "vec" and b.layers == (["model.layers.0.self_attn.attn"], "vec")
    b = _Builder("vec")
    cpu_builder_isa(b, ["x"])
    assert b.isa == "vec" and b.layers is None
    for isa in ("vec16", "neon"):
        with pytest.raises(NotImplementedError, match=f"ISA '{isa}'.*--block-size"):
            cpu_builder_isa(_Builder(isa), ["x"])
    b = _Builder(None)
    cpu_builder_isa(b, ["x"])
    assert not hasattr(b, "isa") and b.layers is None


def test_vllm_picks_an_isa_the_backend_serves_on_this_cpu():
    """vLLM's own choice on this machine for the tests' settings (bf16 and fp32, 128-token pages,
    head size 64), through the same function its CPU builder calls, ends up as 'vec' after
    ``cpu_builder_isa`` (on an AMX machine vLLM itself says 'amx' for bf16)."""
    from vllm.v1.attention.backends import cpu_attn

    from vllm_seer.backend.compat import cpu_builder_isa

    for dtype in (torch.bfloat16, torch.float32):
        b = _Builder(cpu_attn._get_attn_isa(dtype, 128, 64))
        cpu_builder_isa(b, ["x"])
        assert b.isa == "vec", dtype
