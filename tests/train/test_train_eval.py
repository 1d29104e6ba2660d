"""Tiny end-to-end checks of the gate trainer and the eval selectors (CPU, seconds)."""

import math
from pathlib import Path

import pytest
import torch
from vllm_seer.kernels.ground_truth import block_attn_ground_truth_ref

from vllm_seer.checkpoint import load_gates, save_gates, seer_config_fields
from vllm_seer.eval.report import markdown
from vllm_seer.eval.sparse import Selector, ashape_mask, masked_attention
from vllm_seer.gate import pool_k, pool_q
from vllm_seer.rope import RopeSpec, rotate
from vllm_seer.train.data import list_documents, split_of
from vllm_seer.train.trainer import (
    GateModel,
    TrainConfig,
    batch_indices,
    distill_loss,
    lr_at,
    train,
)

B, HQ, HKV, D, L = 16, 4, 2, 16, 2


def _features(seed: int, t: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(t, HQ, D, generator=g), torch.randn(t, HKV, D, generator=g)
    inv = RopeSpec(D, 1e4).inv_freq()
    qp, _ = pool_q(q, 0, B)
    pos = torch.arange(t)
    target = block_attn_ground_truth_ref(rotate(q, pos, inv), rotate(k, pos, inv), block_size=B)
    one = {"q_gate": rotate(qp, torch.arange(qp.shape[0]) * B, inv), "k_pooled": pool_k(k, B),
           "target": target}
    return {n: torch.stack([v] * L) for n, v in one.items()}


def test_split_is_deterministic_and_disjoint() -> None:
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    train = {d.name for d in list_documents("train")}
    held = {d.name for d in list_documents("heldout")}
    assert train and held and not train & held


def test_lr_schedule_and_batches() -> None:
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) < 0.01
    assert batch_indices(3, 10, 4, 0) == batch_indices(3, 10, 4, 0)


def test_gate_matches_library_gate_and_loss_is_kl() -> None:
    from vllm_seer.gate import gate_probs

    f = _features(0)
    inv = RopeSpec(D, 1e4).inv_freq()
    gm = GateModel(L, HQ, D, D, inv, B)
    lp = gm.log_probs(f["q_gate"][None], f["k_pooled"][None])[0, 0]
    ref = gate_probs(_pooled_q(0), 0, f["k_pooled"][0], gm.weight[0].detach(), inv, B)
    torch.testing.assert_close(lp.exp(), ref, rtol=1e-4, atol=1e-6)
    tgt = f["target"][None]
    assert float(distill_loss(torch.log(tgt.clamp_min(1e-30)), tgt)) == pytest.approx(0, abs=1e-4)


def _pooled_q(seed: int, t: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, HQ, D, generator=g)
    return pool_q(q, 0, B)[0]


def test_training_reduces_loss_resumes_and_saves(tmp_path: Path) -> None:
    data = [_features(i) for i in range(6)]
    inv = RopeSpec(D, 1e4).inv_freq()
    cfg = TrainConfig(steps=30, batch_size=2, lr=1e-2, warmup=3, eval_every=10, save_every=10)
    gm = GateModel(L, HQ, D, D, inv, B)
    state = tmp_path / "state"
    res = train(gm, data[:4], data[4:], cfg, torch.device("cpu"), state)
    assert res.final_eval < res.initial_eval and (state / "state.json").is_file()
    again = train(GateModel(L, HQ, D, D, inv, B), data[:4], data[4:], cfg, torch.device("cpu"),
                  state)  # already at the last step: resumes and does nothing
    assert again.final_eval == pytest.approx(res.final_eval, rel=1e-5)
    cfg_json = {"num_hidden_layers": L, "num_attention_heads": HQ, "num_key_value_heads": HKV,
                "hidden_size": HQ * D, "head_dim": D, "base_model": "test",
                **seer_config_fields(gate_hidden=D, block_size=B)}
    out = save_gates(tmp_path / "g", {i: gm.weight[i].detach() for i in range(L)}, cfg_json)
    assert load_gates(out).num_layers == L


def test_masked_attention_dense_equals_sdpa_and_selectors() -> None:
    torch.manual_seed(0)
    t = 80
    q, k, v = torch.randn(t, HQ, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)
    scale = 1 / math.sqrt(D)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    full = torch.ones(HQ, 5, 5, dtype=torch.bool).tril()
    for mask in (None, full):
        torch.testing.assert_close(masked_attention(q, k, v, mask, scale, B, chunk=32), ref,
                                   rtol=1e-4, atol=1e-5)
    m = ashape_mask(HQ, 8, 0.3, torch.device("cpu"))
    assert m[:, :, 0].all() and (m.diagonal(dim1=1, dim2=2)).all() and not m.triu(1).any()
    oracle = Selector("oracle", nz_ratio=0.3, block_size=B).mask(0, q, k)
    assert oracle.shape == (HQ, 5, 5) and oracle.diagonal(dim1=1, dim2=2).all()


def test_report_tables() -> None:
    res = {"ppl": {"2048|a|dense": {"ppl": 10.0, "density": 1.0},
                   "2048|a|seer nz=0.1": {"ppl": 11.0, "density": 0.12}},
           "passkey": {"2048|0.5|0|dense": {"ok": True, "density": 1.0}}}
    md = markdown(res)
    assert "| dense | 10.000 (1.00) |" in md and "100%" in md
