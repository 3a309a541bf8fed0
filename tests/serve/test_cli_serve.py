"""`tinyserve serve` as a user runs it: serves over HTTP, and Ctrl-C leaves no Ray or vLLM process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import pytest

from conftest import free_port

pytestmark = pytest.mark.slow


def test_serve_answers_then_ctrl_c_leaves_no_process_behind(tiny_model_dir, tmp_path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"model: {{path: {tiny_model_dir}}}\nhttp: {{port: {port}}}\ndeployment: {{num_replicas: 2}}\n"
    )
    log = open(tmp_path / "serve.log", "w+")
    ray_tmp = tempfile.mkdtemp(prefix="ts-", dir="/tmp")  # AF_UNIX socket paths must stay short
    ray_env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinyserve.cli", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=ray_env,
    )
    descendants: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    descendants.setdefault(child.pid, child.create_time())
                except psutil.NoSuchProcess:
                    pass
            if "TinyServe is serving" in open(tmp_path / "serve.log").read():
                break
            time.sleep(2)
        else:
            pytest.fail("tinyserve serve did not come up in 10 minutes")
        out = open(tmp_path / "serve.log").read()
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in out
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       json={"model": "tinyserve-tiny", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                descendants.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                pass
        names = set()
        for pid in descendants:
            try:
                names.add(" ".join(psutil.Process(pid).cmdline()))
            except psutil.NoSuchProcess:
                pass
        # The processes that must go: Ray's own daemons and each replica's vLLM engine core.
        assert any("raylet" in n for n in names), names
        assert any("EngineCore" in n for n in names), names
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("tinyserve serve did not exit within 120 s of Ctrl-C")
    assert proc.returncode == 0, open(tmp_path / "serve.log").read()[-3000:]

    deadline = time.monotonic() + 60
    while True:
        alive = []
        for pid, created in descendants.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.cmdline())[:100])
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not alive, alive
