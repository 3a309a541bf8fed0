"""QueryAwareRouter end to end: 3 vLLM replicas behind Ray Serve's OpenAI ingress, over HTTP.

Ground truth comes from vLLM's own counters in each replica (prefix-cache hits/queries, finished requests),
scraped from Ray's metrics agent, never from the router's view of itself.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

pytestmark = pytest.mark.slow

REPLICAS = 3
BLOCK = 32


@pytest.fixture(scope="module")
def app(tmp_path_factory, own_ray_cluster):
    import ray

    from tinyserve import serving
    from tinyserve.bench.router import free_port
    from tinyserve.deployments.config import load_config
    from tinyserve.models.make_model import make_model

    model_dir = os.path.abspath(str(make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny")))
    metrics_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=12, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    cfg = load_config(None, overrides={
        "model": {"path": model_dir, "make_size": None},
        "deployment": {"num_replicas": REPLICAS, "max_ongoing_requests": 8},
        "http": {"port": http_port},
        "router": {"kind": "query_aware", "options": {"tokenizer": model_dir, "hash_seed": "0",
                                                      "decision_log": os.environ.get("TINYSERVE_ROUTER_DECISION_LOG")}},
    })
    try:
        url = serving.start(cfg)
        yield {"url": url, "model": cfg.model.id, "metrics_port": metrics_port, "model_dir": model_dir,
               "deployment": f"TinyServeLLMServer:{cfg.model.id}", "app": serving.APP_NAME}
    finally:
        serving.stop()


def _counters(app) -> dict:
    from tinyserve.bench.router import replica_counters, scrape

    return replica_counters(scrape(app["metrics_port"]))


def _chat(client, app, system: str, user: str, max_tokens: int = 4) -> dict:
    r = client.post(app["url"] + "/v1/chat/completions", json={
        "model": app["model"], "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    return {"status": r.status_code, "body": r.json() if r.status_code == 200 else r.text}


def _system_prompt(tag: str, words: int = 400) -> str:
    import random

    rng = random.Random(tag)
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(words))


def test_requests_sharing_a_long_prefix_land_where_it_is_cached(app):
    """The first request is routed while the router's event streams are still being set up: its blocks are
    published during the PUB's connection handshake (lost on the wire, caught up from the replay buffer)
    and the stream's initial resync must keep the router's provisional record of that decision."""
    import httpx

    from tinyserve.bench.router import wait_for_counters

    before = _counters(app)
    system = _system_prompt("shared-1")
    n = 6
    with httpx.Client(timeout=300) as client:
        first = _chat(client, app, system, "question zero")
        assert first["status"] == 200
        prompt_tokens = first["body"]["usage"]["prompt_tokens"]
        time.sleep(1.0)  # the engine's BlockStored events reach the router
        for i in range(1, n):
            assert _chat(client, app, system, f"question {i}")["status"] == 200
    delta = wait_for_counters(app["metrics_port"], n, before)
    served = sorted((row["requests"] for row in delta.values()), reverse=True)
    assert served[0] == n, f"requests spread over replicas although one held the prefix: {served}"
    hits = sum(row["hits"] for row in delta.values())
    shared_blocks = (prompt_tokens - 16) // BLOCK  # the system prompt, minus the differing question
    assert hits >= (n - 1) * shared_blocks * BLOCK * 0.9, (hits, prompt_tokens)


def test_a_flood_of_one_prefix_spreads_once_its_replica_is_saturated(app):
    import httpx

    from tinyserve.bench.router import wait_for_counters

    before = _counters(app)
    system = _system_prompt("hot-1")
    n = 24

    async def flood():
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(i):
                r = await client.post(app["url"] + "/v1/chat/completions", json={
                    "model": app["model"], "max_tokens": 48, "temperature": 0.0, "ignore_eos": True,
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]})
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(n)))

    statuses = asyncio.run(flood())
    assert statuses.count(200) == n
    delta = wait_for_counters(app["metrics_port"], n, before)
    served = sorted((row["requests"] for row in delta.values() if row["requests"]), reverse=True)
    assert len(served) >= 2, f"a hot prefix stayed on one replica: {served}"
    assert served[0] <= 0.75 * n, served
    queries = sum(row["queries"] for row in delta.values())
    hits = sum(row["hits"] for row in delta.values())
    # Spreading costs at most one cold prefill per replica used; the rest still hit the prefix.
    assert hits / queries >= (n - len(served) - 2) / n * 0.8, (hits, queries, served)


def test_a_killed_replica_is_dropped_and_no_request_is_lost_silently(app):
    import httpx
    import ray

    system = _system_prompt("kill-1")
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "TinyServeLLMServer" in a["name"]]
    assert len(actors) == REPLICAS
    victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    n = 12

    async def traffic():
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(i):
                await asyncio.sleep(0.1 * i)
                try:
                    r = await client.post(app["url"] + "/v1/chat/completions", json={
                        "model": app["model"], "max_tokens": 16, "temperature": 0.0, "ignore_eos": True,
                        "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]})
                    return r.status_code
                except httpx.HTTPError as exc:  # a dropped connection is an error the client sees
                    return repr(exc)

            async def kill():
                await asyncio.sleep(0.35)
                ray.kill(victim, no_restart=True)

            results = await asyncio.gather(*(one(i) for i in range(n)), kill())
            return results[:n]

    t0 = time.time()
    outcomes = asyncio.run(traffic())
    # Every request came back (answer or error to its client) well before the client timeout.
    assert len(outcomes) == n and time.time() - t0 < 240
    assert outcomes.count(200) >= n // 2, outcomes
    # After the kill the router no longer picks the dead replica: every new request succeeds.
    with httpx.Client(timeout=300) as client:
        after = [_chat(client, app, system, f"after {i}")["status"] for i in range(6)]
    assert after == [200] * 6, after
