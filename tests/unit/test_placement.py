"""The compiled placement record against the reference, and the compiled decode growth step in a
reservation: what it takes, what it changes, when it declines and what misuse it refuses."""

from __future__ import annotations

import pytest
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from tinyserve.engine.placement import (
    Placement,
    ReferencePlacement,
    compiled_reservation_growth,
)

FIELDS = ("pool", "request", "tail", "held", "res_next", "res_end", "scan")


def test_compiled_placement_is_built_and_used() -> None:
    assert Placement is not ReferencePlacement, "tinyserve/engine/_placement.c was not built (is a C compiler installed?)"


@pytest.mark.parametrize("impl", [ReferencePlacement, Placement], ids=lambda impl: impl.__module__)
def test_placement_fields(impl: type) -> None:
    pool, request = object(), object()
    placement = impl(pool, request)
    assert [getattr(placement, name) for name in FIELDS] == [pool, request, -2, 0, 0, 0, None]
    placement.tail, placement.held, placement.res_next, placement.res_end = 2**40, 7, 9, 12
    placement.request = placement.pool = None
    assert [getattr(placement, name) for name in FIELDS] == [None, None, 2**40, 7, 9, 12, None]
    with pytest.raises((AttributeError, TypeError)):
        placement.other = 1  # no fields beyond the reference's


def _pool_state(n: int = 12) -> tuple[list[KVCacheBlock], bytearray, bytearray]:
    blocks = [KVCacheBlock(i) for i in range(n)]
    free_mask = bytearray(b"\x01") * n
    reserved_mask = bytearray(n)
    return blocks, free_mask, reserved_mask


def test_growth_takes_the_next_reserved_block() -> None:
    blocks, free_mask, reserved_mask = _pool_state()
    grow = compiled_reservation_growth(blocks, free_mask, reserved_mask)
    assert grow is not None
    placement = Placement(None, None)
    placement.tail, placement.held, placement.res_next, placement.res_end = 4, 3, 5, 8
    free_mask[4] = 0
    reserved_mask[5:8] = b"\x01\x01\x01"
    assert grow(placement) == [blocks[5]]
    assert grow(placement) == [blocks[6]]
    assert (placement.tail, placement.held, placement.res_next, placement.res_end) == (6, 5, 7, 8)
    assert [b.ref_cnt for b in blocks[4:8]] == [0, 1, 1, 0]
    assert free_mask[5:8] == b"\x00\x00\x01" and reserved_mask[5:8] == b"\x00\x00\x01"
    assert grow(placement) is None  # block 7 ends the reservation: the Python path ends it
    assert (placement.tail, placement.res_next) == (6, 7) and free_mask[7] == reserved_mask[7] == 1


def test_growth_declines_other_steps() -> None:
    blocks, free_mask, reserved_mask = _pool_state()
    grow = compiled_reservation_growth(blocks, free_mask, reserved_mask)
    reserved_mask[5:9] = b"\x01" * 4
    cases = [{"tail": 4, "res_next": 5, "res_end": 0},  # no reservation
             {"tail": 3, "res_next": 5, "res_end": 9},  # the reservation is not right after the last block
             {"tail": -2, "res_next": 5, "res_end": 9},
             {"tail": 4, "res_next": 5, "res_end": 99}]  # past the pool
    for case in cases:
        placement = Placement(None, None)
        for name, value in case.items():
            setattr(placement, name, value)
        assert grow(placement) is None
        assert (placement.tail, placement.res_next) == (case["tail"], case["res_next"])
    reference = ReferencePlacement(None, None)
    reference.tail, reference.res_next, reference.res_end = 4, 5, 9
    assert grow(reference) is None
    assert free_mask == bytearray(b"\x01") * 12 and all(b.ref_cnt == 0 for b in blocks)


def test_growth_refuses_inconsistent_state() -> None:
    blocks, free_mask, reserved_mask = _pool_state()
    grow = compiled_reservation_growth(blocks, free_mask, reserved_mask)
    placement = Placement(None, None)
    placement.tail, placement.res_next, placement.res_end = 4, 5, 9
    with pytest.raises(ValueError, match="not free and reserved"):
        grow(placement)  # block 5 is not marked reserved
    reserved_mask[5:9] = b"\x01" * 4
    blocks[5].ref_cnt = 1
    with pytest.raises(ValueError, match="reference count"):
        grow(placement)
    assert (placement.tail, placement.res_next, free_mask[5], reserved_mask[5]) == (4, 5, 1, 1)
    with pytest.raises(TypeError):
        grow()
    with pytest.raises(TypeError):
        grow(placement, placement)
    with pytest.raises(ValueError):
        compiled_reservation_growth(blocks, free_mask, bytearray(3))
    with pytest.raises(TypeError):
        compiled_reservation_growth(tuple(blocks), free_mask, reserved_mask)


def test_growth_trusts_its_remembered_next_block_only_for_that_list_and_id() -> None:
    blocks, free_mask, reserved_mask = _pool_state()
    grow = compiled_reservation_growth(blocks, free_mask, reserved_mask)
    placement = Placement(None, None)
    placement.tail, placement.res_next, placement.res_end = 4, 5, 11
    reserved_mask[5:11] = b"\x01" * 6
    assert grow(placement) == [blocks[5]]  # remembers block 6 for the next step
    # The Python path moved the request (compaction, a new reservation): id 6 is no longer next.
    placement.tail, placement.res_next = 7, 8
    assert grow(placement) == [blocks[8]]
    # Another pool's growth, same ids: its own list's block, not the one remembered from this list.
    other_blocks, other_free, other_reserved = _pool_state()
    other_reserved[9:11] = b"\x01\x01"
    other = compiled_reservation_growth(other_blocks, other_free, other_reserved)
    taken = other(placement)
    assert taken == [other_blocks[9]] and taken[0] is not blocks[9]
    assert blocks[9].ref_cnt == 0 and reserved_mask[9] == 1
