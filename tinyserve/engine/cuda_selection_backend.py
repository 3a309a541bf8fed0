"""Query-aware KV page selection on CUDA: vLLM's FlashAttention backend with TinyServe's kernels at decode.

`install_selection(settings)` (called by the plugin in every vLLM process when the platform is CUDA)
registers `QueryAwareFlashAttentionBackend` as vLLM's `FLASH_ATTN` backend through vLLM's backend registry.
It is the stock backend with three changes:

1. KV layout: per block, all keys then all values, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`
   (stock packs K and V of a head side by side in one `2 * head_dim` row). Each half is a
   `[block_size, num_kv_heads, head_dim]` slab, the row layout TinyServe's kernels read; viewed with
   doubled physical block ids the cache is exactly the kernels' `[NB, bs, Hkv, D]` K and V arrays (a block
   of the view is half a block of the cache). The stock FlashAttention kernels take K and V as strided
   views of the same memory, and the cache stays block-major, so vLLM's block copies move whole blocks.
2. KV-cache update: the stock `reshape_and_cache_flash` write, then the written keys are folded into the
   layer's page metadata (per block and KV head, channel-wise key min/max) by `ops.update_page_metadata`.
3. Attention: steps with any prefill, exempt layers, and layers with features the kernels lack (sliding
   window, ALiBi, soft-cap, sinks, fp8 KV) run the stock forward. A decode-only step in a selecting layer
   runs TinyServe's kernels: page scores from the metadata, top pages within the budget (plus the sinks
   and the page being written), split-K attention over the selected pages. A request whose context fits
   the budget gets all its pages, so its attention is exactly dense.

CUDA graphs: with `budget_tokens` every decision depends on static shapes or on device tensors only, so
vLLM captures the decode path (kernels, metadata update, counters) in its full decode graphs
(`UNIFORM_SINGLE_TOKEN_DECODE` support). With `budget_fraction` the budget follows the step's longest
context (a host value), so the backend asks for no full graphs and attention runs eagerly between
piecewise graphs; then `min_context_tokens` also applies (below it the step is dense through stock FA).
In graph mode requests below the budget are dense by construction and `min_context_tokens` is not used.

Counters (`SelectionCounters` keys) are kept on the device, once per step (every selecting layer of a
step selects the same number of pages per request), and multiplied by the number of selecting layers
when `gather_selection_stats(engine_core)` reads them through `collective_rpc`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tinyserve.engine.settings import SelectionSettings

__all__ = [
    "install_selection",
    "gather_selection_stats",
    "selection_counters",
    "set_selection_settings",
    "page_metadata_of",
    "decode_on_split_layout",
    "STATS_METHOD",
]

STATS_METHOD = "tinyserve_selection_stats"
_BACKEND_PATH = f"{__name__}.QueryAwareFlashAttentionBackend"
_COUNTER_KEYS = ("decode_steps_total", "pages_scored_total", "pages_selected_total",
                 "kv_tokens_read", "kv_tokens_not_read")


class _ProcessState:
    """Selection settings, page metadata and device counters of this process (a worker).

    Invariants: `metadata[layer]` is `(key_min, key_max)`, each `[num_blocks, num_kv_heads, head_dim]` in the
    keys' dtype, indexed by vLLM's physical block id; `counters` is an int64 device tensor laid out as
    `_COUNTER_KEYS`, written only by the layer named `counting_layer`; `selecting_layers` holds the layers
    that select (not exempt), each counted once.
    """

    def __init__(self) -> None:
        self.settings = SelectionSettings()
        self.metadata: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.counters: torch.Tensor | None = None
        self.selecting_layers: set[str] = set()
        self.counting_layer: str | None = None
        self.kv_bytes_per_token_head: int = 0   # K and V bytes of one token of one KV head
        self.kernels_warm = False


_STATE = _ProcessState()


def set_selection_settings(settings: SelectionSettings) -> None:
    """Set this process's selection settings (read when vLLM builds the attention layers and each step)."""
    _STATE.settings = settings


