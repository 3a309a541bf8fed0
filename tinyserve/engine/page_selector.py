"""Query-aware choice of the KV pages a decode step reads, per request and KV head.

Math (tinyserve.kernels.reference; `score_and_select_pages`, the reference's scoring and selection in
fewer torch ops, one top-k for every budget of the step): a page's score for KV head h is
Σ_g Σ_c max(q_gc·min_c, q_gc·max_c) over the query heads g of h (GQA: the query heads that read h), an upper
bound of Σ_g q_g·k over the page's keys of head h. Each KV head keeps its own best pages: two heads of one
request may attend to different pages.

Budget: a token budget buys ceil(budget / block_size) pages, never fewer than the sinks plus the page being
written, for every KV head of a request. A budget of at least the context therefore selects every page (exactly
dense attention). A fraction budget is `fraction × context` tokens for each request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from tinyserve.engine.settings import SelectionSettings
from tinyserve.kernels import reference

__all__ = ["SelectionCounters", "PageSelector"]


@dataclass
class SelectionCounters:
    """Running totals of one worker process (the `tinyserve_selection_*` metrics). A page here is one KV
    head's share of a KV block (page × KV head), the unit that per-head selection scores, keeps and reads.

    - decode_steps_total: decode attentions that ran selection, counted once per (request, layer, step);
    - pages_scored_total: (page, KV head) pairs of those requests' contexts that were scored: context pages ×
      num_kv_heads;
    - pages_selected_total: (page, KV head) pairs those attentions read (sinks and the page being written
      included, for every head);
    - kv_bytes_read_total: K and V bytes those attentions read: Σ over KV heads of the tokens the head read ×
      head_dim × 2 (K and V) × element size;
    - kv_bytes_not_read_total: bytes a dense decode of the same (request, layer, step) would have read and
      selection skipped. The key min/max read for scoring (1/block_size of the keys) is in neither.
    """

    decode_steps_total: int = 0
    pages_scored_total: int = 0
    pages_selected_total: int = 0
    kv_bytes_read_total: int = 0
    kv_bytes_not_read_total: int = 0

    def add(self, other: "SelectionCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


class PageSelector:
    """Chooses, per decode request and KV head, the pages that fit the request's budget; owns the counters.

    Invariants, for every KV head of every request: the first `num_sink_pages` pages and the last (partial)
    page are selected; selected pages come out in ascending logical order, so the page being written is last;
    the head selects exactly `num_selected(seq_lens, budget_pages)` pages, min(pages, budget pages), so the
    tokens it reads, `selected_lens(...)`, are known before the query is (every unselected page is a full
    one); a request whose pages all fit the budget gets all its pages in their original order.
    """

    def __init__(self, settings: SelectionSettings, block_size: int) -> None:
        self.settings = settings
        self.block_size = int(block_size)
        self.counters = SelectionCounters()

    # -- planning (once per step) ------------------------------------------------------------------
    def eligible(self, query_lens: Tensor, seq_lens: Tensor) -> Tensor:
        """Rows that are decodes (one query token) with at least `min_context_tokens` of context."""
        return (query_lens == 1) & (seq_lens >= self.settings.min_context_tokens)

    def budget_pages(self, seq_lens: Tensor) -> Tensor:
        """Pages each KV head of each request may read (int64), sinks and the page being written included."""
        s = self.settings
        if s.budget_tokens is not None:
            tokens = torch.full_like(seq_lens, int(s.budget_tokens), dtype=torch.long)
        else:
            tokens = torch.ceil(seq_lens.double() * float(s.budget_fraction)).long()
        pages = (tokens + self.block_size - 1) // self.block_size
        return pages.clamp(min=s.num_sink_pages + 1)

    def num_pages(self, seq_lens: Tensor) -> Tensor:
        """Pages each request occupies (int64): ceil(seq_len / block_size)."""
        return (seq_lens.long() + self.block_size - 1) // self.block_size

    def num_selected(self, seq_lens: Tensor, budget_pages: Tensor) -> Tensor:
        """Pages every KV head of each request selects (int64): min(pages, budget pages)."""
        return torch.minimum(self.num_pages(seq_lens), budget_pages.long())

    def selection_bias(self, seq_lens: Tensor, max_pages: int) -> Tensor:
        """The sinks and last pages (forced) and the pages past each request (never), as the fp32 bias
        [n, 1, max_pages] `select` adds to the scores; it depends on the lengths only, so once per step."""
        return reference.page_selection_bias(seq_lens, self.block_size, max_pages, self.settings.num_sink_pages)

    def selected_lens(self, seq_lens: Tensor, budget_pages: Tensor) -> Tensor:
        """Tokens every KV head of each request reads (int64): seq_len − unselected pages × block_size."""
        unselected = self.num_pages(seq_lens) - self.num_selected(seq_lens, budget_pages)
        return seq_lens.long() - unselected * self.block_size

    # -- selection (per layer) ---------------------------------------------------------------------
    def select(self, query: Tensor, key_min: Tensor, key_max: Tensor, block_table: Tensor,
               seq_lens: Tensor, budget_pages: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Selected logical pages of each request and KV head.

        query [n, Hq, D]; key_min/key_max [num_blocks, Hkv, D]; block_table [n, P]; seq_lens [n];
        budget_pages [n]; bias: `selection_bias(seq_lens, P)` if the caller kept it. Returns `selected`
        int64 [n, Hkv, K] (ascending, padded with -1) and `num_selected` int64 [n, Hkv].
        """
        return reference.score_and_select_pages(query, key_min, key_max, block_table, seq_lens, self.block_size,
                                                budget_pages, self.settings.num_sink_pages, bias)

    def count(self, seq_lens: Tensor, num_selected: Tensor, bytes_per_token_head: int) -> None:
        """Add one selection over these requests (one layer) to the counters.

        seq_lens [n]; num_selected [n, Hkv]; bytes_per_token_head: K and V bytes of one token of one KV head.
        """
        c = self.counters
        npages = self.num_pages(seq_lens).view(-1, 1)
        nsel = num_selected.long()
        hkv = nsel.shape[1]
        read = seq_lens.long().view(-1, 1) - (npages - nsel) * self.block_size             # tokens, per head
        total = int(seq_lens.long().sum()) * hkv
        c.decode_steps_total += int(seq_lens.shape[0])
        c.pages_scored_total += int(npages.sum()) * hkv
        c.pages_selected_total += int(nsel.sum())
        c.kv_bytes_read_total += int(read.sum()) * bytes_per_token_head
        c.kv_bytes_not_read_total += (total - int(read.sum())) * bytes_per_token_head

    @staticmethod
    def kv_bytes_per_token_head(head_dim: int, dtype: torch.dtype) -> int:
        """K and V bytes of one token of one KV head in one layer."""
        return 2 * int(head_dim) * torch.empty((), dtype=dtype).element_size()
