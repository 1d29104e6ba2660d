"""inv_freq bit for bit against transformers and vLLM (issue 13, part 5b).

The gate's RoPE at block starts and the un-rotation of vLLM's post-RoPE q/k use
:meth:`vllm_seer.rope.RopeSpec.inv_freq`. Upstream SeerAttention takes its inv_freq from
transformers' ``ROPE_INIT_FUNCTIONS`` (``LlamaRotaryEmbedding``) and vLLM serves the model with its
``RotaryEmbedding._compute_inv_freq``; both compute in fp32. A 1-ulp difference flips threshold
decisions that sit on the boundary, so these must be equal exactly (``torch.equal``), not close.
"""

from __future__ import annotations

import pytest
import torch

from vllm_seer.rope import RopeSpec

MAX_LEN = 131072
# (id, LlamaConfig fields, head_dim)
CASES = [
    ("default-llama3-theta", {"rope_theta": 500000.0}, 128),
    ("default-smollm2", {"rope_theta": 100000.0}, 64),
    ("default-qwen2.5", {"rope_theta": 1000000.0}, 128),
    ("llama3.1", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, 128),
    ("llama3.2-factor32", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, 64),
    ("yarn-qwen2.5", {"rope_theta": 1000000.0, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, 128),
    ("yarn-attention-factor-no-truncate", {"rope_theta": 150000.0, "rope_scaling": {
        "rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.3, "truncate": False}}, 64),
]


def _configs(fields: dict, head_dim: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                      max_position_embeddings=MAX_LEN, **fields)
    return cfg, dict(cfg.rope_parameters)


@pytest.mark.parametrize("name,fields,head_dim", CASES, ids=[c[0] for c in CASES])
def test_inv_freq_bit_equal_to_transformers_and_vllm(name, fields, head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    cfg, params = _configs(fields, head_dim)
    spec = RopeSpec.from_hf_config(cfg, head_dim, MAX_LEN)
    ours = spec.inv_freq()
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)

    hf = LlamaRotaryEmbedding(cfg)  # what upstream's modeling code builds
    assert hf.inv_freq.dtype == torch.float32
    assert torch.equal(ours, hf.inv_freq), (ours - hf.inv_freq).abs().max()
    rope_type = params["rope_type"]
    if rope_type != "default":  # the init function itself (default has no entry in transformers 5)
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
        assert torch.equal(ours, inv)
        assert spec.attention_scale() == pytest.approx(scale, rel=1e-15)
    assert spec.attention_scale() == pytest.approx(hf.attention_scaling, rel=1e-15)

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_dim, MAX_LEN, True, rope_parameters=params, dtype=torch.float32)
    arg = rope.scaling_factor if rope_type == "yarn" else rope.base
    v_inv = rope._compute_inv_freq(arg)
    assert torch.equal(ours, v_inv), (ours - v_inv).abs().max()
    # and the angles vLLM caches: cos/sin of the same fp32 products, times its mscale
    pos = torch.arange(0, MAX_LEN, 61)
    ang = pos.to(torch.float32)[:, None] * ours[None, :]
    m = spec.attention_scale()
    cos_v, sin_v = rope.cos_sin_cache[pos].chunk(2, dim=-1)
    want_cos, want_sin = (ang.cos() * m, ang.sin() * m) if m != 1.0 else (ang.cos(), ang.sin())
    assert torch.equal(cos_v, want_cos) and torch.equal(sin_v, want_sin)


def test_inv_freq_is_not_the_float64_rounding():
    """The old computation (float64, rounded to fp32) differs from the fp32 one in some channels,
    so the bit-equality test above can tell them apart."""
    d, theta = 128, 500000.0
    f64 = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).to(torch.float32)
    assert not torch.equal(f64, RopeSpec(d, theta).inv_freq())
