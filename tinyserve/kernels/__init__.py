"""Paged-KV kernels: torch reference (any device) and CUDA kernels (CuPy/NVRTC) behind one dispatch.

The door is ``ops``: it exposes the same functions as ``reference`` and runs the CUDA kernels for CUDA
tensors when CuPy is importable, the reference otherwise. Importing this package needs only torch.
"""

from tinyserve.kernels import ops, reference
from tinyserve.kernels.ops import (
    copy_blocks,
    free_run_stats,
    free_runs,
    page_scores,
    paged_decode_attention,
    query_aware_decode,
    select_pages,
    sparse_paged_decode_attention,
    update_page_metadata,
)

__all__ = [
    "ops",
    "reference",
    "update_page_metadata",
    "page_scores",
    "select_pages",
    "paged_decode_attention",
    "sparse_paged_decode_attention",
    "query_aware_decode",
    "copy_blocks",
    "free_runs",
    "free_run_stats",
]
