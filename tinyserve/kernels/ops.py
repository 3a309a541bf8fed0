"""Dispatch of the paged-KV kernels: CUDA kernels for CUDA tensors when CuPy is importable, else reference.

Same functions and meanings as ``reference`` (see its docstring for shapes). The CUDA path handles
bf16/fp16 caches, head sizes 64/128, GQA groups 1/2/4/8 and power-of-two block sizes; anything else, CPU
tensors, or ``TINYSERVE_KERNELS=reference`` in the environment, takes the reference. The attention
functions take an optional ``out`` tensor (the output is written there). CUDA-path contracts beyond the
reference: tensors contiguous; ``copy_blocks`` sources and destinations disjoint; metadata in the keys'
dtype.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from tinyserve.kernels import loader, reference
from tinyserve.kernels.reference import budget_pages, free_runs, num_pages_of

__all__ = [
    "update_page_metadata",
    "page_scores",
    "select_pages",
    "paged_decode_attention",
    "sparse_paged_decode_attention",
    "query_aware_decode",
    "score_and_select_pages",
    "selection_mode",
    "copy_blocks",
    "free_runs",
    "free_run_stats",
    "free_run_stats_device",
    "cuda_enabled",
    "plan_splits",
    "plan_splits_mma",
]

_TYPES = {torch.bfloat16: "bf16_t", torch.float16: "f16_t"}
_LOG2E = 1.4426950408889634
_MAX_PAGES_PER_SPLIT = 2048
_MIN_TOKENS_PER_SPLIT = 64
_TOKENS_PER_SPLIT = 1024
_MMA_DEFAULT = "mma2x2"  # default tensor-core kernel: 2 CTAs per multiprocessor, 2 steps loaded together
_FUSED_SELECT_MAX_CANDIDATES = 8192   # SEL_SMEM_KEYS in page_select.cu
_COOP_MAX_SMEM = 40 * 1024   # dynamic shared memory of the one-launch query-aware decode, at most
_COOP_MAX_CANDIDATES = 256   # longest rows (pages - sinks - last) the one-launch decode takes by default
_METADATA_SMALL_WRITE = 512   # tokens up to which each metadata-merge thread folds one token (decode steps)


def cuda_enabled(*tensors: Tensor) -> bool:
    """True when every tensor is on CUDA, CuPy is usable and the reference is not forced."""
    if os.environ.get("TINYSERVE_KERNELS", "") == "reference":
        return False
    return all(t.is_cuda for t in tensors) and loader.available()


def _p(t: Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i(x: int) -> np.int32:
    return np.int32(x)


def _attn_ok(query: Tensor, key_cache: Tensor) -> bool:
    b, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    return (query.dtype in _TYPES and key_cache.dtype == query.dtype and d in (64, 128)
            and hq % hkv == 0 and hq // hkv in (1, 2, 4, 8) and bs & (bs - 1) == 0)


def plan_splits(batch: int, num_kv_heads: int, max_list_pages: int, block_size: int) -> tuple[int, int]:
    """(num_splits, pages_per_split) for split-K: about 1024 tokens a split, more splits when that gives
    under two waves of CTAs (3 resident per multiprocessor), never under 64 tokens or over 2048 pages."""
    tokens = max_list_pages * block_size
    waves = math.ceil(2 * 3 * loader.num_sms(torch.cuda.current_device()) / max(1, batch * num_kv_heads))
    splits = max(math.ceil(tokens / _TOKENS_PER_SPLIT), waves)
    splits = max(1, min(splits, math.ceil(tokens / _MIN_TOKENS_PER_SPLIT)))
    pps = min(math.ceil(max_list_pages / splits), _MAX_PAGES_PER_SPLIT)
    return math.ceil(max_list_pages / pps), pps


def _attn_variant() -> str:
    """Attention kernel: ``TINYSERVE_ATTN`` = mma (the default, _MMA_DEFAULT), mmaM or mmaMxN (tensor
    cores; register budget for M CTAs per multiprocessor, N 16-token steps loaded together), or simt
    (the first, CUDA-core kernel)."""
    v = os.environ.get("TINYSERVE_ATTN", "mma")
    return _MMA_DEFAULT if v == "mma" else v


def _mma_shape(variant: str) -> tuple[int, int]:
    """(CTAs per multiprocessor, steps loaded together) of an ``mmaM[xN]`` variant name."""
    minb, _, nsub = variant[3:].partition("x")
    return int(minb), int(nsub or 1)


@functools.lru_cache(maxsize=4096)
def plan_splits_mma(pairs: int, list_pages: int, block_size: int, resident_ctas: int) -> tuple[int, int]:
    """(num_splits, pages_per_split) for the tensor-core kernel: the split count whose CTAs fill whole waves
    of ``resident_ctas`` best, by a model time = waves x (tokens a split + a fixed cost of 64 tokens), at
    most 4096 tokens and at least 64 tokens a split (or one split), at most 256 splits."""
    tokens = list_pages * block_size
    lo = max(1, math.ceil(tokens / 4096))
    hi = max(lo, min(256, tokens // 64, list_pages))
    best = None
    for s in range(lo, hi + 1):
        pps = math.ceil(list_pages / s)
        s_eff = math.ceil(list_pages / pps)
        cost = math.ceil(pairs * s_eff / resident_ctas) * (pps * block_size + 64)
        if best is None or cost < best[0]:
            best = (cost, s_eff, pps)
    return best[1], best[2]


_COUNTERS: dict[int, list[Tensor]] = {}
# the one-launch decode's row barriers: (count, generation) at [2 * row], [2 * row + 1] in a buffer of their
# own (a generation is never reset, so it must not land where a ticket expects 0)
_BARRIERS: dict[int, list[Tensor]] = {}


def _counters(n: int, device: torch.device, pool: dict[int, list[Tensor]] = _COUNTERS) -> Tensor | None:
    """Zeroed int32 tickets (>= n) of ``pool`` (the fused split merge's by default) on ``device``, or None
    while a graph is being captured and no buffer is large enough yet (then the caller takes another path).
    Buffers are never freed: captured graphs keep their addresses. Ticket users leave their entries at 0."""
    bufs = pool.setdefault(device.index or 0, [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    if torch.cuda.is_current_stream_capturing():
        return None
    bufs.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return bufs[-1]


class _CoopSelection(NamedTuple):
    """What the one-launch query-aware decode needs besides the attention's inputs."""

    key_min: Tensor
    key_max: Tensor
    num_sinks: int


def _attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
               seq_lens: Tensor, selected: Tensor | None, num_selected: Tensor | None, scale: float,
               out: Tensor | None, coop: _CoopSelection | None = None) -> Tensor | None:
    """Split-K paged decode attention over every page (selected None) or the selected pages. With `coop`,
    the same launch first scores and selects the pages into `selected` / `num_selected` (outputs then);
    returns None, launching nothing, when that cannot run here (grid larger than the GPU holds at once)."""
    b, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    g = hq // hkv
    t = _TYPES[query.dtype]
    max_list = selected.shape[-1] if selected is not None else block_tables.shape[1]
    variant = _attn_variant()
    if coop is not None and not variant.startswith("mma"):
        return None
    if variant.startswith("mma"):
        minb, nsub = _mma_shape(variant)
        resident = minb * loader.num_sms(query.device.index or 0)
        splits, pps = plan_splits_mma(b * hkv, max_list, bs, resident)
        if os.environ.get("TINYSERVE_SPLITS"):   # a fixed split count, for measuring the plan against others
            pps = math.ceil(max_list / min(max_list, int(os.environ["TINYSERVE_SPLITS"])))
            splits = math.ceil(max_list / pps)
        smem = (8 if selected is not None else 4) * pps   # the split's block ids (and logical pages)
        if coop is not None:
            max_pages = block_tables.shape[1]
            smem += 4 * (max_list + 2 * max_pages)        # the row's selection, block ids and candidates' keys
            if splits * b * hkv > resident or smem > _COOP_MAX_SMEM:
                return None
            counters = _counters(b * hkv, query.device)
            barriers = _counters(2 * b * hkv, query.device, _BARRIERS)
            if counters is None or barriers is None:
                return None
            scores = torch.empty(b * hkv * max_pages, dtype=torch.float32, device=query.device)
            coop_args = (_p(coop.key_min), _p(coop.key_max), _p(scores), _p(barriers), _i(max_pages),
                         _i(coop.num_sinks))
        else:
            counters = _counters(b * hkv, query.device) if splits > 1 else None
            coop_args = (_p(None), _p(None), _p(None), _p(None), _i(0), _i(0))
    else:
        splits, pps = plan_splits(b, hkv, max_list, bs)
        counters = None
    if out is None:
        out = torch.empty_like(query)
    if splits > 1:
        part_acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(b, hq, splits, 2, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = None
    common = (_p(query), _p(key_cache), _p(value_cache), _p(block_tables), _p(seq_lens), _p(selected),
              _p(num_selected), _i(block_tables.stride(0)), _i(max_list if selected is not None else 0), _i(hkv),
              _i(bs.bit_length() - 1), _i(pps), np.float32(scale * _LOG2E), _p(part_acc), _p(part_ml))
    if variant.startswith("mma"):
        flag = "true" if coop is not None else "false"
        fn = loader.kernel("paged_attention.cu", f"paged_decode_mma<{t},{d},{g},{minb},{nsub},{flag}>")
        loader.launch(fn, (splits, hkv, b), (128,), common + (_p(counters),) + coop_args + (_p(out),),
                      shared_mem=smem)
    else:
        unroll = 4 if g <= 4 else 2
        fn = loader.kernel("paged_attention.cu", f"paged_decode_attention<{t},{d},{g},{unroll}>")
        loader.launch(fn, (splits, hkv, b), (128,), common + (_p(out),), shared_mem=4 * pps)
    if splits > 1 and counters is None:
        red = loader.kernel("paged_attention.cu", f"paged_decode_reduce<{t},{d}>")
        loader.launch(red, (b * hq,), (d,), (_p(part_acc), _p(part_ml), _i(splits), _p(out)))
    return out


def _i32(t: Tensor) -> Tensor:
    return t.to(torch.int32).contiguous()


def paged_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float, out: Tensor | None = None) -> Tensor:
    """Dense paged decode attention (split-K CUDA kernel + reduce on GPU)."""
    if not (cuda_enabled(query, key_cache, value_cache) and _attn_ok(query, key_cache)):
        r = reference.paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, scale)
        return r if out is None else out.copy_(r)
    return _attention(query.contiguous(), key_cache, value_cache, _i32(block_tables), _i32(seq_lens),
                      None, None, scale, out)


