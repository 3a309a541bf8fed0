"""CUDA kernels (tinyserve.kernels.ops) against the torch reference, on fresh random inputs.

Outputs are poisoned with NaN first so an unwritten element fails; errors are ||out - ref|| / ||ref||
against an fp64 reference. Skips without CuPy or CUDA.
"""

import math

import pytest
import torch

cupy = pytest.importorskip("cupy")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tinyserve.kernels import ops, reference as ref  # noqa: E402

DEV = "cuda"


def _case(b, hq, hkv, d, bs, seq_lens, dtype, seed, extra_blocks=7):
    g = torch.Generator(device=DEV).manual_seed(seed)
    npages = [math.ceil(s / bs) for s in seq_lens]
    nb = sum(npages) + extra_blocks
    kc = torch.randn(nb, bs, hkv, d, generator=g, device=DEV).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g, device=DEV).to(dtype)
    q = torch.randn(b, hq, d, generator=g, device=DEV).to(dtype)
    perm = torch.randperm(nb, generator=g, device=DEV).int()
    bt = torch.full((b, max(npages)), -1, dtype=torch.int32, device=DEV)
    k = 0
    for i, n in enumerate(npages):
        bt[i, :n] = perm[k:k + n]
        k += n
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, bt, sl


def _rel(out, want):
    return float((out.double() - want.double()).norm() / want.double().norm())


CONFIGS = [  # dtype, Hq, Hkv, D, block_size
    (torch.bfloat16, 32, 8, 128, 16),
    (torch.bfloat16, 32, 8, 128, 64),
    (torch.float16, 16, 2, 128, 32),
    (torch.bfloat16, 8, 8, 64, 16),
    (torch.float16, 16, 4, 64, 64),
    (torch.bfloat16, 16, 2, 64, 32),
    (torch.bfloat16, 32, 8, 128, 128),   # the kernel bench's coarse-page columns
    (torch.bfloat16, 32, 8, 128, 256),
]
SEQS = [(1,), (5000,), (17, 1, 300, 2048, 65), (129, 4096, 33)]


ATTN_VARIANTS = ["mma2", "mma3", "mma2x2", "simt"]


@pytest.mark.parametrize("variant", ATTN_VARIANTS)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seqs", SEQS)
def test_dense_attention(cfg, seqs, variant, monkeypatch):
    monkeypatch.setenv("TINYSERVE_ATTN", variant)
    dtype, hq, hkv, d, bs = cfg
    q, kc, vc, bt, sl = _case(len(seqs), hq, hkv, d, bs, seqs, dtype, seed=hash((cfg, seqs)) % 10_000)
    out = torch.full_like(q, float("nan"))
    ops.paged_decode_attention(q, kc, vc, bt, sl, d ** -0.5, out=out)
    want = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, d ** -0.5)
    assert torch.isfinite(out).all()
    assert _rel(out, want) < 1e-2


def _checked_page_scores(q, kmin, kmax, bt, sl, bs):
    """The CUDA page scores, checked against the reference (same pages live, values close)."""
    s_cuda = ops.page_scores(q, kmin, kmax, bt, sl, bs)
    s_ref = ref.page_scores(q, kmin, kmax, bt, sl, bs)
    live = torch.isfinite(s_ref)
    assert torch.equal(live, torch.isfinite(s_cuda))
    torch.testing.assert_close(s_cuda[live], s_ref[live], rtol=1e-4, atol=1e-3)
    return s_cuda


def _checked_query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget, s_cuda):
    """The CUDA query-aware decode (into a NaN-poisoned output), checked against the reference: the pages
    chosen (ascending, -1 padded, the same score set as the reference's up to ties) and the attention."""
    out = torch.full_like(q, float("nan"))
    _, sel, nsel = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget, out=out)
    rsel, rn = ref.select_pages(s_cuda, sl, bs, budget)
    assert torch.equal(nsel, rn)
    for b in range(sel.shape[0]):
        for h in range(sel.shape[1]):
            n = int(nsel[b, h])
            got = sel[b, h, :n]
            assert torch.equal(got, torch.sort(got).values) and (sel[b, h, n:] == -1).all()
            a = torch.sort(s_cuda[b, h, got.long()]).values
            w = torch.sort(s_cuda[b, h, rsel[b, h, :n].long()]).values
            assert torch.equal(a, w)
    assert torch.isfinite(out).all()
    want = ref.sparse_paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, sel, scale)
    assert _rel(out, want) < 1e-2
    return out


@pytest.mark.parametrize("variant", [("mma", "last"), ("mma3", "fused"), ("mma2", "two_pass"), ("simt", "two_pass"),
                                     ("mma", "coop"), ("mma3", "coop")])
