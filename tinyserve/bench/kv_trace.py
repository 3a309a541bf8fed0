"""A seeded chat-like request trace, and a scheduler-shaped driver of vLLM's real KVCacheManager.

The driver makes the calls vLLM's scheduler makes on the KV cache manager (prefix lookup, allocate_slots
for prefill and for each decode token, cache on append, preempt newest on failure, free on finish) without
running a model, so the block pool under it — vLLM's or TinyServe's — sees the traffic of a serving engine.
Both pools replay the same trace with the same token ids.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TraceRequest", "make_trace", "make_kv_manager", "KVDriver"]


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace: arrival step, prompt token ids, tokens it will generate, max_tokens."""

    request_id: str
    arrival_step: int
    prompt: tuple[int, ...]
    output_len: int
    max_tokens: int


def make_trace(
    *,
    seed: int,
    num_requests: int,
    arrivals_per_step: float = 0.5,
    num_shared_prefixes: int = 4,
    shared_prefix_tokens: tuple[int, int] = (128, 768),
    shared_fraction: float = 0.7,
    user_tokens: tuple[int, int] = (32, 1024),
    output_tokens: tuple[int, int] = (16, 768),
    max_tokens: int = 1024,
    vocab: int = 2000,
) -> list[TraceRequest]:
    """A seeded trace: Poisson arrivals, a share of prompts starting with one of a few system prompts,
    log-uniform user and output lengths, outputs stopping before max_tokens (as EOS would)."""
    rng = random.Random(seed)
    prefixes = [
        tuple(rng.randrange(vocab) for _ in range(rng.randint(*shared_prefix_tokens)))
        for _ in range(num_shared_prefixes)
    ]

    def log_uniform(lo: int, hi: int) -> int:
        return int(round(lo * (hi / lo) ** rng.random()))

    trace, step = [], 0.0
    for index in range(num_requests):
        step += rng.expovariate(arrivals_per_step)
        prefix = prefixes[rng.randrange(num_shared_prefixes)] if rng.random() < shared_fraction else ()
        user = tuple(rng.randrange(vocab) for _ in range(log_uniform(*user_tokens)))
        output_len = min(log_uniform(*output_tokens), max_tokens)
        trace.append(TraceRequest(f"r{index}", int(step), prefix + user, output_len, max_tokens))
    return trace


def make_kv_manager(num_blocks: int, block_size: int, *, max_model_len: int = 32768, enable_caching: bool = True) -> Any:
    """A real vLLM 0.29 KVCacheManager over one full-attention group (whatever BlockPool is installed)."""
    import torch
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.float16)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["attn"], spec)])
    return KVCacheManager(
        config,
        max_model_len=max_model_len,
        scheduler_block_size=block_size,
        hash_block_size=block_size,
        enable_caching=enable_caching,
    )


@dataclass
class _Live:
    request: Any
    spec: TraceRequest
    generated: int = 0
    hit_blocks: int = 0  # blocks found in the prefix cache at its (latest) admission


