"""Plugin registration: idempotent, SEER survives pickling into a fresh (spawned) process."""

from __future__ import annotations

import multiprocessing as mp
import pickle


def _child(payload: bytes, q) -> None:  # runs in a spawned interpreter: nothing registered yet
    member = pickle.loads(payload)
    q.put((member.name, member.get_path()))


def test_register_is_idempotent_and_seer_survives_spawn():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_seer.plugin import BACKEND_PATH, CUSTOM_PATH, register

    register()
    register()
    seer = AttentionBackendEnum["SEER"]
    assert seer.get_path() == BACKEND_PATH
    assert AttentionBackendEnum.CUSTOM.get_path() == CUSTOM_PATH
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(pickle.dumps(seer), q))
    p.start()
    name, path = q.get(timeout=120)
    p.join(timeout=60)
    assert (name, path) == ("SEER", BACKEND_PATH)


def test_backend_path_resolves_to_cpu_class_here():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_seer.backend.cpu import SeerCPUBackend
    from vllm_seer.plugin import register

    register()
    cls = AttentionBackendEnum["SEER"].get_class()
    assert cls is SeerCPUBackend and cls.get_name() == "SEER"
    assert AttentionBackendEnum.CUSTOM.get_class().get_name() == "CUSTOM"