@pytest.mark.parametrize("cfg", CONFIGS[:4] + CONFIGS[-2:])
@pytest.mark.parametrize("budget", [64, 256, 1024, 1 << 20])
def test_query_aware_decode(cfg, budget, variant, monkeypatch):
    monkeypatch.setenv("TINYSERVE_ATTN", variant[0])
    monkeypatch.setenv("TINYSERVE_SELECT", variant[1])
    dtype, hq, hkv, d, bs = cfg
    seqs = (3000, 1, 700, 2 * bs + 1)
    q, kc, vc, bt, sl = _case(len(seqs), hq, hkv, d, bs, seqs, dtype, seed=budget + bs)
    kmin, kmax = kc.amin(1), kc.amax(1)
    scale = d ** -0.5
    s_cuda = _checked_page_scores(q, kmin, kmax, bt, sl, bs)
    out = _checked_query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget, s_cuda)
    if budget >= 1 << 20:   # full budget: bitwise the dense kernel
        dense = ops.paged_decode_attention(q, kc, vc, bt, sl, scale)
        assert torch.equal(out, dense)


@pytest.mark.parametrize("mode", ["fused", "last", "two_pass", "coop"])
@pytest.mark.parametrize("bs", [128, 256])
def test_large_pages_long_rows(bs, mode, monkeypatch):
    """128- and 256-token pages on rows of up to 300 pages (past the 256 pages of the fused mode's regime) in
    every selection mode: page scores, the pages chosen (up to ties) and the sparse attention against the
    reference at the bench's 1/16-of-32k budget, and the full budget bitwise the dense kernel."""
    monkeypatch.setenv("TINYSERVE_SELECT", mode)
    hq, hkv, d = 32, 8, 128
    seqs = (32768 + 5, 1, 700, 2 * bs + 1, 300 * bs - 7)
    q, kc, vc, bt, sl = _case(len(seqs), hq, hkv, d, bs, seqs, torch.bfloat16, seed=bs + len(mode))
    kmin, kmax = kc.amin(1), kc.amax(1)
    scale = d ** -0.5
    s_cuda = _checked_page_scores(q, kmin, kmax, bt, sl, bs)
    for budget in (2048, 1 << 20):
        out = _checked_query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget, s_cuda)
    assert torch.equal(out, ops.paged_decode_attention(q, kc, vc, bt, sl, scale))   # full budget: dense


def test_select_pages_large_row_and_needle():
    torch.manual_seed(1)
    bs = 16
    scores = torch.randn(2, 3, 20000, device=DEV)
    sl = torch.tensor([20000 * bs, 12345 * bs - 3], dtype=torch.int32, device=DEV)
    scores[1, :, 12345:] = float("-inf")
    scores[0, 1, 777] = 1e9                    # needle
    sel, n = ops.select_pages(scores, sl, bs, budget_tokens=128 * bs)
    rsel, rn = ref.select_pages(scores, sl, bs, budget_tokens=128 * bs)
    assert torch.equal(n, rn) and torch.equal(sel, rsel)
    assert 777 in sel[0, 1].tolist()


def _tie_rule_pages(row: list[float], npages: int, k: int, sinks: int = 1) -> list[int]:
    """The kernels' selection rule in plain Python: sinks, the last page, and the best of the others by
    score (NaN lowest), ties to the lowest page index; every page when they fit in k."""
    if npages <= k:
        return list(range(npages))
    cands = sorted(range(sinks, npages - 1), key=lambda p: (math.isnan(row[p]), -row[p] if row[p] == row[p] else 0, p))
    return sorted(list(range(sinks)) + [npages - 1] + cands[: k - sinks - 1])


