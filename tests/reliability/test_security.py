"""The security promises of the README ("Security"), checked on the package source and on a running
server:

* every ``torch.load`` passes ``weights_only=True``; nothing else unpickles (no pickle, dill,
  joblib, ``allow_pickle``, TorchScript, widened ``weights_only`` allow-lists);
* no remote code: no ``trust_remote_code`` other than ``False``, no ``eval``/``exec``;
* no network access unless the user names a hub id and allows it: only ``config.resolve_gates``
  imports ``huggingface_hub``; with ``HF_HUB_OFFLINE=1`` (and for a local folder in any case) it
  contacts no hub, watched by a listener standing in for the hub endpoint;
* nothing listens beyond the address the user chose: the code that runs inside vLLM imports no
  socket or server module, and a real server with the plugin listens on loopback only.
"""

from __future__ import annotations

import ast
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _load import session_pids

from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = (ROOT / "vllm_seer", ROOT / "kernels")  # kernels/ is installed as vllm_seer.kernels
# test/demo tooling, never imported by the plugin: starts vLLM on 127.0.0.1, talks HTTP to it
CLIENT_TOOLS = {"vllm_seer/testing.py"}
NETWORK_MODULES = {"socket", "socketserver", "http", "urllib", "requests", "httpx", "aiohttp", "zmq",
                   "uvicorn", "websockets", "asyncio", "ssl", "ftplib", "smtplib", "xmlrpc"}
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve",
                      "marshal", "pickletools"}
SERVER_CALLS = {"start_http_server", "start_wsgi_server", "make_server", "create_server",
                "start_server", "serve_forever", "listen", "bind", "start_unix_server"}


