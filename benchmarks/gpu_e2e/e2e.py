"""End-to-end GPU benchmark: stock vLLM against TinyServe-patched vLLM, same card, same run.

Runs on the GPU machine after `install.sh` (vLLM 0.26 wheels under /root/site, TinyServe's plugin
registered). Each `run` starts one engine in this process with dummy weights (`load_format="dummy"`) on a
config of the named shape, and writes one JSON part; `report` merges parts into the results JSON, prints
the table and draws the PNG. Workloads:

- long: long-context decode. Per context (32k, 64k, 128k by default) a batch of requests with random
  prompts is prefilled once (measured: prefill time), then the same prompts run again with `decode_tokens`
  output tokens (the prompts hit the prefix cache, so this run is decode). Decode: inter-token latency =
  median over requests of (last − first token time) / (tokens − 1) from vLLM's request stats, decode
  throughput = batch / ITL. The batch is sized from the KV capacity vLLM reports (same for both engines).
  TinyServe: allocator + query-aware selection through the CUDA kernels at a fixed token budget
  (`--budget-tokens`, 1/16 of 64k by default; its fraction of each context is reported).
- chat: shared-prefix multi-turn chat. Conversations share a few long system prompts; each turn appends a
  user message to the conversation so far (history included) and all conversations' turns are submitted
  together. Throughput (generated and total tokens / wall time), TTFT (vLLM's first-token latency),
  prefix hit rate (cached prompt tokens / prompt tokens), runs per request, free-space scatter and
  token-slot utilisation (sampled in the engine core by kv_sampler for either pool). TinyServe: allocator
  only (contexts here are below any selection budget).

Usage: python benchmarks/gpu_e2e/e2e.py run --workload long --engine stock --out part.json
       python benchmarks/gpu_e2e/e2e.py report --parts a.json b.json ... --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "MODEL_SHAPES", "write_model_config", "variant"]

MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B's shape (Meta-Llama-3-8B config.json), no weights.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # A ~1B Llama of the same head layout, for quick runs.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000, rope_theta=500000.0),
}


def write_model_config(directory: Path, shape: str, max_positions: int) -> Path:
    """A HF Llama config.json of the named shape (dummy weights need no checkpoint)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
               max_position_embeddings=max_positions, torch_dtype="bfloat16", tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, attention_bias=False, mlp_bias=False, rope_scaling=None,
               **MODEL_SHAPES[shape])
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return directory


def _engine_settings(engine: str, workload: str, budget_tokens: int) -> str:
    from tinyserve.engine.settings import EngineSettings, SelectionSettings

    if engine == "stock":
        return EngineSettings(enabled=False).model_dump_json()
    selection = SelectionSettings()
    if workload == "long":
        selection = SelectionSettings(enabled=True, budget_tokens=budget_tokens, min_context_tokens=0,
                                      exempt_layers=[0, 1], num_sink_pages=1)
    return EngineSettings(selection=selection).model_dump_json()


def _utility(llm: Any, name: str) -> Any:
    try:
        return llm.llm_engine.engine_core.call_utility(name)
    except Exception as exc:  # noqa: BLE001 - stock engines lack TinyServe's utilities
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def _make_llm(args: argparse.Namespace, max_model_len: int, block_size: int, capture: list[int]) -> Any:
    from vllm import LLM

    model_dir = write_model_config(Path(args.work) / args.model, args.model, max_model_len)
    return LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
               max_model_len=max_model_len, block_size=block_size, gpu_memory_utilization=args.gpu_mem,
               enable_prefix_caching=True, max_num_seqs=max(capture), max_num_batched_tokens=args.chunk,
               disable_log_stats=False, seed=0,
               compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                   "cudagraph_capture_sizes": capture})


def _prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]} for _ in range(n)]


def _itl(outputs: list[Any]) -> tuple[float, list[float]]:
    per = []
    for o in outputs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        if m is not None and n > 1 and m.last_token_ts > m.first_token_ts:
            per.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    return (statistics.median(per) if per else float("nan")), per


