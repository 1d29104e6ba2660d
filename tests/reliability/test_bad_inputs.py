"""Bad inputs refused at start-up, tested at the function that refuses them (no server).

Gate folders and files go through the real loader (``load_gates`` / ``SeerConfig.from_dict``);
models the backend cannot serve go through ``check_startup`` / ``check_served_model`` with a real
vLLM ``ModelConfig`` built from a variant of the tiny test model's ``config.json``. That these checks
run at start-up inside ``vllm serve`` is shown by ``tests/e2e/test_bad_input.py``. Every case is
listed in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _gate_files import MODEL_CFG, edit_json, rewrite_pth

from vllm_seer.checkpoint import (
    CONFIG_FILE,
    KEY_TEMPLATE,
    PTH_FILE,
    SAFETENSORS_FILE,
    GateCheckpointError,
    load_gates,
)
from vllm_seer.config import SeerConfig, SeerConfigError
from vllm_seer.testing import CPU_ENV, ensure_test_model
from vllm_seer.tiny_model import build_random_gates
from vllm_seer.validate import UnsupportedModelError

KEY0 = KEY_TEMPLATE.format(0)


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    """A valid 2-layer gate folder (safetensors + upstream .pth)."""
    return build_random_gates(tmp_path / "g", MODEL_CFG)


def _edit_config(gates: Path, **changes: Any) -> Path:
    return edit_json(gates / CONFIG_FILE, **changes)


def _refused(gates: Path, message: str) -> None:
    with pytest.raises(GateCheckpointError, match=message):
        load_gates(gates)


# -- the gates path --------------------------------------------------------------------------------
def test_gates_path_is_a_file(gates: Path) -> None:
    with pytest.raises(SeerConfigError, match=r"'gates': '.*config\.json' is a file, expected a folder"):
        SeerConfig.from_dict({"gates": str(gates / CONFIG_FILE)})


def test_gates_setting_not_a_string() -> None:
    with pytest.raises(SeerConfigError, match="seer setting 'gates' must be a str, got 5"):
        SeerConfig.from_dict({"gates": 5})


def test_gates_hub_id_invalid() -> None:
    with pytest.raises(SeerConfigError, match="'gates': 'bad id/x y' is not a folder and not a valid"):
        SeerConfig.from_dict({"gates": "bad id/x y"})


def _run_unprivileged(fn: Callable[[], None]) -> str:
    """Run ``fn`` where permission bits bind (a forked child as nobody when we are root); returns the
    message of what it raised, or '' if it returned."""
    if os.geteuid() != 0:
        try:
            fn()
        except Exception as e:  # the message is what the test checks
            return f"{type(e).__name__}: {e}"
        return ""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, report, never return into pytest
        msg = ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except BaseException as e:  # noqa: BLE001 (everything is reported to the parent)
            msg = f"{type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temporary folder other users may enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="seer-perm-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(path)


def test_gates_folder_unreadable(world_tmp: Path) -> None:
    gates = build_random_gates(world_tmp / "g", MODEL_CFG)
    gates.chmod(0)
    msg = _run_unprivileged(lambda: SeerConfig.from_dict({"gates": str(gates)}))
    assert msg == (f"GateCheckpointError: gate checkpoint {gates}: cannot read config.json "
                   "(Permission denied)")


def test_gates_parent_folder_not_searchable(world_tmp: Path) -> None:
    gates = build_random_gates(world_tmp / "private" / "g", MODEL_CFG)
    (world_tmp / "private").chmod(0o700)  # owner only: nobody cannot look inside
    msg = _run_unprivileged(lambda: SeerConfig.from_dict({"gates": str(gates)}))
    if os.geteuid() != 0:  # as the owner the folder is readable: nothing to refuse
        assert msg == ""
    else:
        assert msg == f"SeerConfigError: seer setting 'gates': cannot access '{gates}' (Permission denied)"


# -- config.json -----------------------------------------------------------------------------------
def test_config_json_missing(gates: Path) -> None:
    (gates / CONFIG_FILE).unlink()
    _refused(gates, r"no config\.json \(expected the base model's config plus base_model")


def test_config_json_not_utf8(gates: Path) -> None:
    (gates / CONFIG_FILE).write_bytes(b'{"a": "\xff\xfe"}')
    _refused(gates, r"config\.json: not UTF-8 text")


def test_config_json_not_an_object(gates: Path) -> None:
    (gates / CONFIG_FILE).write_text("[1, 2]")
    _refused(gates, r"config\.json: expected a JSON object, got list")


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_attention_heads": None}, r"missing required key 'num_attention_heads' \(a positive integer\)"),
    ({"head_dim": None, "hidden_size": None}, "missing required key 'hidden_size'"),
    ({"num_hidden_layers": "2"}, "'num_hidden_layers' must be a positive integer, got '2'"),
    ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"base_model": None}, "missing required key 'base_model'"),
    ({"base_model": ""}, "missing required key 'base_model'"),
], ids=["no-heads", "no-head-dim-or-hidden", "layers-string", "layers-zero", "kv-not-divisor",
        "no-base-model", "empty-base-model"])
def test_config_json_bad_field(gates: Path, changes: dict[str, Any], message: str) -> None:
    _edit_config(gates, **changes)
    _refused(gates, message)


def test_gate_block_size_not_supported(gates: Path) -> None:
    _edit_config(gates, seerattn_gate_block_size=48)
    _refused(gates, r"seerattn_gate_block_size=48 is not supported \(expected one of \[16, 32, 64, 128\]")


def test_gate_hidden_size_not_head_dim(gates: Path) -> None:
    _edit_config(gates, seerattn_gate_hidden_size=32)
    _refused(gates, "seerattn_gate_hidden_size=32 must equal head_dim=64")


def test_bad_default_in_checkpoint_names_the_file(gates: Path) -> None:
    cfg_path = _edit_config(gates, seerattn_threshold=5)
    with pytest.raises(SeerConfigError) as info:
        SeerConfig.from_dict({"gates": str(gates)})
    assert str(info.value) == (f"seer setting 'threshold' must be in (0, 1), got 5 "
                               f"(from {cfg_path.resolve()} 'seerattn_threshold')")
    # a flag that overrides the bad default is accepted
    assert SeerConfig.from_dict({"gates": str(gates), "threshold": 0.01}).selection.threshold == 0.01


# -- the tensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gate_weight(gates: Path, value: float) -> None:
    def poison(raw: dict[str, Any]) -> None:
        raw[KEY0] = raw[KEY0].clone()
        raw[KEY0][1, 2, 3] = value
    src = rewrite_pth(gates, poison)
    _refused(gates, f"{src}: '{KEY0}' has 1 NaN or Inf value\\(s\\); gate weights must be finite")


def test_integer_gate_weight(gates: Path) -> None:
    rewrite_pth(gates, lambda raw: raw.__setitem__(KEY0, torch.zeros(4, 192, 64, dtype=torch.int32)))
    _refused(gates, f"'{KEY0}' has dtype torch.int32, expected a floating-point tensor")


def test_non_tensor_value_in_pth(gates: Path) -> None:
    rewrite_pth(gates, lambda raw: raw.__setitem__(KEY0, [1.0, 2.0]))
    _refused(gates, f"'{KEY0}' is not a tensor \\(got list\\)")


def test_pth_not_a_dict(gates: Path) -> None:
    (gates / SAFETENSORS_FILE).unlink()
    torch.save(torch.zeros(3), gates / PTH_FILE)
    _refused(gates, "expected a dict of tensors, got Tensor")


class _RunsCommand:
    """A pickle payload that runs a shell command when unpickled without ``weights_only``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pth_with_code_is_not_executed(gates: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (gates / SAFETENSORS_FILE).unlink()
    torch.save({KEY0: _RunsCommand(marker)}, gates / PTH_FILE)
    _refused(gates, r"cannot be read as a weights-only torch file .*unsupported GLOBAL posix\.system")
    assert not marker.exists()
    # the same file does run its command under a full unpickle: the payload is real
    torch.load(gates / PTH_FILE, weights_only=False)
    assert marker.exists()


def test_truncated_pth(gates: Path) -> None:
    (gates / SAFETENSORS_FILE).unlink()
    data = (gates / PTH_FILE).read_bytes()
    (gates / PTH_FILE).write_bytes(data[: len(data) // 2])
    _refused(gates, f"{gates / PTH_FILE}: cannot be read as a weights-only torch file \\(truncated")


@pytest.mark.parametrize("cut", [0.5, 0.001], ids=["half", "inside-header"])
def test_truncated_safetensors(gates: Path, cut: float) -> None:
    """The .pth beside it is fine: a bad preferred file is an error, never a silent fallback."""
    data = (gates / SAFETENSORS_FILE).read_bytes()
    (gates / SAFETENSORS_FILE).write_bytes(data[: max(1, int(len(data) * cut))])
    _refused(gates, f"{gates / SAFETENSORS_FILE}: cannot be read as a safetensors file")


def test_not_a_safetensors_file(gates: Path) -> None:
    (gates / SAFETENSORS_FILE).write_text("hello, I am not a tensor file\n")
    _refused(gates, f"{gates / SAFETENSORS_FILE}: cannot be read as a safetensors file")


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "message"), [
    ({"threshold": -0.1}, r"'threshold' must be in \(0, 1\), got -0.1"),
    ({"threshold": 1.5}, r"'threshold' must be in \(0, 1\), got 1.5"),
    ({"threshold": 1}, r"'threshold' must be in \(0, 1\), got 1$"),
    ({"threshold": float("nan")}, r"'threshold' must be in \(0, 1\), got nan"),
    ({"nz_ratio": 0}, r"'nz_ratio' must be in \(0, 1\], got 0"),
    ({"nz_ratio": -0.5}, r"'nz_ratio' must be in \(0, 1\], got -0.5"),
    ({"nz_ratio": float("inf")}, r"'nz_ratio' must be in \(0, 1\], got inf"),
    ({"sparsity_method": "THRESHOLD"}, r"'sparsity_method' must be one of \['threshold', 'nz_ratio'\]"),
    ({"min_prefill_tokens": 1.5}, "'min_prefill_tokens' must be an integer >= 0, got 1.5"),
    ({"dense_layers": 3}, "'dense_layers' must be a list of layer indices"),
], ids=["threshold-negative", "threshold-above-1", "threshold-1", "threshold-nan", "nz-zero",
        "nz-negative", "nz-inf", "method-case", "min-prefill-float", "dense-layers-int"])
def test_setting_out_of_range(gates: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(SeerConfigError, match=message):
        SeerConfig.from_dict({"gates": str(gates), **extra})


def test_nan_from_command_line_json(gates: Path) -> None:
    """vLLM parses --additional-config with json.loads, which accepts NaN: still refused."""
    raw = json.loads(f'{{"seer": {{"gates": "{gates}", "threshold": NaN}}}}')
    with pytest.raises(SeerConfigError, match=r"'threshold' must be in \(0, 1\), got nan"):
        SeerConfig.from_additional_config(raw)


def test_seer_entry_not_an_object() -> None:
    with pytest.raises(SeerConfigError, match=r"additional_config\['seer'\] must be a JSON object"):
        SeerConfig.from_additional_config({"seer": "gates/"})


# -- models the backend cannot serve ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> Path:
    return ensure_test_model()


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    """No network for the vLLM config objects built below (the same env as the test servers)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CPU_ENV.items():
            mp.setenv(k, v)
        yield


def _variant(tiny: Path, out: Path, **changes: Any) -> Path:
    """A model folder whose config.json is the tiny model's with ``changes`` (no weights needed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    shutil.copy(tiny / CONFIG_FILE, out / CONFIG_FILE)
    edit_json(out / CONFIG_FILE, **changes)
    return out


def _vllm_config(model: Path, gates: Path, seer: dict[str, Any] | None = None,
                 **model_kwargs: Any) -> Any:
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    cache = CacheConfig(cache_dtype=model_kwargs.pop("cache_dtype", "auto"))
    extra = {"kv_transfer_config": model_kwargs.pop("kv_transfer_config")} if (
        "kv_transfer_config" in model_kwargs) else {}
    return VllmConfig(model_config=ModelConfig(model=str(model), **model_kwargs), cache_config=cache,
                      additional_config={"seer": {"gates": str(gates), **(seer or {})}}, **extra)


def _check(model: Path, gates: Path, **model_kwargs: Any) -> None:
    from vllm_seer.backend.runtime import check_startup

    check_startup(_vllm_config(model, gates, **model_kwargs))


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


def test_supported_variants_pass(tiny: Path, tmp_path: Path) -> None:
    """The checks refuse only what is wrong: the tiny model, its llama3-RoPE and Qwen2 twins, and a
    sliding window no shorter than the served context all pass."""
    _check(tiny, tiny / "gates")
    llama3 = _variant(tiny, tmp_path / "llama3", rope_parameters=LLAMA3_ROPE)
    gates3 = build_random_gates(tmp_path / "g3", json.loads((llama3 / CONFIG_FILE).read_text()))
    _check(llama3, gates3)
    qwen = _variant(tiny, tmp_path / "qwen2", model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                    sliding_window=4096, use_sliding_window=False)
    _check(qwen, build_random_gates(tmp_path / "gq", json.loads((qwen / CONFIG_FILE).read_text())))
    mistral = _variant(tiny, tmp_path / "mistral", model_type="mistral",
                       architectures=["MistralForCausalLM"], sliding_window=4096)
    gates_m = build_random_gates(tmp_path / "gm", json.loads((mistral / CONFIG_FILE).read_text()))
    _check(mistral, gates_m, max_model_len=4096)
    _check(tiny, tiny / "gates", cache_dtype="fp8")  # the CPU reference path dequantizes it


@pytest.mark.parametrize("variant", ["qwen2-moe-yarn", "qwen3-moe-yarn", "mixtral",
                                     "phi3-longrope-partial"])
def test_moe_and_long_rope_variants_pass(tmp_path: Path, variant: str) -> None:
    """The MoE siblings and the YaRN / LongRoPE / partial-rotary configs (the e2e test serves them)
    pass with gates made for them, and refuse gates of the variant's RoPE-less twin."""
    from vllm_seer.tiny_model import VARIANTS

    cfg_name, model_name, fields = VARIANTS[variant]
    import transformers

    out = tmp_path / "m"
    cfg = getattr(transformers, cfg_name)(
        vocab_size=2048, hidden_size=4 * int(fields.get("head_dim", 64)), intermediate_size=512,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=0, eos_token_id=2,
        architectures=[model_name], **fields)
    cfg.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_test_model() / name, out / name)
    model_cfg = json.loads((out / CONFIG_FILE).read_text())
    _check(out, build_random_gates(tmp_path / "g", model_cfg), max_model_len=4096)
    if variant != "mixtral":
        plain = {k: v for k, v in model_cfg.items()
                 if k not in ("rope_scaling", "rope_parameters", "partial_rotary_factor")}
        gates = build_random_gates(tmp_path / "g2", {**plain, "rope_theta": 1e6})
        with pytest.raises(UnsupportedModelError, match="different RoPE frequencies"):
            _check(out, gates, max_model_len=4096)


def test_pooled_key_cache_refused_where_it_cannot_work(tiny: Path) -> None:
    """The pooled-key cache is a CUDA kernel feature, and a KV connector writes pages it is not
    told about: both refused at start-up, naming the setting."""
    from vllm.config import KVTransferConfig

    from vllm_seer.backend.runtime import check_startup

    on = {"pooled_key_cache": True}
    check_startup(_vllm_config(tiny, tiny / "gates", {"pooled_key_cache": False}))
    with pytest.raises(SeerConfigError, match="'pooled_key_cache' is for CUDA .* runs on cpu"):
        check_startup(_vllm_config(tiny, tiny / "gates", on))
    connector = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    with pytest.raises(SeerConfigError, match=r"'pooled_key_cache' cannot be used with "
                                              r"--kv-transfer-config \(or KV offloading"):
        check_startup(_vllm_config(tiny, tiny / "gates", on, kv_transfer_config=connector))


def test_partial_rotary_refused_on_cuda_only() -> None:
    """The Triton kernels rotate the whole head: partial rotary is CPU-only for now."""
    from types import SimpleNamespace

    from vllm_seer.validate import ServedModel, check_served_model

    hf = SimpleNamespace(rope_theta=1e4, partial_rotary_factor=0.5, max_position_embeddings=4096)
    m = ServedModel("m", ("Phi3ForCausalLM",), hf, head_dim=96, max_model_len=4096)
    check_served_model(m)
    with pytest.raises(UnsupportedModelError, match=r"rotates 48 of 96 channels .*cuda kernels"):
        check_served_model(ServedModel("m", ("Phi3ForCausalLM",), hf, head_dim=96,
                                       max_model_len=4096, device="cuda"))


@pytest.mark.parametrize(("changes", "kwargs", "message"), [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 1024}, {},
     r"has sliding_window=1024 < max_model_len=8192; .*pass --max-model-len 1024"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 1024,
      "use_sliding_window": True, "max_window_layers": 2}, {},
     "has sliding_window=1024 < max_model_len=8192"),
    ({"model_type": "bloom", "architectures": ["BloomForCausalLM"], "n_head": 4, "n_layer": 4}, {},
     "uses ALiBi position bias; the Seer gate and kernels need RoPE"),
    ({"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "kv_lora_rank": 64,
      "q_lora_rank": None, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "v_head_dim": 64,
      "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}, {},
     r"uses multi-head latent attention \(MLA, kv_lora_rank=64\)"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, {},
     "rope_scaling type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, {},
     r"trained for base_model .* type=default, but the served model .* type=yarn \(different RoPE"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "sliding_window": 1024,
      "num_local_experts": 4, "num_experts_per_tok": 2}, {},
     "has sliding_window=1024 < max_model_len=8192"),
    ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "sliding_window": 1024,
      "use_sliding_window": True, "num_experts": 4, "num_experts_per_tok": 2,
      "moe_intermediate_size": 128}, {}, "has sliding_window=1024 < max_model_len=8192"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
      "dual_chunk_attention_config": {"chunk_size": 1024, "local_size": 128}}, {},
     r"uses dual chunk attention \(dual_chunk_attention_config"),
    ({"model_type": "bert", "architectures": ["BertModel"], "type_vocab_size": 2}, {},
     r"has 'encoder_only' attention .*causal decoder attention only"),
    ({"is_causal": False}, {"runner": "pooling"}, "has 'encoder_only' attention"),
    ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 256,
      "num_heads": 4, "num_layers": 2, "d_kv": 64, "d_ff": 512}, {},
     "has 'encoder_decoder' attention"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 256, "n_head": 4,
      "n_layer": 4}, {},
     r"architecture \['GPT2LMHeadModel'\] is not supported \(expected one of LlamaForCausalLM"),
], ids=["sliding-window", "qwen2-sliding-layers", "alibi", "mla", "rope-dynamic",
        "yarn-model-default-rope-gates", "mixtral-sliding-window", "qwen3-moe-sliding-window", "dual-chunk",
        "encoder-only", "non-causal-pooling", "encoder-decoder", "architecture"])
