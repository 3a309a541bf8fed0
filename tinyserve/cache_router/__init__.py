"""Query-aware routing: a KV block index fed by vLLM KV events, a cost model, and a Ray Serve request router.

`QueryAwareRouter` is imported lazily (it needs Ray Serve) so the rest works without Ray.
"""

from typing import Any

from tinyserve.cache_router.block_hashing import BlockHasher, UnreproducibleHashError
from tinyserve.cache_router.cost_model import CostModel, CostWeights, ReplicaLoad
from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.kv_event_subscriber import KVEventSubscriber, StreamState
from tinyserve.cache_router.request_tokenizer import RequestTokenizer
from tinyserve.cache_router.router_metrics import RouterMetrics
from tinyserve.cache_router.routing_policy import Decision, RoutingPolicy

__all__ = [
    "BlockHasher",
    "UnreproducibleHashError",
    "CostModel",
    "CostWeights",
    "ReplicaLoad",
    "KVBlockIndex",
    "KVEventSubscriber",
    "StreamState",
    "RequestTokenizer",
    "RouterMetrics",
    "Decision",
    "RoutingPolicy",
    "QueryAwareRouter",
]


def __getattr__(name: str) -> Any:
    if name == "QueryAwareRouter":
        from tinyserve.cache_router.router import QueryAwareRouter

        return QueryAwareRouter
    raise AttributeError(name)
