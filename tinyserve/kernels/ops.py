"""Dispatch: CUDA kernels for CUDA tensors when CuPy is importable, the torch reference otherwise."""

from tinyserve.kernels.reference import (  # noqa: F401
    copy_blocks, free_run_stats, free_runs, page_scores, paged_decode_attention, query_aware_decode,
    select_pages, sparse_paged_decode_attention, update_page_metadata,
)
