"""Offline greedy generation under the eval selectors (tiny random Llama, CPU, seconds)."""

import pytest
import torch

from vllm_seer.eval.decode import eos_ids, greedy
from vllm_seer.eval.sparse import STATE, Selector, register
from vllm_seer.testing import ensure_test_model


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_test_model()
    tok = AutoTokenizer.from_pretrained(path)
    seer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=register()).eval()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               attn_implementation="sdpa").eval()
    return seer, ref, tok


def test_dense_greedy_equals_transformers_generate(models) -> None:
    seer, ref, tok = models
    prompt = torch.randint(5, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    got, dens = greedy(seer, prompt, Selector("dense"), 12, stop=set())
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           min_new_tokens=12, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist() and dens == 1.0


def test_sparse_prefill_then_dense_decode(models) -> None:
    seer, _, tok = models
    prompt = torch.randint(5, 500, (640,), generator=torch.Generator().manual_seed(1)).tolist()
    sel = Selector("ashape", nz_ratio=0.3)
    got, dens = greedy(seer, prompt, sel, 6, stop=set())
    assert len(got) == 6 and 0.1 < dens < 0.7
    # the first token is the argmax of the sparse prefill's last position, computed without cache
    STATE.reset(sel, track_heads=True)
    with torch.no_grad():
        logits = seer(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1]
    assert got[0] == int(logits.argmax())
    # per-head accounting adds up to the totals
    assert sum(float(a.sum()) for a in STATE.heads.values()) == pytest.approx(STATE.active)
    heads = seer.config.num_attention_heads
    assert sum(c * heads for c in STATE.head_causal.values()) == pytest.approx(STATE.causal)
    assert eos_ids(seer, tok) >= {2}
