"""Query-aware KV page selection as a vLLM attention-backend override (CPU path).

`install_selection(settings)` (called by the plugin in every vLLM process) registers
`QueryAwareCPUAttentionBackend` as vLLM's `CPU_ATTN` backend through vLLM's backend registry, so the CPU
platform picks it where it would pick the stock one. The override is the stock backend plus three things:

1. KV-cache update: after vLLM writes K/V into the cache, the same keys and slot mapping are folded into the
   layer's page metadata (`tinyserve.engine.page_metadata`): per block and KV head, key min/max.
2. Metadata build (once per step): finds the decode requests (one query token) with at least
   `min_context_tokens` of context and their page budgets (`PageSelector`).
3. Attention (per layer): prefill and exempt layers run stock. For the eligible decode requests, the layer's
   query scores their pages, the best pages within the budget (plus sinks and the page being written) are
   chosen for all heads of the request, and the stock CPU kernel runs on a rewritten block table row (the
   selected blocks, the partial one last) and the matching shorter length. Decode attention does not depend
   on the order of the keys and RoPE is inside the stored keys, so this is exact attention over the selected
   tokens, and exactly dense attention when every page fits the budget.

The KV cache itself is never copied or re-laid out: the kernel reads it through the rewritten block table;
metadata is computed from the keys vLLM hands to the cache update, so the cache's internal layout (which
differs from the reference's [blocks, block_size, heads, dim]) never has to be read.

Every KV block copy vLLM applies in the worker (`copy_kv_cache_blocks_inplace`, used for copy-on-write and
scheduler-driven compaction) is applied to the page metadata as well.

Counters (see `SelectionCounters`) are summed over workers by `gather_selection_stats(engine_core)`.
The engine core also gets `tinyserve_set_selection(settings_json)`, which swaps the selection settings in
every worker at run time (same engine, selection on/off or another budget: used by tests and the bench),
`tinyserve_selection_stats()` (the counters alone, as `tinyserve_stats()["selection"]` carries them),
and `tinyserve_audit_page_metadata()`, which checks the metadata of every full prefix-cached block and of every
block of the running requests (up to their computed tokens) against the keys read back from the KV cache (max
abs error; 0 when exact).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from vllm import _custom_ops as vllm_ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from tinyserve.engine.page_metadata import page_metadata_store
from tinyserve.engine.page_selector import PageSelector, SelectionCounters
from tinyserve.engine.settings import SelectionSettings

__all__ = [
    "QueryAwareCPUAttentionBackend",
    "QueryAwareCPUAttentionImpl",
    "QueryAwareCPUAttentionMetadata",
    "QueryAwareCPUAttentionMetadataBuilder",
    "DecodeSelectionPlan",
    "install_selection",
    "gather_selection_stats",
    "selection_counters",
    "set_selection_settings",
    "SET_SETTINGS_METHOD",
    "AUDIT_METHOD",
    "STATS_METHOD",
]

SET_SETTINGS_METHOD = "tinyserve_set_selection"
AUDIT_METHOD = "tinyserve_audit_page_metadata"
STATS_METHOD = "tinyserve_selection_stats"
_BACKEND_PATH = f"{__name__}.QueryAwareCPUAttentionBackend"


class _ProcessState:
    """Selection settings and selectors of this process (a worker, or the engine core that hosts one)."""

    def __init__(self) -> None:
        self.settings = SelectionSettings()
        self.selectors: list[PageSelector] = []

    def set_settings(self, settings: SelectionSettings) -> None:
        self.settings = settings
        for s in self.selectors:
            s.settings = settings


_STATE = _ProcessState()


@dataclass
class DecodeSelectionPlan:
    """What one step's eligible decode requests need for selection, shared by all layers of the step.

    rows: batch rows of the eligible requests; query_index: their query token; block_table / seq_lens /
    budget_pages: their rows; out_block_table / out_seq_lens: full-batch copies that each selecting layer
    overwrites at `rows` (other rows stay the step's originals, so the stock kernel runs them unchanged).
    """

    selector: PageSelector
    builder: "QueryAwareCPUAttentionMetadataBuilder"
    rows: torch.Tensor
    query_index: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    budget_pages: torch.Tensor
    out_block_table: torch.Tensor
    out_seq_lens: torch.Tensor


@dataclass
class QueryAwareCPUAttentionMetadata(CPUAttentionMetadata):
    selection: DecodeSelectionPlan | None = None


class QueryAwareCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """The stock CPU metadata builder, plus the per-step decode selection plan."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.selector = PageSelector(_STATE.settings, self.block_size)
        _STATE.selectors.append(self.selector)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        md = QueryAwareCPUAttentionMetadata(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        md.selection = self._plan(md)
        return md

    def _plan(self, md: CPUAttentionMetadata) -> DecodeSelectionPlan | None:
        settings = self.selector.settings
        if (not settings.enabled or self.is_cross_attention or self.is_encoder_only_attention
                or self.window_size != -1 or md.dynamic_causal is not None or not md.causal):
            return None
        num_reqs = md.seq_lens.shape[0]
        qsl = md.query_start_loc[: num_reqs + 1]
        query_lens = qsl[1:] - qsl[:-1]
        seq_lens = md.seq_lens[:num_reqs]
        rows = torch.nonzero(self.selector.eligible(query_lens, seq_lens)).flatten()
        if rows.numel() == 0:
            return None
        row_seq_lens = seq_lens[rows]
        return DecodeSelectionPlan(
            selector=self.selector,
            builder=self,
            rows=rows,
            query_index=qsl[rows].long(),
            block_table=md.block_table[rows],
            seq_lens=row_seq_lens,
            budget_pages=self.selector.budget_pages(row_seq_lens),
            out_block_table=md.block_table.clone(),
            out_seq_lens=md.seq_lens.clone(),
        )

    def scheduler_metadata_for(self, md: CPUAttentionMetadata, seq_lens: torch.Tensor) -> torch.Tensor:
        """The stock kernel's work partition for these (rewritten) lengths."""
        return vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0],
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=md.query_start_loc,
            causal=md.causal,
            sliding_window_size=self.window_size,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=md.dynamic_causal,
            kv_cache_dtype=self.kv_cache_dtype,
        )


