"""Gate distillation: train only the prefill gates' ``mask_linear_k`` weights of a frozen model.

Loss (per layer, summed over layers, x10): ``KL(target || softmax(gate logits))`` in fp32 over the
causal key blocks of each query-block row, averaged over batch, heads and rows, with the first
quarter of query-block rows dropped. ``target`` is the block max-pooled true attention (see
:mod:`vllm_seer.train.features`). AdamW, linear warmup then cosine decay to zero, weight decay 0.

:func:`train` is resumable (:mod:`vllm_seer.train.state`): a run stopped at any point and started
again with the same settings continues from its last checkpoint (weights, optimizer moments, step,
data position, RNG) and ends with the same weights as an uninterrupted run. It stops at the first
of: ``cfg.steps`` steps, the held-out plateau (:class:`~vllm_seer.train.state.Plateau`), the
cumulative ``time_budget_s``; ``stop_after_s`` / ``stop_after_steps`` only pause this invocation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from vllm_seer.rope import cos_sin
from vllm_seer.train.state import (
    Checkpoint,
    DataOrder,
    Plateau,
    StateError,
    load_checkpoint,
    plateau_from,
    plateau_state,
    save_checkpoint,
)

log = logging.getLogger(__name__)


class GateModel(torch.nn.Module):
    """The trainable gate weights of every layer.

    Attributes:
        weight: ``[L, Hq, 3D, G]`` (``x @ W`` layout, like the checkpoint's ``mask_linear_k``).
    """

    def __init__(self, num_layers: int, num_q_heads: int, head_dim: int, gate_hidden: int,
                 inv_freq: torch.Tensor, block_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(3 * head_dim)  # nn.Linear's default init for fan_in = 3D
        w = (torch.rand(num_layers, num_q_heads, 3 * head_dim, gate_hidden, generator=gen) * 2 - 1)
        self.weight = torch.nn.Parameter(w * bound)
        self.block_size = block_size
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def log_probs(self, q_gate: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
        """Causal log-softmax gate scores.

        Args:
            q_gate: ``[B, L, nqb, Hq, G]`` pooled, rotated queries (fp32).
            k_pooled: ``[B, L, nkb, Hkv, 3D]`` pooled keys (fp32).
        Returns:
            ``[B, L, Hq, nqb, nkb]`` fp32; ``-inf`` above the block diagonal.
        """
        nqb, hq, g = q_gate.shape[-3:]
        nkb, hkv = k_pooled.shape[2], k_pooled.shape[3]
        k_rep = k_pooled.repeat_interleave(hq // hkv, dim=3)
        k_proj = torch.einsum("blnhc,lhcg->blnhg", k_rep, self.weight.to(torch.float32))
        pos = torch.arange(nkb, device=k_proj.device) * self.block_size
        cos, sin = cos_sin(pos, self.inv_freq)
        cos, sin = cos[:, None, :], sin[:, None, :]
        k1, k2 = k_proj[..., : g // 2], k_proj[..., g // 2:]
        k_gate = torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1)
        scores = torch.einsum("blqhg,blkhg->blhqk", q_gate, k_gate) / math.sqrt(g)
        causal = torch.ones(nqb, nkb, dtype=torch.bool, device=scores.device).tril()
        return torch.log_softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def distill_loss(logp: torch.Tensor, target: torch.Tensor, drop_frac: float = 0.25,
                 scale: float = 10.0) -> torch.Tensor:
    """KL(target || p) summed over key blocks and layers, averaged over batch, heads, kept rows.

    Args:
        logp: ``[B, L, Hq, nqb, nkb]`` from :meth:`GateModel.log_probs`.
        target: same shape, rows summing to 1, zero above the block diagonal.
    Returns:
        scalar fp32: ``scale * sum_L mean_{B,H,rows >= drop_frac*nqb} KL``.
    """
    nqb = logp.shape[-2]
    first = int(nqb * drop_frac)
    lp, tg = logp[..., first:, :], target[..., first:, :].to(torch.float32)
    lp = lp.masked_fill(tg == 0, 0.0)  # also removes the -inf above the diagonal
    kl = (torch.xlogy(tg, tg) - tg * lp).sum(dim=-1)  # [B, L, Hq, rows]
    return scale * kl.mean(dim=(0, 2, 3)).sum()


@dataclass
class TrainConfig:
    """Optimisation and stopping settings (defaults follow the upstream recipe where it applies).

    ``steps`` is the length of the cosine schedule and the step cap. ``patience`` /
    ``min_rel_improve`` are the plateau rule, ``time_budget_s`` the cumulative wall-clock cap
    over all invocations, ``stop_after_s`` / ``stop_after_steps`` pause this invocation only.
    """

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    patience: int = 3
    min_rel_improve: float = 0.005
    time_budget_s: float | None = None
    stop_after_s: float | None = None
    stop_after_steps: int | None = None

    def run_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one."""
        d = asdict(self)
        for k in ("time_budget_s", "stop_after_s", "stop_after_steps"):
            d.pop(k)
        return d


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warmup, then cosine to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Sequence indices of ``step``: epochs of seeded permutations, a pure function of ``step``."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * batch:(pos + 1) * batch].tolist()


Features = dict[str, torch.Tensor]


class FeatureSource(Protocol):
    """Training features by window index (e.g. extracted on the fly from the base model)."""

    tokens_per_item: int

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> Features:
        """Stacked features ``q_gate [B, L, nqb, Hq, D]``, ``k_pooled``, ``target`` on device."""
        ...


class ListSource:
    """A :class:`FeatureSource` over precomputed per-sequence feature dicts."""

    def __init__(self, items: Sequence[Features], device: torch.device) -> None:
        self.items, self.device = list(items), device
        self.tokens_per_item = int(self.items[0]["q_gate"].shape[1]) if self.items else 0

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: list[int]) -> Features:
        return stack_batch([self.items[i] for i in indices], self.device)


