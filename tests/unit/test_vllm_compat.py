"""vLLM version shims (tinyserve.engine.vllm_compat).

On the pinned vLLM (0.29, CI) `apply()` must change nothing. The 0.26 shim is checked against a class with
0.26's `KVCacheManager` contract (0.26 itself is not installable on CPU machines; the GPU run
`benchmarks/gpu_e2e` exercises it for real): after the shim, one prefix lookup calls
`record_prefix_cache_stats(request, hits)` once, with the lookup's hit count, and only when the lookup ran.
"""

from __future__ import annotations

from types import SimpleNamespace

from tinyserve.engine import vllm_compat


def test_apply_changes_nothing_on_the_pinned_vllm() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    before = dict(vars(KVCacheManager))
    assert vllm_compat.vllm_version() >= (0, 29, 0)
    assert vllm_compat.apply() == []
    assert dict(vars(KVCacheManager)) == before


def test_shim_calls_the_record_hook_after_each_lookup_of_a_026_style_manager(monkeypatch) -> None:
    class Manager026:
        """0.26's contract: get_computed_blocks returns (blocks, num_hit_tokens, boundary), no hook."""

        def __init__(self, enable_caching: bool) -> None:
            self.enable_caching = enable_caching

        def get_computed_blocks(self, request):
            if not self.enable_caching or request.skip_reading_prefix_cache:
                return [], 0, 0
            return ["b0", "b1"], 32, 0

    calls = []
    monkeypatch.setattr(vllm_compat, "_applied", [])
    monkeypatch.setattr("vllm.v1.core.kv_cache_manager.KVCacheManager", Manager026)
    assert vllm_compat.apply() == ["kv_cache_manager.record_prefix_cache_stats"]
    assert vllm_compat.apply() == ["kv_cache_manager.record_prefix_cache_stats"]     # idempotent
    original_hook = Manager026.record_prefix_cache_stats
    Manager026.record_prefix_cache_stats = lambda self, req, hits: calls.append((req.request_id, hits))

    hit = SimpleNamespace(request_id="a", skip_reading_prefix_cache=False)
    skip = SimpleNamespace(request_id="b", skip_reading_prefix_cache=True)
    assert Manager026(True).get_computed_blocks(hit) == (["b0", "b1"], 32, 0)
    Manager026(True).get_computed_blocks(skip)
    Manager026(False).get_computed_blocks(hit)
    assert calls == [("a", 32)]
    assert original_hook(Manager026(True), hit, 32) is None           # records nothing itself
