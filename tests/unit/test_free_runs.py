"""Property tests of FreeRuns against a plain set of ids, for the Python reference and the compiled copy;
and the two against each other (same choices)."""

from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.engine.free_runs import FreeRuns, ReferenceFreeRuns, compiled_free_runs, size_class

COMPILED = compiled_free_runs()
IMPLEMENTATIONS = [ReferenceFreeRuns, COMPILED] if COMPILED is not None else [ReferenceFreeRuns]
implementations = pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda impl: impl.__module__)


def test_compiled_free_runs_is_built_and_used() -> None:
    # `pip install -e .` builds _free_runs.c (optional there, so that a machine without a C compiler still
    # installs); here, where the suite runs, it must have been built.
    assert COMPILED is not None, "tinyserve/engine/_free_runs.c was not built (is a C compiler installed?)"
    assert FreeRuns is COMPILED


def _runs_of(ids: set[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for block_id in sorted(ids):
        if runs and runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], block_id + 1)
        else:
            runs.append((block_id, block_id + 1))
    return runs


def _check(free: FreeRuns, model: set[int]) -> None:
    runs = _runs_of(model)
    assert free.runs() == runs
    assert free.num_free == len(model)
    assert free.num_runs == len(runs)
    assert all(free.contains(i) == (i in model) for i in range(free.num_blocks))
    longest = max((e - s for s, e in runs), default=0)
    assert (free.largest() or (0, 0))[1] == longest