def sparse_paged_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                                  block_tables: Tensor, seq_lens: Tensor, selected: Tensor, scale: float,
                                  out: Tensor | None = None, num_selected: Tensor | None = None) -> Tensor:
    """Attention over the selected pages of each KV head (ascending, -1 padded, last page last)."""
    if not (cuda_enabled(query, key_cache, value_cache) and _attn_ok(query, key_cache)):
        r = reference.sparse_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                                    selected, scale)
        return r if out is None else out.copy_(r)
    if num_selected is None:
        num_selected = (selected >= 0).sum(-1)
    return _attention(query.contiguous(), key_cache, value_cache, _i32(block_tables), _i32(seq_lens),
                      _i32(selected), _i32(num_selected), scale, out)


def page_scores(query: Tensor, key_min: Tensor, key_max: Tensor, block_tables: Tensor, seq_lens: Tensor,
                block_size: int) -> Tensor:
    """Query-aware page scores, fp32 [B, Hkv, max_pages] (-inf past each sequence)."""
    b, hq, d = query.shape
    hkv = key_min.shape[1]
    if not (cuda_enabled(query, key_min, key_max) and _scorable(query, key_min, block_size)):
        return reference.page_scores(query, key_min, key_max, block_tables, seq_lens, block_size)
    bt = _i32(block_tables)
    p = bt.shape[1]
    scores = torch.empty(b, hkv, p, dtype=torch.float32, device=query.device)
    fn = loader.kernel("page_select.cu", f"page_scores<{_TYPES[query.dtype]},{d},{hq // hkv}>")
    loader.launch(fn, (math.ceil(p / 128), hkv, b), (256,), (
        _p(query.contiguous()), _p(key_min), _p(key_max), _p(bt), _p(_i32(seq_lens)), _i(bt.stride(0)),
        _i(p), _i(hkv), _i(block_size.bit_length() - 1), _p(scores)))
    return scores


