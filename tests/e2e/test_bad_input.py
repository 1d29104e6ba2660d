"""Bad input stops `vllm serve` at start-up with a message naming the file, key or setting."""

from __future__ import annotations

import shutil

import pytest
import torch

from vllm_seer.checkpoint import KEY_TEMPLATE, PTH_FILE, SAFETENSORS_FILE
from vllm_seer.testing import SeerServer, ensure_test_model

pytestmark = pytest.mark.e2e
ARGS = ["--enforce-eager", "--max-model-len", "2048"]


def _gates_copy(tmp_path, edit):
    src = ensure_test_model() / "gates"
    dst = tmp_path / "gates"
    shutil.copytree(src, dst)
    (dst / SAFETENSORS_FILE).unlink()
    raw = torch.load(dst / PTH_FILE, weights_only=True)
    edit(raw)
    torch.save(raw, dst / PTH_FILE)
    return dst


def _refused(config: dict) -> str:
    srv = SeerServer(ensure_test_model(), config, ARGS)
    with pytest.raises(RuntimeError) as info:  # ServerError: exited during start-up
        srv.start()
    srv.stop()
    assert "exited with code" in str(info.value)
    return info.value.log  # type: ignore[attr-defined]


def test_wrong_shape_gate_checkpoint(tmp_path):
    gates = _gates_copy(tmp_path, lambda r: r.__setitem__(KEY_TEMPLATE.format(2),
                                                          torch.zeros(4, 64, 64)))
    log = _refused({"seer": {"gates": str(gates)}})
    assert f"{gates / PTH_FILE}: 'model.layers.2.self_attn.attn_gate.mask_linear_k.weight' " \
           "has shape [4, 64, 64], expected [4, 192, 64]" in log


def test_missing_gate_key(tmp_path):
    gates = _gates_copy(tmp_path, lambda r: r.pop(KEY_TEMPLATE.format(3)))
    log = _refused({"seer": {"gates": str(gates)}})
    assert "missing model.layers.3.self_attn.attn_gate.mask_linear_k.weight" in log


def test_unknown_config_key():
    log = _refused({"seer": {"gates": str(ensure_test_model() / "gates"), "treshold": 0.01}})
    assert "unknown seer setting(s) ['treshold']" in log