def test_select_pages_tie_rule():
    """Short and long rows pick exactly the pages of the rule written out in Python, with many ties and a
    NaN (the torch reference leaves ties to torch.topk)."""
    g = torch.Generator(device=DEV).manual_seed(5)
    bs = 16
    for pages in (3, 40, 257, 258, 300, 1000):
        scores = torch.randint(0, 4, (3, 2, pages), generator=g, device=DEV).float()   # many ties
        scores[0, 1, 7 % pages] = float("nan")
        live = [pages, pages, max(1, pages // 2)]
        sl = torch.tensor([n * bs for n in live], dtype=torch.int32, device=DEV)
        scores[2, :, live[2]:] = float("-inf")
        for budget_pages in (2, 5, 33):
            sel, n = ops.select_pages(scores, sl, bs, budget_pages * bs)
            k = min(pages, budget_pages)
            for b in range(3):
                for h in range(2):
                    want = _tie_rule_pages(scores[b, h].tolist(), live[b], k)
                    assert int(n[b, h]) == len(want)
                    assert sel[b, h].tolist() == want + [-1] * (k - len(want)), (pages, budget_pages, b, h)


def test_fused_selection_equals_two_pass(monkeypatch):
    """The one-launch scoring + selection kernels and the one-launch decode pick exactly the pages of
    page_scores + select_pages (same arithmetic), twice in a row (the tickets and barriers reset); the
    outputs are bitwise equal (same split plan)."""
    bs = 16
    seqs = (3000 * bs + 5, 40, 900 * bs)
    q, kc, vc, bt, sl = _case(len(seqs), 32, 8, 128, bs, seqs, torch.bfloat16, seed=11)
    kmin, kmax = kc.amin(1), kc.amax(1)
    got = {}
    for mode in ("last", "fused", "two_pass", "coop"):
        monkeypatch.setenv("TINYSERVE_SELECT", mode)
        for _ in range(2):
            out, sel, nsel = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, 128 ** -0.5, bs, 128 * bs)
        got[mode] = (out, sel, nsel)
    for mode in ("last", "fused", "coop"):
        assert torch.equal(got[mode][1], got["two_pass"][1]) and torch.equal(got[mode][2], got["two_pass"][2])
        assert torch.equal(got[mode][0], got["two_pass"][0])


@pytest.mark.parametrize("splits", [None, "1", "3"])
def test_coop_decode_repeats_and_graph(splits, monkeypatch):
    """The one-launch query-aware decode (rows scoring together behind a barrier) runs: it agrees bitwise with
    the two-launch pipeline over repeated calls and CUDA-graph replays, with one split, an odd split count
    (the barrier's count resets whatever the split count) and the plan's."""
    if splits:
        monkeypatch.setenv("TINYSERVE_SPLITS", splits)
    bs, budget = 64, 1024
    seqs = (9000, 1, 4097, 300)
    q, kc, vc, bt, sl = _case(len(seqs), 32, 8, 128, bs, seqs, torch.bfloat16, seed=31)
    kmin, kmax = kc.amin(1), kc.amax(1)
    monkeypatch.setenv("TINYSERVE_SELECT", "two_pass")
    want = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, 128 ** -0.5, bs, budget)
    monkeypatch.setenv("TINYSERVE_SELECT", "coop")
    for _ in range(3):
        got = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, 128 ** -0.5, bs, budget)
        for a, w in zip(got, want):
            assert torch.equal(a, w)
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, 128 ** -0.5, bs, budget, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, sel, nsel = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, 128 ** -0.5, bs, budget, out=out)
    out.fill_(float("nan"))
    sel.fill_(-7)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want[0]) and torch.equal(sel, want[1]) and torch.equal(nsel, want[2])


def test_coop_decode_leaves_merge_tickets_alone(monkeypatch):
    """The one-launch decode's barriers never touch the split merge's tickets: a larger batch's dense
    attention after it is bitwise what it was before (a barrier's generation left in a ticket made the merge
    start before every split had written)."""
    seqs = (5000,) * 12
    q, kc, vc, bt, sl = _case(len(seqs), 32, 8, 128, 16, seqs, torch.bfloat16, seed=41)
    before = ops.paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5)
    small = (9000, 700)
    q2, kc2, vc2, bt2, sl2 = _case(len(small), 32, 8, 128, 64, small, torch.bfloat16, seed=42)
    monkeypatch.setenv("TINYSERVE_SELECT", "coop")
    for _ in range(3):
        ops.query_aware_decode(q2, kc2, vc2, kc2.amin(1), kc2.amax(1), bt2, sl2, 128 ** -0.5, 64, 1024)
    for _ in range(3):
        assert torch.equal(ops.paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5), before)


