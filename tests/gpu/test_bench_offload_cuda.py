"""The offload benchmark on CUDA: device cache to pinned host memory by runs, by blocks and through the
block-copy kernel, every gathered byte checked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tinyserve.bench.offload import gather_tables  # noqa: E402


def test_gather_on_cuda_checks_every_byte_in_every_method():
    tables = [[1, 2, 3, 7, 8], [4], [9, 10, 12], [20, 19, 18]]
    result = gather_tables(tables, num_blocks=32, block_bytes=32768, limit=10, device="cuda")
    assert result["verified"] is True
    assert result["by_runs_copy_calls_per_request"] == (2 + 1 + 2 + 3) / 4
    assert result["by_blocks_copy_calls_per_request"] == (5 + 1 + 3 + 3) / 4
    assert result["by_block_copy_kernel_copy_calls_per_request"] == 2
    assert result["by_block_copy_kernel_gb_per_s"] > 0
