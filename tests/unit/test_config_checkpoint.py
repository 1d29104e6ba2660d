"""SeerConfig parsing/validation and gate checkpoint load/save, including every kind of bad file."""

from __future__ import annotations

import json

import pytest
import torch
from _gate_files import MODEL_CFG, rewrite_pth

from vllm_seer.checkpoint import (
    KEY_TEMPLATE,
    PTH_FILE,
    SAFETENSORS_FILE,
    GateCheckpointError,
    load_gates,
    save_gates,
)
from vllm_seer.config import DEFAULT_PAIR_MAX_RATIO, SeerConfig, SeerConfigError
from vllm_seer.tiny_model import build_random_gates


@pytest.fixture
def gates(tmp_path):
    return build_random_gates(tmp_path / "g", MODEL_CFG, method="nz_ratio", nz_ratio=0.2)


def test_round_trip_both_formats(gates, tmp_path):
    a = load_gates(gates)  # safetensors preferred
    (gates / SAFETENSORS_FILE).unlink()
    b = load_gates(gates)  # upstream .pth
    assert a.num_layers == 2 and a.num_q_heads == 4 and a.num_kv_heads == 2 and a.head_dim == 64
    for i in range(2):
        assert a.weights[i].shape == (4, 192, 64) and a.weights[i].dtype == torch.bfloat16
        assert torch.equal(a.weights[i], b.weights[i])
    out = save_gates(tmp_path / "again", b.weights, b.config, formats=("safetensors",))
    assert torch.equal(load_gates(out).weights[1], b.weights[1])


def test_upstream_file_is_plain_tensor_dict(gates):
    raw = torch.load(gates / PTH_FILE, weights_only=True)
    assert sorted(raw) == [KEY_TEMPLATE.format(0), KEY_TEMPLATE.format(1)]


def test_missing_key(gates):
    rewrite_pth(gates, lambda r: r.pop(KEY_TEMPLATE.format(1)))
    with pytest.raises(GateCheckpointError, match=r"missing model\.layers\.1\.self_attn"):
        load_gates(gates)


def test_extra_key(gates):
    rewrite_pth(gates, lambda r: r.__setitem__("model.layers.0.self_attn.attn_gate.mask_linear_q.weight",
                                               torch.zeros(1)))
    with pytest.raises(GateCheckpointError, match="unexpected tensor .*mask_linear_q"):
        load_gates(gates)


def test_wrong_shape(gates):
    rewrite_pth(gates, lambda r: r.__setitem__(KEY_TEMPLATE.format(0), torch.zeros(4, 128, 64)))
    msg = r"layers\.0.*shape \[4, 128, 64\], expected \[4, 192, 64\]"
    with pytest.raises(GateCheckpointError, match=msg):
        load_gates(gates)


def test_layer_beyond_model(gates):
    rewrite_pth(gates, lambda r: r.__setitem__(KEY_TEMPLATE.format(5), torch.zeros(4, 192, 64)))
    with pytest.raises(GateCheckpointError, match="beyond num_hidden_layers=2"):
        load_gates(gates)


def test_pickle_with_code_is_refused(gates):
    (gates / SAFETENSORS_FILE).unlink()
    torch.save({"x": torch.nn.Linear(2, 2)}, gates / PTH_FILE)
    with pytest.raises(GateCheckpointError, match="weights-only"):
        load_gates(gates)


def test_bad_config(gates):
    (gates / "config.json").write_text("{not json")
    with pytest.raises(GateCheckpointError, match="not valid JSON"):
        load_gates(gates)
    cfg = {**MODEL_CFG, "seerattn_gate_type": "Qproj_Kmaxmin"}
    (gates / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GateCheckpointError, match="seerattn_gate_type"):
        load_gates(gates)


def test_no_weights_and_no_folder(gates, tmp_path):
    (gates / SAFETENSORS_FILE).unlink()
    (gates / PTH_FILE).unlink()
    with pytest.raises(GateCheckpointError, match="neither"):
        load_gates(gates)
    with pytest.raises(GateCheckpointError, match="not a folder"):
        load_gates(tmp_path / "nope")


def test_check_against_model(gates):
    ckpt = load_gates(gates)
    ckpt.check_against(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=64)
    with pytest.raises(GateCheckpointError, match="num_hidden_layers=2 but the served model has"):
        ckpt.check_against(num_layers=30, num_q_heads=4, num_kv_heads=2, head_dim=64)
    with pytest.raises(GateCheckpointError, match="num_key_value_heads"):
        ckpt.check_against(num_layers=2, num_q_heads=4, num_kv_heads=4, head_dim=64)


