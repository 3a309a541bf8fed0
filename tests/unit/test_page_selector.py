"""Page metadata and page selection at reference level (no engine): exactness, budgets, needles, errors."""

from __future__ import annotations

import pytest
import torch

from tinyserve.engine.page_metadata import PageMetadata, PageMetadataStore
from tinyserve.engine.page_selector import PageSelector
from tinyserve.engine.settings import SelectionSettings
from tinyserve.kernels import reference as ref

BS = 32
HQ, HKV, D = 8, 4, 64


def _settings(**kw) -> SelectionSettings:
    base = dict(enabled=True, budget_tokens=128, min_context_tokens=0, exempt_layers=[], num_sink_pages=1)
    base.update(kw)
    return SelectionSettings(**base)


def _paged(seq_lens: list[int], num_blocks: int = 256, seed: int = 0, dtype=torch.float32):
    """Random K/V in a shuffled paged layout, with block tables and page metadata built by `record`."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, BS, HKV, D, generator=g).to(dtype)
    vc = torch.randn(num_blocks, BS, HKV, D, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    max_pages = max((s + BS - 1) // BS for s in seq_lens)
    bt = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
    meta = PageMetadata(num_blocks, HKV, D, BS, dtype)
    nxt = 0
    for b, s in enumerate(seq_lens):
        pages = (s + BS - 1) // BS
        bt[b, :pages] = perm[nxt: nxt + pages].int()
        nxt += pages
        slots = (bt[b, :pages].long().view(-1, 1) * BS + torch.arange(BS)).flatten()[:s]
        meta.record(kc.view(-1, HKV, D)[slots], slots)
    return kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32), meta


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# -- page metadata ------------------------------------------------------------------------------------------
def test_metadata_exact_through_prefill_chunks_decode_and_reallocation():
    torch.manual_seed(1)
    nb = 16
    meta = PageMetadata(nb, HKV, D, BS, torch.bfloat16)
    truth: dict[int, list[torch.Tensor]] = {}

    def write(block_offsets: list[tuple[int, int]]):
        slots = torch.tensor([b * BS + o for b, o in block_offsets] + [-1, -1])    # padding slots
        keys = torch.randn(len(block_offsets) + 3, HKV, D).to(torch.bfloat16)    # + a padded extra row
        meta.record(keys, slots)
        for i, (b, o) in enumerate(block_offsets):
            if o == 0:
                truth[b] = []
            truth[b].append(keys[i])

    write([(3, o) for o in range(BS)] + [(7, o) for o in range(10)])           # prefill: full + partial
    write([(7, o) for o in range(10, 20)])                                      # chunked prefill continues
    for o in range(20, 25):
        write([(7, o)])                                                         # decode, token by token
    write([(3, o) for o in range(5)])                                           # block 3 freed, reallocated
    for b, keys in truth.items():
        k = torch.stack(keys)
        assert torch.equal(meta.key_min[b], k.amin(0)), b
        assert torch.equal(meta.key_max[b], k.amax(0)), b


def test_metadata_follows_block_moves_like_the_kv_cache():
    kc, vc, bt, lens, meta = _paged([200, 70], num_blocks=32)
    store = PageMetadataStore()
    store._layers["layer.0"] = meta
    before_min, before_max = meta.key_min.clone(), meta.key_max.clone()
    moves = [(int(bt[0, 0]), 30), (int(bt[0, 1]), 31)]
    assert store.copy_blocks(moves) == 2
    for s, d in moves:
        assert torch.equal(meta.key_min[d], before_min[s]) and torch.equal(meta.key_max[d], before_max[s])
        # and it is the metadata of the moved keys
        ref.copy_blocks([kc], torch.tensor([s]), torch.tensor([d]))
        assert torch.equal(meta.key_max[d], kc[d].amax(0))


# -- selection ----------------------------------------------------------------------------------------------
def test_budget_pages_tokens_and_fraction():
    sel = PageSelector(_settings(budget_tokens=100), BS)
    assert sel.budget_pages(torch.tensor([50, 1000])).tolist() == [4, 4]            # ceil(100/32)
    sel = PageSelector(_settings(budget_tokens=None, budget_fraction=0.25, num_sink_pages=2), BS)
    assert sel.budget_pages(torch.tensor([64, 1024, 1000])).tolist() == [3, 8, 8]    # >= sinks + 1
    assert sel.eligible(torch.tensor([1, 5, 1]), torch.tensor([10, 500, 500])).tolist() == [True, False, True]
    sel = PageSelector(_settings(min_context_tokens=100), BS)
    assert sel.eligible(torch.tensor([1, 1]), torch.tensor([99, 100])).tolist() == [False, True]


@pytest.mark.parametrize("fraction", [None, 0.3])
def test_selection_keeps_sinks_and_last_page_and_fits_budget_per_head(fraction):
    lens = [33, 300, 777, 1500]
    kc, vc, bt, sl, meta = _paged(lens)
    settings = _settings(budget_tokens=None if fraction else 160, budget_fraction=fraction, num_sink_pages=2)
    sel = PageSelector(settings, BS)
    q = torch.randn(len(lens), HQ, D)
    bp = sel.budget_pages(sl)
    selected, nsel = sel.select(q, meta.key_min, meta.key_max, bt, sl, bp)
    assert selected.shape[:2] == (len(lens), HKV) and nsel.shape == (len(lens), HKV)
    npages = sel.num_pages(sl)
    assert torch.equal(nsel, sel.num_selected(sl, bp).view(-1, 1).expand(-1, HKV))
    for b in range(len(lens)):
        for h in range(HKV):
            pages = selected[b, h, : nsel[b, h]].tolist()
            assert nsel[b, h] == min(int(npages[b]), int(bp[b]))
            assert pages == sorted(set(pages)) and all(p >= 0 for p in pages)
            assert pages[-1] == npages[b] - 1                                      # page being written, last
            assert pages[: min(2, len(pages))] == list(range(min(2, len(pages))))  # sinks
            assert all(p == -1 for p in selected[b, h, nsel[b, h]:].tolist())
        # the tokens each head reads are known before the query is
        read = sum(min(BS, int(sl[b]) - p * BS) for p in selected[b, 0, : nsel[b, 0]].tolist())
        assert read == int(sel.selected_lens(sl, bp)[b])


def test_selection_is_the_references_per_head_selection_and_dense_at_full_budget():
    lens = [40, 333, 1000]
    kc, vc, bt, sl, meta = _paged(lens, seed=3)
    q = torch.randn(len(lens), HQ, D)
    scale = D ** -0.5
    dense = ref.paged_decode_attention(q, kc, vc, bt, sl, scale)
    for budget in (64, 256, 4096):
        sel = PageSelector(_settings(budget_tokens=budget), BS)
        selected, nsel = sel.select(q, meta.key_min, meta.key_max, bt, sl, sel.budget_pages(sl))
        out, ref_sel, ref_n = ref.query_aware_decode(q, kc, vc, meta.key_min, meta.key_max, bt, sl, scale, BS,
                                                     int(sel.budget_pages(sl)[0]) * BS, 1)
        assert torch.equal(selected, ref_sel.long()) and torch.equal(nsel, ref_n.long())
        if budget >= max(lens):
            torch.testing.assert_close(out, dense, rtol=0, atol=0)
        elif budget == 256:                                  # 8 of 32 pages: room to choose, heads differ
            assert not torch.equal(selected[2, 0], selected[2, 1])


def test_two_kv_heads_with_needles_in_different_pages_each_select_their_own():
    ctx = 40 * BS
    kc, vc, bt, sl, meta = _paged([ctx], num_blocks=48, seed=9)
    q = torch.randn(1, HQ, D)
    g = HQ // HKV
    needles = {h: 5 + 7 * h for h in range(HKV)}                                 # a different page per head
    for h, page in needles.items():
        blk = int(bt[0, page])
        kc[blk, 3, h] = 4.0 * q[0, h * g:(h + 1) * g].sum(0)
        slots = torch.tensor([blk * BS + 3])
        meta.record(kc.view(-1, HKV, D)[slots], slots)
    sel = PageSelector(_settings(budget_tokens=3 * BS), BS)                     # sink + last + one page
    selected, nsel = sel.select(q, meta.key_min, meta.key_max, bt, sl, sel.budget_pages(sl))
    for h, page in needles.items():
        assert selected[0, h].tolist() == [0, page, 39]


def test_counters_count_pages_per_kv_head_and_bytes_read_and_not_read():
    lens = [1000, 100]
    kc, vc, bt, sl, meta = _paged(lens)
    sel = PageSelector(_settings(budget_tokens=128), BS)
    q = torch.randn(2, HQ, D)
    bp = sel.budget_pages(sl)
    selected, nsel = sel.select(q, meta.key_min, meta.key_max, bt, sl, bp)
    per_tok_head = PageSelector.kv_bytes_per_token_head(D, torch.bfloat16)
    assert per_tok_head == 2 * D * 2
    sel.count(sl, nsel, per_tok_head)
    c = sel.counters.as_dict()
    assert c["decode_steps_total"] == 2
    assert c["pages_scored_total"] == (32 + 4) * HKV and c["pages_selected_total"] == (4 + 4) * HKV
    assert c["kv_bytes_read_total"] == int(sel.selected_lens(sl, bp).sum()) * HKV * per_tok_head
    assert c["kv_bytes_read_total"] + c["kv_bytes_not_read_total"] == sum(lens) * HKV * per_tok_head
    assert c["pages_selected_total"] < c["pages_scored_total"]


# -- accuracy vs budget (reference level) --------------------------------------------------------------------
FRACTIONS = [1 / 32, 1 / 8, 1 / 2, 1.0]


def _errors_vs_budget(ctx: int, needle: bool, seeds: range) -> tuple[list[float], list[float]]:
    errs = {f: [] for f in FRACTIONS}
    recall = {f: [] for f in FRACTIONS}
    for seed in seeds:
        kc, vc, bt, sl, meta = _paged([ctx], num_blocks=(ctx + BS - 1) // BS + 4, seed=seed)
        g = torch.Generator().manual_seed(1000 + seed)
        q = torch.randn(1, HQ, D, generator=g)
        npages = (ctx + BS - 1) // BS
        if needle:                                   # one key per KV head made to dominate its queries
            page = int(torch.randint(1, npages - 1, (1,), generator=g))
            off = int(torch.randint(0, BS, (1,), generator=g))
            blk = int(bt[0, page])
            for h in range(HKV):
                kc[blk, off, h] = 4.0 * q[0, h * (HQ // HKV):(h + 1) * (HQ // HKV)].sum(0)
            slots = torch.tensor([blk * BS + off])
            meta.record(kc.view(-1, HKV, D)[slots], slots)
        dense = ref.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5)
        for f in FRACTIONS:
            sel = PageSelector(_settings(budget_tokens=None, budget_fraction=f), BS)
            selected, nsel = sel.select(q, meta.key_min, meta.key_max, bt, sl, sel.budget_pages(sl))
            out = ref.sparse_paged_decode_attention(q, kc, vc, bt, sl, selected, D ** -0.5)
            errs[f].append(_rel_err(out, dense))
            if needle:
                recall[f].append(float(all(page in selected[0, h].tolist() for h in range(HKV))))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return [mean(errs[f]) for f in FRACTIONS], [mean(recall[f]) if recall[f] else 0.0 for f in FRACTIONS]


def test_error_falls_with_budget_and_is_zero_at_full_budget_on_random_keys():
    errs, _ = _errors_vs_budget(2048, needle=False, seeds=range(3))
    assert errs[-1] < 1e-6
    assert errs[0] > errs[1] > errs[2] > errs[-1]
    assert errs[0] > 0.05                             # selection really drops attention mass at 1/32


def test_planted_needle_always_selected_and_small_error():
    # 4096 tokens: even 1/32 of it (4 pages) leaves room for the needle's page beside the sink and last page
    errs, recall = _errors_vs_budget(4096, needle=True, seeds=range(2))
    rand_errs, _ = _errors_vs_budget(4096, needle=False, seeds=range(2))
    assert recall == [1.0] * len(FRACTIONS)
    assert errs[-1] < 1e-6
    assert errs[0] < rand_errs[0]                     # the needle carries the attention the budget keeps


def test_bench_reference_sweep_reports_exact_full_budget_and_needle_recall():
    from tinyserve.bench.selection import reference_sweep

    rows = reference_sweep([1024], [1 / 8, 1.0], trials=1, progress=lambda *_: None)
    assert {(r["inputs"], r["budget_fraction"]) for r in rows} == {(k, f) for k in ("random", "clustered", "needle")
                                                                   for f in (1 / 8, 1.0)}
    for r in rows:
        if r["budget_fraction"] == 1.0:
            assert r["rel_err_per_head"] < 1e-6 and r["rel_err_shared"] < 1e-6
            assert r["attention_mass_selected"] > 1 - 1e-9
        else:
            assert 0 < r["attention_mass_selected"] < 1 and r["budget_pages"] == 4
        if r["inputs"] == "needle" and r["budget_fraction"] == 1.0:
            assert r["needle_recall_per_head"] == r["needle_recall_shared"] == 1.0
        elif r["inputs"] == "needle":              # each KV head's needle in its own page: per-head finds more
            assert r["needle_recall_per_head"] > r["needle_recall_shared"]
            assert r["attention_mass_selected"] > r["attention_mass_selected_shared"]


def test_one_pass_selection_equals_reference_scores_and_selection_for_mixed_budgets():
    lens = [33, 300, 777, 1500, 2000]
    kc, vc, bt, sl, meta = _paged(lens, seed=7)
    q = torch.randn(len(lens), HQ, D)
    budgets = torch.tensor([2, 5, 9, 3, 40])
    selected, nsel = ref.score_and_select_pages(q, meta.key_min, meta.key_max, bt, sl, BS, budgets, 1)
    scores = ref.page_scores(q, meta.key_min, meta.key_max, bt, sl, BS)
    for b in range(len(lens)):
        want, want_n = ref.select_pages(scores[b:b + 1], sl[b:b + 1], BS, int(budgets[b]) * BS, 1)
        assert torch.equal(nsel[b], want_n[0].long())
        k = want.shape[-1]
        assert torch.equal(selected[b, :, :k], want[0].long()) and bool((selected[b, :, k:] == -1).all())
