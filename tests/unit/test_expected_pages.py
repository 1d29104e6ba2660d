"""The warm-up builds the kernels for the page size vLLM will pick (issue 12.2).

Measured on the H200 (2026-12-02, vLLM 0.26): the warm-up read ``cache_config.block_size`` (16,
the default) while vLLM then gave the Seer backend its preferred 64-token pages, so the first long
request compiled and autotuned the kernels (a 25 s TTFT for a 20k-token prompt).
"""

from __future__ import annotations

from types import SimpleNamespace

from vllm_seer.backend.compat import expected_page_sizes


def _preferred(default: int) -> int:
    return default if default % 64 == 0 else 64


def test_default_page_size_is_replaced_by_the_preferred_one() -> None:
    cfg = SimpleNamespace(block_size=16, user_specified_block_size=False)
    assert expected_page_sizes(cfg, _preferred) == [64]


def test_user_block_size_is_kept() -> None:
    cfg = SimpleNamespace(block_size=16, user_specified_block_size=True)
    assert expected_page_sizes(cfg, _preferred) == [16]


def test_unknown_origin_warms_both() -> None:
    assert expected_page_sizes(SimpleNamespace(block_size=16), _preferred) == [16, 64]
    assert expected_page_sizes(SimpleNamespace(block_size=128), _preferred) == [128]


def test_vllm_cache_config_has_the_flag() -> None:
    """The installed vLLM's CacheConfig carries the flag this relies on (False by default)."""
    from vllm.config.cache import CacheConfig

    assert CacheConfig().user_specified_block_size is False