def stack_batch(items: list[Features], device: torch.device) -> Features:
    """Stack per-sequence features into a batch on ``device`` (fp32)."""
    return {k: torch.stack([it[k] for it in items]).to(device, torch.float32) for k in items[0]}


@torch.no_grad()
def evaluate(gates: GateModel, data: list[Features], device: torch.device, batch: int = 8) -> float:
    """Mean distillation loss over ``data``."""
    total, n = 0.0, 0
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        b = stack_batch(chunk, device)
        total += float(distill_loss(gates.log_probs(b["q_gate"], b["k_pooled"]), b["target"]))
        n += 1
    return total / max(n, 1)


@dataclass
class TrainResult:
    """What a run did: losses, why it stopped (None: paused), throughput, evaluation history."""

    steps: int
    seconds: float
    initial_eval: float
    final_eval: float
    final_train: float
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    tokens_seen: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    step_losses: list[list[float]] = field(default_factory=list)


TERMINAL = ("plateau", "max steps")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """Mutable progress of one training run (what a checkpoint holds besides tensors)."""

    def __init__(self, cfg: TrainConfig, n: int) -> None:
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.feat_s, self.train_s = 0.0, 0.0
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[list[float]] = []  # [step, tokens, loss]
        self.stop_reason: str | None = None
        self.order = DataOrder(n, cfg.seed)
        self.plateau = Plateau(cfg.patience, cfg.min_rel_improve)

    def meta(self, run_key: dict[str, Any]) -> dict[str, Any]:
        return {"run": run_key, "tokens": self.tokens, "elapsed_s": self.elapsed,
                "feature_s": self.feat_s, "train_s": self.train_s, "history": self.history,
                "step_losses": self.step_losses, "stop_reason": self.stop_reason}

    def restore(self, ck: Checkpoint) -> None:
        m = ck.meta
        self.step, self.tokens = ck.step, int(m["tokens"])
        self.elapsed, self.feat_s, self.train_s = (float(m["elapsed_s"]), float(m["feature_s"]),
                                                   float(m["train_s"]))
        self.history, self.step_losses = list(m["history"]), list(m["step_losses"])
        self.stop_reason = m.get("stop_reason")
        self.order.restore(ck.data, ck.data_tensors)
        self.plateau = plateau_from(ck.plateau)

    def stats(self) -> dict[str, float]:
        return {"feature_tok_s": self.tokens / self.feat_s if self.feat_s else 0.0,
                "train_tok_s": self.tokens / self.train_s if self.train_s else 0.0,
                "feature_s": self.feat_s, "train_s": self.train_s, "elapsed_s": self.elapsed}


def _check_key(saved: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} now {now.get(k)!r}" for k in diff)
        raise StateError(f"{folder} holds a run with other settings ({detail}); pass the same "
                         "settings, --fresh, or another --state folder")


