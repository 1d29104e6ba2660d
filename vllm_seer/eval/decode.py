"""Offline greedy generation under a :class:`vllm_seer.eval.sparse.Selector`, as vLLM serves it.

The prompt is one prefill through the ``seer_eval`` attention with the selector (block-sparse, the
density recorded); every generated token is then a decode step on the KV cache, attending densely
to all cached keys (Seer sparsifies the prefill only), exactly like ``vllm serve`` with the Seer
backend. Generation stops at an end-of-sequence token (as vLLM does) or after ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_seer.eval.sparse import STATE, Selector


def eos_ids(model: Any, tok: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer (what vLLM stops at)."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(i) for i in src)
    return ids


@torch.no_grad()
def greedy(model: Any, prompt: list[int] | tuple[int, ...], selector: Selector,
           max_new_tokens: int, stop: set[int] | None = None) -> tuple[list[int], float]:
    """(generated token ids, prefill density) of greedy decoding ``prompt`` (ids ``[T]``).

    The ids include a final end-of-sequence token if one was generated (vLLM returns it too).
    """
    dev = next(model.parameters()).device
    STATE.reset(selector)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    density = STATE.density
    past = out.past_key_values
    nxt = int(out.logits[0, -1].float().argmax())
    tokens = [nxt]
    while len(tokens) < max_new_tokens and nxt not in (stop or set()):
        out = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].float().argmax())
        tokens.append(nxt)
    return tokens, density
