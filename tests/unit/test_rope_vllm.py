"""Every RoPE variant the gate accepts, against vLLM's OWN rotary-embedding code (the installed build).

For each variant vLLM's ``get_rope`` (the class the served model uses) rotates random q/k at positions
spread over the model's whole length (up to 131072); un-rotating that with :mod:`vllm_seer.rope`
(inverse rotation, mscale divided out) must give the input back, and rotating forward must give
vLLM's output. Ignoring YaRN's / LongRoPE's mscale, or their frequency blend, fails both by far more
than the tolerance (checked below).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_seer.rope import RopeSpec, rotate

ATOL = 2e-5  # fp32 round trip of unit-variance values; the smallest wrong variant is off by > 1e-2
HEADS = 2

# (id, config fields, head_dim, max length served)
CASES = [
    ("default-llama", {"rope_theta": 500000.0}, 128, 8192),
    ("linear", {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
     64, 16384),
    ("llama3.1", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, 128, 131072),
    ("yarn-qwen2.5", {"rope_theta": 1000000.0, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, 128, 131072),
    ("yarn-attention-factor-no-truncate", {"rope_theta": 150000.0, "rope_scaling": {
        "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.3, "truncate": False}},
     64, 131072),
    ("yarn-mscale-all-dim", {"rope_theta": 10000.0, "rope_scaling": {
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
        "mscale": 1.0, "mscale_all_dim": 0.707}}, 64, 65536),
    ("partial-0.5", {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}, 128, 8192),
]


def _rope_params(fields: dict, head_dim: int) -> dict:
    """The ``rope_parameters`` dict transformers 5 builds (what vLLM 0.32 hands ``get_rope``)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=HEADS * head_dim, num_attention_heads=HEADS, head_dim=head_dim,
                      max_position_embeddings=131072, **fields)
    return cfg, dict(cfg.rope_parameters)


def _round_trip(rope, spec: RopeSpec, head_dim: int, max_len: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(0, 70), torch.randint(0, max_len, (300,), generator=gen),
                     torch.tensor([max_len - 1])])
    q = torch.randn(pos.numel(), HEADS, head_dim, generator=gen)
    k = torch.randn(pos.numel(), 1, head_dim, generator=gen)
    q_v, k_v = rope(pos, q.reshape(pos.numel(), -1).clone(), k.reshape(pos.numel(), -1).clone())
    q_v, k_v = q_v.view_as(q), k_v.view_as(k)
    assert (q_v - q).abs().max() > 0.1  # vLLM really rotated
    inv, m = spec.inv_freq(), spec.attention_scale()
    torch.testing.assert_close(rotate(q_v, pos, inv, inverse=True, scale=m), q, atol=ATOL, rtol=0)
    torch.testing.assert_close(rotate(k_v, pos, inv, inverse=True, scale=m), k, atol=ATOL, rtol=0)
    torch.testing.assert_close(rotate(q, pos, inv, scale=m), q_v, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,fields,head_dim,max_len", CASES, ids=[c[0] for c in CASES])
def test_unrotate_inverts_vllm_rotary_embedding(name, fields, head_dim, max_len):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    cfg, params = _rope_params(fields, head_dim)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_dim, max_len, True, rope_parameters=params, dtype=torch.float32)
        spec = RopeSpec.from_hf_config(cfg, head_dim, max_len)
        assert spec.rotary_dim == rope.rotary_dim
        _round_trip(rope, spec, head_dim, max_len)


def test_yarn_matches_vllm_cache_and_needs_mscale_and_blend():
    """The cos/sin vLLM caches are exactly ``mscale * cos/sin(pos * inv_freq)``; dropping the
    mscale or the frequency blend breaks the round trip."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    cfg, params = _rope_params(CASES[3][1], 128)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(128, 131072, True, rope_parameters=params, dtype=torch.float32)
    spec = RopeSpec.from_hf_config(cfg, 128, 131072)
    m = spec.attention_scale()
    assert m == pytest.approx(0.1 * math.log(4.0) + 1.0) and m == rope.mscale
    pos = torch.arange(0, 131072, 127)
    ang = pos.float()[:, None] * spec.inv_freq()[None, :]
    cos_v, sin_v = rope.cos_sin_cache[pos].chunk(2, dim=-1)
    torch.testing.assert_close(ang.cos() * m, cos_v, atol=1e-6, rtol=0)
    torch.testing.assert_close(ang.sin() * m, sin_v, atol=1e-6, rtol=0)
    x = torch.randn(pos.numel(), 1, 128)
    y, _ = rope(pos, x.reshape(pos.numel(), -1).clone(), x.reshape(pos.numel(), -1).clone())
    y = y.view_as(x)
    no_mscale = rotate(y, pos, spec.inv_freq(), inverse=True)
    assert (no_mscale - x).abs().max() > 0.1
    plain = RopeSpec(128, 1e6).inv_freq() / 4.0  # linear interpolation instead of the blend
    assert (rotate(y, pos, plain, inverse=True, scale=m) - x).abs().max() > 0.1


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A Phi-3.5-style config (LongRoPE, head_dim 96; Phi-4-mini style partial 0.75 below)."""
    from transformers import Phi3Config

    out = tmp_path_factory.mktemp("phi3")
    gen = torch.Generator().manual_seed(0)
    short = (1 + 0.2 * torch.rand(48, generator=gen)).tolist()
    long = (1 + 40 * torch.rand(48, generator=gen)).sort().values.tolist()
    Phi3Config(vocab_size=512, hidden_size=192, num_attention_heads=2, num_key_value_heads=1,
               num_hidden_layers=1, max_position_embeddings=131072,
               original_max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
               bos_token_id=1, architectures=["Phi3ForCausalLM"],
               rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
               ).save_pretrained(out / "hd96")
    Phi3Config(vocab_size=512, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
               num_hidden_layers=1, max_position_embeddings=131072, partial_rotary_factor=0.75,
               original_max_position_embeddings=4096, pad_token_id=0, eos_token_id=1,
               bos_token_id=1, architectures=["Phi3ForCausalLM"],
               rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
               ).save_pretrained(out / "partial")
    return out