def sources() -> Iterator[tuple[str, ast.Module]]:
    for base in PACKAGE:
        for path in sorted(base.rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def imported(tree: ast.Module) -> Iterator[tuple[str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, node.lineno


def call_names(tree: ast.Module) -> Iterator[tuple[str, ast.Call]]:
    """Calls with their dotted name, ``torch`` aliases and ``from torch import load`` resolved."""
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            head, _, rest = name.partition(".")
            if head in alias:
                name = alias[head] + ("." + rest if rest else "")
            yield name, node


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_every_torch_load_passes_weights_only_true():
    loads, bad = [], []
    for rel, tree in sources():
        for name, call in call_names(tree):
            if name in ("torch.load", "torch.serialization.load"):
                loads.append(f"{rel}:{call.lineno}")
                if not is_const(keyword(call, "weights_only"), True):
                    bad.append(f"{rel}:{call.lineno}")
    assert len(loads) >= 1, loads  # checkpoint.py (the trainer keeps safetensors): the scan works
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_nothing_else_unpickles():
    bad = []
    for rel, tree in sources():
        for module, line in imported(tree):
            if module.split(".")[0] in UNPICKLING_MODULES:
                bad.append(f"{rel}:{line} imports {module}")
        for name, call in call_names(tree):
            last = name.rsplit(".", 1)[-1]
            if last in ("add_safe_globals", "safe_globals", "read_pickle") or name == "torch.jit.load":
                bad.append(f"{rel}:{call.lineno} {name}")
            if last == "load" and not is_const(keyword(call, "allow_pickle"), False) and \
                    keyword(call, "allow_pickle") is not None:
                bad.append(f"{rel}:{call.lineno} {name}(allow_pickle=...)")
    assert not bad, bad


def test_no_remote_code():
    bad = []
    for rel, tree in sources():
        for name, call in call_names(tree):
            trc = keyword(call, "trust_remote_code")
            if trc is not None and not is_const(trc, False):
                bad.append(f"{rel}:{call.lineno} {name}(trust_remote_code=...)")
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                bad.append(f"{rel}:{call.lineno} {name}()")
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    "trust-remote-code" in node.value:
                bad.append(f"{rel}:{node.lineno} passes --trust-remote-code")
    assert not bad, bad


def test_plugin_code_opens_no_sockets():
    """The modules vLLM loads (plugin, backend, metrics, endpoint, ...) import no network module
    and call nothing that binds or listens; the test tooling binds to 127.0.0.1 only."""
    bad, hub = [], []
    for rel, tree in sources():
        for module, line in imported(tree):
            top = module.split(".")[0]
            if top == "huggingface_hub":
                hub.append(rel)
            if top in NETWORK_MODULES and rel not in CLIENT_TOOLS:
                bad.append(f"{rel}:{line} imports {module}")
        for name, call in call_names(tree):
            last = name.rsplit(".", 1)[-1]
            if last not in SERVER_CALLS:
                continue
            if rel in CLIENT_TOOLS and last == "bind" and call.args and \
                    isinstance(call.args[0], ast.Tuple) and \
                    isinstance(call.args[0].elts[0], ast.Constant) and \
                    call.args[0].elts[0].value == "127.0.0.1":
                continue  # testing.free_port: an ephemeral loopback port, closed at once
            bad.append(f"{rel}:{call.lineno} {name}()")
    assert not bad, bad
    # the only route to the network: a gates hub id (config.resolve_gates)
    assert sorted(set(hub)) == ["vllm_seer/config.py"], hub


class FakeHub:
    """A TCP listener standing in for the hub endpoint: counts connections, answers 404."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def resolve_in_subprocess(gates: str, hub: FakeHub, home: Path, offline: bool) -> subprocess.CompletedProcess:
    """``config.resolve_gates`` in a fresh interpreter (huggingface_hub reads its settings at import)."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": str(int(offline)),
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5", "NO_PROXY": "*"}
    env.pop("HF_TOKEN", None)
    code = "import sys; from vllm_seer.config import resolve_gates; print(resolve_gates(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, gates], env=env, capture_output=True,
                          text=True, timeout=120)


def test_hub_contacted_only_for_a_hub_id_when_online(tmp_path):
    hub = FakeHub()
    try:
        local = resolve_in_subprocess(str(ensure_test_model() / "gates"), hub, tmp_path, offline=False)
        assert local.returncode == 0, local.stderr
        assert hub.connections == 0  # a local folder: no network, even online
        off = resolve_in_subprocess("nobody/no-such-gates", hub, tmp_path, offline=True)
        assert off.returncode != 0 and "HF_HUB_OFFLINE=1" in off.stderr, off.stderr[-2000:]
        assert hub.connections == 0  # offline honoured
        on = resolve_in_subprocess("nobody/no-such-gates", hub, tmp_path, offline=False)
        assert on.returncode != 0 and "nobody/no-such-gates" in on.stderr, on.stderr[-2000:]
        assert hub.connections >= 1  # the control: this listener does see a hub request
    finally:
        hub.close()


# -- a running server ------------------------------------------------------------------------
def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/*6: four 32-bit words, each in host (little-endian) order
    return socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def bound_sockets(pids: list[int]) -> list[tuple[str, str, int]]:
    """``(protocol, address, port)`` of the TCP sockets listening and UDP sockets bound by
    ``pids`` (from /proc/net, matched by socket inode)."""
    ours = set().union(*(_socket_inodes(p) for p in pids))
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if inode not in ours or (proto.startswith("tcp") and state != "0A"):  # 0A: LISTEN
                continue
            addr, port = local.rsplit(":", 1)
            found.append((proto, _address(addr), int(port, 16)))
    return found


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.e2e
def test_server_listens_on_loopback_only():
    """A real server with every plugin entry point active (general, platform, stats endpoint)
    after a sparse prefill and scrapes: all its processes' listening sockets are on loopback, and
    the API port the user chose is among them. ``VLLM_HOST_IP`` (which the test helper sets for
    vLLM's internal sockets) is left unset here: the user chose ``--host 127.0.0.1`` and no more."""
    model = ensure_test_model()
    seer = {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 256}}
    env = {"VLLM_PLUGINS": "seer,seer_cpu,seer_stats"}
    srv = SeerServer(model, seer, ["--enforce-eager", "--max-model-len", "2048"], env=env)
    srv.env.pop("VLLM_HOST_IP", None)
    with srv:
        srv.completion([(7 * i) % 1500 + 100 for i in range(600)], 2)
        samples = parse_metrics(srv.metrics_text())
        srv.post("/v1/chat/completions", {"model": srv.model_name, "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "hi"}]})
        with urllib.request.urlopen(srv.url + "/v1/seer/stats", timeout=30) as r:
            assert r.status == 200
        pids = session_pids(srv.proc.pid)
        sockets = bound_sockets(pids)
    assert metric_sum(samples, "vllm:seer_prefill_tokens_total", path="sparse") == 600
    assert ("tcp", "127.0.0.1", srv.port) in sockets, sockets
    outside = [s for s in sockets if not is_loopback(s[1])]
    assert not outside, f"listening beyond 127.0.0.1: {outside} (all: {sockets})"
    print(f"\n{len(pids)} server processes, {len(sockets)} listening/bound sockets, all loopback: "
          f"{sorted(sockets)}")
