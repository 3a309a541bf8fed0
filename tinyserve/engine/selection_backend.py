"""Query-aware KV page selection as a vLLM attention-backend override (CPU path).

`install_selection(settings)` (called by the plugin in every vLLM process) registers
`QueryAwareCPUAttentionBackend` as vLLM's `CPU_ATTN` backend through vLLM's backend registry, so the CPU
platform picks it where it would pick the stock one. The override is the stock backend plus three things:

1. KV-cache update: after vLLM writes K/V into the cache, the same keys and slot mapping are folded into the
   layer's page metadata (`tinyserve.engine.page_metadata`): per block and KV head, key min/max.
2. Metadata build (once per step): finds the decode requests (one query token) with at least
   `min_context_tokens` of context, their page budgets (`PageSelector`), and the kernel's batch for them
   (lengths and work partition, which do not depend on which pages a head selects).
3. Attention (per layer): prefill and exempt layers run stock. For the eligible decode requests, the layer's
   query scores their pages per KV head (the query heads of a KV head combined), each KV head keeps its own
   best pages within the budget (plus sinks and the page being written), and the stock CPU kernel attends
   over them per KV head in one call: the cache, `[num_blocks, num_kv_heads, block_size, 2 * head_dim]`
   block-major (the CPU backend's only layout, LBHNC), is viewed as a one-KV-head cache of
   `num_blocks * num_kv_heads` blocks (block b of head h is block `b * num_kv_heads + h`), and each
   (request, KV head) becomes one sequence of that view: the head's query heads as its query heads, its
   selected blocks (the partial one last) as its block table row, the tokens they hold as its length.
   Decode attention does not depend on the order of the keys and RoPE is inside the stored keys, so this is
   exact attention over each head's selected tokens, and exactly dense attention when every page fits the
   budget. The step's other rows (prefill chunks, short decodes) run in one stock call beforehand, where
   the selecting rows are cut to one token; a step whose rows all select skips that call.

The KV cache itself is never copied or re-laid out: the kernel reads it through the one-head view and the
per-head block table; metadata is computed from the keys vLLM hands to the cache update, so the cache's
internal layout (which differs from the reference's [blocks, block_size, heads, dim]) never has to be read.

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

from tinyserve.engine.page_metadata import PageMetadata, page_metadata_store
from tinyserve.engine.page_selector import PageSelector, SelectionCounters
from tinyserve.engine.settings import SelectionSettings

__all__ = [
    "QueryAwareCPUAttentionBackend",
    "QueryAwareCPUAttentionImpl",
    "QueryAwareCPUAttentionMetadata",
    "QueryAwareCPUAttentionMetadataBuilder",
    "DecodeSelectionPlan",
    "plan_decode_selection",
    "one_head_cache_view",
    "head_block_table",
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
    """What one step's eligible decode requests need for per-KV-head selection, shared by all layers of the
    step (each head of a request selects `selector.num_selected` pages whatever the query, so lengths and the
    kernel's work partition are known before any layer runs).

    rows: batch rows of the eligible requests; query_index: their query token; block_table / seq_lens /
    budget_pages: their rows; selection_bias: `PageSelector.selection_bias` of their rows.
    head_seq_lens / head_query_start_loc / head_scheduler_metadata: the kernel's
    batch of (request, KV head) sequences over the one-head cache view, request-major (row i, head h is
    sequence i * num_kv_heads + h). rest: metadata of the stock call for the step's other rows (the selecting
    rows cut to one token), or None when every row of the step selects.
    """

    selector: PageSelector
    rows: torch.Tensor
    query_index: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    budget_pages: torch.Tensor
    selection_bias: torch.Tensor
    head_seq_lens: torch.Tensor
    head_query_start_loc: torch.Tensor
    head_scheduler_metadata: torch.Tensor
    rest: CPUAttentionMetadata | None


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
        if (self.is_cross_attention or self.is_encoder_only_attention or self.window_size != -1
                or md.dynamic_causal is not None or not md.causal):
            return None
        return plan_decode_selection(self.selector, md, self.num_heads, self.num_kv_heads, self.head_dim,
                                     self.dtype, self.isa, self.kv_cache_dtype)


def plan_decode_selection(selector: PageSelector, md: CPUAttentionMetadata, num_heads: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype, isa: str,
                          kv_cache_dtype: str) -> DecodeSelectionPlan | None:
    """The step's selection plan for a causal decoder batch `md` (None when no row selects)."""
    if not selector.settings.enabled or num_heads % num_kv_heads != 0:
        return None
    num_reqs = md.seq_lens.shape[0]
    qsl = md.query_start_loc[: num_reqs + 1]
    query_lens = qsl[1:] - qsl[:-1]
    seq_lens = md.seq_lens[:num_reqs]
    rows = torch.nonzero(selector.eligible(query_lens, seq_lens)).flatten()
    if rows.numel() == 0:
        return None

    def partition(lens: torch.Tensor, starts: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
        return vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=lens.shape[0], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, seq_lens=lens,
            dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=kv_cache_dtype)

    row_seq_lens = seq_lens[rows]
    budget = selector.budget_pages(row_seq_lens)
    head_lens = selector.selected_lens(row_seq_lens, budget).repeat_interleave(num_kv_heads).to(md.seq_lens.dtype)
    head_qsl = torch.arange(rows.numel() * num_kv_heads + 1, dtype=md.query_start_loc.dtype)
    rest = None
    if rows.numel() < num_reqs:
        rest_lens = md.seq_lens.clone()
        rest_lens[rows] = 1                            # their output is overwritten by the selecting call
        rest = dataclasses.replace(md, seq_lens=rest_lens,
                                   scheduler_metadata=partition(rest_lens, md.query_start_loc, num_heads,
                                                                num_kv_heads))
    block_table = md.block_table[rows]
    return DecodeSelectionPlan(
        selector=selector,
        rows=rows,
        query_index=qsl[rows].long(),
        block_table=block_table,
        seq_lens=row_seq_lens,
        budget_pages=budget,
        selection_bias=selector.selection_bias(row_seq_lens, block_table.shape[1]),
        head_seq_lens=head_lens,
        head_query_start_loc=head_qsl,
        head_scheduler_metadata=partition(head_lens, head_qsl, num_heads // num_kv_heads, 1),
        rest=rest,
    )


class QueryAwareCPUAttentionImpl(CPUAttentionBackendImpl):
    """The stock CPU attention, with page metadata kept on every KV write and per-KV-head page selection at
    decode.

    Invariant: with no plan for the step (prefill only, selection off, no eligible request), in an exempt
    layer, or in a layer with per-head extras the one-head view cannot carry (ALiBi slopes, attention sinks,
    fp8 KV), `forward` is exactly the stock forward.
    """

    _layer_index: int | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel() == 0 or self.attn_type != AttentionType.DECODER:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        meta = page_metadata_store().get_or_create(
            layer.layer_name, num_blocks, num_kv_heads, self.head_size, block_size, key.dtype, key.device)
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
        if (plan is None or meta is None or self.is_fp8_kv_cache or self.alibi_slopes is not None
                or self.sinks is not None or self._is_exempt(layer)):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if plan.rest is not None:
            super().forward(layer, query, key, value, kv_cache, plan.rest, output, output_scale,
                            output_block_scale)
        self._attend_selected(layer, query, kv_cache, meta, plan, output)
        return output

    def _attend_selected(self, layer, query: torch.Tensor, kv_cache: torch.Tensor, meta: PageMetadata,
                         plan: DecodeSelectionPlan, output: torch.Tensor) -> None:
        """Select each eligible request's pages per KV head and write its attention output."""
        n, hkv, d = plan.rows.numel(), self.num_kv_heads, self.head_size
        q = query.index_select(0, plan.query_index)                                  # [n, Hq, D]
        selected, num_selected = plan.selector.select(q, meta.key_min, meta.key_max, plan.block_table,
                                                      plan.seq_lens, plan.budget_pages, plan.selection_bias)
        key_cache, value_cache = one_head_cache_view(kv_cache)
        out = torch.empty(n * hkv, self.num_queries_per_kv, d, dtype=output.dtype)
        vllm_ops.cpu_attention_with_kv_cache(
            query=q.view(n * hkv, self.num_queries_per_kv, d),
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=plan.head_query_start_loc,
            seq_lens=plan.head_seq_lens,
            scale=self.scale,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=head_block_table(plan.block_table, selected, hkv),
            softcap=self.logits_soft_cap,
            scheduler_metadata=plan.head_scheduler_metadata,
            s_aux=None,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        rows_out = output.view(output.shape[0], self.num_heads, d)
        rows_out.index_copy_(0, plan.query_index, out.view(n, self.num_heads, d))
        plan.selector.count(plan.seq_lens, num_selected,
                            PageSelector.kv_bytes_per_token_head(d, meta.key_min.dtype))


def one_head_cache_view(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value caches of `kv_cache` ([num_blocks, Hkv, block_size, 2 * D], block-major) viewed as a
    cache of one KV head and `num_blocks * Hkv` blocks: block b of head h is block `b * Hkv + h`. No copy."""
    nb, hkv, bs, two_d = kv_cache.shape
    if kv_cache.stride(0) != hkv * kv_cache.stride(1) or kv_cache.stride(1) != bs * two_d:
        raise ValueError(f"KV cache of strides {tuple(kv_cache.stride())} is not block-major "
                         "[num_blocks, num_kv_heads, block_size, 2 * head_dim]")
    return kv_cache.view(nb * hkv, 1, 2 * bs, two_d // 2).chunk(2, dim=2)


def head_block_table(block_table: torch.Tensor, selected: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Block table of the (request, KV head) sequences over `one_head_cache_view`, int32 [n * Hkv, K].

    block_table [n, P] physical blocks; selected [n, Hkv, K] logical pages (ascending, -1 padded). Row
    i * Hkv + h lists head h's selected blocks of request i as `block * Hkv + h`; padding repeats a valid
    entry (the kernel reads only as many entries as the row's length needs).
    """
    n, hkv, k = selected.shape
    phys = torch.gather(block_table.long().unsqueeze(1).expand(n, hkv, block_table.shape[1]), 2,
                        selected.clamp(min=0))
    heads = torch.arange(hkv, dtype=torch.long).view(1, hkv, 1)
    return (phys * num_kv_heads + heads).view(n * hkv, k).to(torch.int32)


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