@dataclass
class KVDriver:
    """Scheduler-shaped driver of one KVCacheManager.

    Owns the waiting queue (FIFO, preempted requests back at the front) and the running list (admission
    order). Each `step()` schedules every running request's next token (preempting the newest running
    request when a block cannot be had, as vLLM does), then admits waiting requests whose prompt fits the
    token budget and the free blocks, then "runs" the step: computed tokens advance and each decoding
    request appends its next trace token. Invariant: a request is in exactly one of waiting, running or
    finished. With `compaction` (AllocatorSettings; TinyServe's pool), each step compacts as the engine does
    after its scheduler: blocks of requests that were already running may move (tables rewritten, sources
    freed at the next step, when the copy has run); `blocks_moved` counts the copies.
    """

    manager: Any
    block_size: int
    max_num_seqs: int = 64
    token_budget: int = 4096
    on_step: Callable[["KVDriver"], None] | None = None
    # called with (driver, request id, block ids, prefix-hit blocks) just before a finished request is freed
    on_finish: Callable[["KVDriver", str, list[int], int], None] | None = None
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    finished: int = 0
    preemptions: int = 0
    steps: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    compaction: Any = None
    blocks_moved: int = 0
    _retained: list = field(default_factory=list)

    def submit(self, spec: TraceRequest) -> None:
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        if not getattr(KVDriver, "_hash_ready", False):
            init_none_hash(sha256)
            KVDriver._hash_ready = True  # type: ignore[attr-defined]
        request = Request(
            spec.request_id,
            list(spec.prompt),
            SamplingParams(max_tokens=spec.max_tokens),
            None,
            block_hasher=get_request_block_hasher(self.block_size, sha256),
        )
        self.waiting.append(_Live(request, spec))

    def _preempt_newest(self) -> None:
        from vllm.v1.request import RequestStatus

        victim = self.running.pop()
        self.manager.free(victim.request)  # vLLM frees first, then marks the request preempted
        victim.request.status = RequestStatus.PREEMPTED
        victim.request.num_computed_tokens = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1

    def step(self) -> None:
        from vllm.v1.request import RequestStatus

        manager = self.manager
        if self._retained:   # the step that copied them has run
            pool = manager.block_pool
            pool.free_blocks(pool.blocks[m.src] for m in self._retained)
            self._retained = []
        budget = self.token_budget
        scheduled: list[tuple[_Live, int]] = []
        index = 0
        while index < len(self.running):
            live = self.running[index]
            request = live.request
            new_tokens = request.num_tokens - request.num_computed_tokens
            while manager.allocate_slots(request, new_tokens) is None:
                self._preempt_newest()
                if live not in self.running:
                    break
            if live not in self.running:
                break
            scheduled.append((live, new_tokens))
            budget -= new_tokens
            index += 1
        already_running = [live for live, _ in scheduled]
        while self.waiting and len(self.running) < self.max_num_seqs:
            live = self.waiting[0]
            request = live.request
            blocks, num_hit, _ = manager.get_computed_blocks(request)
            new_tokens = request.num_tokens - num_hit
            if new_tokens > budget:
                break
            if manager.allocate_slots(request, new_tokens, num_hit, blocks) is None:
                break
            manager.record_prefix_cache_stats(request, num_hit)
            self.prefix_query_tokens += request.num_tokens
            self.prefix_hit_tokens += num_hit
            self.waiting.popleft()
            live.hit_blocks = num_hit // self.block_size
            request.status = RequestStatus.RUNNING
            self.running.append(live)
            scheduled.append((live, new_tokens))
            budget -= new_tokens
        if self.compaction is not None:
            self._compact(already_running)
        for live, new_tokens in scheduled:
            request = live.request
            request.num_computed_tokens += new_tokens
            if request.num_computed_tokens >= request.num_tokens:
                token = (live.spec.prompt[live.generated % len(live.spec.prompt)] * 31 + live.generated) % 2000 + 1
                live.generated += 1
                if live.generated >= live.spec.output_len:
                    from vllm.v1.request import RequestStatus

                    if self.on_finish is not None:
                        table = manager.coordinator.single_type_managers[0].req_to_blocks.get(request.request_id, [])
                        self.on_finish(self, live.spec.request_id, [b.block_id for b in table], live.hit_blocks)
                    self.running.remove(live)
                    request.status = RequestStatus.FINISHED_STOPPED
                    manager.free(request)
                    self.finished += 1
                else:
                    request.append_output_token_ids(token)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)

    def _compact(self, movable: list[_Live]) -> None:
        from tinyserve.engine.compaction import compact

        single = self.manager.coordinator.single_type_managers[0]
        self._retained = compact(single, self.manager.block_pool,
                                 lambda: [live.request.request_id for live in movable], self.compaction)
        self.blocks_moved += len(self._retained)

    def run(self, trace: list[TraceRequest], *, max_steps: int = 1_000_000) -> None:
        pending = deque(sorted(trace, key=lambda r: r.arrival_step))
        while (pending or self.waiting or self.running) and self.steps < max_steps:
            while pending and pending[0].arrival_step <= self.steps:
                self.submit(pending.popleft())
            self.step()

    def block_tables(self) -> dict[str, list[int]]:
        table_of = self.manager.coordinator.single_type_managers[0].req_to_blocks
        return {
            live.spec.request_id: [b.block_id for b in table_of.get(live.request.request_id, ()) if not b.is_null]
            for live in self.running
        }

    def tokens_held(self) -> dict[str, int]:
        return {live.spec.request_id: live.request.num_computed_tokens for live in self.running}