def page_metadata_of(layer_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(key_min, key_max) of one layer in this process, or None before its first KV write."""
    return _STATE.metadata.get(layer_name)


def _budget_tokens(settings: SelectionSettings, max_seq_len: int) -> int:
    if settings.budget_tokens is not None:
        return settings.budget_tokens
    return max(1, math.ceil(settings.budget_fraction * max_seq_len))


class _KVHalves:
    """Stands in for a stock-layout cache in the stock forward, which splits it with
    `kv_cache.transpose(1, 2).split(head_size, dim=-1)`: both calls hand back the (key, value) views."""

    __slots__ = ("key", "value")

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value

    def transpose(self, *_: int) -> "_KVHalves":
        return self

    def split(self, *_: Any, **__: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key, self.value


def _warm_kernels(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                  device: torch.device) -> None:
    """Compile (NVRTC) every kernel the decode path launches before vLLM captures graphs."""
    from tinyserve.kernels import ops

    if _STATE.kernels_warm or not ops.cuda_enabled(torch.empty(0, device=device)):
        return
    nb, pages = 8, 6
    q = torch.randn(2, num_heads, head_dim, dtype=dtype, device=device)
    cache = torch.randn(nb, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    kmin = torch.randn(nb, num_kv_heads, head_dim, dtype=dtype, device=device)
    kmax = kmin + 1
    bt = torch.arange(pages, dtype=torch.int32, device=device).repeat(2, 1)
    sl = torch.tensor([pages * block_size, block_size + 1], dtype=torch.int32, device=device)
    key = torch.randn(3, num_kv_heads, head_dim, dtype=dtype, device=device)
    ops.update_page_metadata(kmin, kmax, key, torch.tensor([0, 1, block_size], device=device), block_size)
    for mode in ("last", "fused", "two_pass"):   # every selection launch the decode may pick
        sel, nsel = ops.score_and_select_pages(q, kmin, kmax, bt, sl, block_size, 2 * block_size, 1, mode=mode)
    k, v = cache[:, 0], cache[:, 1]
    ops.sparse_paged_decode_attention(q, k, v, bt * 2, sl, sel, 0.1, num_selected=nsel)
    ops.paged_decode_attention(q, k, v, bt * 2, sl, 0.1)
    torch.cuda.synchronize(device)
    _STATE.kernels_warm = True


def _make_classes() -> tuple[type, type, type]:
    """Build the backend classes against the installed vLLM (imported only where the plugin selects)."""
    from vllm.model_executor.layers.attention import Attention  # noqa: F401  (vLLM import order)
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )
    from vllm._custom_ops import reshape_and_cache_flash

    from tinyserve.kernels import ops

    class QueryAwareFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
        """The stock builder; full CUDA graphs only for single-token decode, and none with a fractional
        budget (its per-step budget is a host value)."""

        @classmethod
        def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
            if _STATE.settings.enabled and _STATE.settings.budget_tokens is None:
                return AttentionCGSupport.NEVER
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    class QueryAwareFlashAttentionImpl(FlashAttentionImpl):
        """Stock FlashAttention with page metadata kept on KV writes and query-aware decode.

        Invariant: for prefill or mixed steps, exempt layers and unsupported features, `forward` computes
        what the stock forward computes on the stock layout.
        """

        _layer_index: int | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kernel_ok = (
                self.attn_type == AttentionType.DECODER and self.sliding_window in (None, (-1, -1))
                and self.alibi_slopes is None and not self.logits_soft_cap
                and getattr(self, "sinks", None) is None and self.kv_cache_dtype == "auto"
                and self.head_size in (64, 128) and self.num_heads // self.num_kv_heads in (1, 2, 4, 8)
            )

        def _selects(self, layer: Any) -> bool:
            if self._layer_index is None:
                from vllm.model_executor.models.utils import extract_layer_index

                try:
                    self._layer_index = extract_layer_index(layer.layer_name)
                except (AssertionError, ValueError):
                    self._layer_index = -1
            settings = _STATE.settings
            return (settings.enabled and self._kernel_ok
                    and self._layer_index not in settings.exempt_layers)

        def prepare(self, layer: Any, kv_cache: torch.Tensor) -> None:
            """Allocate this layer's page metadata and compile the kernels (when vLLM binds the caches,
            before any CUDA graph is captured)."""
            if not self._selects(layer) or layer.layer_name in _STATE.metadata:
                return
            nb, _, bs, hkv, d = kv_cache.shape
            _warm_kernels(kv_cache.dtype, self.num_heads, hkv, d, bs, kv_cache.device)
            kmin = torch.full((nb, hkv, d), float("inf"), dtype=kv_cache.dtype, device=kv_cache.device)
            _STATE.metadata[layer.layer_name] = (kmin, torch.full_like(kmin, float("-inf")))
            _STATE.selecting_layers.add(layer.layer_name)
            if _STATE.counting_layer is None:
                _STATE.counting_layer = layer.layer_name
                _STATE.counters = torch.zeros(len(_COUNTER_KEYS), dtype=torch.int64, device=kv_cache.device)
                _STATE.kv_bytes_per_token_head = 2 * d * kv_cache.element_size()

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
            if self.attn_type in (AttentionType.ENCODER_ONLY, AttentionType.ENCODER):
                return
            key_cache, value_cache = kv_cache.unbind(1)
            reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype,
                                    layer._k_scale, layer._v_scale)
            meta = _STATE.metadata.get(layer.layer_name)
            if meta is not None:
                kmin, kmax = meta
                ops.update_page_metadata(kmin, kmax, key[: slot_mapping.shape[0]], slot_mapping,
                                         kv_cache.shape[2])

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            md = attn_metadata
            halves = _KVHalves(*kv_cache.unbind(1)) if kv_cache.dim() == 5 else kv_cache
            if (md is None or md.max_query_len != 1 or md.use_cascade or output_scale is not None
                    or not self._selects(layer) or layer.layer_name not in _STATE.metadata):
                return super().forward(layer, query, key, value, halves, md, output,
                                       output_scale, output_block_scale)
            settings = _STATE.settings
            graphs = settings.budget_tokens is not None
            if not graphs and md.max_seq_len < settings.min_context_tokens:
                return super().forward(layer, query, key, value, halves, md, output)
            kmin, kmax = _STATE.metadata[layer.layer_name]
            bs = kv_cache.shape[2]
            b = md.seq_lens.shape[0]
            seq_lens = md.seq_lens.clamp(min=1)          # padded graph rows have length 0
            block_table = md.block_table
            doubled = getattr(md, "tinyserve_doubled_block_table", None)
            if doubled is None:                          # once per step, shared by all layers
                doubled = block_table * 2
                md.tinyserve_doubled_block_table = doubled
            out = output[:b].view(b, self.num_heads, self.head_size)
            num_selected = decode_on_split_layout(
                query[:b], halves.key, halves.value, kmin, kmax, block_table, doubled, seq_lens, self.scale,
                _budget_tokens(settings, md.max_seq_len), settings.num_sink_pages, out)
            if layer.layer_name == _STATE.counting_layer:
                _count(md.seq_lens, num_selected, bs)
            return output

    class QueryAwareFlashAttentionBackend(FlashAttentionBackend):
        """vLLM's FlashAttention backend (same name and kernels for prefill) with TinyServe's decode and a
        K-then-V block layout; see the module docstring."""

        @staticmethod
        def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                               cache_dtype_str: str = "auto") -> tuple[int, ...]:
            if block_size % 16 != 0:
                raise ValueError("Block size must be a multiple of 16.")
            return (num_blocks, 2, block_size, num_kv_heads, head_size)

        @staticmethod
        def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
            if include_num_layers_dimension:
                raise NotImplementedError("TinyServe's KV layout has no cross-layer form")
            return (0, 1, 2, 3, 4)

        @staticmethod
        def get_impl_cls() -> type:
            return QueryAwareFlashAttentionImpl

        @staticmethod
        def get_builder_cls() -> type:
            return QueryAwareFlashAttentionMetadataBuilder

    classes = (QueryAwareFlashAttentionBackend, QueryAwareFlashAttentionImpl, QueryAwareFlashAttentionMetadataBuilder)
    for cls in classes:                 # importable by name: vLLM resolves classes by module + qualname
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    return classes


def decode_on_split_layout(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           key_min: torch.Tensor, key_max: torch.Tensor, block_table: torch.Tensor,
                           doubled_block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           budget_tokens: int, num_sink_pages: int, out: torch.Tensor) -> torch.Tensor:
    """Query-aware decode on the backend's cache: `key_cache`/`value_cache` are the `[NB, bs, Hkv, D]`
    halves of a `[NB, 2, bs, Hkv, D]` cache; the kernels see them as arrays of half-blocks, so they get the
    block table with ids doubled. Writes `out` [B, Hq, D]; returns num_selected [B, Hkv]."""
    from tinyserve.kernels import ops

    bs = key_cache.shape[1]
    selected, num_selected = ops.score_and_select_pages(query, key_min, key_max, block_table, seq_lens, bs,
                                                        budget_tokens, num_sink_pages)
    ops.sparse_paged_decode_attention(query, key_cache, value_cache, doubled_block_table, seq_lens, selected,
                                      scale, out=out, num_selected=num_selected)
    return num_selected


def _count(seq_lens: torch.Tensor, num_selected: torch.Tensor, block_size: int) -> None:
    """Add one step's numbers to the device counters (no host sync; safe inside a CUDA graph). Pages and
    tokens count per (page, KV head), as the CPU backend counts them: each KV head selects its own pages."""
    live = (seq_lens > 0).long()
    sl = seq_lens.long()
    pages = (sl + block_size - 1) // block_size
    nsel = num_selected.long()                       # [B, Hkv]
    hkv = nsel.shape[1]
    read = (sl.unsqueeze(1) - (pages.unsqueeze(1) - nsel) * block_size).sum(1)   # every unselected page is full
    step = torch.stack((live, pages * hkv, nsel.sum(1), read, sl * hkv - read)) * live
    _STATE.counters.add_(step.sum(dim=1))


def __getattr__(name: str) -> Any:
    """The backend classes, built on first use (importing this module never imports vLLM)."""
    if name in ("QueryAwareFlashAttentionBackend", "QueryAwareFlashAttentionImpl",
                "QueryAwareFlashAttentionMetadataBuilder"):
        backend, impl, builder = _make_classes()
        globals().update(QueryAwareFlashAttentionBackend=backend, QueryAwareFlashAttentionImpl=impl,
                         QueryAwareFlashAttentionMetadataBuilder=builder)
        return globals()[name]
    raise AttributeError(name)


# -- worker side (module-level so collective_rpc pickles them by reference) -------------------------------
def selection_counters() -> dict[str, int]:
    """This process's counters in `SelectionCounters` keys (all selecting layers)."""
    out = dict.fromkeys(("decode_steps_total", "pages_scored_total", "pages_selected_total",
                         "kv_bytes_read_total", "kv_bytes_not_read_total"), 0)
    if _STATE.counters is None:
        return out
    steps, scored, selected, read, not_read = (int(x) for x in _STATE.counters.tolist())
    layers = len(_STATE.selecting_layers)
    out.update(
        decode_steps_total=steps * layers,
        pages_scored_total=scored * layers,
        pages_selected_total=selected * layers,
        kv_bytes_read_total=read * layers * _STATE.kv_bytes_per_token_head,
        kv_bytes_not_read_total=not_read * layers * _STATE.kv_bytes_per_token_head,
    )
    return out


