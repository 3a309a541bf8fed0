"""The CUDA selection backend's step counters (plain torch ops, so they run on any device): pages and tokens
count per (page, KV head), as the CPU backend counts them."""

from __future__ import annotations

import pytest
import torch

from tinyserve.engine import cuda_selection_backend as backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_counters_count_one_step_per_kv_head(device, monkeypatch):
    monkeypatch.setattr(backend._STATE, "counters", torch.zeros(5, dtype=torch.int64, device=device))
    monkeypatch.setattr(backend._STATE, "selecting_layers", {"a", "b"})
    monkeypatch.setattr(backend._STATE, "kv_bytes_per_token_head", 10)
    seq_lens = torch.tensor([130, 64, 0], dtype=torch.int32, device=device)   # last row: graph padding
    # Row 0 (3 pages of 64): head 0 keeps 2 pages, head 1 all 3; row 1 (1 page): both keep it.
    nsel = torch.tensor([[2, 3], [1, 1], [1, 1]], dtype=torch.int32, device=device)
    backend._count(seq_lens, nsel, 64)
    got = backend.selection_counters()
    read_token_heads = (130 - 64) + 130 + 64 + 64          # head 0 of row 0 skips one full page
    assert got == {"decode_steps_total": 2 * 2, "pages_scored_total": (3 + 1) * 2 * 2,
                   "pages_selected_total": (2 + 3 + 1 + 1) * 2,
                   "kv_bytes_read_total": read_token_heads * 2 * 10,
                   "kv_bytes_not_read_total": 64 * 2 * 10}
