"""Make the real-selection data file and the overlap table (CPU venv; see :mod:`real_selections`).

``extract``: runs SmolLM2-135M-Instruct (``vllm-seer prepare-model`` output) in fp32 with
transformers on 8192 tokens of text, dense attention throughout, and at every layer applies the
project's gate (:func:`vllm_seer.gate.gate_mask`, the committed distilled gates) to that layer's
post-RoPE Q and K, for several selection settings. Masks are stored without ``last_block_dense``
(so that :func:`real_selections.load_real_selection` can apply it at the target length); the
densities in the sidecar are with it, as upstream.

Texts: ``code``, the first 8192-token window of the first document of the corpus's held-out split
in its seeded order (:func:`vllm_seer.train.data.sequences`, seed 0); ``prose``, the first 8192
tokens of the English reference-manual topics shipped in the stdlib (``pydoc_data.topics``, values
in key order, joined by blank lines); that document is in the corpus's *train* split.

``overlap``: :func:`real_selections.adjacent_overlap` of random top-k gates (random bf16 Q/K and
gate weights through :func:`vllm_seer.gate.gate_mask`, as ``bench_kernels.py`` draws them), of the
real selections and of the structured ones, written as a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path
from typing import Any

import torch
from real_selections import (
    BLOCK,
    DATA,
    LAYOUT,
    Overlap,
    adjacent_overlap,
    causal_blocks,
    dense_last_rows,
    load_real_selection,
    pack_lower,
    read_selection,
    read_sidecar,
    real_selection_sources,
    selection_key,
    structured_selection,
)
from safetensors.torch import save_file

SEQ = 8192
SETTINGS: dict[str, list[tuple[str, float]]] = {
    "code": [("nz_ratio", 0.1), ("nz_ratio", 0.05), ("threshold", 5e-4)],
    "prose": [("nz_ratio", 0.1), ("nz_ratio", 0.05)],
}
LENGTHS = (8192, 32768, 131072)
LLAMA = (32, 8, 128, 500000.0)  # q heads, kv heads, head dim, rope theta (bench_kernels.MODELS)
RESULTS = Path(__file__).resolve().parent / "results" / "selection-overlap.md"


def code_text(tok: Any) -> tuple[str, torch.Tensor]:
    from vllm_seer.train.data import sequences

    for name, ids in sequences(tok, "heldout", SEQ, count=1, seed=0):
        return f"stdlib held-out {name}", ids
    raise RuntimeError(f"no held-out stdlib document has {SEQ} tokens")


def prose_text(tok: Any) -> tuple[str, torch.Tensor]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < SEQ:
        raise RuntimeError(f"pydoc_data.topics has only {len(ids)} tokens, need {SEQ}")
    return "stdlib pydoc_data.topics (English reference-manual text; train split)", torch.tensor(ids[:SEQ])


_CAPTURE: dict[str, Any] = {}
ATTN_NAME = "seer_capture"


def _capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention: dense causal SDPA, plus the gate masks of this layer into ``_CAPTURE``."""
    from vllm_seer.gate import gate_mask

    if query.shape[0] != 1:
        raise ValueError("the capture attention supports batch size 1")
    q, k = query[0].transpose(0, 1), key[0].transpose(0, 1)  # [T, H, D] post-RoPE
    layer = int(module.layer_idx)
    w, inv = _CAPTURE["weights"][layer], _CAPTURE["inv_freq"]
    _CAPTURE["found"][layer] = [gate_mask(q, k, w, inv, BLOCK, s)[0] for s in _CAPTURE["sels"]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


def gate_masks(model: Any, ids: torch.Tensor, weights: dict[int, torch.Tensor], inv_freq: torch.Tensor,
               sels: list[Any]) -> list[torch.Tensor]:
    """One dense forward; per selection a ``[layers, Hq, nb, nb]`` bool gate mask (no dense last rows).

    ``model`` must have been loaded with ``attn_implementation=ATTN_NAME``.
    """
    _CAPTURE.update(weights=weights, inv_freq=inv_freq, sels=sels, found={})
    with torch.no_grad():
        model.model(input_ids=ids[None], use_cache=False)
    found = _CAPTURE.pop("found")
    n = model.config.num_hidden_layers
    if sorted(found) != list(range(n)):
        raise RuntimeError(f"gate masks captured for layers {sorted(found)}, expected 0..{n - 1}")
    return [torch.stack([found[i][s] for i in range(n)]) for s in range(len(sels))]


def extract(out: Path, model_dir: Path, gates: Path) -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from vllm_seer.checkpoint import load_gates
    from vllm_seer.gate import Selection
    from vllm_seer.rope import RopeSpec
    from vllm_seer.train.prepare_model import DONE_MARKER

    tok = AutoTokenizer.from_pretrained(model_dir)
    AttentionInterface.register(ATTN_NAME, _capture)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=ATTN_NAME).eval()
    cfg = model.config
    ckpt = load_gates(gates)
    ckpt.check_against(num_layers=cfg.num_hidden_layers, num_q_heads=cfg.num_attention_heads,
                       num_kv_heads=cfg.num_key_value_heads, head_dim=ckpt.head_dim)
    if ckpt.block_size != BLOCK:
        raise ValueError(f"{gates}: gate block size {ckpt.block_size}, the benchmark uses {BLOCK}")
    inv = RopeSpec.from_hf_config(cfg, ckpt.head_dim).inv_freq()
    weights = {i: w.to(torch.float32) for i, w in ckpt.weights.items()}
    tensors: dict[str, torch.Tensor] = {}
    marker = json.loads((model_dir / DONE_MARKER).read_text())
    root = Path(__file__).resolve().parents[1]
    gates_label = gates.resolve().relative_to(root) if gates.resolve().is_relative_to(root) else gates
    side: dict[str, Any] = {"model": f"{model_dir.name} ({marker['source']}, dequantized by "
                                     "vllm-seer prepare-model)",
                            "gates": str(gates_label), "dtype": "float32",
                            "tokens": SEQ, "block_size": BLOCK, "layout": LAYOUT,
                            "attention": "dense (gates applied to each layer's Q/K of a dense forward)",
                            "stored": "gate masks without last_block_dense; densities with it",
                            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                            "texts": {}, "selections": {}}
    for source, settings in SETTINGS.items():
        label, ids = code_text(tok) if source == "code" else prose_text(tok)
        side["texts"][source] = {"text": label, "tokens": int(ids.numel())}
        sels = [Selection(m, v if m == "threshold" else 0.0, v if m == "nz_ratio" else 0.0, False)
                for m, v in settings]
        masks = gate_masks(model, ids, weights, inv, sels)
        for (m, v), mask in zip(settings, masks, strict=True):
            key = selection_key(source, **{m: v})
            lbd = dense_last_rows(mask)
            nb = mask.shape[-1]
            per_layer = (lbd.sum((1, 2, 3)).double() / (causal_blocks(nb, nb).sum() * mask.shape[1]))
            side["selections"][key] = {"method": m, "value": v, "last_block_dense": True,
                                       "density": float(per_layer.mean()),
                                       "density_per_layer": [round(float(x), 4) for x in per_layer]}
            tensors[key] = pack_lower(mask).contiguous()
            print(f"{key}: density {per_layer.mean():.4f} (layers {per_layer.min():.3f}.."
                  f"{per_layer.max():.3f})", flush=True)
    meta = {"layout": LAYOUT, "nqb": str(SEQ // BLOCK), "block_size": str(BLOCK),
            "num_layers": str(cfg.num_hidden_layers), "num_heads": str(cfg.num_attention_heads),
            "num_kv_heads": str(cfg.num_key_value_heads)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    out.with_suffix(".json").write_text(json.dumps(side, indent=1) + "\n")
    for key in tensors:  # the stored form round-trips to what the gate produced
        back, _ = read_selection(out, key)
        if back.shape != (cfg.num_hidden_layers, cfg.num_attention_heads, SEQ // BLOCK, SEQ // BLOCK):
            raise RuntimeError(f"{out}: {key} read back with shape {tuple(back.shape)}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json').name}")


def random_selection(L: int, nz_ratio: float, seed: int = 0) -> torch.Tensor:
    """Random-gate top-k mask ``[32, nb, nb]`` at Llama shapes (last rows dense), one KV group at a time."""
    from vllm_seer.gate import Selection, gate_mask
    from vllm_seer.rope import RopeSpec

    hq, hkv, d, theta = LLAMA
    gs = hq // hkv
    gen = torch.Generator().manual_seed(seed)
    inv = RopeSpec(d, theta).inv_freq()
    sel = Selection("nz_ratio", 0.0, nz_ratio, True)
    parts = []
    for _ in range(hkv):
        q = torch.randn(L, gs, d, generator=gen).to(torch.bfloat16)
        k = torch.randn(L, 1, d, generator=gen).to(torch.bfloat16)
        w = (torch.randn(gs, 3 * d, d, generator=gen) / math.sqrt(3 * d)).to(torch.bfloat16)
        parts.append(gate_mask(q, k, w.to(torch.float32), inv, BLOCK, sel)[0])
    return torch.cat(parts)


def _row(kind: str, L: int, setting: str, heads: str, st: Overlap, sp: Overlap) -> str:
    return (f"| {kind} | {L // 1024}k | {setting} | {heads} | {st.density:.3f} | "
            f"{st.adjacent_jaccard:.3f} | {sp.adjacent_jaccard:.3f} | {st.pair_work_ratio:.3f} | "
            f"{sp.pair_work_ratio:.3f} | {st.group_union_ratio:.3f} |")


def overlap_table(path: Path, lengths: tuple[int, ...], out: Path) -> None:
    side = read_sidecar(path)
    lines = []

    def add(kind: str, L: int, setting: str, heads: str, mask: torch.Tensor, group: int) -> None:
        lines.append(_row(kind, L, setting, heads, adjacent_overlap(mask, group),
                          adjacent_overlap(mask, group, skip_last=2)))
        print(lines[-1], flush=True)

    for L in lengths:
        for r in (0.1, 0.05):
            add("random gate", L, f"nz_ratio={r:g}", "32 (Llama)", random_selection(L, r), 4)
    for key in side["selections"]:
        source, setting = key.split("/")
        stored, meta = read_selection(path, key)
        native = dense_last_rows(stored.flatten(0, 1))  # 30 layers x 9 heads, groups of 3 real heads
        add(f"real {source}", SEQ, setting, f"{native.shape[0]} (SmolLM2, all)", native,
            int(meta["num_heads"]) // int(meta["num_kv_heads"]))
        m, v = setting.split("=")
        for L in lengths:
            mask = load_real_selection(path, 32, L, source=source,
                                       **({"nz_ratio": float(v), "threshold": None} if m == "nz_ratio"
                                          else {"nz_ratio": None, "threshold": float(v)}))
            add(f"real {source}", L, setting, "32 (Llama map)", mask, 4)
    for L in lengths:
        for r in (0.1, 0.05):
            add("structured", L, f"nz_ratio={r:g}", "32 (seed 0)", structured_selection(32, L, r, 0), 4)
    srcs = real_selection_sources(32, 8)
    head = ("| selection | seq | setting | heads | density | adjacent-row Jaccard | same, sparse rows |"
            " pair-tile work ratio | same, sparse rows | GQA-group union / per-head density |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    texts = "; ".join(f"`{k}`: {v['text']}, {v['tokens']} tokens" for k, v in side["texts"].items())
    text = f"""# Adjacent-row overlap of block selections (64-token blocks)

Made by `python benchmarks/real_selections.py overlap` on the CPU
({datetime.date.today().isoformat()}); data `benchmarks/data/{path.name}` ({side['date']}).
All masks causal, diagonal on, last two query-block rows dense (counted in every column).

* **random gate**: random bf16 Q/K and gate weights through `vllm_seer.gate.gate_mask` at
  Llama-3.1-8B shapes (32 / 8 heads, d=128), top-k, as `benchmarks/bench_kernels.py` draws them.
* **real**: SmolLM2-135M-Instruct (fp32, dense forward) + the committed distilled gates on
  {texts}. "SmolLM2, all" = the 270 (layer, head) masks at 8k with GQA groups of 3;
  "Llama map" = 32 of them, KV group g from layer {sorted({layer for layer, _ in srcs})}[g]
  (`real_selection_sources`), nearest-neighbour upscaled in block space to 32k / 128k and
  re-thresholded to each stored row's density (`load_real_selection`). Upscaling makes the `f` rows
  built from one stored row share their off-diagonal blocks, so the 32k / 128k Jaccard is inflated
  by construction: the 8k rows are the native-granularity figure.
* **structured**: `structured_selection`: sink + local window + vertical stripes, the gate's
  top-k budget per row.

Columns: adjacent-row Jaccard = mean over heads and query-block pairs (j, j+1) of |A∩B|/|A∪B|;
pair-tile work ratio = Σ2|A∪B| / Σ(|A|+|B|), blocks a 128-row tile over the union iterates relative
to two 64-row tiles (1 = free, 2 = double); GQA-group union = union over a KV group's query heads /
per-head density (1 = heads agree, 4 = disjoint; 3 for the SmolLM2 rows). "sparse rows": the same
without the two dense last rows (the pairs that touch them left out), which the kernels treat apart.

{head}
""" + "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    from vllm_seer.train.prepare_model import default_model_dir

    p = argparse.ArgumentParser(prog="real_selections.py")
    p.add_argument("command", choices=("extract", "overlap"))
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--gates", type=Path,
                   default=Path(__file__).resolve().parents[1] / "vllm_seer/assets/gates/smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.command == "extract":
        extract(a.data, a.model, a.gates)
    else:
        overlap_table(a.data, tuple(a.lengths), a.out)
    return 0
