"""The served evaluation's pieces that need no server: settings, prompt log-prob parsing, report."""

import math
from pathlib import Path

import pytest

from vllm_seer.eval.served import ServedEvalError, ServedSession, Setting, markdown, server_flags


def test_settings_parse_and_map_to_server_and_offline() -> None:
    assert Setting.parse("dense").seer_config(Path("g")) is None
    nz, thr = Setting.parse("nz=0.3"), Setting.parse("thr=2e-3")
    assert (nz.label, thr.label) == ("seer nz=0.3", "seer thr=0.002")  # offline labels
    cfg = nz.seer_config(Path("g"))["seer"]
    assert cfg == {"gates": "g", "sparsity_method": "nz_ratio", "nz_ratio": 0.3,
                   "last_block_dense": True, "min_prefill_tokens": 0}
    assert thr.selector({}, None).selection().threshold == 2e-3
    with pytest.raises(ServedEvalError):
        Setting.parse("topk=3")
    sink = Setting.parse("nz=0.1+sink=1")
    assert sink.label == "seer+sink nz=0.1"
    assert sink.label == sink.selector({}, None).label  # the offline selector's own label
    assert sink.seer_config(Path("g"))["seer"]["sink_blocks"] == 1
    assert sink.selector({}, None).selection().sink_blocks == 1
    assert Setting.parse("thr=2e-3+sink=2").label == "seer+sink2 thr=0.002"
    from vllm_seer.eval.sparse import Selector

    with pytest.raises(ValueError, match="sink_blocks applies to the seer selector only"):
        Selector("oracle", "nz_ratio", nz_ratio=0.1, sink_blocks=1)
    for bad in ("nz=0.1+sink=x", "nz=0.1+sink", "nz=0.1+foo=1", "nz=0.1+5", "nz=0.1+sink=0",
                "nz=0.1+sink=\u0663"):
        with pytest.raises(ServedEvalError, match="optionally followed by"):
            Setting.parse(bad)
    flags = server_flags(2048)
    assert int(flags[flags.index("--max-num-batched-tokens") + 1]) >= 2048
    assert "--no-enable-prefix-caching" in flags and "float32" in flags


class _FakeServer:
    model_name = "m"
    log_path = Path("x")

    def __init__(self, ids: list[int], short: bool = False) -> None:
        self.ids, self.short = ids, short

    def post(self, path: str, body: dict) -> dict:
        assert body["prompt"] == self.ids and body["prompt_logprobs"] == 0
        plp = [None] + [{str(t): {"logprob": -0.5, "rank": 2 if i == 0 else 1}}
                        for i, t in enumerate(self.ids[1:])]
        return {"choices": [{"prompt_logprobs": plp[:-1] if self.short else plp,
                             "token_ids": [7]}]}


def test_prompt_logprobs_to_perplexity_and_passkey() -> None:
    ids = [5, 6, 7, 8, 9]
    sess = ServedSession(_FakeServer(ids), sparse=False)
    ppl, dens = sess.perplexity(ids)
    assert ppl == pytest.approx(math.exp(0.5)) and dens == 1.0
    assert sess.passkey_teacher_forced(ids, 2) == (True, 1.0)  # answer = positions 2..4: rank 1
    assert sess.passkey_teacher_forced(ids, 1) == (False, 1.0)  # position 1 has rank 2
    with pytest.raises(ServedEvalError, match="expected 5 prompt log-probs"):
        ServedSession(_FakeServer(ids, short=True), sparse=False).perplexity(ids)


def test_markdown_has_both_sides() -> None:
    res = {"ppl": {"2048|a.py|seer nz=0.3": {"served_ppl": 8.0, "served_density": 0.39,
                                              "offline_ppl": 8.0000008, "offline_density": 0.39}},
           "passkey": {"2048|0.5|0|dense": {"key": "12345", "served_greedy_text": " 12345",
                                            "served_greedy_ok": True, "served_greedy_density": 1.0,
                                            "offline_ok": True, "offline_text": " 12345",
                                            "offline_density": 1.0}}}
    md = markdown(res)
    assert "| 2048 | `a.py` | seer nz=0.3 | 8.000000 | 8.000001 | 1.0e-07 |" in md
    assert "`12345` (ok)" in md