def _worker_selection_counters(worker: Any = None) -> dict[str, int]:
    return selection_counters()


def gather_selection_stats(engine_core: Any) -> dict[str, int]:
    """Selection counters summed over the engine core's workers (the CPU backend's keys)."""
    total: dict[str, int] = {}
    for d in engine_core.model_executor.collective_rpc(_worker_selection_counters):
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _copy_metadata(kv_cache_block_copies: Any) -> None:
    if not kv_cache_block_copies or not _STATE.metadata:
        return
    pairs = torch.tensor(list(kv_cache_block_copies), dtype=torch.long)
    for kmin, kmax in _STATE.metadata.values():
        src, dst = pairs[:, 0].to(kmin.device), pairs[:, 1].to(kmin.device)
        kmin[dst] = kmin[src]
        kmax[dst] = kmax[src]


def _runner_modules(*names: str) -> list[Any]:
    """The model-runner modules of this vLLM that exist (0.26 and 0.29 have two runners, v1 and v2)."""
    import importlib

    found = []
    for name in names:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            pass
    return found


def _install_bind_hook() -> None:
    """Prepare every selecting layer right after the model runner binds the KV caches."""

    def wrap(original: Any) -> Any:
        def bind_kv_cache_and_prepare(kv_caches, forward_context, *args, **kwargs):
            original(kv_caches, forward_context, *args, **kwargs)
            cls = globals().get("QueryAwareFlashAttentionImpl") or __getattr__("QueryAwareFlashAttentionImpl")
            for name, cache in kv_caches.items():
                layer = forward_context.get(name)
                impl = getattr(layer, "impl", None)
                if isinstance(impl, cls) and isinstance(cache, torch.Tensor) and cache.dim() == 5:
                    impl.prepare(layer, cache)

        bind_kv_cache_and_prepare._tinyserve_wrapped = True  # type: ignore[attr-defined]
        return bind_kv_cache_and_prepare

    for module in _runner_modules("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.attn_utils"):
        original = getattr(module, "bind_kv_cache", None)
        if original is not None and not getattr(original, "_tinyserve_wrapped", False):
            module.bind_kv_cache = wrap(original)


