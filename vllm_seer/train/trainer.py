"""Gate distillation: train only the prefill gates' ``mask_linear_k`` weights of a frozen model.

Loss (per layer, summed over layers, x10): ``KL(target || softmax(gate logits))`` in fp32 over the
causal key blocks of each query-block row, averaged over batch, heads and rows, with the first
quarter of query-block rows dropped. ``target`` is the block max-pooled true attention (see
:mod:`vllm_seer.train.features`). AdamW, linear warmup then cosine decay to zero, weight decay 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_seer.rope import cos_sin

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
    """Optimisation settings (defaults follow the upstream recipe where it applies)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0


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
    """What a run did: final losses and the loss history ``(step, train, eval | None)``."""

    steps: int
    seconds: float
    initial_eval: float
    final_eval: float
    final_train: float
    history: list[tuple[int, float, float | None]] = field(default_factory=list)


def train(gates: GateModel, train_data: list[Features], eval_data: list[Features],
          cfg: TrainConfig, device: torch.device, state_path: Path | None = None,
          progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``gates`` in place; resumes from ``state_path`` if it exists and saves to it.

    Args:
        train_data / eval_data: per-sequence feature dicts of equal shapes (see ``features``).
        progress: called as ``progress(step, loss)`` after each step (e.g. a tqdm update).
    """
    gates.to(device)
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = 0, []
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        gates.weight.data.copy_(state["weight"])
        opt.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), [tuple(h) for h in state["history"]]
        log.info("resumed from %s at step %d", state_path, start)
    initial = evaluate(gates, eval_data, device) if start == 0 else float(history[0][2])
    if start == 0:
        history.append((0, float("nan"), initial))
    t0, loss_v = time.time(), float("nan")
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        b = stack_batch([train_data[i] for i in batch_indices(step, len(train_data),
                                                              cfg.batch_size, cfg.seed)], device)
        loss = distill_loss(gates.log_probs(b["q_gate"], b["k_pooled"]), b["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        done = step + 1
        ev = evaluate(gates, eval_data, device) if done % cfg.eval_every == 0 else None
        if ev is not None or done == cfg.steps:
            history.append((done, loss_v, ev))
            if ev is not None:
                log.info("step %d train %.4f eval %.4f lr %.2e", done, loss_v, ev, lr_at(step, cfg))
        if progress is not None:
            progress(done, loss_v)
        if state_path is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            _save_state(state_path, gates, opt, done, history)
    final = evaluate(gates, eval_data, device)
    return TrainResult(cfg.steps, time.time() - t0, initial, final, loss_v, history)


def _save_state(path: Path, gates: GateModel, opt: torch.optim.Optimizer, step: int,
                history: list[tuple[int, float, float | None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    hist = [[s, tr, -1.0 if ev is None else ev] for s, tr, ev in history]
    torch.save({"weight": gates.weight.detach().cpu(), "optimizer": opt.state_dict(),
                "step": step, "history": hist}, tmp)
    tmp.replace(path)
