"""TinyServe's block pool for vLLM 0.29 and the hook that puts it in place of vLLM's.

First landing: `BestFitBlockPool` keeps vLLM's allocation order and adds `stats()`; the best-fit
placement follows.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.block_pool import BlockPool

from tinyserve.engine.settings import AllocatorSettings

__all__ = ["BestFitBlockPool", "install_block_pool"]


class BestFitBlockPool(BlockPool):
    """vLLM's BlockPool with TinyServe's statistics (same interface and semantics)."""

    settings: AllocatorSettings = AllocatorSettings()

    def stats(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_gpu_blocks,
            "num_free_blocks": self.get_num_free_blocks(),
            "usage": self.get_usage(),
        }


def install_block_pool(settings: AllocatorSettings) -> None:
    """Make vLLM's KV cache coordinator build `BestFitBlockPool` (idempotent)."""
    import vllm.v1.core.kv_cache_coordinator as coordinator

    BestFitBlockPool.settings = settings
    coordinator.BlockPool = BestFitBlockPool