def test_size_class_is_monotone() -> None:
    classes = [size_class(n) for n in range(1, 5000)]
    assert classes == sorted(classes)
    assert all(size_class(n) == n for n in range(1, 64))
    if COMPILED is not None:
        from tinyserve.engine._free_runs import size_class as compiled_size_class

        lengths = [*range(1, 5000), *(random.Random(0).randrange(1, 1 << 40) for _ in range(2000))]
        assert [compiled_size_class(n) for n in lengths] == [size_class(n) for n in lengths]


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(1, 300),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "take", "remove", "cut", "fill", "fit"]), st.integers(0, 10**6)), max_size=200
    ),
)
@implementations
def test_matches_set_model(impl: type, num_blocks: int, ops: list[tuple[str, int]]) -> None:
    free = impl(num_blocks)
    model: set[int] = set()
    for op, arg in ops:
        if op == "add":
            block_id = arg % num_blocks
            if block_id not in model:
                free.add(block_id)
                model.add(block_id)
        elif op == "remove" and model:
            block_id = sorted(model)[arg % len(model)]
            free.remove(block_id)
            model.discard(block_id)
        elif op == "take" and model:
            start, end = _runs_of(model)[arg % len(_runs_of(model))]
            num = 1 + arg % (end - start)
            assert free.run_at(start) == end
            free.take_prefix(start, num)
            model.difference_update(range(start, start + num))
        elif op == "cut" and model:
            start, end = _runs_of(model)[arg % len(_runs_of(model))]
            lo = start + arg % (end - start)
            hi = lo + 1 + (arg // 7) % (end - lo)
            assert free.run_containing(lo) == start
            free.remove_range(lo, hi)
            model.difference_update(range(lo, hi))
        elif op == "fill":
            gaps = [i for i in range(num_blocks) if i not in model]
            if gaps:
                lo = gaps[arg % len(gaps)]
                hi = lo + 1
                while hi < num_blocks and hi not in model and hi - lo < 1 + arg % 9:
                    hi += 1
                free.add_run(lo, hi) if arg % 2 else free.add_many(list(range(lo, hi))[::-1])
                model.update(range(lo, hi))
        elif op == "fit":
            want = 1 + arg % num_blocks
            start = free.best_fit(want)
            fitting = [e - s for s, e in _runs_of(model) if e - s >= want]
            if not fitting:
                assert start is None
            else:
                length = free.run_at(start) - start
                assert length >= want
                if want < 64:  # exact best fit below 64 blocks
                    assert length == min(fitting)
        _check(free, model)


@implementations
def test_best_fit_prefers_exact_then_smallest(impl: type) -> None:
    free = impl(100)
    for block_id in [*range(0, 10), *range(20, 23), *range(40, 45)]:
        free.add(block_id)
    assert free.best_fit(3) == 20
    assert free.best_fit(4) == 40
    assert free.best_fit(6) == 0
    assert free.best_fit(11) is None


@implementations
def test_best_fit_with_predicate_skips_refused_runs(impl: type) -> None:
    free = impl(100)
    for block_id in [*range(0, 10), *range(20, 23), *range(40, 45), *range(60, 63)]:
        free.add(block_id)
    assert free.best_fit(3, lambda start: start != 20) == 60  # the other exact fit
    assert free.best_fit(4, lambda start: start >= 20) == 40  # 0..10 refused: the next smallest that holds 4
    assert free.best_fit(3, lambda start: start < 20) == 0  # smallest accepted run that holds 3
    assert free.best_fit(3, lambda start: False) is None


@pytest.mark.skipif(COMPILED is None, reason="compiled FreeRuns not built")
@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1))
def test_compiled_makes_the_reference_choices(num_blocks: int, seed: int) -> None:
    """Same operations, same answers: runs, best fits (with and without a predicate or an age limit, past
    the exact classes and the scan limits), largest run, run lookups."""
    rng = random.Random(seed)
    ref, fast = ReferenceFreeRuns(num_blocks), COMPILED(num_blocks)
    serial = array("q", (rng.randrange(1000) for _ in range(num_blocks)))  # LRU stamps, for best_fit_older
    for _ in range(300):
        op = rng.random()
        if op < 0.45:
            lo = rng.randrange(num_blocks)
            hi = min(num_blocks, lo + rng.choice([1, 2, 5, 40, 300]))
            ids = [i for i in range(lo, hi) if not ref.contains(i)]
            rng.shuffle(ids)
            if ids:
                ref.add_many(list(ids))
                fast.add_many(list(ids))
        elif op < 0.7 and ref.num_free:
            want = rng.choice([1, 2, 3, 8, 63, 64, 65, 100, 700])
            parity = rng.randrange(2)
            assert fast.best_fit(want) == ref.best_fit(want)
            accept = lambda start: start % 2 == parity  # noqa: E731
            start = ref.best_fit(want, accept)
            assert fast.best_fit(want, accept) == start
            limit = rng.randrange(1000)
            assert fast.best_fit_older(want, serial, limit) == ref.best_fit_older(want, serial, limit)
            if start is not None:
                take = rng.randint(1, ref.run_at(start) - start)
                ref.take_prefix(start, take)
                fast.take_prefix(start, take)
        elif ref.num_free:
            runs = ref.runs()
            start, end = runs[rng.randrange(len(runs))]
            lo = rng.randrange(start, end)
            hi = rng.randint(lo + 1, end)
            assert fast.run_containing(lo) == ref.run_containing(lo) == start
            if hi - lo == 1 and rng.random() < 0.5:
                ref.remove(lo)
                fast.remove(lo)
            else:
                ref.remove_range(lo, hi)
                fast.remove_range(lo, hi)
        assert fast.runs() == ref.runs()
        assert (fast.num_free, fast.num_runs) == (ref.num_free, ref.num_runs)
        assert fast.largest() == ref.largest()
        assert bytes(fast._member) == bytes(ref._member)