def select_pages(scores: Tensor, seq_lens: Tensor, block_size: int, budget_tokens: int,
                 num_sink_pages: int = 1) -> tuple[Tensor, Tensor]:
    """Sinks + last page + top-scoring pages within the budget, ascending, -1 padded."""
    if not (cuda_enabled(scores) and block_size & (block_size - 1) == 0):
        return reference.select_pages(scores, seq_lens, block_size, budget_tokens, num_sink_pages)
    b, hkv, p = scores.shape
    k, sel, nsel = _selection_buffers(b, hkv, p, block_size, budget_tokens, num_sink_pages, scores.device)
    fn = loader.kernel("page_select.cu", "select_pages")
    loader.launch(fn, (hkv, b), (512,), (
        _p(scores.float().contiguous()), _p(_i32(seq_lens)), _i(p), _i(hkv), _i(block_size.bit_length() - 1),
        _i(k), _i(num_sink_pages), _p(sel), _p(nsel)))
    return sel, nsel


def query_aware_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, key_min: Tensor,
                       key_max: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
                       block_size: int, budget_tokens: int, num_sink_pages: int = 1,
                       out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Score, select (``score_and_select_pages``) and attend: (out, selected, num_selected); on CUDA the
    split-K attention's last CTA per KV head merges the splits. In selection mode ``coop`` the scoring and
    selection run inside the attention's launch when its grid fits the GPU at once (else as above)."""
    if not (cuda_enabled(query, key_cache, value_cache) and _attn_ok(query, key_cache)):
        r, s, n = reference.query_aware_decode(query, key_cache, value_cache, key_min, key_max, block_tables,
                                               seq_lens, scale, block_size, budget_tokens, num_sink_pages)
        return (r if out is None else out.copy_(r)), s, n
    bt, sl = _i32(block_tables), _i32(seq_lens)
    b = query.shape[0]
    if (selection_mode(b * key_min.shape[1], bt.shape[1], query.device.index or 0) == "coop"
            and _scorable(query, key_min, block_size)):
        _, sel, nsel = _selection_buffers(b, key_min.shape[1], bt.shape[1], block_size, budget_tokens,
                                          num_sink_pages, query.device)
        o = _attention(query.contiguous(), key_cache, value_cache, bt, sl, sel, nsel, scale, out,
                       coop=_CoopSelection(key_min.contiguous(), key_max.contiguous(), num_sink_pages))
        if o is not None:
            return o, sel, nsel
    sel, nsel = score_and_select_pages(query, key_min, key_max, bt, sl, block_size, budget_tokens, num_sink_pages)
    o = _attention(query.contiguous(), key_cache, value_cache, bt, sl, sel, nsel, scale, out)
    return o, sel, nsel