def test_unsupported_model_refused(tiny: Path, tmp_path: Path, changes: dict[str, Any],
                                   kwargs: dict[str, Any], message: str) -> None:
    model = _variant(tiny, tmp_path / "m", **changes)
    with pytest.raises(UnsupportedModelError, match=message) as info:
        _check(model, tiny / "gates", **kwargs)
    assert str(model) in str(info.value) or "kv-cache-dtype" in str(info.value)


# -- gates that do not fit the served model --------------------------------------------------------
@pytest.mark.parametrize(("changes", "message"), [
    ({"vocab_size": 32000}, "with vocab_size=32000, but the served model .* has vocab_size=2048"),
    ({"hidden_size": 512, "intermediate_size": 2048},
     "with hidden_size=512, but the served model .* has hidden_size=256"),
    ({"num_hidden_layers": 6}, "with num_hidden_layers=6, but the served model .* has num_hidden_layers=4"),
    ({"num_attention_heads": 8, "head_dim": 32},
     "with num_attention_heads=8, but the served model .* has num_attention_heads=4"),
    ({"head_dim": 32}, "with head_dim=32, but the served model .* has head_dim=64"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
     r"with RoPE theta=500000 type=default, but the served model .* has theta=10000"),
], ids=["vocab", "hidden", "layers", "heads", "head-dim", "rope-theta"])
def test_gates_for_another_base_model(tiny: Path, tmp_path: Path, changes: dict[str, Any],
                                      message: str) -> None:
    base = _variant(tiny, tmp_path / "other", **changes)  # the model the gates were trained for
    gates = build_random_gates(tmp_path / "g", json.loads((base / CONFIG_FILE).read_text()))
    load_gates(gates)  # a well-formed checkpoint, just not for this model
    with pytest.raises(UnsupportedModelError, match=f"gate checkpoint {gates / CONFIG_FILE}: "
                       f"trained for base_model 'vllm-seer/tiny-llama' {message}"):
        _check(tiny, gates)


def test_head_dim_and_kv_heads_mismatch_in_shapes(gates: Path) -> None:
    """The loaded weights against the served layer shapes (TP-aware, checked in every worker)."""
    ckpt = load_gates(gates)
    for kwargs, name in [({"num_q_heads": 8}, "num_attention_heads=4 but the served model has "
                          "num_attention_heads=8"),
                         ({"head_dim": 128}, "head_dim=64 but the served model has head_dim=128")]:
        shape = {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 64, **kwargs}
        with pytest.raises(GateCheckpointError, match=name):
            ckpt.check_against(**shape)


def test_get_runtime_runs_the_checks(tiny: Path, tmp_path: Path) -> None:
    """The backend's entry point refuses before it loads anything (the impl calls it at start-up)."""
    from vllm_seer.backend import runtime

    model = _variant(tiny, tmp_path / "m", model_type="mistral", architectures=["MistralForCausalLM"],
                     sliding_window=512)
    assert runtime._RUNTIME is None
    with pytest.raises(UnsupportedModelError, match="sliding_window=512 < max_model_len=8192"):
        runtime.get_runtime(_vllm_config(model, tiny / "gates"), 4, 2, 64, torch.device("cpu"))
    assert runtime._RUNTIME is None
