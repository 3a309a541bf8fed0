"""CPU tests of tinyserve.kernels.reference, the specification the CUDA kernels are checked against."""

import math

import pytest
import torch

from tinyserve.kernels import reference as ref


def _paged_case(b=3, hq=8, hkv=2, d=32, bs=16, seq_lens=(70, 16, 5), num_blocks=40, dtype=torch.float32,
                seed=0):
    """Random paged KV with shuffled block tables and exact page metadata."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    maxp = int(ref.num_pages_of(sl, bs).max())
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((b, maxp), -1, dtype=torch.int32)
    k = 0
    for i, s in enumerate(seq_lens):
        n = math.ceil(s / bs)
        bt[i, :n] = perm[k:k + n].int()
        k += n
    kmin = kc.amin(1)
    kmax = kc.amax(1)
    return q, kc, vc, kmin, kmax, bt, sl


def test_full_budget_equals_dense_exactly():
    q, kc, vc, kmin, kmax, bt, sl = _paged_case()
    scale = 32 ** -0.5
    dense = ref.paged_decode_attention(q, kc, vc, bt, sl, scale)
    out, sel, nsel = ref.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, 16, budget_tokens=10_000)
    assert torch.equal(out, dense)
    assert nsel.tolist() == [[5, 5], [1, 1], [1, 1]]


def test_dense_matches_naive_softmax():
    q, kc, vc, kmin, kmax, bt, sl = _paged_case(dtype=torch.float64)
    scale = 0.3
    out = ref.paged_decode_attention(q, kc, vc, bt, sl, scale)
    for b in range(q.shape[0]):
        n = int(sl[b])
        blocks = bt[b, : math.ceil(n / 16)].long()
        keys = kc[blocks].reshape(-1, 2, 32)[:n]
        vals = vc[blocks].reshape(-1, 2, 32)[:n]
        for h in range(8):
            kh = h // 4
            p = torch.softmax(keys[:, kh] @ q[b, h] * scale, 0)
            torch.testing.assert_close(out[b, h], p @ vals[:, kh])


def test_page_scores_match_definition():
    q, kc, vc, kmin, kmax, bt, sl = _paged_case()
    s = ref.page_scores(q, kmin, kmax, bt, sl, 16)
    b, h, p = 0, 1, 3
    blk = int(bt[b, p])
    qg = q[b, 4:8]
    want = torch.maximum(qg * kmin[blk, h], qg * kmax[blk, h]).sum()
    torch.testing.assert_close(s[b, h, p], want, rtol=1e-5, atol=1e-4)
    assert torch.isinf(s[1, :, 1:]).all() and (s[1, :, 1:] < 0).all()
    # an upper bound of every key's q.k in the page
    keys = kc[blk, :, h]
    assert ((qg @ keys.T).sum(0) <= s[b, h, p] + 1e-4).all()


def test_select_pages_sinks_last_and_budget():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 20)
    sl = torch.tensor([20 * 16 - 3, 5 * 16], dtype=torch.int32)
    scores[1, :, 5:] = float("-inf")
    sel, n = ref.select_pages(scores, sl, 16, budget_tokens=6 * 16, num_sink_pages=1)
    assert sel.shape == (2, 3, 6) and sel.dtype == torch.int32
    assert n.tolist() == [[6, 6, 6], [5, 5, 5]]
    for h in range(3):
        row = sel[0, h].tolist()
        assert row == sorted(row) and row[0] == 0 and row[-1] == 19
        middle = scores[0, h, 1:19]
        best = set((torch.topk(middle, 4).indices + 1).tolist())
        assert set(row[1:-1]) == best
        assert sel[1, h].tolist() == [0, 1, 2, 3, 4, -1]


def test_planted_needle_always_selected():
    bs, hkv, hq, d = 16, 2, 8, 32
    for seed in range(5):
        q, kc, vc, kmin, kmax, bt, sl = _paged_case(b=2, hq=hq, hkv=hkv, d=d, bs=bs, seq_lens=(400, 333),
                                                    num_blocks=60, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        for b in range(2):
            npg = math.ceil(int(sl[b]) / bs)
            for h in range(hkv):
                page = int(torch.randint(1, npg - 1, (1,), generator=g))
                blk = int(bt[b, page])
                kc[blk, 3, h] = 8 * q[b, h * 4:(h + 1) * 4].sum(0)     # dominant q.k
        kmin, kmax = kc.amin(1), kc.amax(1)
        out, sel, _ = ref.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, d ** -0.5, bs, budget_tokens=64)
        for b in range(2):
            for h in range(hkv):
                blocks = set(bt[b, sel[b, h][sel[b, h] >= 0].long()].tolist())
                hit = [p for p in range(bt.shape[1]) if (kc[int(bt[b, p]), 3, h] ==
                       8 * q[b, h * 4:(h + 1) * 4].sum(0)).all()]
                assert int(bt[b, hit[0]]) in blocks


def test_error_decreases_with_budget():
    bs = 16
    q, kc, vc, kmin, kmax, bt, sl = _paged_case(b=2, hq=8, hkv=2, d=64, bs=bs, seq_lens=(1024, 900),
                                                num_blocks=140, seed=3)
    # make attention peaked and keys page-local, as in real models
    kc = kc + 2.0 * torch.randn(kc.shape[0], 1, kc.shape[2], kc.shape[3])
    kmin, kmax = kc.amin(1), kc.amax(1)
    dense = ref.paged_decode_attention(q, kc, vc, bt, sl, 64 ** -0.5)
    errs = []
    for budget in (64, 128, 256, 512, 1024):
        out, _, _ = ref.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, 64 ** -0.5, bs, budget)
        errs.append(float((out - dense).norm() / dense.norm()))
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] == 0.0 and errs[0] > errs[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_metadata_exact_after_writes_with_resets(dtype):
    bs, nb, hkv, d = 8, 6, 2, 4
    g = torch.Generator().manual_seed(1)
    kmin = torch.zeros(nb, hkv, d, dtype=dtype)
    kmax = torch.zeros(nb, hkv, d, dtype=dtype)
    cache = torch.zeros(nb, bs, hkv, d, dtype=dtype)
    fill = [0] * nb                                       # tokens written per block by its current owner

    def write(blocks_offsets):
        slots = torch.tensor([b * bs + o if b >= 0 else -1 for b, o in blocks_offsets], dtype=torch.long)
        key = torch.randn(len(blocks_offsets), hkv, d, generator=g).to(dtype)
        for i, (b, o) in enumerate(blocks_offsets):
            if b >= 0:
                cache[b, o] = key[i]
                fill[b] = o + 1
        ref.update_page_metadata(kmin, kmax, key, slots, bs)

    write([(0, o) for o in range(5)] + [(-1, 0)] + [(2, o) for o in range(8)] + [(3, 0)])   # prefill
    write([(0, 5), (3, 1), (-1, 0)])                                                        # decode
    write([(2, o) for o in range(3)] + [(4, 0), (4, 1)])                                    # block 2 reused
    write([(0, 6), (2, 3), (3, 2)])
    for b in (0, 2, 3, 4):
        live = cache[b, : fill[b]]
        assert torch.equal(kmin[b], live.amin(0)), b
        assert torch.equal(kmax[b], live.amax(0)), b


def test_copy_blocks_all_caches():
    a = torch.arange(6 * 3, dtype=torch.float32).view(6, 3)
    b = torch.arange(6 * 2 * 2).view(6, 2, 2)
    a0, b0 = a.clone(), b.clone()
    ref.copy_blocks([a, b], torch.tensor([0, 1, 5]), torch.tensor([1, 2, 4]))
    for t, t0 in ((a, a0), (b, b0)):
        assert torch.equal(t[1], t0[0]) and torch.equal(t[2], t0[1]) and torch.equal(t[4], t0[5])
        assert torch.equal(t[0], t0[0]) and torch.equal(t[3], t0[3]) and torch.equal(t[5], t0[5])


@pytest.mark.parametrize(
    "bits,starts,lengths",
    [
        ("0000", [0], [4]),
        ("1111", [], []),
        ("0110010001", [0, 3, 6], [1, 2, 3]),
        ("1000000110", [1, 9], [6, 1]),
        ("", [], []),
    ],
)
def test_free_runs_known_bitmaps(bits, starts, lengths):
    used = torch.tensor([c == "1" for c in bits], dtype=torch.bool)
    s, n = ref.free_runs(used)
    assert s.tolist() == starts and n.tolist() == lengths
    st = ref.free_run_stats(used)
    assert st == {"num_free": sum(lengths), "num_runs": len(starts), "largest_run": max(lengths, default=0)}