def train(gates: GateModel, train_data: Sequence[Features] | FeatureSource,
          eval_data: list[Features], cfg: TrainConfig, device: torch.device,
          state_dir: Path | None = None, progress: Callable[[int, float, dict[str, float]], None]
          | None = None, run_key: dict[str, Any] | None = None) -> TrainResult:
    """Train ``gates`` in place; resumes from ``state_dir`` if it holds a checkpoint, saves to it.

    Args:
        train_data: per-sequence feature dicts or a :class:`FeatureSource`.
        eval_data: held-out per-sequence feature dicts (evaluated every ``cfg.eval_every`` steps).
        progress: called as ``progress(step, loss, stats)`` after each step.
        run_key: extra settings (model, data) a resumed run must match, stored with the state.
    """
    source = train_data if hasattr(train_data, "batch") else ListSource(train_data, device)
    key = {**cfg.run_key(), "windows": len(source), **(run_key or {})}
    gates.to(device)
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _Run(cfg, len(source))
    ck = load_checkpoint(state_dir) if state_dir is not None else None
    if ck is not None:
        _check_key(ck.meta["run"], key, state_dir)
        gates.weight.data.copy_(ck.weight.to(device))
        if ck.exp_avg is not None and ck.adam_step > 0:
            opt.state[gates.weight] = {"step": torch.tensor(ck.adam_step),
                                       "exp_avg": ck.exp_avg.to(device),
                                       "exp_avg_sq": ck.exp_avg_sq.to(device)}
        run.restore(ck)
        log.info("resumed from %s at step %d (%d tokens)", state_dir, run.step, run.tokens)
    if run.step == 0 and not run.history:
        first = evaluate(gates, eval_data, device)
        run.history.append({"step": 0, "tokens": 0, "train": None, "eval": first})
        run.plateau.update(first)  # the untrained gates' loss is the first "best"
    if run.stop_reason not in TERMINAL:
        run.stop_reason = None
        _loop(gates, opt, source, eval_data, cfg, device, run, state_dir, progress, key)
    final = evaluate(gates, eval_data, device)
    last_train = run.step_losses[-1][2] if run.step_losses else float("nan")
    return TrainResult(run.step, run.elapsed, float(run.history[0]["eval"]), final, last_train,
                       run.history, run.stop_reason, run.tokens, run.stats(), run.step_losses)


def _loop(gates: GateModel, opt: torch.optim.Optimizer, source: FeatureSource,
          eval_data: list[Features], cfg: TrainConfig, device: torch.device, run: _Run,
          state_dir: Path | None, progress: Callable[[int, float, dict[str, float]], None] | None,
          key: dict[str, Any]) -> None:
    t_call, base_elapsed, done_here = time.time(), run.elapsed, 0
    window = []
    while True:
        now = time.time() - t_call
        run.elapsed = base_elapsed + now
        if run.step >= cfg.steps:
            run.stop_reason = "max steps"
        elif cfg.time_budget_s is not None and run.elapsed >= cfg.time_budget_s:
            run.stop_reason = "time budget"
        if run.stop_reason is not None or (cfg.stop_after_s is not None and now >= cfg.stop_after_s
                                           ) or (cfg.stop_after_steps is not None
                                                 and done_here >= cfg.stop_after_steps):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(run.step, cfg)
        t0 = time.time()
        b = source.batch(run.order.take(cfg.batch_size))
        _sync(device)
        t1 = time.time()
        loss = distill_loss(gates.log_probs(b["q_gate"], b["k_pooled"]), b["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        t2 = time.time()
        del b
        run.feat_s += t1 - t0
        run.train_s += t2 - t1
        run.step += 1
        done_here += 1
        run.tokens += cfg.batch_size * source.tokens_per_item
        run.step_losses.append([run.step, run.tokens, loss_v])
        window.append(loss_v)
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            ev = evaluate(gates, eval_data, device)
            run.history.append({"step": run.step, "tokens": run.tokens,
                                "train": sum(window) / len(window), "eval": ev,
                                "lr": lr_at(run.step - 1, cfg), **run.stats()})
            window = []
            log.info("step %d tokens %d train %.4f eval %.4f (best %.4f, %d/%d without gain)",
                     run.step, run.tokens, run.history[-1]["train"], ev,
                     min(ev, run.plateau.best), run.plateau.bad, cfg.patience)
            if run.plateau.update(ev):
                run.stop_reason = "plateau"
        run.elapsed = base_elapsed + time.time() - t_call
        if progress is not None:
            progress(run.step, loss_v, run.stats())
        if state_dir is not None and run.step % cfg.save_every == 0:
            _save(state_dir, gates, opt, run, key)
    if state_dir is not None:
        _save(state_dir, gates, opt, run, key)


def _save(folder: Path, gates: GateModel, opt: torch.optim.Optimizer, run: _Run,
          key: dict[str, Any]) -> None:
    st = opt.state.get(gates.weight, {})
    data_meta, data_tensors = run.order.state()
    ck = Checkpoint(run.step, gates.weight.detach().float(), st.get("exp_avg"),
                    st.get("exp_avg_sq"), float(st["step"]) if "step" in st else 0.0, data_meta,
                    data_tensors, plateau_state(run.plateau), run.meta(key))
    save_checkpoint(folder, ck)
