"""vLLM plugin entry points (see ``pyproject.toml``).

``register`` (group ``vllm.general_plugins``) runs once in every vLLM process: it registers the
``SEER`` backend enum member and the ``CUSTOM`` slot, and in the API-server process sets up the
metrics collector. ``cpu_platform`` (group ``vllm.platform_plugins``) activates a CPU platform that
honours the selection, only where vLLM's own CPU platform would be active.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_PATH = "vllm_seer.backend.SeerBackend"
CUSTOM_PATH = "vllm_seer.backend.SeerCustomBackend"
_registered = False


def register() -> None:
    """Idempotent and cheap: no model or gate loading happens here."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_seer.backend import compat
    from vllm_seer.metrics import setup_api_server_metrics

    _share_vllm_log_handlers()
    compat.register_seer_member(BACKEND_PATH)
    compat.register_custom(CUSTOM_PATH)
    setup_api_server_metrics()


def cpu_platform() -> str | None:
    """Platform plugin: our CPU platform where vLLM would pick its CPU platform, else ``None``."""
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None
    return "vllm_seer.backend.platform.SeerCpuPlatform"


def _share_vllm_log_handlers() -> None:
    """Route the ``vllm_seer`` loggers through vLLM's configured handlers (same format, level)."""
    ours, theirs = logging.getLogger("vllm_seer"), logging.getLogger("vllm")
    if theirs.handlers and not ours.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False
