"""A CPU platform that honours the Seer backend selection.

vLLM's CPU platform ignores every selected backend but ``CPU_ATTN``; this subclass (activated through
the ``vllm.platform_plugins`` entry point only where vLLM's own CPU platform would be) returns the
Seer backend when the user selected ``seer`` (or the ``CUSTOM`` slot filled by this plugin) and
defers to vLLM otherwise.
"""

from __future__ import annotations

from typing import Any

from vllm.platforms.cpu import CpuPlatform

from vllm_seer.backend import compat


class SeerCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend: Any, attn_selector_config: Any,
                             *args: Any, **kwargs: Any) -> str:
        if compat.is_seer_selection(selected_backend) and not getattr(
            attn_selector_config, "use_mla", False
        ):
            return selected_backend.get_path()
        return super().get_attn_backend_cls(selected_backend, attn_selector_config,
                                            *args, **kwargs)
