"""train-gates at small scale on the CPU: packed shards, document split, resumption, early stop,
time budget, log and plot (tiny random Llama from ``vllm_seer.tiny_model``)."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton ground truth runs on CPU in the interpreter only
    os.environ.setdefault("TRITON_INTERPRET", "1")
from safetensors.torch import load_file
from test_train_eval import HQ, B, D, L, _features

from vllm_seer.checkpoint import load_gates
from vllm_seer.rope import RopeSpec
from vllm_seer.tiny_model import build_tiny_llama
from vllm_seer.train.cli import train_gates_main
from vllm_seer.train.data import split_of, stdlib_root
from vllm_seer.train.pack import PackedCorpus, PackError, pack, parse_corpora
from vllm_seer.train.state import DataOrder, Plateau, StateError, load_checkpoint
from vllm_seer.train.trainer import GateModel, TrainConfig, train

CORPUS = f"code:{stdlib_root() / 'email'}:.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, packed corpus folder) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_llama(root / "model", num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, max_len=512)
    rc = train_gates_main(["pack", "--tokenizer", str(model), "--out", str(root / "data"),
                           "--corpus", CORPUS, "--heldout-permille", "200",
                           "--shard-tokens", "40000"])
    assert rc == 0
    return model, root / "data"


def test_pack_round_trip_and_manifest(tiny: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    model, data = tiny
    tok = AutoTokenizer.from_pretrained(model)
    corpus = PackedCorpus(data)
    m = corpus.manifest
    assert m["dtype"] == "uint16" and len(m["shards"]) >= 3  # 40k-token shards: several
    for d in m["documents"]:
        text = (stdlib_root() / "email" / d["name"]).read_text(encoding="utf-8", errors="replace")
        want = [*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert corpus.document("code", d["name"]).tolist() == want, d["name"]
    for s in m["shards"]:
        raw = lzma.decompress((data / s["file"]).read_bytes())
        assert len(raw) == 2 * s["tokens"] and s["bytes"] < len(raw)
    for split in ("train", "heldout"):
        assert m["totals"][f"{split}_tokens"] == sum(s["tokens"] for s in m["shards"]
                                                     if s["split"] == split)
    w = corpus.windows("train", 256)
    assert len(w) == m["totals"]["train_tokens"] // 256
    assert torch.equal(torch.cat(w), torch.from_numpy(
        corpus.stream("code", "train")[:len(w) * 256].astype("int64")))


def test_split_by_document_holds(tiny: tuple[Path, Path]) -> None:
    m = PackedCorpus(tiny[1]).manifest
    train = {d["name"] for d in m["documents"] if d["split"] == "train"}
    held = {d["name"] for d in m["documents"] if d["split"] == "heldout"}
    assert train and held and not train & held
    for d in m["documents"]:
        assert d["split"] == split_of(d["name"], 200)
    for s in m["shards"]:  # a shard holds one split only, and its documents say so
        docs = [d for d in m["documents"] if d["shard"] == s["file"]]
        assert docs and {d["split"] for d in docs} == {s["split"]}


def test_corrupt_shard_and_bad_specs_are_named(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny[1], copy)
    shard = copy / PackedCorpus(copy).manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(PackError, match=shard.name):
        PackedCorpus(copy)
    with pytest.raises(PackError, match="get-prose"):
        parse_corpora(f"prose:{tmp_path / 'nope'}:.txt")
    with pytest.raises(PackError, match="NAME:DIR:SUFFIXES"):
        parse_corpora("prose")
    assert [c.suffixes for c in parse_corpora(f"a:{tmp_path}:txt+md")] == [(".txt", ".md")]


def _run(tiny: tuple[Path, Path], state: Path, *extra: str) -> int:
    model, data = tiny
    return train_gates_main([str(model), "--out", str(state / "gates"), "--state", str(state),
                             "--data", str(data), "--seq-len", "256", "--batch-size", "2",
                             "--steps", "8", "--warmup", "2", "--eval-every", "2",
                             "--save-every", "3", "--eval-windows", "2", "--lr", "3e-2",
                             "--max-train-windows", "5", "--forward-batch", "2", *extra])


def test_resumed_run_equals_uninterrupted(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(tiny, a) == 0
    # b: paused after 4 steps (saved there), resumed, paused again, then finished; 5 windows and
    # batch 2 make the epochs reshuffle in between, so the data order and its RNG state matter.
    assert _run(tiny, b, "--stop-after-steps", "4") == 0
    assert load_checkpoint(b).step == 4
    assert _run(tiny, b, "--stop-after-steps", "1") == 0
    assert _run(tiny, b) == 0
    wa, wb = (_tensors(x) for x in (a, b))
    assert torch.equal(wa["weight"], wb["weight"]) and torch.equal(wa["rng_state"], wb["rng_state"])
    la, lb = (json.loads((x / "log.json").read_text()) for x in (a, b))
    assert la["steps"] == lb["steps"] == 8 and la["stop_reason"] == "max steps"
    assert [h["eval"] for h in la["history"]] == [h["eval"] for h in lb["history"]]
    assert la["history"][-1]["eval"] < la["history"][0]["eval"]  # it learns
    assert la["tokens_seen"] == 8 * 2 * 256 and la["feature_tok_s"] > 0 and la["train_tok_s"] > 0
    assert (a / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_gates(a / "gates").num_layers == 2
    assert _run(tiny, b, "--batch-size", "3") == 2  # other settings: refused, state untouched
    assert load_checkpoint(b).step == 8


def test_interrupted_save_is_detected(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    st = tmp_path / "s"
    assert _run(tiny, st, "--stop-after-steps", "3") == 0
    f = next(st.glob("adam_v-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(StateError, match="adam_v"):
        load_checkpoint(st)


def _tensors(state: Path) -> dict[str, torch.Tensor]:
    files = json.loads((state / "state.json").read_text())["files"]
    return load_file(str(state / next(f for f in files if f.startswith("weights-"))))


def test_plateau_rule() -> None:
    p = Plateau(patience=2, min_rel_improve=0.1)
    assert [p.update(x) for x in (10.0, 9.5, 9.2, 8.0, 7.9)] == [False, False, True, False, False]
    assert p.best == 8.0 and p.bad == 1
    assert p.update(7.5) is True  # 7.5 > 8.0 * 0.9: no gain twice in a row


def test_training_stops_on_plateau_and_time_budget(tmp_path: Path) -> None:
    data = [_features(i) for i in range(4)]
    inv = RopeSpec(D, 1e4).inv_freq()
    cfg = TrainConfig(steps=100, batch_size=2, lr=0.0, warmup=1, eval_every=2, save_every=50,
                      patience=3)
    res = train(GateModel(L, HQ, D, D, inv, B), data[:3], data[3:], cfg, torch.device("cpu"),
                tmp_path / "p")
    assert res.stop_reason == "plateau" and res.steps == 6  # lr 0: evals at 2, 4, 6 show no gain
    assert json.loads((tmp_path / "p" / "state.json").read_text())["stop_reason"] == "plateau"
    again = train(GateModel(L, HQ, D, D, inv, B), data[:3], data[3:], cfg, torch.device("cpu"),
                  tmp_path / "p")
    assert again.steps == 6 and again.stop_reason == "plateau"  # a finished run stays finished
    cfg_t = TrainConfig(steps=10**6, batch_size=2, lr=1e-2, warmup=1, eval_every=10**6,
                        save_every=10**6, time_budget_s=0.3)
    res_t = train(GateModel(L, HQ, D, D, inv, B), data[:3], data[3:], cfg_t, torch.device("cpu"),
                  tmp_path / "t")
    assert res_t.stop_reason == "time budget" and 0 < res_t.steps < 10**6
    assert load_checkpoint(tmp_path / "t").step == res_t.steps


def test_data_order_resumes_exactly() -> None:
    a = DataOrder(7, seed=3)
    seq = [a.take(3) for _ in range(6)]
    b = DataOrder(7, seed=3)
    first = [b.take(3) for _ in range(2)]
    meta, tensors = b.state()
    c = DataOrder(7, seed=99)
    c.restore(meta, tensors)
    assert first + [c.take(3) for _ in range(4)] == seq
    assert all(len(set(x)) == 3 for x in seq)


def test_pack_caps_train_tokens(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[0])
    m = pack(tok, parse_corpora(CORPUS), tmp_path / "d", max_train_tokens=20000,
             heldout_permille=200)
    full = PackedCorpus(tiny[1]).manifest["totals"]["train_tokens"]
    assert 20000 <= m["totals"]["train_tokens"] < full  # stops after the doc that crosses the cap
    assert m["totals"]["heldout_tokens"] == PackedCorpus(tiny[1]).manifest["totals"][
        "heldout_tokens"]


def test_gpu_script_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu/train_gates_gpu.py end to end on the CPU: prepare, staging calls, a warm
    call, a cold machine restaged with the carried state; the run ends at its last step."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "train_gates_gpu.py"
    spec = importlib.util.spec_from_file_location("train_gates_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["dry-run", "--work", str(tmp_path / "w")]) == 0
    plan = json.loads((tmp_path / "w" / "gpu-train" / "call1" / "plan.json").read_text())
    assert plan["calls"] >= 2 and len(plan["model"]["parts"]) >= 2
    outs = sorted((tmp_path / "w").glob("out*"), key=lambda d: int(d.name[3:]))
    assert json.loads((outs[-1] / "log.json").read_text())["finished"]
    for out in outs:  # what comes back from $OUT: at most 8 plain files of at most 16 MiB
        files = list(out.iterdir())
        assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2**20
                                       for f in files), files
    # the returned parts join to the state (sha256 checked), at the step the manifest names
    manifest = json.loads((outs[-1] / "state.tar.json").read_text())
    assert mod.unpack_state(outs[-1], tmp_path / "state") == manifest["step"] == 6
    assert (tmp_path / "state" / "state.json").is_file()
    (outs[-1] / manifest["parts"][0]).write_bytes(b"x")
    with pytest.raises(SystemExit, match="sha256"):
        mod.unpack_state(outs[-1], tmp_path / "state2")


def test_batched_extraction_matches_per_sequence_features(tiny: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from vllm_seer.train.features import ModelShape, ModelSource, sequence_features

    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    shape = ModelShape.from_hf_config(model.config)
    spec = RopeSpec.from_hf_config(model.config, shape.head_dim)
    windows = PackedCorpus(tiny[1]).windows("train", 192)[:3]  # 3 blocks of 64
    two = ModelSource(model, windows, spec, 64, forward_batch=2).batch([2, 0, 1])
    one = ModelSource(model, windows, spec, 64, forward_batch=1).batch([2, 0, 1])
    for name in ("q_gate", "k_pooled", "target"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    ref = sequence_features(model, windows[0], shape, spec, 64, dtype=torch.float32)
    for name in ("q_gate", "k_pooled", "target"):
        assert two[name].shape[1:] == ref[name].shape
        torch.testing.assert_close(two[name][1], ref[name], rtol=1e-4, atol=1e-5)


def test_extraction_with_the_triton_ground_truth(tiny: tuple[Path, Path]) -> None:
    """The kernel the GPU run uses, fed by ModelSource, equals the reference path."""
    from transformers import AutoModelForCausalLM

    from vllm_seer.train.features import ModelShape, ModelSource

    triton_gt = pytest.importorskip("vllm_seer.kernels.ground_truth.triton")
    model = AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.float32).eval()
    spec = RopeSpec.from_hf_config(model.config, ModelShape.from_hf_config(model.config).head_dim)
    windows = PackedCorpus(tiny[1]).windows("train", 160)[:1]  # 2.5 blocks: a partial one
    ref = ModelSource(model, windows, spec, 64).batch([0])
    got = ModelSource(model, windows, spec, 64,
                      ground_truth=triton_gt.block_attn_ground_truth).batch([0])
    torch.testing.assert_close(got["target"], ref["target"], rtol=1e-4, atol=1e-6)


def test_killed_run_continues_to_the_same_weights(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL a training process after its second checkpoint; the same command continues it."""
    import signal
    import subprocess
    import sys
    import time

    model, data = tiny
    args = [str(model), "--data", str(data), "--seq-len", "128", "--batch-size", "2",
            "--steps", "12", "--eval-every", "4", "--save-every", "1", "--eval-windows", "1",
            "--max-train-windows", "7", "--forward-batch", "2", "--lr", "3e-2", "--device", "cpu"]

    def cmd(state: Path) -> list[str]:
        return [sys.executable, "-m", "vllm_seer.cli", "train-gates", *args, "--state",
                str(state), "--out", str(state / "gates")]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        st = killed / "state.json"
        if st.is_file() and json.loads(st.read_text())["step"] >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(killed).step
    assert 2 <= step < 12, step  # it was killed mid-run
    assert train_gates_main(cmd(killed)[4:]) == 0  # the same command, continued
    whole = tmp_path / "whole"
    assert train_gates_main(cmd(whole)[4:]) == 0
    assert torch.equal(_tensors(killed)["weight"], _tensors(whole)["weight"])
    assert load_checkpoint(killed).step == 12
    assert len(list(killed.glob("*.safetensors"))) == 3  # the previous saves' files are gone