def run_long(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    contexts = [int(c) for c in args.contexts.split(",")]
    block = 64
    max_len = max(contexts) + args.decode_tokens + block
    capture = [1, 2, 4, 8, 16]
    llm = _make_llm(args, max_len, block, capture)
    cache = llm.llm_engine.vllm_config.cache_config
    capacity_tokens = int(cache.num_gpu_blocks) * block
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    rng = random.Random(0)
    rows = []
    for ctx in contexts:
        per_req = ctx + args.decode_tokens + 2 * block
        batch = max(1, min(max(capture), int(0.9 * capacity_tokens) // per_req, args.max_batch))
        prompts = _prompts(rng, batch, ctx, vocab)
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False), use_tqdm=False)
        prefill_s = time.perf_counter() - t0
        sp = SamplingParams(max_tokens=args.decode_tokens + 1, ignore_eos=True, detokenize=False, temperature=0)
        t1 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t1
        itl, per = _itl(outs)
        row = dict(context=ctx, batch=batch, prefill_s=prefill_s, decode_wall_s=wall, itl_ms=1e3 * itl,
                   itl_ms_per_request=[1e3 * x for x in per], decode_tokens_per_s=batch / itl,
                   wall_tokens_per_s=batch * args.decode_tokens / wall,
                   cached_prompt_tokens=[o.num_cached_tokens for o in outs],
                   first_tokens=[list(o.outputs[0].token_ids[:16]) for o in outs[:2]],
                   budget_fraction=(args.budget_tokens / ctx) if args.engine != "stock" else None)
        rows.append(row)
        print(f"[long {args.engine}] ctx={ctx} B={batch} prefill={prefill_s:.1f}s ITL={row['itl_ms']:.2f}ms "
              f"decode={row['decode_tokens_per_s']:.0f} tok/s wall={row['wall_tokens_per_s']:.0f} tok/s",
              flush=True)
    stats = _utility(llm, "tinyserve_stats")
    return dict(workload="long", capacity_tokens=capacity_tokens, block_size=block, rows=rows,
                tinyserve_stats=stats)


def run_chat(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    block = 16
    capture = [1, 2, 4, 8, 16, 32, 64, 128]
    llm = _make_llm(args, args.chat_max_len, block, capture)
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    rng = random.Random(1)
    systems = [[rng.randrange(3, vocab) for _ in range(args.system_tokens)] for _ in range(args.num_systems)]
    history = [list(systems[i % args.num_systems]) for i in range(args.conversations)]
    _utility(llm, "tinyserve_e2e_kv")             # clear samples of the warm-up
    turns = []
    t_all = time.perf_counter()
    for turn in range(args.turns):
        prompts, params = [], []
        for h in history:
            h.extend(rng.randrange(3, vocab) for _ in range(rng.randint(64, 512)))
            prompts.append({"prompt_token_ids": list(h)})
            params.append(SamplingParams(max_tokens=rng.randint(64, 256), ignore_eos=True, detokenize=False))
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        cached = sum(o.num_cached_tokens for o in outs)
        ttft = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
        for h, o in zip(history, outs):
            h.extend(o.outputs[0].token_ids)
        turns.append(dict(turn=turn, requests=len(outs), wall_s=wall, generated_tokens=gen,
                          prompt_tokens=prompt_tokens, cached_prompt_tokens=cached,
                          ttft_ms_median=1e3 * statistics.median(ttft) if ttft else None,
                          ttft_ms_p90=1e3 * sorted(ttft)[int(0.9 * (len(ttft) - 1))] if ttft else None))
        print(f"[chat {args.engine}] turn {turn}: {gen / wall:.0f} gen tok/s, hit {cached / prompt_tokens:.3f}, "
              f"TTFT med {turns[-1]['ttft_ms_median']:.0f} ms", flush=True)
    total_wall = time.perf_counter() - t_all
    gen = sum(t["generated_tokens"] for t in turns)
    prompt = sum(t["prompt_tokens"] for t in turns)
    cached = sum(t["cached_prompt_tokens"] for t in turns)
    summary = dict(generated_tokens_per_s=gen / total_wall, total_tokens_per_s=(gen + prompt) / total_wall,
                   prefix_hit_rate=cached / prompt, ttft_ms_median=statistics.median(
                       [t["ttft_ms_median"] for t in turns if t["ttft_ms_median"] is not None]),
                   wall_s=total_wall)
    return dict(workload="chat", block_size=block, turns=turns, summary=summary,
                kv_samples=_utility(llm, "tinyserve_e2e_kv"), tinyserve_stats=_utility(llm, "tinyserve_stats"))


def _machine() -> dict[str, Any]:
    import torch
    import vllm

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return dict(card=card, platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                vllm=vllm.__version__, python=platform.python_version())


def cmd_run(args: argparse.Namespace) -> int:
    os.environ["TINYSERVE_ENGINE"] = _engine_settings(args.engine, args.workload, args.budget_tokens)
    t0 = time.perf_counter()
    body = run_long(args) if args.workload == "long" else run_chat(args)
    part = dict(engine=args.engine, model=args.model, machine=_machine(), commit=args.commit,
                settings=json.loads(os.environ["TINYSERVE_ENGINE"]), seconds=time.perf_counter() - t0, **body)
    Path(args.out).write_text(json.dumps(part, indent=1, default=str))
    print(f"wrote {args.out} ({part['seconds']:.0f} s)", flush=True)
    return 0


def variant(part: dict[str, Any]) -> str:
    """What a part ran: stock, or which TinyServe features (read off the settings it ran with)."""
    st = part.get("settings", {})
    if not st.get("enabled", True):
        return "stock"
    feats = [name for name in ("allocator", "selection") if st.get(name, {}).get("enabled", name == "allocator")]
    return "tinyserve:" + "+".join(feats) if feats else "tinyserve:none"


def _long_rows(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every TinyServe long-context row beside the stock row of the same context and batch, from the same
    commit's run when there is one."""
    stock: dict[tuple, dict[str, Any]] = {}
    for p in parts:
        if p["workload"] == "long" and variant(p) == "stock":
            for r in p["rows"]:
                stock[(p.get("commit"), r["context"], r["batch"])] = r
                stock.setdefault((None, r["context"], r["batch"]), r)
    rows = []
    for p in parts:
        if p["workload"] != "long" or variant(p) == "stock":
            continue
        for t in p["rows"]:
            s = stock.get((p.get("commit"), t["context"], t["batch"])) or stock.get((None, t["context"], t["batch"]))
            if s is None:
                continue
            rows.append(dict(
                variant=variant(p), commit=p.get("commit"), context=t["context"], batch=t["batch"], budget_tokens=p["settings"].get(
                    "selection", {}).get("budget_tokens"), budget_fraction=t["budget_fraction"],
                stock_itl_ms=s["itl_ms"], tinyserve_itl_ms=t["itl_ms"],
                stock_tokens_per_s=s["decode_tokens_per_s"], tinyserve_tokens_per_s=t["decode_tokens_per_s"],
                speedup=t["decode_tokens_per_s"] / s["decode_tokens_per_s"],
                stock_wall_tokens_per_s=s["wall_tokens_per_s"], tinyserve_wall_tokens_per_s=t["wall_tokens_per_s"],
                stock_prefill_s=s["prefill_s"], tinyserve_prefill_s=t["prefill_s"],
                prompt_tokens_cached=dict(stock=sum(s["cached_prompt_tokens"]),
                                          tinyserve=sum(t["cached_prompt_tokens"]),
                                          of=t["context"] * t["batch"]),
                same_first_16_tokens=[a == b for a, b in zip(s["first_tokens"], t["first_tokens"])]))
    return rows


def cmd_report(args: argparse.Namespace) -> int:
    parts = [json.loads(Path(p).read_text()) for p in args.parts]
    if not parts:
        print("no parts")
        return 1
    machine = parts[0]["machine"]
    card = machine["card"].replace(" ", "_")
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    result: dict[str, Any] = dict(machine=machine, commit=commit, long=_long_rows(parts), chat={}, parts=parts)
    lines = [f"card {machine['card']}, vLLM {machine['vllm']}, torch {machine['torch']}, "
             f"{machine['platform']}, {machine['cpu_count']} CPUs, commit {commit}"]
    if result["long"]:
        lines.append("long-context decode, Llama-3-8B shape, dummy weights, bf16, 64-token blocks:")
        lines.append("variant | context | batch | budget | stock ITL ms | TinyServe ITL ms | stock tok/s | "
                     "TinyServe tok/s | speed-up | prompt tokens cached stock / TinyServe")
        for r in result["long"]:
            c = r["prompt_tokens_cached"]
            lines.append(f"{r['variant']} | {r['context'] // 1024}k | {r['batch']} | "
                         f"{r['budget_tokens']} (1/{1 / r['budget_fraction']:.0f}) | {r['stock_itl_ms']:.2f} | "
                         f"{r['tinyserve_itl_ms']:.2f} | {r['stock_tokens_per_s']:.0f} | "
                         f"{r['tinyserve_tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
                         f"{c['stock'] / c['of']:.2f} / {c['tinyserve'] / c['of']:.2f}")
    result["chat"] = _chat_summary([p for p in parts if p["workload"] == "chat"], lines)
    print("\n".join(lines))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"gpu-e2e-{card}"
    result["table"] = lines
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    _plot(result, Path(f"{stem}.png"))
    print(f"wrote {stem}.json and .png")
    return 0


_CHAT_KEYS = ("generated_tokens_per_s", "total_tokens_per_s", "ttft_ms_median", "prefix_hit_rate")
_KV_KEYS = ("runs_per_request_mean", "runs_per_request_max_seen", "free_runs", "free_space_scatter",
            "token_slot_utilisation", "effective_capacity")


def _chat_summary(parts: list[dict[str, Any]], lines: list[str]) -> dict[str, Any]:
    """Stock against TinyServe on the chat workload, over every repeat given (the i-th run of each engine
    pairs with the other's i-th run); appends the table to ``lines``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for p in parts:
        runs.setdefault(variant(p), []).append(p)
    stock = runs.pop("stock", [])
    if not stock or not runs:
        return {}
    name, tiny = next(iter(runs.items()))

    def mean(ps: list[dict[str, Any]], key: str, field: str = "summary") -> float:
        return sum(p.get(field, {})[key] for p in ps) / len(ps)

    ratios = [t["summary"]["generated_tokens_per_s"] / s["summary"]["generated_tokens_per_s"]
              for s, t in zip(stock, tiny)]
    out = dict(variant=name, repeats=min(len(stock), len(tiny)),
               stock={k: mean(stock, k) for k in _CHAT_KEYS}, tinyserve={k: mean(tiny, k) for k in _CHAT_KEYS},
               stock_runs=[p["summary"] for p in stock], tinyserve_runs=[p["summary"] for p in tiny],
               throughput_ratio=mean(tiny, "generated_tokens_per_s") / mean(stock, "generated_tokens_per_s"),
               throughput_ratio_per_repeat=ratios,
               tinyserve_pool=tiny[-1].get("tinyserve_stats", {}).get("kv", {}))
    kv_keys = [k for k in _KV_KEYS if all(k in p.get("kv_samples", {}) for p in stock + tiny)]
    out["stock"]["kv"] = {k: mean(stock, k, "kv_samples") for k in kv_keys}
    out["tinyserve"]["kv"] = {k: mean(tiny, k, "kv_samples") for k in kv_keys}
    s0 = stock[0]
    lines.append(f"shared-prefix chat ({name}), {len(s0['turns'])} turns x {s0['turns'][0]['requests']} "
                 f"conversations, mean of {out['repeats']} repeats: metric | stock | TinyServe")
    for key in _CHAT_KEYS:
        lines.append(f"{key} | {out['stock'][key]:.3f} | {out['tinyserve'][key]:.3f}")
    for key in kv_keys:
        lines.append(f"{key} (sampled) | {out['stock']['kv'][key]:.3f} | {out['tinyserve']['kv'][key]:.3f}")
    lines.append("generated tokens/s TinyServe / stock per repeat: "
                 + ", ".join(f"{r:.3f}" for r in ratios) + f" (of the means: {out['throughput_ratio']:.3f})")
    return out


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if result["long"]:
        rows = result["long"]
        x = range(len(rows))
        axes[0].bar([i - 0.2 for i in x], [r["stock_tokens_per_s"] for r in rows], 0.4, label="stock vLLM")
        axes[0].bar([i + 0.2 for i in x], [r["tinyserve_tokens_per_s"] for r in rows], 0.4, label="TinyServe")
        for i, r in enumerate(rows):
            axes[0].text(i + 0.2, r["tinyserve_tokens_per_s"], f"{r['speedup']:.2f}x", ha="center", va="bottom",
                         fontsize=7)
        axes[0].set_xticks(list(x), [f"{r['context'] // 1024}k B={r['batch']}\n"
                                     f"{r['variant'].split(':')[1].replace('allocator', 'alloc').replace('selection', 'sel')}"
                                     for r in rows], fontsize=7)
        axes[0].set_ylabel("decode tokens/s (batch / ITL)")
        axes[0].set_title("long-context decode, budget 4096 tokens")
        axes[0].legend(fontsize=7)
    if result["chat"]:
        keys = ["generated_tokens_per_s", "ttft_ms_median"]
        s, t = result["chat"]["stock"], result["chat"]["tinyserve"]
        axes[1].bar([0, 2], [s[k] for k in keys], 0.8, label="stock vLLM")
        axes[1].bar([1, 3], [t[k] for k in keys], 0.8, label="TinyServe (allocator)")
        axes[1].set_xticks([0.5, 2.5], ["gen tokens/s", "median TTFT ms"])
        axes[1].set_title("shared-prefix chat")
        axes[1].legend()
    fig.suptitle(f"{result['machine']['card']} · vLLM {result['machine']['vllm']} · commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyserve bench gpu-e2e", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workload", choices=["long", "chat"], required=True)
    r.add_argument("--engine", choices=["stock", "tinyserve"], required=True)
    r.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama3-8b")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/tinyserve-e2e")
    r.add_argument("--commit", default=os.environ.get("TINYSERVE_COMMIT", "unknown"))
    r.add_argument("--gpu-mem", type=float, default=0.85)
    r.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    r.add_argument("--contexts", default="32768,65536,131072")
    r.add_argument("--decode-tokens", type=int, default=128)
    r.add_argument("--max-batch", type=int, default=16)
    r.add_argument("--budget-tokens", type=int, default=4096)
    r.add_argument("--conversations", type=int, default=96)
    r.add_argument("--turns", type=int, default=3)
    r.add_argument("--num-systems", type=int, default=4)
    r.add_argument("--system-tokens", type=int, default=2048)
    r.add_argument("--chat-max-len", type=int, default=8192)
    rep = sub.add_parser("report")
    rep.add_argument("--parts", nargs="+", required=True)
    rep.add_argument("--out-dir", default="benchmarks/results")
    rep.add_argument("--commit", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