class _SingleThreaded:
    """Runs a block with one intra-op thread, then restores the count.

    Selection and metadata upkeep are many small torch ops (~10^5 elements); their intra-op parallel regions
    cost more than they save, and on a busy (oversubscribed) CPU each region can wait milliseconds for a
    descheduled thread. The OpenMP pool (and any core binding vLLM gave its threads) is kept while idle.
    """

    __slots__ = ("threads",)

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        if self.threads > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.threads > 1:
            torch.set_num_threads(self.threads)


_single_threaded = _SingleThreaded()


class QueryAwareCPUAttentionImpl(CPUAttentionBackendImpl):
    """The stock CPU attention, with page metadata kept on every KV write and page selection at decode.

    Invariant: with no plan for the step (prefill only, selection off, no eligible request) or in an exempt
    layer, `forward` is exactly the stock forward.
    """

    _layer_index: int | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel() == 0 or self.attn_type != AttentionType.DECODER:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        meta = page_metadata_store().get_or_create(
            layer.layer_name, num_blocks, num_kv_heads, self.head_size, block_size, key.dtype, key.device)
        with _single_threaded:
            meta.record(key, slot_mapping)

    def _is_exempt(self, layer) -> bool:
        if self._layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            try:
                self._layer_index = extract_layer_index(layer.layer_name)
            except (AssertionError, ValueError):
                self._layer_index = -1
        return self._layer_index in _STATE.settings.exempt_layers

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "selection", None)
        meta = page_metadata_store().get(layer.layer_name) if plan is not None else None
        if plan is None or meta is None or self.is_fp8_kv_cache or self._is_exempt(layer):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        with _single_threaded:
            selector = plan.selector
            selected, num_selected = selector.select(query[plan.query_index], meta.key_min, meta.key_max,
                                                     plan.block_table, plan.seq_lens, plan.budget_pages)
            row_table = plan.out_block_table[plan.rows]
            row_lens = plan.out_seq_lens[plan.rows]
            selector.rewrite(plan.block_table, plan.seq_lens, selected, num_selected, row_table, row_lens)
            plan.out_block_table[plan.rows] = row_table
            plan.out_seq_lens[plan.rows] = row_lens
            selector.count(plan.seq_lens, row_lens, num_selected,
                           2 * self.num_kv_heads * self.head_size * meta.key_min.element_size())
            selected_md = dataclasses.replace(
                attn_metadata,
                block_table=plan.out_block_table,
                seq_lens=plan.out_seq_lens,
                scheduler_metadata=plan.builder.scheduler_metadata_for(attn_metadata, plan.out_seq_lens),
                selection=None,
            )
        return super().forward(layer, query, key, value, kv_cache, selected_md, output,
                               output_scale, output_block_scale)


class QueryAwareCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend (same name, layouts, kernels) with query-aware page selection."""

    @staticmethod
    def get_impl_cls() -> type[QueryAwareCPUAttentionImpl]:
        return QueryAwareCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[QueryAwareCPUAttentionMetadataBuilder]:
        return QueryAwareCPUAttentionMetadataBuilder


# -- worker-side helpers (run through collective_rpc: module-level, so they pickle by reference) -----------
def selection_counters() -> dict[str, int]:
    """This process's counters, summed over its selectors."""
    total = SelectionCounters()
    for s in _STATE.selectors:
        total.add(s.counters)
    return total.as_dict()


def _worker_selection_counters(worker: Any = None) -> dict[str, int]:
    return selection_counters()


def set_selection_settings(settings: SelectionSettings) -> None:
    """Swap this process's selection settings (new steps use them)."""
    _STATE.set_settings(settings)


def _worker_set_settings(worker: Any, settings_json: str) -> bool:
    set_selection_settings(SelectionSettings.model_validate_json(settings_json))
    return True


# -- engine-core side ----------------------------------------------------------------------------------
def gather_selection_stats(engine_core: Any) -> dict[str, int]:
    """Selection counters summed over the engine core's workers (keys of `SelectionCounters`)."""
    per_worker = engine_core.model_executor.collective_rpc(_worker_selection_counters)
    total = SelectionCounters()
    for d in per_worker:
        total.add(SelectionCounters(**d))
    return total.as_dict()


def _engine_core_set_selection(engine_core: Any, settings_json: str) -> bool:
    SelectionSettings.model_validate_json(settings_json)  # fail here, not in the workers
    return all(engine_core.model_executor.collective_rpc(_worker_set_settings, args=(settings_json,)))