def selection_mode(rows: int, pages: int, device: int = 0) -> str:
    """How the CUDA path scores and selects ``pages`` pages for each of ``rows`` (sequence, KV head) pairs:
    ``TINYSERVE_SELECT`` when set; else ``coop`` for rows of at most _COOP_MAX_CANDIDATES candidates (scoring
    and selection inside query_aware_decode's attention launch where the grid fits the GPU at once, else
    the regime's mode; measured faster there on the H100, slower on longer rows: round 7 of
    benchmarks/KERNEL_NOTES.md); else ``_selection_regime``."""
    if os.environ.get("TINYSERVE_SELECT"):
        return os.environ["TINYSERVE_SELECT"]
    if pages - 2 <= _COOP_MAX_CANDIDATES:
        return "coop"
    return _selection_regime(rows, pages, device)


def _selection_regime(rows: int, pages: int, device: int = 0) -> str:
    """The fastest selection launch measured per regime (H100, round 4 of benchmarks/KERNEL_NOTES.md):
    ``fused`` (one CTA per row scores and selects) for rows of at most 256 pages or when the rows alone fill
    the multiprocessors; ``last`` (scoring over many CTAs, the last CTA of a row selects, one launch) while
    rows x pages <= 32768; else ``two_pass`` (a scoring launch, then a selection launch)."""
    if pages <= 256 or rows >= loader.num_sms(device):
        return "fused"
    return "last" if rows * pages <= 32768 else "two_pass"