def _install_copy_hook() -> None:
    """Make every KV block copy the model runners apply (copy-on-write, compaction) move the metadata."""

    def wrap(original: Any) -> Any:
        def copy_kv_cache_blocks_and_metadata(kv_caches, num_blocks, kv_cache_block_copies):
            original(kv_caches, num_blocks, kv_cache_block_copies)
            _copy_metadata(kv_cache_block_copies)

        copy_kv_cache_blocks_and_metadata._tinyserve_wrapped = True  # type: ignore[attr-defined]
        return copy_kv_cache_blocks_and_metadata

    for module in _runner_modules("vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"):
        original = getattr(module, "copy_kv_cache_blocks_inplace", None)
        if original is not None and not getattr(original, "_tinyserve_wrapped", False):
            module.copy_kv_cache_blocks_inplace = wrap(original)


def install_selection(settings: SelectionSettings) -> None:
    """Register the query-aware FlashAttention backend as vLLM's FLASH_ATTN (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.engine.core import EngineCore

    set_selection_settings(settings)
    register_backend(AttentionBackendEnum.FLASH_ATTN, _BACKEND_PATH)
    _install_copy_hook()
    _install_bind_hook()
    if not hasattr(EngineCore, STATS_METHOD):
        setattr(EngineCore, STATS_METHOD, gather_selection_stats)
