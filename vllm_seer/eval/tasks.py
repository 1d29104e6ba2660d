"""Evaluation tasks run under a :class:`vllm_seer.eval.sparse.Selector`.

* :func:`perplexity`: token-level perplexity of held-out documents (see
  :mod:`vllm_seer.train.data`), the first ``length`` tokens of each document, all positions scored.
* :func:`passkey`: a 5-digit pass key hidden at a relative ``depth`` inside repeated filler text;
  the model must continue "The pass key is" with it. Scored teacher-forced: success iff the greedy
  (argmax) prediction at every answer position is the right token, which equals greedy decoding of
  the answer; the whole prompt + answer is one prefill, so the sparse attention is exercised.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from vllm_seer.eval.sparse import STATE, Selector

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor, positions: slice) -> torch.Tensor:
    """Logits ``[n, V]`` fp32 of ``positions`` for ``ids [T]`` (LM head applied to those only)."""
    dev = next(model.parameters()).device
    hidden = model.model(input_ids=ids[None].to(dev), use_cache=False).last_hidden_state[0]
    return model.lm_head(hidden[positions]).to(torch.float32)


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, selector: Selector, chunk: int = 1024
               ) -> tuple[float, float]:
    """(perplexity, achieved density) of ``ids [T]`` under ``selector``."""
    STATE.reset(selector)
    dev = next(model.parameters()).device
    hidden = model.model(input_ids=ids[None].to(dev), use_cache=False).last_hidden_state[0]
    target = ids[1:].to(dev)
    nll = 0.0
    for s in range(0, target.shape[0], chunk):
        logits = model.lm_head(hidden[s:min(s + chunk, target.shape[0])]).to(torch.float32)
        nll += float(torch.nn.functional.cross_entropy(logits, target[s:s + chunk],
                                                       reduction="sum"))
    return math.exp(nll / target.shape[0]), STATE.density


def passkey_prompt(tok: Any, length: int, depth: float, seed: int) -> tuple[torch.Tensor, int, str]:
    """(``ids [T]`` with the answer appended, answer start index, pass key) of about ``length``."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tok(INTRO + needle + QUESTION + " " + key, add_special_tokens=False)["input_ids"])
    per = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    n_fill = max(1, (length - fixed) // per)
    before = int(round(n_fill * depth))
    text = INTRO + FILLER * before + needle + FILLER * (n_fill - before) + QUESTION
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok(" " + key, add_special_tokens=False)["input_ids"]
    return torch.tensor(prompt + answer, dtype=torch.long), len(prompt), key


@torch.no_grad()
def passkey(model: Any, tok: Any, length: int, depth: float, selector: Selector, seed: int = 0
            ) -> tuple[bool, float]:
    """(retrieved, achieved density) for one pass-key prompt."""
    ids, start, _ = passkey_prompt(tok, length, depth, seed)
    STATE.reset(selector)
    logits = _logits(model, ids, slice(start - 1, ids.shape[0] - 1))
    ok = bool((logits.argmax(-1).cpu() == ids[start:]).all())
    return ok, STATE.density
