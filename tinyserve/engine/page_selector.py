"""Query-aware choice of the KV pages a decode step reads, shared by all KV heads of a request.

Math (from tinyserve.kernels.ops, i.e. the torch reference on CPU): per KV head, a page's score is
Σ_g Σ_c max(q_gc·min_c, q_gc·max_c) over the query heads g of that KV head, an upper bound of Σ_g q_g·k over
the page's keys. The selection is shared by the heads of a request (so that a stock paged kernel can run it
from a rewritten block table), so the per-KV-head scores are summed: still an upper bound, of Σ_heads q·k.

Budget: a token budget buys ceil(budget / block_size) pages, never fewer than the sinks plus the page being
written. A budget of at least the context therefore selects every page (exactly dense attention). A fraction
budget is `fraction × context` tokens for each request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from tinyserve.engine.settings import SelectionSettings
from tinyserve.kernels import ops

__all__ = ["SelectionCounters", "PageSelector"]


@dataclass
class SelectionCounters:
    """Running totals of one worker process (the `tinyserve_selection_*` metrics).

    - decode_steps_total: decode attentions that ran selection, counted once per (request, layer, step);
    - pages_scored_total: pages of those requests' contexts that were scored (once per page, all KV heads);
    - pages_selected_total: pages those attentions read (sinks and the page being written included);
    - kv_bytes_read_total: K and V bytes those attentions read: selected tokens × num_kv_heads × head_dim ×
      2 (K and V) × element size;
    - kv_bytes_not_read_total: bytes a dense decode of the same (request, layer, step) would have read and
      selection skipped: (context tokens − selected tokens) × the same factor. The key min/max read for
      scoring (1/block_size of the keys) is not included in either.
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
    """Chooses, per decode request, the pages that fit its budget; owns the selection counters.

    Invariants: the first `num_sink_pages` pages and the last (partial) page of a request are always
    selected; selected pages come out in ascending logical order, so the page being written is last and a
    rewritten block table row keeps the partial page at the end; a request whose pages all fit the budget
    gets all its pages in their original order (its rewritten row and length equal the original).
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
        """Pages each request may read (int64), sinks and the page being written included."""
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

    # -- selection (per layer) ---------------------------------------------------------------------
    def select(self, query: Tensor, key_min: Tensor, key_max: Tensor, block_table: Tensor,
               seq_lens: Tensor, budget_pages: Tensor) -> tuple[Tensor, Tensor]:
        """Selected logical pages, shared by the heads of each request.

        query [n, Hq, D]; key_min/key_max [num_blocks, Hkv, D]; block_table [n, P]; seq_lens [n];
        budget_pages [n]. Returns `selected` int64 [n, K] (ascending, padded with -1) and `num_selected` [n].
        """
        scores = ops.page_scores(query, key_min, key_max, block_table, seq_lens, self.block_size)
        shared = scores.sum(dim=1, keepdim=True)                                 # [n, 1, P]
        n, _, p = shared.shape
        distinct = torch.unique(budget_pages)
        if distinct.numel() == 1:                                                # token budget: one call
            sel, nsel = ops.select_pages(shared, seq_lens, self.block_size,
                                         int(distinct[0]) * self.block_size, self.settings.num_sink_pages)
            return sel[:, 0].long(), nsel[:, 0].long()
        k = min(p, int(distinct.max()))
        selected = torch.full((n, k), -1, dtype=torch.long)
        num_selected = torch.zeros(n, dtype=torch.long)
        for bp in distinct.tolist():                                             # fraction budget: per value
            rows = torch.nonzero(budget_pages == bp).flatten()
            sel, nsel = ops.select_pages(shared[rows], seq_lens[rows], self.block_size,
                                         int(bp) * self.block_size, self.settings.num_sink_pages)
            selected[rows, : sel.shape[-1]] = sel[:, 0].long()
            num_selected[rows] = nsel[:, 0].long()
        return selected, num_selected

    def rewrite(self, block_table: Tensor, seq_lens: Tensor, selected: Tensor, num_selected: Tensor,
                out_block_table: Tensor, out_seq_lens: Tensor) -> None:
        """Write the block table rows and lengths that make a stock paged kernel read only the selection.

        Row i of `out_block_table` gets the physical blocks of the selected pages in order (the partial page
        last) and `out_seq_lens[i]` the tokens they hold: seq_len − (pages − selected pages) × block_size.
        """
        k = selected.shape[1]
        phys = torch.gather(block_table.long(), 1, selected.clamp(min=0))
        phys = torch.where(selected >= 0, phys, block_table[:, :k].long())          # padding: left as it was
        out_block_table[:, :k] = phys.to(out_block_table.dtype)
        npages = self.num_pages(seq_lens)
        out_seq_lens.copy_((seq_lens.long() - (npages - num_selected) * self.block_size).to(out_seq_lens.dtype))

    def count(self, seq_lens: Tensor, new_seq_lens: Tensor, num_selected: Tensor,
              bytes_per_token: int) -> None:
        """Add one selection over these requests (one layer) to the counters."""
        c = self.counters
        npages = self.num_pages(seq_lens)
        read = int(new_seq_lens.long().sum())
        total = int(seq_lens.long().sum())
        c.decode_steps_total += int(seq_lens.shape[0])
        c.pages_scored_total += int(npages.sum())
        c.pages_selected_total += int(num_selected.sum())
        c.kv_bytes_read_total += read * bytes_per_token
        c.kv_bytes_not_read_total += (total - read) * bytes_per_token

    @staticmethod
    def kv_bytes_per_token(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V bytes of one token in one layer."""
        return 2 * int(num_kv_heads) * int(head_dim) * torch.empty((), dtype=dtype).element_size()

