"""The CPU selection backend's attention (no engine): vLLM's real CPU kernel over a hand-built KV cache.

Each KV head must get its own pages: two KV heads whose needles sit in different pages both attend to their
needle even when the budget leaves room for one page beside the sink and the page being written; a shared
selection would miss one of them. At a budget >= the context the output is the stock kernel's, bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tinyserve.engine.page_metadata import page_metadata_store
from tinyserve.engine.page_selector import PageSelector
from tinyserve.engine.settings import SelectionSettings
from tinyserve.kernels import reference as ref

vllm_ops = pytest.importorskip("vllm._custom_ops")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")
backend = pytest.importorskip("tinyserve.engine.selection_backend")

BS, HQ, HKV, D = 32, 4, 2, 64
DTYPE = torch.bfloat16
LAYER = "model.layers.3.self_attn.attn"


def _settings(**kw) -> SelectionSettings:
    base = dict(enabled=True, budget_tokens=3 * BS, min_context_tokens=0, exempt_layers=[], num_sink_pages=1)
    base.update(kw)
    return SelectionSettings(**base)


class Case:
    """A paged KV cache in vLLM's CPU layout with `seq_lens` requests (shuffled blocks), written through the
    backend's KV-cache update (so page metadata is recorded as in the engine), plus one query token each."""

    def __init__(self, seq_lens: list[int], seed: int = 0, num_blocks: int = 96) -> None:
        g = torch.Generator().manual_seed(seed)
        self.isa = cpu_attn._get_attn_isa(DTYPE, BS, D, "auto")
        self.layer = SimpleNamespace(layer_name=LAYER, isa=self.isa, _k_scale_float=1.0, _v_scale_float=1.0)
        self.impl = backend.QueryAwareCPUAttentionImpl(HQ, D, D ** -0.5, HKV, None, None, "auto")
        self.kv_cache = torch.zeros(num_blocks, HKV, BS, 2 * D, dtype=DTYPE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        pages = [(s + BS - 1) // BS for s in seq_lens]
        perm = torch.randperm(num_blocks, generator=g)
        self.block_table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
        self.keys, self.values = [], []
        start = 0
        for i, (s, p) in enumerate(zip(seq_lens, pages)):
            self.block_table[i, :p] = perm[start:start + p].int()
            start += p
            self.keys.append(torch.randn(s, HKV, D, generator=g).to(DTYPE))
            self.values.append(torch.randn(s, HKV, D, generator=g).to(DTYPE))
        self.query = torch.randn(len(seq_lens), HQ, D, generator=g).to(DTYPE)

    def slots(self, i: int) -> torch.Tensor:
        s = int(self.seq_lens[i])
        return (self.block_table[i].long().view(-1, 1) * BS + torch.arange(BS)).flatten()[:s]

    def write(self) -> None:
        page_metadata_store()._layers.pop(LAYER, None)
        for i in range(len(self.keys)):
            self.impl.do_kv_cache_update(self.layer, self.keys[i], self.values[i], self.kv_cache, self.slots(i))

    def metadata(self, selection: SelectionSettings | None):
        n = self.seq_lens.shape[0]
        qsl = torch.arange(n + 1, dtype=torch.int32)
        sched = vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=n, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=self.seq_lens, dtype=DTYPE,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=True)
        md = backend.QueryAwareCPUAttentionMetadata(
            num_actual_tokens=n, max_query_len=1, query_start_loc=qsl, max_seq_len=int(self.seq_lens.max()),
            seq_lens=self.seq_lens, block_table=self.block_table, slot_mapping=torch.zeros(n, dtype=torch.long),
            scheduler_metadata=sched)
        if selection is not None:
            self.selector = PageSelector(selection, BS)
            md.selection = backend.plan_decode_selection(self.selector, md, HQ, HKV, D, DTYPE, self.isa, "auto")
        return md

    def forward(self, selection: SelectionSettings | None) -> torch.Tensor:
        out = torch.zeros(self.query.shape[0], HQ, D, dtype=DTYPE)
        self.impl.forward(self.layer, self.query, None, None, self.kv_cache, self.metadata(selection), out)
        return out

    def reference_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same K/V in the reference's [num_blocks, block_size, Hkv, D] layout."""
        nb = self.kv_cache.shape[0]
        kc = torch.zeros(nb * BS, HKV, D, dtype=DTYPE)
        vc = torch.zeros(nb * BS, HKV, D, dtype=DTYPE)
        for i in range(len(self.keys)):
            kc[self.slots(i)] = self.keys[i]
            vc[self.slots(i)] = self.values[i]
        return kc.view(nb, BS, HKV, D), vc.view(nb, BS, HKV, D)


@pytest.fixture(autouse=True)
def _clean_store():
    yield
    page_metadata_store()._layers.pop(LAYER, None)


def test_each_kv_head_gets_its_own_needle_page():
    ctx = 12 * BS + 5
    case = Case([ctx])
    g = HQ // HKV
    needle_page = {0: 4, 1: 9}                       # different pages for the two KV heads
    for h, page in needle_page.items():
        t = page * BS + 7
        case.keys[0][t, h] = (3.0 * case.query[0, h * g:(h + 1) * g].float().sum(0)).to(DTYPE)
        case.values[0][t, h] = torch.full((D,), 5.0 if h == 0 else -5.0, dtype=DTYPE)
    case.write()
    settings = _settings(budget_tokens=3 * BS)      # sink + page being written + one more, per head
    out = case.forward(settings)

    # each head's query heads read its needle: the needle dominates their attention
    for h, page in needle_page.items():
        head_out = out[0, h * g:(h + 1) * g].float()
        assert torch.allclose(head_out, torch.full_like(head_out, 5.0 if h == 0 else -5.0), atol=0.5), h
    # and the output is attention over each head's own selection (the reference's per-head selection)
    kc, vc = case.reference_cache()
    meta = page_metadata_store().get(LAYER)
    expect, selected, _ = ref.query_aware_decode(case.query, kc, vc, meta.key_min, meta.key_max,
                                                 case.block_table, case.seq_lens, D ** -0.5, BS, 3 * BS, 1)
    for h, page in needle_page.items():
        assert page in selected[0, h].tolist() and needle_page[1 - h] not in selected[0, h].tolist()
    torch.testing.assert_close(out.float(), expect.float(), rtol=2e-2, atol=2e-2)
    # counters: pages per KV head
    c = case.selector.counters.as_dict()
    assert c["decode_steps_total"] == 1
    assert c["pages_scored_total"] == 13 * HKV and c["pages_selected_total"] == 3 * HKV


def test_full_budget_is_the_stock_kernel_bit_for_bit():
    case = Case([40, 333, 700], seed=3)
    case.write()
    stock = case.forward(None)
    full = case.forward(_settings(budget_tokens=4096))
    assert torch.equal(full, stock)
    c = case.selector.counters.as_dict()
    assert c["pages_selected_total"] == c["pages_scored_total"] == (2 + 11 + 22) * HKV
    assert c["kv_bytes_not_read_total"] == 0


def test_mixed_step_rows_that_do_not_select_run_stock():
    case = Case([64, 700, 500], seed=5)
    case.write()
    stock = case.forward(None)
    out = case.forward(_settings(budget_tokens=4 * BS, min_context_tokens=100))  # row 0 is below it
    md = case.metadata(_settings(budget_tokens=4 * BS, min_context_tokens=100))
    assert md.selection.rows.tolist() == [1, 2] and md.selection.rest is not None
    assert torch.equal(out[0], stock[0])
    kc, vc = case.reference_cache()
    meta = page_metadata_store().get(LAYER)
    expect, _, _ = ref.query_aware_decode(case.query[1:], kc, vc, meta.key_min, meta.key_max,
                                          case.block_table[1:], case.seq_lens[1:], D ** -0.5, BS, 4 * BS, 1)
    torch.testing.assert_close(out[1:].float(), expect.float(), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(out[1:].float(), stock[1:].float(), atol=1e-3)


def test_one_head_view_and_head_block_table_address_the_same_memory():
    kv = torch.arange(5 * HKV * BS * 2 * D, dtype=torch.float32).view(5, HKV, BS, 2 * D)
    kc, vc = backend.one_head_cache_view(kv)
    assert kc.shape == (5 * HKV, 1, BS, D) and kc.data_ptr() == kv.data_ptr()
    table = backend.head_block_table(torch.tensor([[3, 1, 4]]), torch.tensor([[[0, 2], [1, 2]]]), HKV)
    assert table.tolist() == [[3 * HKV + 0, 4 * HKV + 0], [1 * HKV + 1, 4 * HKV + 1]]
    stock_k, stock_v = kv.view(5, HKV, 2 * BS, D).chunk(2, dim=2)             # what the stock backend reads
    assert torch.equal(kc[1 * HKV + 1, 0], stock_k[1, 1]) and torch.equal(vc[4 * HKV, 0], stock_v[4, 0])
    with pytest.raises(ValueError):
        backend.one_head_cache_view(kv.transpose(0, 1).contiguous().transpose(0, 1))
