"""HttpGuard and ApiKeys in front of a real FastAPI app (in-process ASGI): 401, 413, 429, pass-through."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

from tinyserve.deployments.api_keys import ApiKeyError, ApiKeys
from tinyserve.deployments.config import load_config
from tinyserve.deployments.gateway_metrics import GatewayMetrics
from tinyserve.deployments.http_guard import HttpGuard


def make_app(release: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        if release is not None:
            await release.wait()
        return {"bytes": len(body)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    return app


def guarded(keys: ApiKeys | None = None, max_body_bytes: int = 1024, max_inflight: int | None = None,
            release: asyncio.Event | None = None, metrics: GatewayMetrics | None = None) -> HttpGuard:
    return HttpGuard(make_app(release), keys=keys, max_body_bytes=max_body_bytes, max_inflight=max_inflight,
                     retry_after_s=3, on_reject=metrics.on_rejected if metrics is not None else None)


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, **kwargs)

    return asyncio.run(go())


def test_auth_off_passes_every_request_through():
    app = guarded()
    assert call(app, "GET", "/v1/models").status_code == 200
    r = call(app, "POST", "/echo", content=b"x" * 100)
    assert r.status_code == 200 and r.json() == {"bytes": 100}


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer key-one-x", "Basic key-one", "key-one",
                                    "Bearer ", "bearer key-onf"])
def test_auth_on_rejects_without_saying_which_part_failed(header):
    app = guarded(ApiKeys(["key-one", "key-two"]))
    headers = {"Authorization": header} if header is not None else {}
    r = call(app, "POST", "/echo", content=b"{}", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    # One answer for a missing header, a wrong scheme and a wrong key.
    assert r.json() == {"error": {"message": "Unauthorized.", "type": "AuthenticationError", "param": None,
                                  "code": 401}}


def test_auth_on_accepts_each_configured_key():
    app = guarded(ApiKeys(["key-one", "key-two"]))
    for key in ("key-one", "key-two"):
        assert call(app, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert call(app, "GET", "/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200


def test_keys_come_from_a_file_and_the_environment(tmp_path, monkeypatch):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nfile-key\n\n")
    monkeypatch.setenv("TS_TEST_KEYS", "env-a, env-b")
    keys = ApiKeys.load(file=str(keys_file), env="TS_TEST_KEYS")
    assert len(keys) == 3
    for key in (b"file-key", b"env-a", b"env-b"):
        assert keys.accepts(b"Bearer " + key)
    assert not keys.accepts(b"Bearer # team keys")
    assert ApiKeys.load(file=None, env=None) is None


def test_auth_configured_without_keys_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.delenv("TS_NO_KEYS", raising=False)
    with pytest.raises(ApiKeyError):
        ApiKeys.load(file=None, env="TS_NO_KEYS")
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(ApiKeyError):
        ApiKeys.load(file=str(tmp_path / "empty"), env=None)
    with pytest.raises(ApiKeyError):
        ApiKeys.load(file=str(tmp_path / "missing"), env=None)


def test_body_over_the_bound_gets_413_declared_or_chunked():
    app = guarded(max_body_bytes=1000)
    assert call(app, "POST", "/echo", content=b"x" * 1000).status_code == 200
    r = call(app, "POST", "/echo", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"

    async def chunks():
        for _ in range(5):
            yield b"y" * 300

    r = call(app, "POST", "/echo", content=chunks())  # no Content-Length: chunked transfer
    assert r.status_code == 413
    assert app.inflight == 0


def test_inflight_bound_answers_429_with_retry_after():
    async def go() -> tuple[list[int], httpx.Response, int]:
        release = asyncio.Event()
        app = guarded(max_inflight=2, release=release)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            held = [asyncio.create_task(c.post("/echo", content=b"a")) for _ in range(2)]
            while app.inflight < 2:
                await asyncio.sleep(0.01)
            rejected = await c.post("/echo", content=b"b")
            release.set()
            statuses = [(await t).status_code for t in held]
            after = (await c.post("/echo", content=b"c")).status_code
        return statuses + [after], rejected, app.inflight

    statuses, rejected, inflight = asyncio.run(go())
    assert statuses == [200, 200, 200]
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "3"
    assert rejected.json()["error"]["type"] == "RateLimitError"
    assert inflight == 0


def test_gateway_config_defaults_and_validation():
    from tinyserve.deployments.app import _deployment_config, _engine_kwargs
    from tinyserve.deployments.config import ConfigError

    config = load_config(None)
    assert config.gateway.api_keys_file is None and config.gateway.api_keys_env is None  # auth off by default
    assert _engine_kwargs(config)["enable_log_requests"] is False
    assert _deployment_config(config)["max_queued_requests"] == -1
    bounded = load_config(None, {"gateway": {"max_queued_requests": 4, "log_prompts": True}})
    assert _deployment_config(bounded)["max_queued_requests"] == 4
    assert _engine_kwargs(bounded)["enable_log_requests"] is True
    with pytest.raises(ConfigError, match="gateway.retry_max_attempts"):
        load_config(None, {"gateway": {"retry_max_attempts": 0}})


def test_every_rejection_is_counted_by_reason():
    metrics = GatewayMetrics()
    app = guarded(ApiKeys(["key-one"]), max_body_bytes=64, metrics=metrics)
    ok = {"Authorization": "Bearer key-one"}
    assert call(app, "POST", "/echo", content=b"{}").status_code == 401
    assert call(app, "POST", "/echo", content=b"{}", headers={"Authorization": "Bearer no"}).status_code == 401
    assert call(app, "POST", "/echo", content=b"x" * 65, headers=ok).status_code == 413
    assert call(app, "POST", "/echo", content=b"x" * 64, headers=ok).status_code == 200
    snap = metrics.snapshot()
    assert snap["rejected"] == {"unauthorized": 2, "body_too_large": 1, "inflight_bound": 0, "queue_full": 0,
                                "no_replica": 0}
    assert snap["retried_requests"] == 0 and snap["cut_streams"] == 0

    release = asyncio.Event()
    app = guarded(max_inflight=1, release=release, metrics=metrics)

    async def two_at_once() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.create_task(c.post("/echo", content=b"{}"))
            while app.inflight == 0:
                await asyncio.sleep(0.01)
            second = await c.post("/echo", content=b"{}")
            release.set()
            return [(await first).status_code, second.status_code]

    assert asyncio.run(two_at_once()) == [200, 429]
    assert metrics.snapshot()["rejected"]["inflight_bound"] == 1
    with pytest.raises(ValueError):
        metrics.on_rejected("teapot")
