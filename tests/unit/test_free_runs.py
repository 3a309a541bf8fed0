"""Property tests of FreeRuns against a plain set of ids."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.engine.free_runs import FreeRuns, size_class


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


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(1, 300),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "take", "remove", "cut", "fill", "fit"]), st.integers(0, 10**6)), max_size=200
    ),
)
def test_matches_set_model(num_blocks: int, ops: list[tuple[str, int]]) -> None:
    free = FreeRuns(num_blocks)
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


def test_best_fit_prefers_exact_then_smallest() -> None:
    free = FreeRuns(100)
    for block_id in [*range(0, 10), *range(20, 23), *range(40, 45)]:
        free.add(block_id)
    assert free.best_fit(3) == 20
    assert free.best_fit(4) == 40
    assert free.best_fit(6) == 0
    assert free.best_fit(11) is None


def test_best_fit_with_predicate_skips_refused_runs() -> None:
    free = FreeRuns(100)
    for block_id in [*range(0, 10), *range(20, 23), *range(40, 45), *range(60, 63)]:
        free.add(block_id)
    assert free.best_fit(3, lambda start: start != 20) == 60  # the other exact fit
    assert free.best_fit(4, lambda start: start >= 20) == 40  # 0..10 refused: the next smallest that holds 4
    assert free.best_fit(3, lambda start: start < 20) == 0  # smallest accepted run that holds 3
    assert free.best_fit(3, lambda start: False) is None
