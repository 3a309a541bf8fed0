"""The query-aware decode pipeline at one grid point, for a profiler (Nsight Compute) on the GPU machine.

Builds the kernel benchmark's inputs for one (B, context) with 64-token pages (`--block-size`) and runs the
default sparse pipeline (page scores, selection, split-K attention) `--repeats` times, then the dense paged
kernel once as a reference. Usage on the device:

    ncu --clock-control none -k regex:"page_scores|select_pages|paged_decode" --launch-skip 3 \
        --launch-count 4 --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python3 benchmarks/kernel_profile.py --batch 8 --context 32768
"""

from __future__ import annotations

import argparse
import math

import torch

from tinyserve.kernels import ops

HQ, HKV, D = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=float, default=1 / 16, help="fraction of the context")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=64, help="tokens a page (a power of two)")
    ap.add_argument("--sweep-splits", default="", help="comma-separated split counts to time (TINYSERVE_SPLITS)")
    ap.add_argument("--layout-probe", action="store_true",
                    help="time the sparse attention alone with per-KV-head pages and with KV head 0's pages "
                         "shared by all heads (same bytes, whole token rows of the cache)")
    args = ap.parse_args()
    b, ctx, bs = args.batch, args.context, args.block_size
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = ctx // bs
    nb = b * pages * 2
    kc = torch.randn(nb, bs, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(nb, bs, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bt = torch.randperm(nb, device="cuda", generator=g)[: b * pages].view(b, pages).int()
    sl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    kmin, kmax = kc.amin(1), kc.amax(1)
    scale, budget = 1 / math.sqrt(D), int(ctx * args.budget)
    for _ in range(args.repeats):
        ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget)
    ops.paged_decode_attention(q, kc, vc, bt, sl, scale)
    torch.cuda.synchronize()
    print(f"B={b} context={ctx} pages={pages} of {bs} tokens budget={budget} tokens: done")
    if args.sweep_splits:
        _sweep_splits(args, q, kc, vc, kmin, kmax, bt, sl, scale, budget)
    if args.layout_probe:
        _layout_probe(q, kc, vc, kmin, kmax, bt, sl, scale, budget, bs)


def _layout_probe(q, kc, vc, kmin, kmax, bt, sl, scale, budget, bs) -> None:
    """Sparse attention alone (CUDA-graph replays, L2 flushed) over each KV head's own pages, and over KV
    head 0's pages for every head: the same bytes, but then the heads of one token (interleaved in vLLM's
    [blocks, block_size, Hkv, D] layout) are read together instead of 256-byte pieces 2 KB apart."""
    from tinyserve.bench.kernels import _bencher, _graphed

    bench, how = _bencher()
    _, sel, nsel = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget)
    shared_sel = sel[:, :1].expand_as(sel).contiguous()
    shared_n = nsel[:, :1].expand_as(nsel).contiguous()
    nbytes = int(nsel.sum()) * bs * D * 2 * 2
    print(f"timing: {how}; {nbytes / 1e6:.1f} MB of K/V read either way")
    for name, s, n in (("per-KV-head pages", sel, nsel), ("head 0's pages for all", shared_sel, shared_n)):
        ms = bench(_graphed(lambda: ops.sparse_paged_decode_attention(q, kc, vc, bt, sl, s, scale, num_selected=n)))
        print(f"{name:<24s} {ms * 1e3:7.1f} us  {nbytes / (ms * 1e-3) / 1e9:7.0f} GB/s")


def _sweep_splits(args, q, kc, vc, kmin, kmax, bt, sl, scale, budget) -> None:
    """Times the sparse pipeline and its attention alone (CUDA-graph replays, L2 flushed) per split count."""
    import os

    from tinyserve.bench.kernels import _bencher, _graphed

    bench, how = _bencher()
    bs = args.block_size
    os.environ.pop("TINYSERVE_SPLITS", None)
    _, sel, nsel = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget)
    minb = ops._mma_shape(ops._attn_variant())[0] if ops._attn_variant().startswith("mma") else 0
    plan = ops.plan_splits_mma(q.shape[0] * HKV, sel.shape[-1], bs, minb * torch.cuda.get_device_properties(
        0).multi_processor_count) if minb else "n/a"
    print(f"timing: {how}; planned (splits, pages a split) of {ops._attn_variant()}: {plan}")
    for splits in ["plan"] + args.sweep_splits.split(","):
        if splits == "plan":
            os.environ.pop("TINYSERVE_SPLITS", None)
        else:
            os.environ["TINYSERVE_SPLITS"] = splits
        _, sel, nsel = ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget)
        pipeline = bench(_graphed(lambda: ops.query_aware_decode(q, kc, vc, kmin, kmax, bt, sl, scale, bs, budget)))
        attention = bench(_graphed(lambda: ops.sparse_paged_decode_attention(q, kc, vc, bt, sl, sel, scale,
                                                                              num_selected=nsel)))
        print(f"splits={splits:>5s} pipeline {pipeline * 1e3:7.1f} us  attention {attention * 1e3:7.1f} us")
    os.environ.pop("TINYSERVE_SPLITS", None)


if __name__ == "__main__":
    main()
