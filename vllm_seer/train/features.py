"""Per-layer gate-training features from one no-grad forward of the frozen base model.

Forward hooks on every layer's ``self_attn.q_proj`` / ``k_proj`` capture the pre-RoPE projections.
From them, per layer:

* ``q_gate``: block-averaged queries, RoPE-rotated at each block's first position
  (the gate's Q side has no parameters, so this is final) — ``[nqb, Hq, D]``;
* ``k_pooled``: ``[max | min | avg]`` block-pooled keys (before the trainable projection)
  — ``[nkb, Hkv, 3D]``;
* ``target``: the ground truth, block max-pooled true attention probabilities with rows
  normalised — ``[Hq, nqb, nkb]``, from the post-RoPE q / k.

:class:`ModelSource` extracts them on the fly for training batches, on the model's device: the
ground truth uses the Triton kernel (:func:`vllm_seer.kernels.ground_truth.block_attn_ground_truth`)
on CUDA and the plain-PyTorch reference elsewhere. Features are recomputed every epoch rather than
cached: one 8192-token SmolLM2 window's features are ~18 MB in fp16 (``target`` 30 x 9 x 128 x 128,
``q_gate`` and ``k_pooled`` 30 x 128 x 576 each), so 20M tokens would be ~43 GB, which neither
travels to the GPU host nor survives between its calls.

Only the transformers Llama-style layout (``model.model.layers[i].self_attn.{q,k}_proj``, NeoX
rotate-half RoPE) is supported, which covers Llama, Qwen2 and SmolLM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vllm_seer.gate import pool_k, pool_q
from vllm_seer.kernels.ground_truth import block_attn_ground_truth_ref
from vllm_seer.rope import RopeSpec, rotate


@dataclass(frozen=True)
class ModelShape:
    """Attention geometry of the base model."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelShape:
        hq = int(cfg.num_attention_heads)
        hd = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // hq
        return cls(int(cfg.num_hidden_layers), hq, int(getattr(cfg, "num_key_value_heads", hq)),
                   int(hd))


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: unsupported architecture")
    return list(layers)


