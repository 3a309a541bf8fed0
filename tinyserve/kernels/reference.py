"""Torch reference of TinyServe's paged-KV kernels; runs on any device torch runs on.

This module is the specification the CUDA kernels (``csrc/*.cu``) are tested against, and the
implementation CPU engines use. Everything here is plain, vectorised torch; no CUDA, CuPy, vLLM or Ray.

Shapes and conventions (shared by every function and by ``ops``):

- ``key_cache`` / ``value_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (vLLM's NHD layout).
- ``query``: ``[B, Hq, D]``, one decode token per sequence.
- ``block_tables``: int32 ``[B, max_pages]``; logical page ``p`` of sequence ``b`` lives in physical block
  ``block_tables[b, p]``. Entries past the sequence are ignored (they may hold any value, -1 included).
- ``seq_lens``: int32 ``[B]``, tokens in context including the current one (>= 1).
- ``key_min`` / ``key_max``: ``[num_blocks, num_kv_heads, head_dim]``, channel-wise min and max of the
  keys written into each block, per KV head. Same dtype as the keys: min and max of bf16/fp16 values are
  themselves exact values of that dtype, so no wider type is needed; scores are computed in fp32.
- GQA: query head ``g`` reads KV head ``g // (Hq // Hkv)``.
- Query-aware score of a page for KV head ``h``: ``sum over query heads g of h, sum over channels c of
  max(q_gc * min_c, q_gc * max_c)``; an upper bound of ``sum_g q_g . k`` over the page's keys. Because
  ``max >= min``, ``max(q*min, q*max) = relu(q)*max + min(q, 0)*min``, so the score is linear in the
  summed positive and negative parts of the group's queries; that identity is how it is computed here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "update_page_metadata",
    "page_scores",
    "select_pages",
    "paged_decode_attention",
    "sparse_paged_decode_attention",
    "query_aware_decode",
    "score_and_select_pages",
    "page_selection_bias",
    "copy_blocks",
    "free_runs",
    "free_run_stats",
    "num_pages_of",
    "budget_pages",
]


def num_pages_of(seq_lens: Tensor, block_size: int) -> Tensor:
    """Pages each sequence occupies: ``ceil(seq_len / block_size)`` (int64)."""
    return (seq_lens.long() + block_size - 1) // block_size


def budget_pages(budget_tokens: int, block_size: int, num_sink_pages: int = 1) -> int:
    """Pages a token budget buys: ``budget_tokens // block_size``, at least the sinks plus the last page."""
    return max(int(budget_tokens) // int(block_size), int(num_sink_pages) + 1)


def update_page_metadata(key_min: Tensor, key_max: Tensor, key: Tensor, slot_mapping: Tensor,
                         block_size: int) -> None:
    """Fold freshly written keys into the per-block min/max metadata, in place, exactly.

    key: ``[T, Hkv, D]``; slot_mapping: int64 ``[T]``, ``slot = block * block_size + offset``, negative
    slots are padding and skipped. A block that receives a token at offset 0 in this call is reset first
    (a block is always written from offset 0 after it is (re)allocated, so every token of such a block in
    this call belongs to the new owner); every other touched block merges the new keys into its min/max.
    """
    slots = slot_mapping.to(device=key.device, dtype=torch.long)
    valid = slots >= 0
    if not bool(valid.any()):
        return
    slots = slots[valid]
    k = key[valid].to(key_min.dtype)
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - blocks * block_size
    nb = key_min.shape[0]
    flat_min = key_min.view(nb, -1)
    flat_max = key_max.view(nb, -1)
    reset_blocks = torch.unique(blocks[offsets == 0])
    if reset_blocks.numel():
        flat_min[reset_blocks] = float("inf")
        flat_max[reset_blocks] = float("-inf")
    kf = k.reshape(k.shape[0], -1)
    idx = blocks.unsqueeze(1).expand_as(kf)
    flat_min.scatter_reduce_(0, idx, kf, reduce="amin", include_self=True)
    flat_max.scatter_reduce_(0, idx, kf, reduce="amax", include_self=True)


def _group_query_parts(query: Tensor, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """Per KV head, the sum over its query heads of ``relu(q)`` and of ``min(q, 0)`` (fp32, [B, Hkv, D])."""
    b, hq, d = query.shape
    q = query.float().view(b, num_kv_heads, hq // num_kv_heads, d)
    return q.clamp(min=0).sum(2), q.clamp(max=0).sum(2)


def page_scores(query: Tensor, key_min: Tensor, key_max: Tensor, block_tables: Tensor,
                seq_lens: Tensor, block_size: int) -> Tensor:
    """Query-aware page scores, fp32 ``[B, Hkv, max_pages]``; pages past each sequence are ``-inf``."""
    hkv = key_min.shape[1]
    qp, qn = _group_query_parts(query, hkv)                                   # [B, Hkv, D]
    bt = block_tables.long().clamp(min=0)                                     # [B, P]
    kmax = key_max[bt].float()                                                # [B, P, Hkv, D]
    kmin = key_min[bt].float()
    s = torch.einsum("bhd,bphd->bhp", qp, kmax) + torch.einsum("bhd,bphd->bhp", qn, kmin)
    npages = num_pages_of(seq_lens, block_size).to(s.device)
    pidx = torch.arange(bt.shape[1], device=s.device)
    live = pidx.view(1, 1, -1) < npages.view(-1, 1, 1)
    return s.masked_fill(~live, float("-inf"))


def select_pages(scores: Tensor, seq_lens: Tensor, block_size: int, budget_tokens: int,
                 num_sink_pages: int = 1) -> tuple[Tensor, Tensor]:
    """Choose, per sequence and KV head, the logical pages decode attends to.

    Keeps the first ``num_sink_pages`` pages and the last (partial, being written) page, then fills the
    budget (``budget_pages(...)`` pages in all) with the highest-scoring other pages. A sequence with no
    more pages than the budget gets all its pages (attention then equals dense attention exactly).

    Returns ``selected`` int32 ``[B, Hkv, K]`` (ascending logical page indices, padded with -1;
    ``K = min(max_pages, budget pages)``) and ``num_selected`` int32 ``[B, Hkv]``.
    Ties between equal scores are broken arbitrarily.
    """
    b, hkv, p = scores.shape
    k = min(p, budget_pages(budget_tokens, block_size, num_sink_pages))
    npages = num_pages_of(seq_lens, block_size).to(scores.device).view(-1, 1, 1)
    pidx = torch.arange(p, device=scores.device).view(1, 1, -1)
    live = pidx < npages
    forced = live & ((pidx < num_sink_pages) | (pidx == npages - 1))
    # fp64 keys: live scores are clamped finite, so forced (+inf) > live > dead (-inf) always.
    key = torch.nan_to_num(scores.double(), nan=-1e300, posinf=1e300, neginf=-1e300)
    key = key.masked_fill(forced, float("inf")).masked_fill(~live, float("-inf"))
    top = torch.topk(key, k, dim=-1, sorted=True).indices                     # [B, Hkv, K]
    nsel = torch.minimum(npages.view(-1, 1), torch.tensor(k, device=scores.device)).expand(b, hkv)
    slot = torch.arange(k, device=scores.device).view(1, 1, -1)
    keep = slot < nsel.unsqueeze(-1)
    top = torch.where(keep, top, torch.full_like(top, p))                     # padding sorts last
    top = torch.sort(top, dim=-1).values
    top = torch.where(top == p, torch.full_like(top, -1), top)
    return top.to(torch.int32), nsel.to(torch.int32).contiguous()


def sparse_paged_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                                  block_tables: Tensor, seq_lens: Tensor, selected: Tensor,
                                  scale: float) -> Tensor:
    """Decode attention over the tokens of the selected logical pages of each KV head.

    Math in fp32 (fp64 for fp64 inputs).

    selected: int ``[B, Hkv, K]`` logical page indices, -1 = none; the sequence's last page counts only
    up to ``seq_len``. Returns ``[B, Hq, D]`` in the query's dtype.
    """
    b, hq, d = query.shape
    bs, hkv = key_cache.shape[1], key_cache.shape[2]
    g = hq // hkv
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32    # fp32 math, fp64 kept
    sel = selected.long()                                                     # [B, Hkv, K]
    kk = sel.shape[-1]
    bt = block_tables.long()
    phys = torch.gather(bt.unsqueeze(1).expand(b, hkv, bt.shape[1]), 2, sel.clamp(min=0))
    phys = phys.clamp(min=0)                                                  # [B, Hkv, K]
    heads = torch.arange(hkv, device=query.device).view(1, hkv, 1).expand_as(phys)
    # key_cache[phys, :, head] -> [B, Hkv, K, bs, D]
    keys = key_cache.permute(0, 2, 1, 3)[phys, heads].to(cdt)
    vals = value_cache.permute(0, 2, 1, 3)[phys, heads].to(cdt)
    pos = sel.unsqueeze(-1) * bs + torch.arange(bs, device=query.device)     # [B, Hkv, K, bs]
    ok = (sel.unsqueeze(-1) >= 0) & (pos < seq_lens.long().to(query.device).view(b, 1, 1, 1))
    keys = keys.reshape(b, hkv, kk * bs, d)
    vals = vals.reshape(b, hkv, kk * bs, d)
    q = query.to(cdt).view(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhtd->bhgt", q, keys) * float(scale)
    logits = logits.masked_fill(~ok.reshape(b, hkv, 1, kk * bs), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgt,bhtd->bhgd", probs, vals)
    return out.reshape(b, hq, d).to(query.dtype)


def paged_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, scale: float) -> Tensor:
    """Dense decode attention over every token of each sequence's pages, ``[B, Hq, D]`` (math as sparse)."""
    b = query.shape[0]
    hkv = key_cache.shape[2]
    p = block_tables.shape[1]
    npages = num_pages_of(seq_lens, key_cache.shape[1]).to(query.device)
    pidx = torch.arange(p, device=query.device).view(1, -1)
    sel = torch.where(pidx < npages.view(-1, 1), pidx, torch.full_like(pidx, -1))
    sel = sel.view(b, 1, p).expand(b, hkv, p)
    return sparse_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, sel, scale)


def query_aware_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, key_min: Tensor,
                       key_max: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
                       block_size: int, budget_tokens: int,
                       num_sink_pages: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Score pages, select them within the budget, attend over them: ``(out, selected, num_selected)``."""
    scores = page_scores(query, key_min, key_max, block_tables, seq_lens, block_size)
    selected, num_selected = select_pages(scores, seq_lens, block_size, budget_tokens, num_sink_pages)
    out = sparse_paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                        selected, scale)
    return out, selected, num_selected


def page_selection_bias(seq_lens: Tensor, block_size: int, max_pages: int, num_sink_pages: int = 1) -> Tensor:
    """What ``select_pages`` forces, as an fp32 bias ``[B, 1, max_pages]`` to add to finite page scores:
    ``+inf`` on the sink pages and the last page of each sequence, ``-inf`` past the sequence, 0 elsewhere."""
    npages = num_pages_of(seq_lens, block_size).view(-1, 1, 1)
    pidx = torch.arange(max_pages, device=seq_lens.device).view(1, 1, -1)
    live = pidx < npages
    forced = live & ((pidx < num_sink_pages) | (pidx == npages - 1))
    bias = torch.zeros(live.shape, dtype=torch.float32, device=seq_lens.device)
    return bias.masked_fill_(forced, float("inf")).masked_fill_(~live, float("-inf"))


def score_and_select_pages(query: Tensor, key_min: Tensor, key_max: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, block_size: int, budget_pages: Tensor, num_sink_pages: int = 1,
                           bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``page_scores`` then ``select_pages``, in one pass with a page budget per sequence, in fewer and
    cheaper torch ops (rows gathered with ``index_select``, scores as a multiply-sum instead of an einsum over
    a permuted copy, forced and dead pages as one added bias, one top-k for all budgets): the path of the CPU
    engine, where the fixed cost of each small op dominates.

    budget_pages: int ``[B]``, pages each KV head of a sequence may keep (sinks and last page included, at
    least ``num_sink_pages + 1``). bias: ``page_selection_bias(seq_lens, block_size, max_pages,
    num_sink_pages)`` when the caller already has it (it depends on the lengths only, not on the query).
    Returns ``selected`` int64 ``[B, Hkv, K]`` (ascending logical pages, -1 padded, ``K = min(max_pages,
    max budget)``) and ``num_selected`` int64 ``[B, Hkv]``, the pages ``select_pages(page_scores(...), ...,
    budget_pages[b] * block_size, ...)`` picks for each sequence b (scores are the same fp32 sums in another
    order, so only exact near-ties may resolve differently).
    """
    b, hq, d = query.shape
    hkv = key_min.shape[1]
    p = block_tables.shape[1]
    qp, qn = _group_query_parts(query, hkv)                                   # [B, Hkv, D]
    rows = block_tables.long().clamp(min=0).flatten()
    kmax = key_max.index_select(0, rows).view(b, p, hkv, d).float()
    kmin = key_min.index_select(0, rows).view(b, p, hkv, d).float()
    scores = ((kmax * qp.unsqueeze(1)).sum(-1) + (kmin * qn.unsqueeze(1)).sum(-1)).transpose(1, 2)  # [B, Hkv, P]
    if bias is None:
        bias = page_selection_bias(seq_lens, block_size, p, num_sink_pages)
    big = torch.finfo(torch.float32).max                                      # forced > live > dead, as there
    key = torch.nan_to_num(scores, nan=-big, posinf=big, neginf=-big).add_(bias)
    budget = budget_pages.long().to(scores.device).clamp(min=num_sink_pages + 1).view(-1, 1)
    k = min(p, int(budget.max()))
    top = torch.topk(key, k, dim=-1, sorted=True).indices                     # best first
    nsel = torch.minimum(num_pages_of(seq_lens, block_size).to(scores.device).view(-1, 1), budget)
    padded = bool((nsel < k).any())
    if padded:                                     # slots past a sequence's own count: -1, sorted last
        keep = torch.arange(k, device=scores.device).view(1, 1, -1) < nsel.unsqueeze(-1)
        top = torch.where(keep, top, torch.full_like(top, p))
    top = torch.sort(top, dim=-1).values
    if padded:
        top = torch.where(top == p, torch.full_like(top, -1), top)
    return top, nsel.expand(b, hkv).contiguous()


def copy_blocks(caches: list[Tensor], src: Tensor, dst: Tensor) -> None:
    """Copy block ``src[i]`` to block ``dst[i]`` (dim 0) in every tensor of ``caches``, in place.

    All sources are read before any destination is written; destinations must be distinct.
    """
    if src.numel() == 0:
        return
    for c in caches:
        s = src.to(device=c.device, dtype=torch.long)
        d = dst.to(device=c.device, dtype=torch.long)
        c.index_copy_(0, d, c.index_select(0, s))


def free_runs(used: Tensor) -> tuple[Tensor, Tensor]:
    """Maximal runs of free (``used == False``) blocks: ``(starts, lengths)``, int64, ascending starts."""
    free = (~used.bool()).to(torch.int8).flatten()
    edge = torch.zeros(free.numel() + 2, dtype=torch.int8, device=free.device)
    edge[1:-1] = free
    d = edge[1:].to(torch.int16) - edge[:-1].to(torch.int16)                  # +1 run start, -1 run end
    starts = torch.nonzero(d == 1).flatten()
    ends = torch.nonzero(d == -1).flatten()
    return starts, ends - starts


def free_run_stats(used: Tensor) -> dict[str, int]:
    """``{"num_free", "num_runs", "largest_run"}`` of a block-state bitmap (True = used)."""
    starts, lengths = free_runs(used)
    return {
        "num_free": int(lengths.sum()) if lengths.numel() else 0,
        "num_runs": int(starts.numel()),
        "largest_run": int(lengths.max()) if lengths.numel() else 0,
    }
