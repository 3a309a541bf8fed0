"""Query-aware routing: a KV block index fed by vLLM KV events, a cost model, and a Ray Serve request router."""

from tinyserve.cache_router.block_hashing import BlockHasher, UnreproducibleHashError
from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.kv_event_subscriber import KVEventSubscriber, StreamState
from tinyserve.cache_router.request_tokenizer import RequestTokenizer

__all__ = [
    "BlockHasher",
    "UnreproducibleHashError",
    "KVBlockIndex",
    "KVEventSubscriber",
    "StreamState",
    "RequestTokenizer",
]