@pytest.mark.parametrize("variant,head_dim,max_len", [("hd96", 96, 131072), ("hd96", 96, 4096),
                                                      ("partial", 128, 131072)],
                         ids=["longrope-long-hd96", "longrope-short-hd96", "longrope-partial-0.75"])
def test_unrotate_inverts_vllm_longrope(phi3_dir, variant, head_dim, max_len):
    """vLLM's Phi-3 LongRoPE picks short or long factors from ``max_model_len`` (read from the
    current vLLM config), so a real ``ModelConfig`` of the folder is made current."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers import rotary_embedding
    from vllm.model_executor.layers.rotary_embedding import get_rope

    # get_rope memoises by shape and rope parameters, not by max_model_len: start afresh
    rotary_embedding._ROPE_DICT.clear()
    mc = ModelConfig(model=str(phi3_dir / variant), skip_tokenizer_init=True,
                     max_model_len=max_len)
    hf = mc.hf_text_config
    with set_current_vllm_config(VllmConfig(model_config=mc)):
        rope = get_rope(head_dim, hf.max_position_embeddings, True,
                        rope_parameters=hf.rope_parameters, dtype=torch.float32)
    spec = RopeSpec.from_hf_config(hf, head_dim, max_len)
    assert rope.use_long_rope is (max_len > 4096)
    assert spec.rotary_dim == rope.rotary_dim and spec.partial is (variant == "partial")
    assert spec.attention_scale() == pytest.approx(
        rope.long_mscale if rope.use_long_rope else rope.short_mscale)
    _round_trip(rope, spec, head_dim, max_len)


def test_refused_variants_are_named():
    for rope_type, word in (("dynamic", "dynamic NTK"), ("mrope", "M-RoPE"),
                            ("su", "'su' is not supported")):
        cfg = SimpleNamespace(rope_theta=1e4, rope_scaling={"rope_type": rope_type, "factor": 2.0})
        with pytest.raises(ValueError, match=word):
            RopeSpec.from_hf_config(cfg, 64)
    cfg = SimpleNamespace(rope_theta=1e4, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeSpec.from_hf_config(cfg, 64).inv_freq()
    cfg = SimpleNamespace(rope_theta=1e4, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
        "original_max_position_embeddings": 4096}, max_position_embeddings=8192)
    with pytest.raises(ValueError, match="3 entries, expected rotary_dim / 2 = 32"):
        RopeSpec.from_hf_config(cfg, 64, 8192).inv_freq()



def _gate_probs_from_post(q_post, k_post, w, inv, block, unrotate_scale, block_scale):
    """The gate's scores from post-RoPE q/k (positions ``L-n .. L-1`` / ``0 .. L-1``)."""
    from vllm_seer.gate import gate_probs, pool_k, pool_q

    n, L = q_post.shape[0], k_post.shape[0]
    q_pre = rotate(q_post, torch.arange(L - n, L), inv, inverse=True, scale=unrotate_scale)
    k_pre = rotate(k_post, torch.arange(L), inv, inverse=True, scale=unrotate_scale)
    qp, qb0 = pool_q(q_pre, L - n, block)
    return gate_probs(qp, qb0, pool_k(k_pre, block), w, inv, block, block_scale)


def test_gate_scores_fold_the_yarn_mscale():
    """Upstream's scores: pooled pre-RoPE q/k under the model's own RoPE, cos/sin scaled by mscale.
    From vLLM's rotated q/k, the explicit path (divide on un-rotation, multiply at block starts,
    the CPU path) and the scale-free one the Triton kernels run (pooling and projection commute
    with a positive constant) both give them; dropping the mscale at block starts does not."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_seer.gate import gate_probs, pool_k, pool_q

    cfg, params = _rope_params(CASES[3][1], 64)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, 131072, True, rope_parameters=params, dtype=torch.float32)
    spec = RopeSpec.from_hf_config(cfg, 64, 131072)
    inv, m = spec.inv_freq(), spec.attention_scale()
    gen = torch.Generator().manual_seed(3)
    L, n, block = 640, 200, 64
    q_pre, k_pre = torch.randn(L, 4, 64, generator=gen), torch.randn(L, 2, 64, generator=gen)
    q_v, k_v = rope(torch.arange(L), q_pre.reshape(L, -1).clone(), k_pre.reshape(L, -1).clone())
    q_v, k_v = q_v.view(L, 4, 64)[L - n:], k_v.view(L, 2, 64)
    w = torch.randn(4, 192, 64, generator=gen) / 4
    qp, qb0 = pool_q(q_pre[L - n:], L - n, block)
    upstream = gate_probs(qp, qb0, pool_k(k_pre, block), w, inv, block, m)
    explicit = _gate_probs_from_post(q_v, k_v, w, inv, block, m, m)
    folded = _gate_probs_from_post(q_v, k_v, w, inv, block, 1.0, 1.0)
    torch.testing.assert_close(explicit, upstream, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(folded, upstream, atol=1e-5, rtol=1e-4)
    no_block_scale = _gate_probs_from_post(q_v, k_v, w, inv, block, m, 1.0)
    assert (no_block_scale - upstream).abs().max() > 1e-2