def _scorable(query: Tensor, key_min: Tensor, block_size: int) -> bool:
    """Whether the CUDA scoring kernels take these shapes and types."""
    return (key_min.dtype == query.dtype and query.dtype in _TYPES and query.shape[-1] in (64, 128)
            and query.shape[1] // key_min.shape[1] in (1, 2, 4, 8) and block_size & (block_size - 1) == 0)


def score_and_select_pages(query: Tensor, key_min: Tensor, key_max: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, block_size: int, budget_tokens: int, num_sink_pages: int = 1,
                           mode: str | None = None) -> tuple[Tensor, Tensor]:
    """``select_pages(page_scores(...))`` in the launches of ``mode`` (default: what ``selection_mode``
    picks; all modes pick the same pages): (selected, num_selected)."""
    bt, sl = _i32(block_tables), _i32(seq_lens)
    if not (cuda_enabled(query, key_min, key_max) and block_size & (block_size - 1) == 0):
        scores = reference.page_scores(query, key_min, key_max, bt, sl, block_size)
        return reference.select_pages(scores, sl, block_size, budget_tokens, num_sink_pages)
    rows = bt.shape[0] * key_min.shape[1]
    mode = mode or selection_mode(rows, bt.shape[1], query.device.index or 0)
    if mode == "coop":   # (only inside query_aware_decode's launch): the regime's own mode here
        mode = _selection_regime(rows, bt.shape[1], query.device.index or 0)
    fusable = (key_min.dtype == query.dtype and bt.shape[1] - 2 <= _FUSED_SELECT_MAX_CANDIDATES
               and query.shape[-1] in (64, 128) and query.dtype in _TYPES)
    counters = _counters(rows, query.device) if fusable and mode == "last" else None
    if counters is not None:
        return _score_select_last(query.contiguous(), key_min, key_max, bt, sl, block_size, budget_tokens,
                                  num_sink_pages, counters)
    if fusable and mode == "fused":
        return _score_select(query.contiguous(), key_min, key_max, bt, sl, block_size, budget_tokens,
                             num_sink_pages)
    scores = page_scores(query, key_min, key_max, bt, sl, block_size)
    return select_pages(scores, sl, block_size, budget_tokens, num_sink_pages)


def _selection_buffers(b: int, hkv: int, pages: int, block_size: int, budget_tokens: int, num_sink_pages: int,
                       device: torch.device) -> tuple[int, Tensor, Tensor]:
    """(pages kept per row k, selected [B, Hkv, k], num_selected [B, Hkv]) for a selection kernel to fill."""
    k = min(pages, budget_pages(budget_tokens, block_size, num_sink_pages))
    return (k, torch.empty(b, hkv, k, dtype=torch.int32, device=device),
            torch.empty(b, hkv, dtype=torch.int32, device=device))


def _score_select_last(query: Tensor, key_min: Tensor, key_max: Tensor, bt: Tensor, sl: Tensor,
                       block_size: int, budget_tokens: int, num_sink_pages: int,
                       counters: Tensor) -> tuple[Tensor, Tensor]:
    """Scoring over many blocks and selection by the last block of each row, one launch (same pages as
    page_scores + select_pages)."""
    (b, hq, d), hkv, p = query.shape, key_min.shape[1], bt.shape[1]
    k, sel, nsel = _selection_buffers(b, hkv, p, block_size, budget_tokens, num_sink_pages, query.device)
    scores = torch.empty(b, hkv, p, dtype=torch.float32, device=query.device)
    pages_per_block = (512 // (d // 8)) * 8
    fn = loader.kernel("page_select.cu", f"score_pages_select_last<{_TYPES[query.dtype]},{d},{hq // hkv}>")
    loader.launch(fn, (math.ceil(p / pages_per_block), hkv, b), (512,), (
        _p(query), _p(key_min.contiguous()), _p(key_max.contiguous()), _p(bt), _p(sl), _i(bt.stride(0)), _i(p),
        _i(hkv), _i(block_size.bit_length() - 1), _i(k), _i(num_sink_pages), _p(scores), _p(counters), _p(sel),
        _p(nsel)))
    return sel, nsel


def _score_select(query: Tensor, key_min: Tensor, key_max: Tensor, bt: Tensor, sl: Tensor, block_size: int,
                  budget_tokens: int, num_sink_pages: int) -> tuple[Tensor, Tensor]:
    """Scoring and selection in one launch (same pages as page_scores + select_pages)."""
    (b, hq, d), hkv, p = query.shape, key_min.shape[1], bt.shape[1]
    k, sel, nsel = _selection_buffers(b, hkv, p, block_size, budget_tokens, num_sink_pages, query.device)
    fn = loader.kernel("page_select.cu", f"score_select_pages<{_TYPES[query.dtype]},{d},{hq // hkv}>")
    loader.launch(fn, (hkv, b), (512,), (
        _p(query), _p(key_min.contiguous()), _p(key_max.contiguous()), _p(bt), _p(sl), _i(bt.stride(0)), _i(hkv),
        _i(block_size.bit_length() - 1), _i(k), _i(num_sink_pages), _p(sel), _p(nsel)))
    return sel, nsel


def update_page_metadata(key_min: Tensor, key_max: Tensor, key: Tensor, slot_mapping: Tensor,
                         block_size: int) -> None:
    """Fold written keys into per-block min/max in place (reset on offset 0); exact."""
    ok = (cuda_enabled(key_min, key_max, key) and key.dtype in _TYPES and key_min.dtype == key.dtype
          and key_max.dtype == key.dtype and key_min.is_contiguous() and key_max.is_contiguous()
          and key.shape[-1] % 2 == 0)
    if not ok:
        return reference.update_page_metadata(key_min, key_max, key, slot_mapping, block_size)
    t = key.shape[0]
    if t == 0:
        return None
    k = key.contiguous()
    slots = slot_mapping.to(device=key.device, dtype=torch.int64).contiguous()
    words = k[0].numel() // 2
    tn = _TYPES[key.dtype]
    reset = loader.kernel("page_metadata.cu", f"page_metadata_reset<{tn}>")
    cap = 8 * loader.num_sms(torch.cuda.current_device())
    loader.launch(reset, (min(math.ceil(t / 8), cap),), (256,),   # a warp per token
                  (_p(slots), _i(t), _i(block_size), _i(words), _p(key_min), _p(key_max)))
    chunk = 1 if t <= _METADATA_SMALL_WRITE else 16
    # prefills read 16 bytes a thread and token; a decode step's threads fold one word each (each word's
    # compare-and-swaps are a chain of L2 round trips, so fewer words a thread keeps that chain short)
    vec = 4 if chunk > 1 and words % 4 == 0 and k.data_ptr() % 16 == 0 else 1
    merge = loader.kernel("page_metadata.cu", f"page_metadata_merge<{tn},{chunk},{vec}>")
    grid = min(math.ceil(math.ceil(t / chunk) * words / vec / 256), cap)
    bs_shift = block_size.bit_length() - 1 if block_size & (block_size - 1) == 0 else -1
    loader.launch(merge, (grid,), (256,), (_p(k), _p(slots), _i(t), _i(block_size), _i(bs_shift), _i(words),
                                           _p(key_min), _p(key_max)))
    return None


def copy_blocks(caches: list[Tensor], src: Tensor, dst: Tensor) -> None:
    """Copy block src[i] -> dst[i] of every cache in one launch (CUDA: sources and destinations disjoint)."""
    if src.numel() == 0:
        return None
    if not (cuda_enabled(*caches) and all(c.is_contiguous() for c in caches)):
        return reference.copy_blocks(caches, src, dst)
    dev = caches[0].device
    meta = torch.tensor([[c.data_ptr() for c in caches], [c[0].numel() * c.element_size() for c in caches]],
                        dtype=torch.int64).to(dev, non_blocking=True)
    s = src.to(device=dev, dtype=torch.int64).contiguous()
    d = dst.to(device=dev, dtype=torch.int64).contiguous()
    fn = loader.kernel("block_copy.cu", "copy_blocks")
    loader.launch(fn, (s.numel(), len(caches)), (256,), (_p(meta[0]), _p(meta[1]), _p(s), _p(d)))
    return None


def free_run_stats_device(used: Tensor) -> Tensor:
    """int64 [3] on the device: (num_free, num_runs, largest_run) of a CUDA bitmap, without a sync."""
    n = used.numel()
    u = used.reshape(-1).contiguous()
    u = u.view(torch.uint8) if u.dtype == torch.bool else (u != 0).view(torch.uint8)
    vecs = 32 if n >= 64 << 20 else 16            # 16-byte loads a thread
    nparts = max(1, math.ceil(n / (256 * 16 * vecs)))   # FR_THREADS x FR_BYTES blocks a CTA
    partial = torch.empty(nparts * 6, dtype=torch.int64, device=used.device)
    result = torch.empty(3, dtype=torch.int64, device=used.device)
    loader.launch(loader.kernel("free_runs.cu", f"free_runs_partial<{vecs}>"), (nparts,), (256,),
                  (_p(u), np.int64(n), _p(partial)))
    loader.launch(loader.kernel("free_runs.cu", "free_runs_finish"), (1,), (1024,),
                  (_p(partial), _i(nparts), _p(result)))
    return result


def free_run_stats(used: Tensor) -> dict[str, int]:
    """{"num_free", "num_runs", "largest_run"} of a block-state bitmap (True = used)."""
    if not cuda_enabled(used) or used.numel() == 0:
        return reference.free_run_stats(used)
    nf, nr, lr = free_run_stats_device(used).tolist()
    return {"num_free": nf, "num_runs": nr, "largest_run": lr}


_ = (free_runs, num_pages_of)   # re-exported unchanged: torch runs them on any device
