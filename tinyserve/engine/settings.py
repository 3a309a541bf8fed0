"""TinyServe engine settings and how they reach vLLM's engine-core and worker processes.

The deployment config holds an `EngineSettings`; the replica puts it, as JSON, in the environment variable
`TINYSERVE_ENGINE` before vLLM starts, and the plugin reads it back in every process vLLM spawns (engine
core, workers), which inherit the environment. No variable set means: plugin on, defaults below.
"""

from __future__ import annotations

import json
import os

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ENV_VAR", "AllocatorSettings", "SelectionSettings", "EngineSettings"]

ENV_VAR = "TINYSERVE_ENGINE"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllocatorSettings(_Strict):
    """The best-fit, fragmentation-aware block pool (tinyserve.engine.block_pool)."""

    enabled: bool = True
    # Compaction runs when free-space scatter (1 - largest_free_run / free_blocks) exceeds this; None = never.
    compaction_scatter_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    # Test hook: plan and apply a compaction at every scheduler step.
    force_compaction_every_step: bool = False
    # At most this many block copies per compaction (one compaction per scheduler step at most).
    compaction_max_moves: int = Field(default=64, ge=1)
    # Gather instead of coalescing free space: each step, a running request whose own blocks (held by it
    # alone) lie in at least this many runs gets one move: all of them into one stretch in table order
    # around one of its runs left in place, else two of its runs joined, else all into one free run (free
    # = placeable, or never-hit cached blocks of any age, evicted out of LRU order); most runs first, at
    # most compaction_max_moves copies a step; None = off.
    compaction_gather_runs: int | None = Field(default=None, ge=2)
    # A new placement reserves room to grow right after it: the learned expected output (moving mean of
    # finished outputs, doubled once exceeded) or a fair share of free blocks if larger, never past
    # prompt + max_tokens, and at most this many blocks (None = no cap). Reserved blocks stay free: an
    # allocation that finds no unreserved block splits the largest reservation and takes its far part.
    growth_reserve_max_blocks: int | None = Field(default=None, ge=0)
    # Weight of each finished request in the moving mean of output lengths that sizes reservations.
    output_mean_weight: float = Field(default=0.05, gt=0.0, le=1.0)
    # Placement never takes a cached block while a block without a hash is free (as vLLM's free queue).
    # Eviction of cached blocks looks at this many least-recently-used ones and prefers, in
    # order: fewer prefix hits, keeping the allocation contiguous, fewer free neighbours. 1 = plain LRU
    # (the default: wider windows bought no contiguity and lost prefix hits on the benchmark trace).
    eviction_window: int = Field(default=1, ge=1)
    # Once every free block is cached, an allocation may evict an old, never-hit cached block out of LRU
    # order to stay contiguous: one among this fraction of the least recently used free cached blocks.
    eviction_age_fraction: float = Field(default=0.5, gt=0.0, le=1.0)


class SelectionSettings(_Strict):
    """Query-aware KV page selection at decode (tinyserve.engine.selection)."""

    enabled: bool = False
    # Token budget per request and KV head: an absolute number of tokens, or a fraction of the context.
    budget_tokens: int | None = Field(default=None, gt=0)
    budget_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    # Selection starts only once a request's context is at least this long.
    min_context_tokens: int = Field(default=1024, ge=0)
    # Layers that always attend densely (the first layers carry little query-aware structure).
    exempt_layers: list[int] = Field(default_factory=lambda: [0, 1])
    num_sink_pages: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _one_budget(self) -> "SelectionSettings":
        if self.enabled and (self.budget_tokens is None) == (self.budget_fraction is None):
            raise ValueError("selection needs exactly one of budget_tokens or budget_fraction")
        return self


class EngineSettings(_Strict):
    """Everything the TinyServe plugin changes inside vLLM; `enabled: false` leaves vLLM stock."""

    enabled: bool = True
    allocator: AllocatorSettings = Field(default_factory=AllocatorSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)

    def to_env(self) -> dict[str, str]:
        """The environment entry that carries these settings into vLLM's processes."""
        return {ENV_VAR: self.model_dump_json()}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "EngineSettings":
        raw = (os.environ if environ is None else environ).get(ENV_VAR)
        return cls() if not raw else cls.model_validate(json.loads(raw))
