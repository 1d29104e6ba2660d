"""Resumable training state: checkpoint files, data order, and the early-stop rule.

A checkpoint is a folder holding ``weights-N.safetensors`` (gate weights fp32 + the data-order RNG
state), ``adam_m-N.safetensors`` / ``adam_v-N.safetensors`` (AdamW moments, fp32; one file each so
every file stays under 16 MiB for a 30-layer model) and ``state.json`` (step, data position,
optimizer scalars, early-stop counters, history, the run's settings, and the names and sha256 of
the tensor files). ``N`` counts saves. A save writes new tensor files (temporary name, fsync,
rename), then ``state.json`` the same way, and only then deletes the previous tensor files: a run
killed at any point leaves a ``state.json`` whose files are all present and complete (a mismatch,
e.g. from a broken copy, is reported, never loaded). No pickles: nothing here calls ``torch.load``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "state.json"
TENSOR_FILES = {"weights": "weights", "exp_avg": "adam_m", "exp_avg_sq": "adam_v"}  # name stems


class StateError(RuntimeError):
    """A saved state is unreadable, incomplete, or belongs to a different run configuration."""


class DataOrder:
    """Epochs of seeded random permutations of ``n`` training windows, with a saveable cursor.

    The permutation of each epoch is drawn from ``self.gen`` when the epoch starts; the cursor is
    ``(epoch, pos)``. Saving the generator state and the cursor resumes the exact same sequence.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError("DataOrder needs at least one training window")
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self.perm = torch.randperm(n, generator=self.gen)

    def take(self, batch: int) -> list[int]:
        """The next ``batch`` window indices (a batch never spans two epochs)."""
        if self.pos + batch > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = torch.randperm(self.n, generator=self.gen)
        out = self.perm[self.pos:self.pos + batch].tolist()
        self.pos += len(out)
        return out

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return ({"n": self.n, "epoch": self.epoch, "pos": self.pos},
                {"rng_state": self.gen.get_state(), "perm": self.perm.clone()})

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if int(meta["n"]) != self.n:
            raise StateError(f"saved data order has {meta['n']} windows, the corpus now {self.n}")
        self.epoch, self.pos = int(meta["epoch"]), int(meta["pos"])
        self.gen.set_state(tensors["rng_state"])
        self.perm = tensors["perm"].clone()


@dataclass
class Plateau:
    """Early stop on the held-out loss.

    Rule: an evaluation *improves* when ``loss < best * (1 - min_rel_improve)``; training stops
    after ``patience`` consecutive evaluations without an improvement.
    """

    patience: int = 3
    min_rel_improve: float = 0.005
    best: float = math.inf
    bad: int = 0

    def update(self, loss: float) -> bool:
        """Record one held-out loss; True when the plateau rule says stop."""
        if loss < self.best * (1.0 - self.min_rel_improve):
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        return self.bad >= self.patience


@dataclass
class Checkpoint:
    """Everything needed to continue a run (tensors on the CPU)."""

    step: int
    weight: torch.Tensor
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    adam_step: float
    data: dict[str, Any]
    data_tensors: dict[str, torch.Tensor]
    plateau: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(folder: Path, ck: Checkpoint) -> None:
    """Write ``ck`` into ``folder`` (created); tensor files first, ``state.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, torch.Tensor]] = {
        "weights": {"weight": ck.weight, **ck.data_tensors}}
    if ck.exp_avg is not None and ck.exp_avg_sq is not None:
        groups["exp_avg"] = {"exp_avg": ck.exp_avg}
        groups["exp_avg_sq"] = {"exp_avg_sq": ck.exp_avg_sq}
    old = folder / STATE_JSON
    seq = int(json.loads(old.read_text()).get("save_seq", 0)) + 1 if old.is_file() else 1
    hashes = {}
    for key, tensors in groups.items():
        path = folder / f"{TENSOR_FILES[key]}-{seq}.safetensors"
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        _atomic_write(path, lambda p, t=cpu: save_file(t, str(p)))
        hashes[path.name] = _sha256(path)
    body = {"step": ck.step, "adam_step": ck.adam_step, "data": ck.data, "plateau": ck.plateau,
            "files": hashes, "save_seq": seq, **ck.meta}
    _atomic_write(folder / STATE_JSON,
                  lambda p: p.write_text(json.dumps(body, indent=1, allow_nan=True) + "\n"))
    for f in folder.glob("*.safetensors"):  # the previous save's files (and any left by a kill)
        if f.name not in hashes:
            f.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None when there is none yet.

    Raises:
        StateError: ``state.json`` names a tensor file that is missing or whose sha256 differs.
    """
    path = folder / STATE_JSON
    if not path.is_file():
        return None
    body = json.loads(path.read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name, digest in body["files"].items():
        f = folder / name
        if not f.is_file():
            raise StateError(f"{path} names {name}, which is missing from {folder}")
        if _sha256(f) != digest:
            raise StateError(f"{f}: sha256 differs from {path} (interrupted copy?)")
        tensors.update(load_file(str(f)))
    data_tensors = {k: tensors[k] for k in ("rng_state", "perm") if k in tensors}
    meta = {k: v for k, v in body.items()
            if k not in ("step", "adam_step", "data", "plateau", "files", "save_seq")}
    return Checkpoint(int(body["step"]), tensors["weight"], tensors.get("exp_avg"),
                      tensors.get("exp_avg_sq"), float(body["adam_step"]), body["data"],
                      data_tensors, body["plateau"], meta)


def plateau_state(p: Plateau) -> dict[str, Any]:
    d = asdict(p)
    d["best"] = None if math.isinf(p.best) else p.best
    return d


def plateau_from(d: dict[str, Any]) -> Plateau:
    best = d.get("best")
    return Plateau(int(d["patience"]), float(d["min_rel_improve"]),
                   math.inf if best is None else float(best), int(d["bad"]))