def _cache_key_layout(layer: Any, num_kv_heads: int, block_size: int, head_dim: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Where the stock CPU kernel puts key (token t, channel c) inside one block of one head: a flat index
    [block_size, head_dim] into the block's key area (the layout depends on the kernel's ISA, e.g. "vec"
    stores keys channel-major). Found by writing a probe through the kernel's own cache-write op."""
    probe = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    kc, vc = probe.view(1, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    slots = torch.arange(block_size, dtype=torch.long)
    found = []
    for coord in (torch.arange(block_size).view(-1, 1).expand(block_size, head_dim),       # token
                  torch.arange(head_dim).view(1, -1).expand(block_size, head_dim)):       # channel
        key = (coord + 1).to(dtype).view(block_size, 1, head_dim).expand(block_size, num_kv_heads, head_dim)
        vllm_ops.cpu_attn_reshape_and_cache(key.contiguous(), torch.zeros_like(key), kc, vc, slots,
                                            layer.isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        found.append(kc[0, 0].reshape(-1).float().long() - 1)
    token, channel = found
    where = torch.empty(block_size, head_dim, dtype=torch.long)
    where[token, channel] = torch.arange(block_size * head_dim)
    return where


def _worker_audit_metadata(worker: Any, blocks: list[tuple[int, int]]) -> dict[str, float]:
    """Compare every layer's metadata of these `(block, tokens)` with the min/max of the block's first
    `tokens` keys read back from the KV cache."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    layers = get_layers_from_vllm_config(worker.vllm_config, Attention)
    by_len: dict[int, list[int]] = {}
    for block, tokens in blocks:
        by_len.setdefault(int(tokens), []).append(int(block))
    worst, checked = 0.0, 0
    for name, layer in layers.items():
        meta = page_metadata_store().get(name)
        cache = layer.kv_cache
        if meta is None or not isinstance(cache, torch.Tensor) or cache.numel() == 0 or not blocks:
            continue
        nb, hkv, bs, two_d = cache.shape
        where = _cache_key_layout(layer, hkv, bs, two_d // 2, cache.dtype).flatten()
        for tokens, ids_list in by_len.items():
            ids = torch.tensor(ids_list, dtype=torch.long)
            area = cache.view(nb, hkv, 2 * bs, -1)[ids, :, :bs, :].reshape(ids.numel(), hkv, -1)
            keys = area[:, :, where].view(ids.numel(), hkv, bs, -1)[:, :, :tokens].float()
            err_min = (keys.amin(dim=2) - meta.key_min[ids].float()).abs().max()
            err_max = (keys.amax(dim=2) - meta.key_max[ids].float()).abs().max()
            worst = max(worst, float(err_min), float(err_max))
        checked += 1
    return {"layers_checked": checked, "max_abs_error": worst}


def _engine_core_audit_metadata(engine_core: Any) -> dict[str, float]:
    """Audit page metadata against the KV cache: every full prefix-cached block, and every block of the
    running requests up to their computed tokens (partial pages included). Exact means error 0."""
    scheduler = engine_core.scheduler
    manager = scheduler.kv_cache_manager
    block_size = scheduler.cache_config.block_size
    tokens_of: dict[int, int] = {}
    for b in manager.block_pool.blocks:
        if b.block_hash is not None and not b.is_null:
            tokens_of[b.block_id] = block_size
    running = 0
    for req in list(scheduler.running):
        ids = manager.get_block_ids(req.request_id)[0]
        done = int(req.num_computed_tokens)
        for i, block in enumerate(ids):
            n = min(block_size, done - i * block_size)
            if n > 0:
                tokens_of[block] = max(tokens_of.get(block, 0), n)
        running += 1
    blocks = sorted(tokens_of.items())
    per_worker = engine_core.model_executor.collective_rpc(_worker_audit_metadata, args=(blocks,))
    return {
        "blocks_checked": len(blocks),
        "partial_blocks_checked": sum(1 for _, n in blocks if n < block_size),
        "running_requests": running,
        "layers_checked": min(int(w["layers_checked"]) for w in per_worker),
        "max_abs_error": max(float(w["max_abs_error"]) for w in per_worker),
    }


def _install_copy_hook() -> None:
    """Make every KV block copy the GPU/CPU model runner applies move the page metadata too."""
    import vllm.v1.worker.gpu_model_runner as runner_module

    original = runner_module.copy_kv_cache_blocks_inplace
    if getattr(original, "_tinyserve_wrapped", False):
        return

    def copy_kv_cache_blocks_and_metadata(kv_caches, num_blocks, kv_cache_block_copies):
        original(kv_caches, num_blocks, kv_cache_block_copies)
        page_metadata_store().copy_blocks(kv_cache_block_copies, num_blocks)

    copy_kv_cache_blocks_and_metadata._tinyserve_wrapped = True  # type: ignore[attr-defined]
    runner_module.copy_kv_cache_blocks_inplace = copy_kv_cache_blocks_and_metadata


def install_selection(settings: SelectionSettings) -> None:
    """Register the query-aware CPU backend as vLLM's CPU_ATTN and set this process's settings (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.engine.core import EngineCore

    set_selection_settings(settings)
    register_backend(AttentionBackendEnum.CPU_ATTN, _BACKEND_PATH)
    _install_copy_hook()
    if not hasattr(EngineCore, SET_SETTINGS_METHOD):
        setattr(EngineCore, SET_SETTINGS_METHOD, _engine_core_set_selection)
    if not hasattr(EngineCore, STATS_METHOD):
        setattr(EngineCore, STATS_METHOD, gather_selection_stats)
    if not hasattr(EngineCore, AUDIT_METHOD):
        setattr(EngineCore, AUDIT_METHOD, _engine_core_audit_metadata)
