"""Bad requests to a real `vllm serve` with the Seer backend: each gets an HTTP 4xx with a message,
and the same server keeps serving (a good request after them takes the Seer path and succeeds).

One server for the whole module (start-up is the expensive part on 2 CPU cores).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

pytestmark = pytest.mark.e2e

MAX_LEN = 512
ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--seed", "0"]


@pytest.fixture(scope="module")
def server() -> Iterator[SeerServer]:
    model = ensure_test_model()
    config = {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 64}}
    with SeerServer(model, config, ARGS) as srv:
        yield srv


def _send(srv: SeerServer, path: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (raw bytes or a JSON object); returns (HTTP status, JSON reply)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(srv.url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _completion(srv: SeerServer, **fields: Any) -> dict[str, Any]:
    return {"model": srv.model_name, "max_tokens": 4, "temperature": 0.0, **fields}


def _error_text(reply: dict[str, Any]) -> str:
    err = reply.get("error", reply)
    return str(err.get("message", err) if isinstance(err, dict) else err)


# (id, path, body builder, expected status, message excerpt)
CASES: list[tuple[str, str, Any, int, str]] = [
    ("empty-prompt", "/v1/completions", lambda s: _completion(s, prompt=""), 400,
     "must be provided and non-empty"),
    ("empty-token-list", "/v1/completions", lambda s: _completion(s, prompt=[]), 400,
     "at least one prompt"),
    ("prompt-longer-than-context", "/v1/completions",
     lambda s: _completion(s, prompt=[5] * (MAX_LEN + 100)), 400,
     "maximum context length is 512 tokens"),
    ("invalid-json-body", "/v1/completions", lambda s: b'{"model": "seer-test", "prompt": ', 400,
     "JSON decode error"),
    ("body-not-an-object", "/v1/completions", lambda s: b"[1, 2, 3]", 400,
     "valid dictionary"),
    ("absurd-max-tokens", "/v1/completions",
     lambda s: _completion(s, prompt="def f(x):", max_tokens=10**12), 400,
     "cannot be greater than max_model_len=512"),
    ("negative-max-tokens", "/v1/completions",
     lambda s: _completion(s, prompt="def f(x):", max_tokens=-1), 400,
     "max_tokens must be at least 1"),
    ("token-id-out-of-vocab", "/v1/completions",
     lambda s: _completion(s, prompt=[1, 2, 10**7]), 400, "out of vocabulary"),
    ("unknown-model", "/v1/completions",
     lambda s: {**_completion(s, prompt="def f(x):"), "model": "no-such-model"}, 404, "does not exist"),
    ("chat-no-messages", "/v1/chat/completions", lambda s: _completion(s, messages=[]), 400,
     "empty conversation"),
    ("negative-temperature", "/v1/completions",
     lambda s: _completion(s, prompt="def f(x):", temperature=-1.0), 400,
     "temperature must be non-negative"),
]


@pytest.mark.parametrize(("path", "build", "status", "excerpt"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_is_refused(server: SeerServer, path: str, build: Any, status: int,
                                excerpt: str) -> None:
    got, reply = _send(server, path, build(server))
    assert got == status, reply
    assert excerpt in _error_text(reply), reply
    assert server.proc is not None and server.proc.poll() is None  # still running


def test_server_still_serves_after_bad_requests(server: SeerServer) -> None:
    """After the bad requests (file order; one more here, so it also holds when run alone): a prompt
    long enough for the Seer path completes on the same server, and nothing crashed."""
    assert _send(server, "/v1/completions", b"{")[0] == 400
    before = parse_metrics(server.metrics_text())
    prompt = list(range(3, 3 + 300))  # 300 tokens >= min_prefill_tokens 64: the sparse path
    status, reply = _send(server, "/v1/completions", _completion(server, prompt=prompt, max_tokens=8))
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")
    assert reply["usage"]["prompt_tokens"] == 300
    after = parse_metrics(server.metrics_text())
    sparse = "vllm:seer_prefill_tokens_total"
    assert metric_sum(after, sparse, path="sparse") - metric_sum(before, sparse, path="sparse") == 300
    assert server.chat("Hello", 4)  # and chat
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    log = server.log()
    assert "Traceback" not in log and "EngineDeadError" not in log, log[-3000:]
