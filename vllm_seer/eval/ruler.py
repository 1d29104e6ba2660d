"""Generated retrieval tasks (pass key and RULER-style), built offline from seeds, scored on text.

Every :class:`Sample` is a prompt of at most ``length - max_new_tokens`` tokens that ends in an
answer prefix; the model continues it greedily (offline: :func:`vllm_seer.eval.decode.greedy`,
served: a greedy completion) and :func:`score` reads the *decoded text*, so a leading ``" a"`` or
a different tokenisation of the same digits is no miss.

Tasks (after RULER, Hsieh et al. 2024, arXiv 2404.06654; templates written for this project):

* ``passkey``: the 5-digit pass key of :func:`vllm_seer.eval.tasks.passkey_prompt` at a given
  relative depth in repeated filler; score 1 iff the first number in the answer is the key.
* ``niah_single``: one "special magic number" for a key (two words) in repeated filler.
* ``niah_multikey``: four such needles with different keys, one asked for.
* ``niah_multivalue``: four numbers for the same key; score = fraction of them in the answer.
* ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A`` ... (4 hops) in filler;
  the model lists every variable holding the value; score = fraction named.
* ``cwe`` (common words): a numbered list where 10 words appear 30 times each (fewer at short
  lengths) and the others 3 times; score = fraction of the 10 in the answer.
* ``fwe`` (frequent words): Zipf-distributed (alpha 2) random "coded words"; the three most frequent
  are asked for; score = fraction of them in the answer.

Words for keys and for ``cwe`` come from the tokenizer's vocabulary (whole lowercase words of
4-10 letters), so nothing is downloaded; numbers and choices come from ``random.Random(seed)``.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

from vllm_seer.eval.tasks import FILLER, passkey_prompt

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe")
TASKS = ("passkey", *RULER_TASKS)
MAX_NEW = {"passkey": 10, "niah_single": 14, "niah_multikey": 14, "niah_multivalue": 48, "vt": 32,
           "cwe": 64, "fwe": 24}
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
              "memorize it. I will quiz you about the numbers afterwards.\n")
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
CWE_INTRO = "Below is a numbered list of words. Memorize the ones that appear most often.\n"
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the "
             "three most frequently appeared coded words.\n")


@dataclass(frozen=True)
class Sample:
    """One generated prompt: ``prompt`` token ids ``[T]`` and the reference ``answers``."""

    task: str
    length: int
    seed: int
    depth: float | None
    prompt: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int

    @property
    def key(self) -> str:
        """``task|length|sample id`` (the results-file key, without the selector label)."""
        sid = f"d{self.depth:g}s{self.seed}" if self.depth is not None else f"s{self.seed}"
        return f"{self.task}|{self.length}|{sid}"


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def score(task: str, text: str, answers: tuple[str, ...]) -> float:
    """Score in [0, 1] of the decoded continuation ``text`` (see the module docstring)."""
    if task == "passkey":
        nums = _numbers(text)
        return float(bool(nums) and nums[0] == answers[0])
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        nums = set(_numbers(text))
        return sum(a in nums for a in answers) / len(answers)
    if task == "vt":
        names = set(re.findall(r"[A-Z]{5}", text))
        return sum(a in names for a in answers) / len(answers)
    if task in ("cwe", "fwe"):
        words = _words(text)
        return sum(a in words for a in answers) / len(answers)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def vocabulary(tok: Any) -> list[str]:
    """Sorted whole lowercase words (4-10 letters) that are single tokens with a leading space."""
    words = set()
    for piece in tok.get_vocab():
        w = piece[1:] if piece[:1] in ("Ġ", "▁") else None
        if w and 4 <= len(w) <= 10 and w.isascii() and w.isalpha() and w.islower():
            words.add(w)
    if len(words) < 1000:
        raise ValueError(f"tokenizer vocabulary yields only {len(words)} whole words; the cwe and "
                         "key generators need at least 1000")
    return sorted(words)


def _fit(tok: Any, budget: int, build: Any, per_unit: int, fixed: int) -> tuple[list[int], Any]:
    """Largest ``n`` (filler units) with ``len(tokens(build(n))) <= budget``; (ids, build result)."""
    def tokens(n: int) -> tuple[list[int], Any]:
        text, extra = build(n)
        return tok(text, add_special_tokens=False)["input_ids"], extra

    best = tokens(1)
    if len(best[0]) > budget:
        raise ValueError(f"length {budget} is too short for this task's fixed text")
    lo, hi = 1, max(2, 2 * (budget - fixed) // max(1, per_unit) + 2)  # fits at lo, not beyond hi
    while hi - lo > 1:  # the token count grows with n: bisect for the largest n that fits
        mid = (lo + hi) // 2
        cand = tokens(mid)
        if len(cand[0]) <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    return best


def _ntok(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _insert(units: list[str], items: list[tuple[float, str]]) -> str:
    """Filler ``units`` with ``(depth, text)`` items placed at relative depths."""
    out = list(units)
    for depth, text in sorted(items, reverse=True):
        out.insert(int(round(depth * len(units))), text)
    return "".join(out)


def make_sample(tok: Any, words: list[str], task: str, length: int, seed: int,
                depth: float | None = None) -> Sample:
    """The sample of ``task`` at ``length`` tokens for ``seed`` (and pass-key ``depth``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    new = MAX_NEW[task]
    budget = length - new
    rng = random.Random(f"{task}|{length}|{seed}")
    if task == "passkey":
        if depth is None:
            raise ValueError("the passkey task needs a depth")
        # the key's seed mixes length and depth (as `vllm-seer eval` does) so cells differ
        ids, start, key = passkey_prompt(tok, length - new, depth,
                                         seed * 7919 + length + int(depth * 100))
        return Sample(task, length, seed, depth, tuple(ids[:start].tolist()), (key,), new)
    per = _ntok(tok, FILLER)
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        n_keys = 4 if task == "niah_multikey" else 1
        keys = [f"{rng.choice(words)}-{rng.choice(words)}" for _ in range(n_keys)]
        n_vals = 4 if task == "niah_multivalue" else 1
        vals = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(max(n_keys, n_vals))]
        if task == "niah_multivalue":
            needles = [(rng.random(), f" One of the special magic numbers for {keys[0]} is: {v}. ")
                       for v in vals]
            q = (f"\nWhat are all the special magic numbers for {keys[0]} mentioned in the provided "
                 f"text? The special magic numbers for {keys[0]} mentioned in the provided text are")
            answers = tuple(vals)
        else:
            needles = [(rng.random() if depth is None else depth,
                        f" One of the special magic numbers for {k} is: {v}. ")
                       for k, v in zip(keys, vals, strict=True)]
            asked = rng.randrange(n_keys)
            q = (f"\nWhat is the special magic number for {keys[asked]} mentioned in the provided "
                 f"text? The special magic number for {keys[asked]} mentioned in the provided text is")
            answers = (vals[asked],)
        fixed = _ntok(tok, NIAH_INTRO + "".join(t for _, t in needles) + q)
        ids, _ = _fit(tok, budget, lambda n: (NIAH_INTRO + _insert([FILLER] * n, needles) + q, None),
                      per, fixed)
        return Sample(task, length, seed, depth, tuple(ids), answers, new)
    if task == "vt":
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(5)]
        value = str(rng.randint(10000, 99999))
        chain = [f" VAR {names[0]} = {value}. "] + [f" VAR {names[i]} = VAR {names[i - 1]}. "
                                                    for i in range(1, 5)]
        depths = sorted(rng.random() for _ in chain)
        items = list(zip(depths, chain, strict=True))
        q = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
             f"above. Answer: According to the chain of variable assignments in the text above, 5 "
             f"variables are assigned the value {value}, they are:")
        fixed = _ntok(tok, VT_INTRO + "".join(chain) + q)
        ids, _ = _fit(tok, budget, lambda n: (VT_INTRO + _insert([FILLER] * n, items) + q, None),
                      per, fixed)
        return Sample(task, length, seed, None, tuple(ids), tuple(names), new)
    if task == "cwe":
        pool = rng.sample(words, 1000)
        common, rare = pool[:10], pool[10:]
        freq = 30 if length >= 4096 else 10
        q = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 "
             "words that appear most often in the list are:")

        def build(n: int) -> tuple[str, None]:
            lst = common * freq + [w for w in rare[:n] for _ in range(3)]
            random.Random(seed).shuffle(lst)
            return CWE_INTRO + " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)) + q, None

        per_word = 3 * 4  # three entries of about four tokens each
        fixed = _ntok(tok, build(0)[0])
        ids, _ = _fit(tok, budget, build, per_word, fixed)
        return Sample(task, length, seed, None, tuple(ids), tuple(common), new)
    # fwe
    coded = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(5)) for _ in range(800)})
    weights = [1.0 / (r + 1) ** 2 for r in range(len(coded))]
    rng.shuffle(coded)
    q = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
         "three most frequently appeared words in the above coded text? Answer: According to the "
         "coded text above, the three most frequently appeared words are:")
    stream = random.Random(seed).choices(coded, weights=weights, k=4 * length)

    def build_fwe(n: int) -> tuple[str, list[str]]:
        top = [w for w, _ in Counter(stream[:n]).most_common(3)]
        return FWE_INTRO + " .... ".join(stream[:n]) + q, top

    ids, top = _fit(tok, budget, build_fwe, 4, _ntok(tok, FWE_INTRO + q))
    return Sample(task, length, seed, None, tuple(ids), tuple(top), new)