def test_null_kv_heads_means_multi_head(gates):
    """``num_key_value_heads: null`` (accepted by the config check) reads as num_attention_heads."""
    cfg_path = gates / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_key_value_heads": None}))
    ckpt = load_gates(gates)
    assert ckpt.num_kv_heads == ckpt.num_q_heads == 4
    ckpt.check_against(num_layers=2, num_q_heads=4, num_kv_heads=4, head_dim=64)


def test_config_defaults_from_checkpoint_and_overrides(gates):
    cfg = SeerConfig.from_dict({"gates": str(gates)})
    assert cfg.selection.method == "nz_ratio" and cfg.selection.nz_ratio == 0.2
    assert cfg.pair_max_ratio == DEFAULT_PAIR_MAX_RATIO
    assert cfg.gates == gates.resolve()
    cfg = SeerConfig.from_dict({"gates": str(gates), "sparsity_method": "threshold",
                                "threshold": 2e-3, "dense_layers": [1],
                                "min_prefill_tokens": 0, "last_block_dense": False,
                                "pair_max_ratio": 0})
    assert cfg.pair_max_ratio == 0.0
    assert not SeerConfig.from_dict({"gates": str(gates)}).pooled_key_cache  # off by default
    assert SeerConfig.from_dict({"gates": str(gates), "pooled_key_cache": True}).pooled_key_cache
    assert cfg.selection.method == "threshold" and cfg.selection.threshold == 2e-3
    assert cfg.dense_layers == frozenset({1}) and cfg.min_prefill_tokens == 0
    assert not cfg.selection.last_block_dense
    assert cfg.selection.sink_blocks == 0  # upstream's selection by default
    sink = SeerConfig.from_dict({"gates": str(gates), "sink_blocks": 2})
    assert sink.selection.sink_blocks == 2 and sink.describe()["sink_blocks"] == "2"


@pytest.mark.parametrize(("extra", "message"), [
    ({"treshold": 1e-3}, r"unknown seer setting\(s\) \['treshold'\]"),
    ({"threshold": 0}, r"'threshold' must be in \(0, 1\)"),
    ({"threshold": "high"}, "'threshold' must be a number"),
    ({"nz_ratio": 1.5}, r"'nz_ratio' must be in \(0, 1\]"),
    ({"sparsity_method": "topk"}, "'sparsity_method' must be one of"),
    ({"last_block_dense": "yes"}, "'last_block_dense' must be true or false"),
    ({"min_prefill_tokens": -1}, "'min_prefill_tokens' must be an integer >= 0"),
    ({"dense_layers": [0, "1"]}, "'dense_layers' must be a list"),
    ({"dense_layers": [7]}, "names a layer >= num_hidden_layers=2"),
    ({"pair_max_ratio": 0.5}, r"'pair_max_ratio' must be 0 \(no pair tiles\) or a number in"),
    ({"pair_max_ratio": 2.5}, r"'pair_max_ratio' must be 0"),
    ({"pair_max_ratio": True}, r"'pair_max_ratio' must be 0"),
    ({"pooled_key_cache": "yes"}, "'pooled_key_cache' must be true or false, got 'yes'"),
    ({"sink_blocks": -1}, "'sink_blocks' must be an integer >= 0, got -1"),
    ({"sink_blocks": 1.0}, "'sink_blocks' must be an integer >= 0, got 1.0"),
    ({"sink_blocks": True}, "'sink_blocks' must be an integer >= 0, got True"),
])
def test_config_refuses_bad_values(gates, extra, message):
    with pytest.raises(SeerConfigError, match=message):
        SeerConfig.from_dict({"gates": str(gates), **extra})


def test_config_requires_gates_and_resolves(tmp_path):
    with pytest.raises(SeerConfigError, match="'gates' is required"):
        SeerConfig.from_dict({})
    with pytest.raises(SeerConfigError, match="needs --additional-config"):
        SeerConfig.from_additional_config({})
    with pytest.raises(SeerConfigError, match="not a folder and not a hub id"):
        SeerConfig.from_dict({"gates": str(tmp_path / "missing")})


def test_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SeerConfigError, match="offline .*not in the local hub cache"):
        SeerConfig.from_dict({"gates": "SeerAttention/SeerAttention-Llama-3.1-8B-AttnGates"})


def test_min_prefill_tokens_default_per_device(gates) -> None:
    """Not given: 2048 on CPU, 4096 on CUDA (the measured crossover); given: kept on both."""
    folder = gates
    cfg = SeerConfig.from_dict({"gates": str(folder)})
    assert cfg.min_prefill_tokens is None
    assert cfg.for_device("cpu").min_prefill_tokens == 2048
    assert cfg.for_device("cuda").min_prefill_tokens == 4096
    assert cfg.for_device("cuda").describe()["min_prefill_tokens"] == "4096"
    mine = SeerConfig.from_dict({"gates": str(folder), "min_prefill_tokens": 100})
    assert mine.for_device("cuda").min_prefill_tokens == 100
