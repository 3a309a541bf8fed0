"""TinyServe's query-aware FlashAttention backend on CUDA (skips without CUDA; the engine test needs vLLM).

1. The split K-then-V block layout read through doubled block ids gives exactly the reference's sparse
   attention over the same pages (and dense attention at a budget >= the context).
2. End to end (vLLM on the GPU, dummy weights): stock FlashAttention and TinyServe's backend at a budget
   above every context produce the same first token (prefill is stock FA on both layouts) and the same
   greedy tokens within bf16 noise, and the selection counters say selection ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tinyserve.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _split_cache(nb: int, bs: int, hkv: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(nb, 2, bs, hkv, d, dtype=dtype, device="cuda")


@pytest.mark.parametrize("budget_pages", [3, 1000])
def test_split_layout_decode_matches_reference(budget_pages: int) -> None:
    from tinyserve.engine.cuda_selection_backend import decode_on_split_layout

    torch.manual_seed(int.from_bytes(os.urandom(2), "little"))
    nb, bs, hkv, g, d, b, pages = 64, 64, 4, 4, 128, 3, 9
    cache = _split_cache(nb, bs, hkv, d, torch.bfloat16)
    key_cache, value_cache = cache[:, 0], cache[:, 1]
    table = torch.stack([torch.randperm(nb - 1, device="cuda")[:pages] + 1 for _ in range(b)]).int()
    seq_lens = torch.tensor([pages * bs, 5 * bs + 7, bs + 1], dtype=torch.int32, device="cuda")
    query = torch.randn(b, hkv * g, d, dtype=torch.bfloat16, device="cuda")
    kmin = torch.full((nb, hkv, d), float("inf"), dtype=torch.bfloat16, device="cuda")
    kmax = torch.full_like(kmin, float("-inf"))
    k_plain, v_plain = key_cache.contiguous(), value_cache.contiguous()
    for row in range(b):                        # metadata from the keys, as the KV update folds them
        n = int(seq_lens[row])
        slots = (table[row].long().repeat_interleave(bs) * bs + torch.arange(bs, device="cuda").repeat(pages))[:n]
        keys = k_plain.view(-1, hkv, d)[slots]
        reference.update_page_metadata(kmin, kmax, keys, slots, bs)
    out = torch.empty_like(query)
    budget = budget_pages * bs
    nsel = decode_on_split_layout(query, key_cache, value_cache, kmin, kmax, table, table * 2, seq_lens, 0.088,
                                  budget, 1, out)
    ref_sel_scores = reference.page_scores(query, kmin, kmax, table, seq_lens, bs)
    sel, ref_nsel = reference.select_pages(ref_sel_scores, seq_lens, bs, budget, 1)
    ref = reference.sparse_paged_decode_attention(query, k_plain, v_plain, table, seq_lens, sel, 0.088)
    assert torch.equal(nsel.cpu(), ref_nsel.cpu())
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < 2e-2, err
    if budget_pages >= pages:
        dense = reference.paged_decode_attention(query, k_plain, v_plain, table, seq_lens, 0.088)
        assert (out.float() - dense.float()).norm() / dense.float().norm() < 2e-2


_ENGINE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from vllm import LLM, SamplingParams
    from benchmarks.gpu_e2e.e2e import write_model_config
    if __name__ == "__main__":
        d = write_model_config(__import__("pathlib").Path(sys.argv[1]), "llama-1b", 4096)
        llm = LLM(model=str(d), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=4096, block_size=64, gpu_memory_utilization=0.3, seed=0,
                  compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                      "cudagraph_capture_sizes": [1, 2, 4]})
        prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 30000 + 3 for j in range(1500 + 300 * i)]}
                   for i in range(3)]
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                    detokenize=False), use_tqdm=False)
        try:
            stats = llm.llm_engine.engine_core.call_utility("tinyserve_stats")
        except Exception as exc:
            stats = {"error": str(exc)}
        print("RESULT" + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "stats": stats},
                                    default=str))
""")


def _engine_tokens(tmp_path, settings_json: str) -> dict:
    pytest.importorskip("vllm")
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TINYSERVE_ENGINE=settings_json,
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "model")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_engine_budget_above_context_matches_stock(tmp_path) -> None:
    from tinyserve.engine.settings import EngineSettings, SelectionSettings

    stock = _engine_tokens(tmp_path, EngineSettings(enabled=False).model_dump_json())
    tiny = _engine_tokens(tmp_path, EngineSettings(selection=SelectionSettings(
        enabled=True, budget_tokens=8192, min_context_tokens=0)).model_dump_json())
    assert "selection" in tiny["stats"]["plugin"]["features"]
    sel = tiny["stats"]["selection"]
    assert sel["decode_steps_total"] > 0 and sel["kv_bytes_not_read_total"] == 0
    for a, b in zip(stock["tokens"], tiny["tokens"]):
        assert a[0] == b[0]                               # prefill: stock FA on both layouts
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        assert same >= 8, (a, b)                          # dense-equivalent decode, bf16 noise aside
