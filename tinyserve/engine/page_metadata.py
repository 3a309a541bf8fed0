"""Per KV block and KV head, the channel-wise min and max of the keys written into the block.

The metadata lives in the worker process beside the KV cache, one `PageMetadata` per attention layer, indexed
by the same physical block ids as the layer's KV cache. It is owned by the block, not by a request, which is
what makes it follow the block through vLLM's life cycle without any bookkeeping of its own:

- prefill, decode and chunked prefill: every key vLLM writes into the cache is folded in at the same time
  (`record`, called from the attention backend's KV-cache update with the same keys and slot mapping);
- free and reallocation: a block is always (re)written from offset 0 after it is handed to a new owner, and a
  write at offset 0 resets the block's min/max first, so stale keys of a former owner never leak in;
- prefix-cache reuse and preemption (recompute): a cached block is reused as it is, and so is its metadata;
  the non-cached tail of a preempted request is rewritten from offset 0 on resumption;
- compaction and copy-on-write: every KV block copy vLLM applies in the worker
  (`SchedulerOutput.kv_cache_block_copies`) is applied to the metadata too (`PageMetadataStore.copy_blocks`).

Not covered: speculative decoding writes keys that may be rejected and later overwritten at the same offsets;
the min/max then still bound the live keys (scores stay upper bounds) but are no longer tight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from tinyserve.kernels import ops

__all__ = ["PageMetadata", "PageMetadataStore", "page_metadata_store"]


class PageMetadata:
    """Key min/max of one attention layer: `key_min`, `key_max` of shape [num_blocks, num_kv_heads, head_dim].

    Invariant: for every block b that holds tokens 0..n-1 of its current owner, `key_min[b, h, c]` and
    `key_max[b, h, c]` are exactly the min and max over those n tokens of channel c of KV head h's keys, in
    the cache's dtype (min/max of representable values are representable: no rounding). Blocks never written
    hold 0 and are never read by selection (only pages of live requests are scored).
    """

    def __init__(self, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.block_size = int(block_size)
        self.key_min = torch.zeros(num_blocks, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.key_max = torch.zeros(num_blocks, num_kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.key_min.shape[0]

    def record(self, key: Tensor, slot_mapping: Tensor) -> None:
        """Fold keys just written to the KV cache: key [T, Hkv, D] (extra rows past the slots are padding),
        slot_mapping [T'] with T' <= T, `slot = block * block_size + offset`, negative slots skipped."""
        n = slot_mapping.shape[0]
        if n == 0:
            return
        ops.update_page_metadata(self.key_min, self.key_max, key[:n], slot_mapping, self.block_size)

    def copy_blocks(self, src: Tensor, dst: Tensor) -> None:
        """Block `src[i]`'s metadata becomes block `dst[i]`'s (all reads before writes), as the KV copy does."""
        ops.copy_blocks([self.key_min, self.key_max], src, dst)


class PageMetadataStore:
    """Every layer's `PageMetadata` in this worker process, keyed by vLLM layer name.

    A layer's metadata is created on its first KV-cache write, sized from the layer's KV cache (block count,
    KV heads, head size, dtype). `copy_blocks` applies one list of block copies to all layers, like vLLM's
    `copy_kv_cache_blocks_inplace` does to the KV caches.
    """

    def __init__(self) -> None:
        self._layers: dict[str, PageMetadata] = {}

    def get(self, layer_name: str) -> PageMetadata | None:
        return self._layers.get(layer_name)

    def get_or_create(self, layer_name: str, num_blocks: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype, device: torch.device | str) -> PageMetadata:
        meta = self._layers.get(layer_name)
        if meta is None or meta.num_blocks != num_blocks:
            meta = PageMetadata(num_blocks, num_kv_heads, head_dim, block_size, dtype, device)
            self._layers[layer_name] = meta
        return meta

    def layers(self) -> dict[str, PageMetadata]:
        return dict(self._layers)

    def copy_blocks(self, copies: Iterable[Sequence[int]], num_blocks: int | None = None) -> int:
        """Apply `(src_block, dst_block)` copies to every layer; returns the number of copies applied.

        `num_blocks` is the scheduler's block count when it differs from the layers' (vLLM may split one
        scheduler block into several kernel blocks); scheduler block b is then kernel blocks b*k .. b*k+k-1.
        """
        pairs = [(int(s), int(d)) for s, d in copies]
        if not pairs:
            return 0
        idx = torch.tensor(pairs, dtype=torch.long)
        for meta in self._layers.values():
            k = 1 if not num_blocks else meta.num_blocks // int(num_blocks)
            src, dst = idx[:, 0], idx[:, 1]
            if k > 1:
                sub = torch.arange(k)
                src = (src.view(-1, 1) * k + sub).flatten()
                dst = (dst.view(-1, 1) * k + sub).flatten()
            meta.copy_blocks(src, dst)
        return len(pairs)

    def clear(self) -> None:
        self._layers.clear()


_STORE = PageMetadataStore()


def page_metadata_store() -> PageMetadataStore:
    """The process-wide store (one per worker process)."""
    return _STORE