@pytest.mark.parametrize("variant", ["mma2", "mma3", "mma2x2"])
def test_fused_split_merge_repeats(variant, monkeypatch):
    """The last-CTA merge resets its tickets: repeated calls (many splits, ragged batch) agree bitwise and
    with the reference, and a CUDA-graph replay gives the same output."""
    monkeypatch.setenv("TINYSERVE_ATTN", variant)
    seqs = (70000, 1, 4097, 300)
    q, kc, vc, bt, sl = _case(len(seqs), 32, 8, 128, 16, seqs, torch.bfloat16, seed=21)
    want = ref.paged_decode_attention(q.double(), kc.double(), vc.double(), bt, sl, 128 ** -0.5)
    first = ops.paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5)
    assert _rel(first, want) < 1e-2
    for _ in range(3):
        assert torch.equal(ops.paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5), first)
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode_attention(q, kc, vc, bt, sl, 128 ** -0.5, out=out)
    out.fill_(float("nan"))
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_page_metadata_exact(dtype):
    bs, nb, hkv, d = 16, 80, 8, 128
    g = torch.Generator(device=DEV).manual_seed(3)
    kmin = torch.randn(nb, hkv, d, generator=g, device=DEV).to(dtype)
    kmax = kmin + 1
    rmin, rmax = kmin.clone(), kmax.clone()
    # prefill of 3 sequences (blocks 0-2 full, 3 partial), padding, then decode steps and a reallocation
    steps = [list(range(0, 3 * bs + 5)) + [-1, -1] + [10 * bs + o for o in range(bs + 2)],
             [3 * bs + 5, 11 * bs + 2, -1],
             [2 * bs + o for o in range(4)] + [20 * bs, 11 * bs + 3]]
    steps.append(list(range(30 * bs + 3, 30 * bs + 3 + 700)))   # a prefill past the small-write path
    for slots in steps:
        s = torch.tensor(slots, dtype=torch.int64, device=DEV)
        key = torch.randn(len(slots), hkv, d, generator=g, device=DEV).to(dtype)
        ops.update_page_metadata(kmin, kmax, key, s, bs)
        ref.update_page_metadata(rmin, rmax, key, s, bs)
    assert torch.equal(kmin, rmin) and torch.equal(kmax, rmax)


@pytest.mark.parametrize("bs", [16, 24])   # block ids by shift, and by division
@pytest.mark.parametrize("hkv,d", [(8, 128), (1, 64), (2, 80), (1, 6)])   # (1, 6): rows of 3 words
def test_update_page_metadata_long_writes_with_padding(hkv, d, bs):
    """Prefill-sized writes (the 16-token chunk path) with padding slots inside, blocks started mid-chunk
    and a block continued across calls, equal to the reference bit for bit."""
    nb = 400
    g = torch.Generator(device=DEV).manual_seed(hkv * d)
    kmin = torch.randn(nb, hkv, d, generator=g, device=DEV).bfloat16()
    kmax = kmin + 1
    rmin, rmax = kmin.clone(), kmax.clone()
    first = [5 * bs + 3 + i if i % 97 else -1 for i in range(2000)]   # starts mid-block, padding inside
    second = [first[-1] + 1 + i for i in range(1000)]                  # continues the last block
    third = [200 * bs + i for i in range(1600)]                         # block-aligned: whole-block chunks
    for slots in (first, second, third):
        s = torch.tensor(slots, dtype=torch.int64, device=DEV)
        key = torch.randn(len(slots), hkv, d, generator=g, device=DEV).bfloat16()
        ops.update_page_metadata(kmin, kmax, key, s, bs)
        ref.update_page_metadata(rmin, rmax, key, s, bs)
    assert torch.equal(kmin, rmin) and torch.equal(kmax, rmax)


def test_copy_blocks_all_caches_one_launch():
    g = torch.Generator(device=DEV).manual_seed(4)
    caches = [torch.randn(64, 16, 8, 128, generator=g, device=DEV).bfloat16() for _ in range(6)]
    caches += [torch.randn(64, 8, 128, generator=g, device=DEV).half(), torch.randn(64, 3, device=DEV)]
    before = [c.clone() for c in caches]
    src = torch.tensor([0, 5, 9, 33, 63], device=DEV)
    dst = torch.tensor([40, 41, 2, 60, 10], device=DEV)
    ops.copy_blocks(caches, src, dst)
    ref.copy_blocks(before, src, dst)
    for c, r in zip(caches, before):
        assert torch.equal(c, r)


@pytest.mark.parametrize("n", [1, 15, 16, 63, 64, 65, 4097, 65536 * 3 + 17, 1_000_003])
def test_free_run_stats(n):
    g = torch.Generator(device=DEV).manual_seed(n)
    for density in (0.0, 0.3, 0.9, 0.99, 1.0):
        used = torch.rand(n, generator=g, device=DEV) < density
        assert ops.free_run_stats(used) == ref.free_run_stats(used.cpu())
        if n > 1:   # a view one byte in: no 16-byte alignment, the byte-load path
            assert ops.free_run_stats(used[1:]) == ref.free_run_stats(used[1:].cpu())


def test_free_run_stats_long_runs():
    """Runs longer than a thread's, a warp's and a CTA's slice, crossing every boundary."""
    n = 65536 * 5 + 300
    used = torch.ones(n, dtype=torch.bool, device=DEV)
    for a, b in ((3, 70), (255, 257), (1000, 9000), (65530, 200000), (n - 100, n)):
        used[a:b] = False
    assert ops.free_run_stats(used) == ref.free_run_stats(used.cpu())
