"""Helpers of the load tests: request mixes, an asyncio HTTP client with bounded waits, the server's
process tree and memory read from /proc."""

from __future__ import annotations

import asyncio
import builtins
import json
import keyword
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vllm_seer.testing import SeerServer, metric_sum, parse_metrics

# words the tiny model's tokenizer (trained on stdlib sources) knows; ~2 tokens per word
WORDS = sorted(set(keyword.kwlist)
               | {w for w in dir(builtins) if w.islower() and not w.startswith("_")}
               | {w for w in dir(str) if not w.startswith("_")})
KV_BLOCK = 128  # vLLM's CPU KV-cache block size: prefix caching works on whole blocks of it
VOCAB = 2000  # token ids used for token-id prompts (the tiny vocabulary is 2048; 0-2 are special)


@dataclass
class Req:
    """One request of a mix. ``n_prompt``: prompt tokens as the server counts them."""

    i: int
    chat: bool
    long: bool
    stream: bool
    cancel: bool
    max_tokens: int
    prompt: str | list[int]
    n_prompt: int = 0

    def body(self, model: str) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "temperature": 0.0,
                                "ignore_eos": True}
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if self.chat:
            return "/v1/chat/completions", {**body, "messages": self.messages()}
        return "/v1/completions", {**body, "prompt": self.prompt}

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": str(self.prompt)}]


@dataclass
class Result:
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    done: bool = False  # the stream ended with [DONE]
    cancelled: bool = False  # closed by the client after its first token
    seconds: float = 0.0
    error: str = ""


def make_mix(n: int, tag: str, seed: int, *, long_every: int = 3, cancel_every: int = 5,
             long_tokens: tuple[int, int] = (300, 700), short_tokens: tuple[int, int] = (12, 200),
             cancel_max_tokens: int = 200) -> list[Req]:
    """``n`` requests: every ``long_every``-th long (chat text or token ids), half chat, half
    streamed; streamed short requests whose index is a multiple of ``cancel_every`` are cancelled
    after their first token (only short ones: they take the dense path and their prefill is
    complete when the first token arrives). Greedy with ``ignore_eos``: each non-cancelled request
    must produce exactly ``max_tokens`` tokens. Prompts are unique from their first tokens on (an
    index up front), so no two share a cached KV block."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        long = i % long_every == 0
        chat = i % 2 == 0
        stream = i % 4 in (1, 2)
        cancel = stream and not long and i % cancel_every == 0
        lo, hi = long_tokens if long else short_tokens
        target = rng.randrange(lo, hi)
        if chat:  # ~2.1 tokens per word plus the template; measured on the server later
            words = max(1, (target - 12) // 2)
            prompt: str | list[int] = f"{tag} {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))
        else:
            prompt = [3 + i % 1000, 3 + len(tag)] + [rng.randrange(3, VOCAB) for _ in range(target - 2)]
            if long and len(prompt) % KV_BLOCK in (0, 1):
                prompt.append(rng.randrange(3, VOCAB))
        max_tokens = cancel_max_tokens if cancel else 4 + (i * 7) % 13
        reqs.append(Req(i, chat, long, stream, cancel, max_tokens, prompt))
    return reqs


def measure_prompts(srv: SeerServer, reqs: list[Req]) -> None:
    """Fill ``n_prompt`` (the server's own ``/tokenize`` for chat requests). A long chat prompt whose
    length is a multiple of the KV block (or one more) gets a word appended: re-sent later, a prefix
    cache hit would then recompute a single token, which vLLM treats as a decode (dense path)."""
    with httpx.Client(timeout=30) as client:
        for r in reqs:
            if not r.chat:
                r.n_prompt = len(r.prompt)
                continue
            for _ in range(5):
                body = {"model": srv.model_name, "messages": r.messages(), "add_generation_prompt": True}
                resp = client.post(srv.url + "/tokenize", json=body)
                resp.raise_for_status()
                r.n_prompt = int(resp.json()["count"])
                if not (r.long and r.n_prompt % KV_BLOCK in (0, 1)):
                    break
                r.prompt = f"{r.prompt} x"


async def _send(client: httpx.AsyncClient, url: str, model: str, req: Req) -> Result:
    path, body = req.body(model)
    res = Result()
    t0 = time.monotonic()
    try:
        if not req.stream:
            resp = await client.post(url + path, json=body)
            res.status = resp.status_code
            if resp.status_code == 200:
                data = resp.json()
                choice = data["choices"][0]
                res.text = choice["message"]["content"] if req.chat else choice["text"]
                res.finish_reason = choice["finish_reason"]
                res.usage = data["usage"]
            else:
                res.error = resp.text[:500]
        else:
            async with client.stream("POST", url + path, json=body) as resp:
                res.status = resp.status_code
                if resp.status_code != 200:
                    res.error = (await resp.aread()).decode(errors="replace")[:500]
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        res.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:  # vLLM ends a failed stream with an error event
                        res.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    if chunk.get("usage"):
                        res.usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        res.text += (choice["delta"].get("content") or "") if req.chat \
                            else choice.get("text", "")
                        res.finish_reason = choice.get("finish_reason") or res.finish_reason
                    if req.cancel and res.text:
                        res.cancelled = True  # leaving the block closes the connection mid-body
                        break
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.monotonic() - t0
    return res


async def _burst(url: str, model: str, reqs: list[Req], timeout: float) -> list[Result]:
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout / 2), limits=limits) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(_send(client, url, model, r) for r in reqs)), timeout)


def burst(srv: SeerServer, reqs: list[Req], timeout: float = 240.0) -> list[Result]:
    """All ``reqs`` at once over separate connections; bounded by ``timeout`` in total."""
    return asyncio.run(_burst(srv.url, srv.model_name, reqs, timeout))


def sequential(srv: SeerServer, reqs: list[Req], timeout: float = 240.0) -> list[Result]:
    async def run() -> list[Result]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
            return [await _send(client, srv.url, srv.model_name, r) for r in reqs]

    return asyncio.run(asyncio.wait_for(run(), timeout))


def in_flight(samples: dict[str, float]) -> float:
    """Requests running or waiting in the server, from vLLM's ``/metrics`` samples."""
    return (metric_sum(samples, "vllm:num_requests_running")
            + metric_sum(samples, "vllm:num_requests_waiting"))


def wait_idle(srv: SeerServer, timeout: float = 60.0) -> dict[str, float]:
    """Poll ``/metrics`` until no request is running or waiting; returns vLLM's samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = parse_metrics(srv.metrics_text(), "vllm:")
        busy = in_flight(samples)
        if busy == 0:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout:.0f} s: {busy:.0f} requests")
        time.sleep(0.5)


# -- processes ---------------------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def session_pids(sid: int) -> list[int]:
    """Live processes in session ``sid`` (SeerServer starts the server as a session leader; vLLM's
    children stay in it). Zombies are listed too: they are processes nobody reaped."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None and int(f[3]) == sid:
                pids.append(int(entry))
    return sorted(pids)


def running(pids: list[int], sid: int) -> list[int]:
    """Those of ``pids`` that still run in session ``sid`` (zombies are dead: not listed)."""
    out = []
    for pid in pids:
        f = _stat(pid)
        if f is not None and int(f[3]) == sid and f[0] != "Z":
            out.append(pid)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        f = _stat(pid)
        out.append(f"{pid} state={f[0] if f else 'gone'} {cmdline(pid)[:120]}")
    return out


def rss_mib(pids: list[int]) -> float:
    """Sum of VmRSS of ``pids`` (MiB); processes that exited meanwhile count 0."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024
