"""Kernel benchmark: builds, checks and times TinyServe's CUDA kernels against baselines in one run.

Owns the measurement of issue 5: on one card, in one process, it measures the device-to-device copy
bandwidth, then for every grid point (batch x context) times torch SDPA (flash) on contiguous KV,
gather-then-SDPA on the paged layout, the dense paged kernel (16- and 64-token pages) and query-aware
sparse decode at several budgets with 16-, 64-, 128- and 256-token pages (one logical sequence seen through
blocks of each size of the same memory), each checked against the dense result (output error, needle recall).
It also times the page-metadata update, the multi-cache block copy and the free-run analysis against
their torch references. Prints progress lines and a table; writes JSON naming card, torch and commit.

Entry: ``python -m tinyserve.bench.kernels [--quick] [--out PATH]`` or ``main(argv)``. Needs CUDA;
imports neither vLLM nor Ray.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path

from tinyserve.bench import provenance

HQ, HKV, D = 32, 8, 128
VARIANTS = ("mma2", "mma3", "mma2x2", "simt")   # attention kernels timed beside the default (TINYSERVE_ATTN)
# other sparse pipelines timed at the target point (1/16 with 64-, 128- and 256-token pages): name -> environment
SPARSE_VARIANTS = {
    "mma2x2_last": {"TINYSERVE_ATTN": "mma2x2", "TINYSERVE_SELECT": "last"},
    "mma2x2_fused": {"TINYSERVE_ATTN": "mma2x2", "TINYSERVE_SELECT": "fused"},
    "mma2x2_coop": {"TINYSERVE_ATTN": "mma2x2", "TINYSERVE_SELECT": "coop"},
    "mma2_two_pass": {"TINYSERVE_ATTN": "mma2", "TINYSERVE_SELECT": "two_pass"},
    "simt_two_pass": {"TINYSERVE_ATTN": "simt", "TINYSERVE_SELECT": "two_pass"},
}
SPARSE_PAGES = (16, 64, 128, 256)   # page (block) sizes of the sparse rows


class _env:
    """Sets environment variables for the duration of a ``with`` block (kernel variant switches)."""

    def __init__(self, **kv: str) -> None:
        self.kv, self.old = kv, {}

    def __enter__(self) -> None:
        for k, v in self.kv.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc) -> None:
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _say(*a) -> None:
    print(*a, flush=True)


def _bencher():
    """Median time in ms of a callable: triton.testing.do_bench (L2 flushed between runs) or CUDA events."""
    import torch

    try:
        from triton.testing import do_bench

        def run(fn):
            return float(do_bench(fn, warmup=10, rep=60, return_mode="median"))
        return run, "triton.testing.do_bench median, L2 flushed"
    except Exception:  # noqa: BLE001
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

        def run(fn):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(30):
                flush.zero_()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e))
            return float(sorted(ts)[len(ts) // 2])
        return run, "CUDA events median of 30, L2 flushed"


def _graphed(fn):
    """A CUDA-graph replay of ``fn`` (launch overhead out of the timing, as in a CUDA-graph decode step),
    or ``fn`` itself when capture fails."""
    import torch

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        _GRAPHS.append(g)
        return g.replay
    except Exception as e:  # noqa: BLE001
        _say(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)")
        torch.cuda.synchronize()
        return fn


_GRAPHS: list = []


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _copy_bw(bench) -> float:
    import torch

    n = 1 << 30
    x = torch.randn(n // 2, device="cuda").bfloat16()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    del x, y
    return 2 * n / (ms * 1e-3) / 1e9


def _point(bench, b: int, ctx: int, budgets: list[float], copy_gbs: float, rows: list, seed: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinyserve.kernels import ops

    torch.manual_seed(seed)
    dt = torch.bfloat16
    scale = D ** -0.5
    kv_bytes = b * ctx * HKV * D * 2 * 2
    free = torch.cuda.mem_get_info()[0]
    if 2.2 * kv_bytes > free:
        _say(f"skip B={b} ctx={ctx}: needs {2.2 * kv_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} free")
        return
    nb = b * ctx // 16
    kc = torch.randn(nb, 16, HKV, D, device="cuda", dtype=dt)
    vc = torch.randn(nb, 16, HKV, D, device="cuda", dtype=dt)
    q = torch.randn(b, HQ, D, device="cuda", dtype=dt)
    # one logical sequence seen through 256-, 128-, 64- and 16-token blocks of the same memory
    p256, p128, p64 = ctx // 256, ctx // 128, ctx // 64
    bt256 = torch.randperm(nb // 16, device="cuda").view(b, p256).int()
    bt128 = (2 * bt256.repeat_interleave(2, dim=1) + torch.arange(2, device="cuda").repeat(p256)).int()
    bt64 = (2 * bt128.repeat_interleave(2, dim=1) + torch.arange(2, device="cuda").repeat(p128)).int()
    bt16 = (4 * bt64.repeat_interleave(4, dim=1) + torch.arange(4, device="cuda").repeat(p64)).int()
    sl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    # plant one needle per (sequence, KV head): a key 3x the norm of a random key along the group's query
    qsum = q.float().view(b, HKV, HQ // HKV, D).sum(2)
    needle = (3 * math.sqrt(D) * qsum / qsum.norm(dim=-1, keepdim=True)).to(dt)
    # never in a forced page (the first and the last page) at any page size up to 256 tokens
    pos = torch.randint(256, ctx - 256, (b, HKV), device="cuda")
    blk = torch.gather(bt16.long(), 1, pos // 16)
    kc[blk, pos % 16, torch.arange(HKV, device="cuda").expand(b, HKV)] = needle
    kc64, vc64 = kc.view(nb // 4, 64, HKV, D), vc.view(nb // 4, 64, HKV, D)
    kc128, vc128 = kc.view(nb // 8, 128, HKV, D), vc.view(nb // 8, 128, HKV, D)
    kc256, vc256 = kc.view(nb // 16, 256, HKV, D), vc.view(nb // 16, 256, HKV, D)
    meta = {16: (kc.amin(1), kc.amax(1), kc, vc, bt16), 64: (kc64.amin(1), kc64.amax(1), kc64, vc64, bt64),
            128: (kc128.amin(1), kc128.amax(1), kc128, vc128, bt128),
            256: (kc256.amin(1), kc256.amax(1), kc256, vc256, bt256)}
    base = {"B": b, "context": ctx}

    def record(name, ms, nbytes, **extra):
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = {**base, "kernel": name, "ms": ms, "bytes": nbytes, "GBps": gbs, "copy_ratio": gbs / copy_gbs,
               **extra}
        rows.append(row)
        _say(f"  B={b:<3d} ctx={ctx:<7d} {name:<28s} {ms * 1e3:9.1f} us {gbs:8.0f} GB/s "
             f"{gbs / copy_gbs:5.2f}x copy " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                       for k, v in extra.items()))

    dense16 = ops.paged_decode_attention(q, kc, vc, bt16, sl, scale)
    torch.cuda.synchronize()
    record("dense_paged_bs16", bench(_graphed(lambda: ops.paged_decode_attention(q, kc, vc, bt16, sl, scale))),
           kv_bytes, eager_ms=bench(lambda: ops.paged_decode_attention(q, kc, vc, bt16, sl, scale)),
           variant=ops._attn_variant())
    for variant in VARIANTS:   # the other attention kernels, same inputs
        with _env(TINYSERVE_ATTN=variant):
            o = ops.paged_decode_attention(q, kc, vc, bt16, sl, scale)
            record(f"dense_paged_bs16_{variant}",
                   bench(_graphed(lambda: ops.paged_decode_attention(q, kc, vc, bt16, sl, scale))), kv_bytes,
                   err_vs_default=_rel(o, dense16))
    dense64 = ops.paged_decode_attention(q, kc64, vc64, bt64, sl, scale)
    record("dense_paged_bs64", bench(_graphed(lambda: ops.paged_decode_attention(q, kc64, vc64, bt64, sl, scale))),
           kv_bytes, err_vs_bs16=_rel(dense64, dense16))

    q4 = q.view(b, HKV, HQ // HKV, D)

    def gather_sdpa():
        k = kc[bt16.long()].view(b, ctx, HKV, D).transpose(1, 2)
        v = vc[bt16.long()].view(b, ctx, HKV, D).transpose(1, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k, v, scale=scale)

    try:
        out = gather_sdpa().reshape(b, HQ, D)
        record("gather_then_sdpa", bench(_graphed(gather_sdpa)), 3 * kv_bytes, err_vs_dense=_rel(out, dense16))
    except torch.OutOfMemoryError:
        _say(f"  B={b} ctx={ctx} gather_then_sdpa: out of memory, skipped")
    torch.cuda.empty_cache()
    try:
        kcont = kc[bt16.long()].view(b, ctx, HKV, D).transpose(1, 2).contiguous()
        vcont = vc[bt16.long()].view(b, ctx, HKV, D).transpose(1, 2).contiguous()

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q4, kcont, vcont, scale=scale)

        out = sdpa().reshape(b, HQ, D)
        sdpa_ms = bench(_graphed(sdpa))
        record("sdpa_contiguous", sdpa_ms, kv_bytes, err_vs_dense=_rel(out, dense16))
        del kcont, vcont
    except torch.OutOfMemoryError:
        sdpa_ms = float("nan")
        _say(f"  B={b} ctx={ctx} sdpa_contiguous: out of memory, skipped")
    torch.cuda.empty_cache()
    for r in rows:
        if r["B"] == b and r["context"] == ctx:
            r["speedup_vs_sdpa"] = sdpa_ms / r["ms"]

    for bs in SPARSE_PAGES:
        kmin, kmax, kcb, vcb, btb = meta[bs]
        npages = ctx // bs
        meta_bytes = b * HKV * npages * 2 * D * 2
        for frac in budgets:
            budget = int(ctx * frac)

            def sparse():
                return ops.query_aware_decode(q, kcb, vcb, kmin, kmax, btb, sl, scale, bs, budget)

            out, sel, nsel = sparse()
            ms = bench(_graphed(sparse))
            pages = int(nsel.sum())
            nbytes = pages * bs * D * 2 * 2 + meta_bytes
            hit = (sel.long() == (pos // bs).unsqueeze(-1)).any(-1).float().mean()
            record(f"sparse_bs{bs}_1/{round(1 / frac)}", ms, nbytes, speedup_vs_sdpa=sdpa_ms / ms,
                   eager_ms=bench(sparse),
                   err_vs_dense=_rel(out, dense16), needle_recall=float(hit), budget_tokens=budget)
            if bs >= 64 and round(1 / frac) == 16:   # other pipelines at the target point, same inputs
                for vname, env in SPARSE_VARIANTS.items():
                    with _env(**env):
                        o2, _, _ = sparse()
                        ms2 = bench(_graphed(sparse))
                    record(f"sparse_bs{bs}_1/16_{vname}", ms2, nbytes, speedup_vs_sdpa=sdpa_ms / ms2,
                           err_vs_default=_rel(o2, out))
                # the pipeline's stages timed alone
                ms_sc = bench(_graphed(lambda: ops.page_scores(q, kmin, kmax, btb, sl, bs)))
                record(f"stage_page_scores_bs{bs}", ms_sc, meta_bytes)
                scores = ops.page_scores(q, kmin, kmax, btb, sl, bs)
                ms_sel = bench(_graphed(lambda: ops.select_pages(scores, sl, bs, budget)))
                record(f"stage_select_pages_bs{bs}_1/16", ms_sel, scores.numel() * 4)
                cnt = ops._counters(b * HKV, q.device)
                ms_last = bench(_graphed(lambda: ops._score_select_last(q, kmin, kmax, btb, sl, bs, budget, 1, cnt)))
                record(f"stage_score_select_last_bs{bs}_1/16", ms_last, meta_bytes)
                ms_att = bench(_graphed(lambda: ops.sparse_paged_decode_attention(
                    q, kcb, vcb, btb, sl, sel, scale, num_selected=nsel)))
                record(f"stage_attention_bs{bs}_1/16", ms_att, nbytes - meta_bytes)
    del kc, vc, meta, kc64, vc64, kc128, vc128, kc256, vc256
    _GRAPHS.clear()
    torch.cuda.empty_cache()


def _side_kernels(bench, copy_gbs: float, rows: list) -> None:
    import torch

    from tinyserve.kernels import ops, reference

    def record(name, ms, nbytes, **extra):
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({"kernel": name, "ms": ms, "bytes": nbytes, "GBps": gbs, "copy_ratio": gbs / copy_gbs,
                     **extra})
        _say(f"  {name:<40s} {ms * 1e3:9.1f} us {gbs:8.0f} GB/s {gbs / copy_gbs:5.2f}x copy "
             + " ".join(f"{k}={v}" for k, v in extra.items()))

    # metadata update: a 32k-token prefill into 2048 blocks of 16, and a 256-token decode step
    dt = torch.bfloat16
    nb = 65536
    kmin = torch.randn(nb, HKV, D, device="cuda", dtype=dt)
    kmax = kmin + 1
    for t, name in ((32768, "prefill32k"), (256, "decode256")):
        key = torch.randn(t, HKV, D, device="cuda", dtype=dt)
        if t > 256:
            slots = torch.arange(t, device="cuda") + 16 * 1000
        else:
            slots = torch.randperm(nb, device="cuda")[:t] * 16 + torch.randint(0, 16, (t,), device="cuda")
        a, b_ = kmin.clone(), kmax.clone()
        ops.update_page_metadata(a, b_, key, slots, 16)
        ra, rb = kmin.clone(), kmax.clone()
        reference.update_page_metadata(ra, rb, key, slots, 16)
        exact = bool(torch.equal(a, ra) and torch.equal(b_, rb))
        touched = len(set((slots // 16).tolist()))
        nbytes = t * HKV * D * 2 + touched * HKV * D * 2 * 2 * 2
        record(f"metadata_update_{name}", bench(_graphed(lambda: ops.update_page_metadata(a, b_, key, slots, 16))),
               nbytes, exact=exact,
               torch_ref_ms=bench(lambda: reference.update_page_metadata(ra, rb, key, slots, 16)))
    del kmin, kmax
    # block copy: 1024 blocks across 32 layers x (K, V) in one launch
    layers, nbk = 32, 2048
    caches = [torch.randn(nbk, 16, HKV, D, device="cuda", dtype=dt) for _ in range(2 * layers)]
    perm = torch.randperm(nbk, device="cuda")
    src, dst = perm[:1024], perm[1024:2048]
    want = [c.clone() for c in caches[:2]]
    reference.copy_blocks(want, src, dst)
    ops.copy_blocks(caches, src, dst)
    exact = all(torch.equal(c, w) for c, w in zip(caches[:2], want))
    nbytes = 2 * 1024 * 2 * layers * 16 * HKV * D * 2
    record("copy_blocks_1024x64caches", bench(lambda: ops.copy_blocks(caches, src, dst)), nbytes, exact=exact,
           torch_ref_ms=bench(lambda: reference.copy_blocks(caches, src, dst)))
    del caches, want
    # free-run analysis of a 16M- and a 256M-block bitmap
    for n, name in ((16 << 20, "16M"), (256 << 20, "256M")):
        used = torch.rand(n, device="cuda") < 0.7
        ok = ops.free_run_stats(used) == reference.free_run_stats(used)
        record(f"free_run_stats_{name}", bench(_graphed(lambda: ops.free_run_stats_device(used))), n, exact=ok,
               torch_ref_ms=bench(lambda: reference.free_run_stats(used)))
        del used
    torch.cuda.empty_cache()


def _table(rows: list) -> str:
    lines = [f"{'B':>3} {'ctx':>7} {'kernel':<24} {'us':>9} {'GB/s':>7} {'xcopy':>6} {'vsSDPA':>7} "
             f"{'err':>8} {'needle':>6}"]
    for r in rows:
        if "B" not in r:
            continue
        lines.append(f"{r['B']:>3} {r['context']:>7} {r['kernel']:<24} {r['ms'] * 1e3:9.1f} {r['GBps']:7.0f} "
                     f"{r['copy_ratio']:6.2f} {r.get('speedup_vs_sdpa', float('nan')):7.2f} "
                     f"{r.get('err_vs_dense', float('nan')):8.4f} {r.get('needle_recall', float('nan')):6.2f}")
    for r in rows:
        if "B" not in r:
            lines.append(f"    {r['kernel']:<40} {r['ms'] * 1e3:9.1f} us {r['GBps']:7.0f} GB/s "
                         f"{r['copy_ratio']:5.2f}x copy  torch ref {r.get('torch_ref_ms', 0) * 1e3:9.1f} us "
                         f"exact={r.get('exact')}")
    return "\n".join(lines)


def _plot(rows: list, card: str, copy_gbs: float, path: str) -> str | None:
    """Speed-up over SDPA (contiguous KV) of dense paged and query-aware decode per grid point (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    points = sorted({(r["B"], r["context"]) for r in rows if "B" in r})
    names = ["dense_paged_bs16", "sparse_bs16_1/16", "sparse_bs64_1/16", "sparse_bs128_1/16", "sparse_bs256_1/16",
             "sparse_bs64_1/32"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [next((r.get("speedup_vs_sdpa", float("nan")) for r in rows
                    if r.get("B") == b and r.get("context") == c and r["kernel"] == name), float("nan"))
              for b, c in points]
        ax.bar([x + i * width for x in range(len(points))], ys, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(points))])
    ax.set_xticklabels([f"B={b}\n{c // 1024}k" for b, c in points])
    ax.set_ylabel("speed-up over SDPA (flash, contiguous KV)")
    ax.set_yscale("log")
    ax.set_title(f"{card}: paged decode, Hq=32 Hkv=8 D=128 bf16 (copy {copy_gbs:.0f} GB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _method_note(method: str) -> str:
    return method + "; kernels and baselines timed as CUDA-graph replays (eager_ms: plain calls)"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code (1 when CUDA is missing)."""
    ap = argparse.ArgumentParser(prog="tinyserve bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid (B 1,8; context 4k,32k; budget 1/16)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--budgets", default="32,16,8", help="budget denominators: 1/N of the context")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<card>-<date>.json)")
    ap.add_argument("--no-side", action="store_true", help="skip metadata/copy/free-run kernels")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        _say("tinyserve bench kernels: needs a CUDA device")
        return 1
    from tinyserve.kernels import loader

    if not loader.available():
        _say("tinyserve bench kernels: needs CuPy (cupy-cuda13x)")
        return 1
    batches = [1, 8] if args.quick else [int(x) for x in args.batches.split(",")]
    contexts = [4096, 32768] if args.quick else [int(x) for x in args.contexts.split(",")]
    budgets = [1 / 16] if args.quick else [1 / int(x) for x in args.budgets.split(",")]
    bench, method = _bencher()
    card = torch.cuda.get_device_name()
    _say(f"card {card}, torch {torch.__version__}, timing: {method}")
    copy_gbs = _copy_bw(bench)
    _say(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows: list = []
    result = {
        "card": card, "torch": torch.__version__, "commit": provenance.commit(), "timing": _method_note(method),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "sms": torch.cuda.get_device_properties(0).multi_processor_count},
        "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16"}, "copy_GBps": copy_gbs,
        "default_attention": __import__("tinyserve.kernels.ops", fromlist=["ops"])._attn_variant(),
        "rows": rows, "complete": False,
    }
    out = args.out or (f"benchmarks/results/kernels-{card.replace(' ', '_')}-"
                       f"{_dt.date.today().isoformat()}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for b in batches:
        for ctx in contexts:
            _point(bench, b, ctx, budgets, copy_gbs, rows, seed=b * 7 + ctx)
            Path(out).write_text(json.dumps(result, indent=1))   # partial results survive a time limit
    if not args.no_side:
        _side_kernels(bench, copy_gbs, rows)
    table = _table(rows)
    _say(table)
    result["complete"] = True
    Path(out).write_text(json.dumps(result, indent=1))
    _say(f"wrote {out}")
    png = _plot(rows, card, copy_gbs, str(Path(out).with_suffix(".png")))
    if png:
        _say(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