class QKCapture:
    """Context manager capturing every layer's pre-RoPE q / k of a forward.

    After the forward, ``q[i]`` is ``[T, Hq, D]`` and ``k[i]`` is ``[T, Hkv, D]`` (model dtype);
    with ``batched=True`` they are ``[B, T, Hq, D]`` / ``[B, T, Hkv, D]``.
    """

    def __init__(self, model: Any, shape: ModelShape, batched: bool = False) -> None:
        self.model, self.shape, self.batched = model, shape, batched
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> QKCapture:
        d = self.shape.head_dim
        for i, layer in enumerate(decoder_layers(self.model)):
            attn = layer.self_attn
            self._handles.append(attn.q_proj.register_forward_hook(self._hook(self.q, i, d)))
            self._handles.append(attn.k_proj.register_forward_hook(self._hook(self.k, i, d)))
        return self

    def _hook(self, store: dict[int, torch.Tensor], i: int, d: int) -> Any:
        def fn(_mod: Any, _inp: Any, out: torch.Tensor) -> None:
            if self.batched:
                store[i] = out.detach().view(out.shape[0], out.shape[1], -1, d)
                return
            if out.shape[0] != 1:
                raise ValueError("QKCapture supports batch size 1 only (or batched=True)")
            store[i] = out[0].detach().view(out.shape[1], -1, d)
        return fn

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def capture_qk(model: Any, input_ids: torch.Tensor, shape: ModelShape
               ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run the model (no LM head) on ``input_ids`` ``[T]``; pre-RoPE q / k per layer."""
    inner = getattr(model, "model", model)
    dev = next(model.parameters()).device
    with QKCapture(model, shape) as cap:
        inner(input_ids=input_ids[None].to(dev), use_cache=False)
    return cap.q, cap.k


GroundTruth = Callable[..., torch.Tensor]


def default_ground_truth(device: torch.device) -> GroundTruth:
    """The Triton ground-truth kernel on CUDA, the plain-PyTorch reference elsewhere."""
    if device.type == "cuda":
        from vllm_seer.kernels.ground_truth import block_attn_ground_truth

        return block_attn_ground_truth
    return block_attn_ground_truth_ref


def layer_features(q_pre: torch.Tensor, k_pre: torch.Tensor, inv_freq: torch.Tensor,
                   block_size: int, ground_truth: GroundTruth = block_attn_ground_truth_ref
                   ) -> dict[str, torch.Tensor]:
    """Features of one layer for one sequence.

    Args:
        q_pre: ``[T, Hq, D]``; k_pre: ``[T, Hkv, D]`` (pre-RoPE, positions ``0 .. T-1``).
        ground_truth: reference or Triton kernel (same signature); fed post-RoPE q / k in the
            input dtype (the model's, as its own attention sees them).
    Returns:
        ``q_gate [nqb, Hq, D]``, ``k_pooled [nkb, Hkv, 3D]``, ``target [Hq, nqb, nkb]`` (fp32).
    """
    t = q_pre.shape[0]
    dev = q_pre.device
    pos = torch.arange(t, device=dev)
    inv = inv_freq.to(dev)
    q_pooled, _ = pool_q(q_pre, 0, block_size)
    q_gate = rotate(q_pooled, torch.arange(q_pooled.shape[0], device=dev) * block_size, inv)
    dt = q_pre.dtype
    target = ground_truth(rotate(q_pre, pos, inv).to(dt), rotate(k_pre, pos, inv).to(dt),
                          block_size=block_size)
    return {"q_gate": q_gate, "k_pooled": pool_k(k_pre, block_size), "target": target}


def sequence_features(model: Any, input_ids: torch.Tensor, shape: ModelShape, spec: RopeSpec,
                      block_size: int = 64, dtype: torch.dtype = torch.float16
                      ) -> dict[str, torch.Tensor]:
    """All layers' features of one sequence, stacked on a leading layer axis.

    Returns:
        ``q_gate [L, nqb, Hq, D]``, ``k_pooled [L, nkb, Hkv, 3D]``, ``target [L, Hq, nqb, nkb]``,
        on the CPU in ``dtype`` (fp16 keeps a 2k-token sequence at ~2.5 MB).
    """
    qs, ks = capture_qk(model, input_ids, shape)
    inv = spec.inv_freq()
    per_layer = [layer_features(qs[i], ks[i], inv, block_size) for i in range(shape.num_layers)]
    return {name: torch.stack([f[name] for f in per_layer]).to("cpu", dtype)
            for name in ("q_gate", "k_pooled", "target")}


class ModelSource:
    """Training features of packed token windows, extracted on the fly (a ``FeatureSource``).

    ``batch(indices)`` runs the frozen model on ``forward_batch`` windows at a time and returns
    ``q_gate [B, L, nqb, Hq, D]``, ``k_pooled [B, L, nkb, Hkv, 3D]``, ``target [B, L, Hq, nqb, nkb]``
    fp32 on the model's device. ``seconds`` / ``tokens`` count the extraction work done.
    """

    def __init__(self, model: Any, windows: Sequence[torch.Tensor], spec: RopeSpec,
                 block_size: int = 64, forward_batch: int = 4,
                 ground_truth: GroundTruth | None = None) -> None:
        self.model, self.windows, self.block_size = model, list(windows), block_size
        self.shape = ModelShape.from_hf_config(model.config)
        self.device = next(model.parameters()).device
        self.inv = spec.inv_freq().to(self.device)
        self.forward_batch = forward_batch
        self.ground_truth = ground_truth or default_ground_truth(self.device)
        self.tokens_per_item = int(self.windows[0].numel()) if self.windows else 0

    def __len__(self) -> int:
        return len(self.windows)

    @torch.no_grad()
    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {"q_gate": [], "k_pooled": [], "target": []}
        inner = getattr(self.model, "model", self.model)
        for i in range(0, len(indices), self.forward_batch):
            ids = torch.stack([self.windows[j] for j in indices[i:i + self.forward_batch]])
            with QKCapture(self.model, self.shape, batched=True) as cap:
                inner(input_ids=ids.to(self.device), use_cache=False)
            for b in range(ids.shape[0]):
                per = [layer_features(cap.q[layer][b], cap.k[layer][b], self.inv, self.block_size,
                                      self.ground_truth) for layer in range(self.shape.num_layers)]
                for name in out:
                    out[name].append(torch.stack([f[name] for f in per]).float())
        return {name: torch.stack(v) for name, v in out.items()}

    def features(self, indices: list[int], chunk: int = 4) -> list[dict[str, torch.Tensor]]:
        """Per-window feature dicts (e.g. a held-out set kept for repeated evaluation)."""
        items = []
        for i in range(0, len(indices), chunk):
            b = self.batch(indices[i:i + chunk])
            items.extend({k: v[j] for k, v in b.items()} for j in range(len(b["target"])))
        return items