@pytest.mark.skipif(COMPILED is None, reason="compiled FreeRuns not built")
def test_compiled_refuses_misuse_with_errors() -> None:
    free = COMPILED(10)
    free.add_run(2, 5)
    for bad in (lambda: free.add(3), lambda: free.add(10), lambda: free.add_run(4, 7), lambda: free.add_run(5, 5),
                lambda: free.add_range(5, 7), lambda: free.add_many([6, 6]), lambda: free.add_many([7, 2]),
                lambda: free.take_prefix(3, 1), lambda: free.take_prefix(2, 4), lambda: free.remove(6),
                lambda: free.remove_range(3, 6), lambda: free.run_containing(0), lambda: free.best_fit(-1),
                lambda: free.best_fit_older(-1, array("q", bytes(80)), 0)):
        with pytest.raises(ValueError):
            bad()
    assert free.runs() == [(2, 5)] and free.num_free == 3  # nothing changed
    with pytest.raises(TypeError):
        free.add_many((1, 2))
    with pytest.raises(TypeError):
        free.best_fit_older(1, array("q", bytes(8)), 0)  # shorter than the pool


@pytest.mark.skipif(COMPILED is None, reason="compiled FreeRuns not built")
def test_compiled_release_refuses_mismatched_pool_state() -> None:
    from tinyserve.engine._free_runs import release_blocks

    n = 10
    good = dict(free_mask=bytearray(n), in_lru=bytearray(n), serial=array("q", bytes(8 * n)), hits=[0] * n)
    assert release_blocks([], *good.values(), 0, COMPILED(n), COMPILED(n)) == (0, [], 0)
    for name, bad in (("free_mask", bytearray(n - 1)), ("in_lru", b"\0" * n), ("serial", [0] * n), ("hits", [0] * (n - 1))):
        state = {**good, name: bad}
        with pytest.raises(TypeError):
            release_blocks([], *state.values(), 0, COMPILED(n), COMPILED(n))
    with pytest.raises(TypeError):
        release_blocks([], *good.values(), 0, COMPILED(n), COMPILED(n - 1))


class _PlainBlock:
    """A block type without slots: the compiled free pass reads it through getattr."""

    def __init__(self, block_id: int) -> None:
        self.block_id, self.ref_cnt, self._block_hash, self.is_null = block_id, 0, None, False


@pytest.mark.skipif(COMPILED is None, reason="compiled FreeRuns not built")
@pytest.mark.parametrize("block_type", ["KVCacheBlock", "plain"])
def test_compiled_release_files_each_kind_of_block(block_type: str) -> None:
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    from tinyserve.engine._free_runs import release_blocks

    n = 10
    blocks = [(KVCacheBlock if block_type == "KVCacheBlock" else _PlainBlock)(i) for i in range(n)]
    blocks[0].is_null = True
    for block in blocks:
        block.ref_cnt = 1
    blocks[2].ref_cnt = 2  # still held by another request after this free
    blocks[5]._block_hash = blocks[6]._block_hash = b"cached"
    free_mask, in_lru, serial, hits = bytearray(n), bytearray(n), array("q", bytes(8 * n)), [0] * n
    hits[6] = 1
    runs, cold = COMPILED(n), COMPILED(n)
    freed, cached, clock = release_blocks([blocks[i] for i in (0, 2, 3, 4, 5, 6, 7)], free_mask, in_lru, serial,
                                          hits, 7, runs, cold)
    assert (freed, cached, clock) == (5, [blocks[5], blocks[6]], 9)
    assert [b.ref_cnt for b in blocks[:8]] == [0, 1, 1, 0, 0, 0, 0, 0]
    assert free_mask == bytearray([0, 0, 0, 1, 1, 1, 1, 1, 0, 0]) and in_lru == bytearray([0] * 5 + [1, 1] + [0] * 3)
    assert (serial[5], serial[6]) == (7, 8)
    assert runs.runs() == [(3, 5), (7, 8)] and cold.runs() == [(5, 6)]  # block 6 was hit: in the LRU, not cold
    if block_type == "KVCacheBlock":  # an unset slot is an error, not a crash
        broken = KVCacheBlock(8)
        broken.ref_cnt = 1
        del broken._block_hash
        with pytest.raises(AttributeError):
            release_blocks([broken], free_mask, in_lru, serial, hits, 9, runs, cold)
