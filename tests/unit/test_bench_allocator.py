"""`tinyserve bench allocator --quick` runs end to end and records both pools, the machine and the commit."""

from __future__ import annotations

import json

import pytest

from tinyserve.bench.allocator import main

pytestmark = pytest.mark.slow


def test_quick_run_writes_json_and_png(tmp_path, capsys) -> None:
    assert main(["--quick", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "runs_per_request_mean" in printed and "µs/alloc" in printed and "GB/s" in printed
    [report_path] = list(tmp_path.glob("allocator-quick-*.json"))
    assert report_path.with_suffix(".png").exists()
    report = json.loads(report_path.read_text())
    assert report["machine"]["cpu_count"] and report["machine"]["commit"]
    for load in ("moderate", "high"):
        stock, ours = report["replay"][load]["vllm"], report["replay"][load]["tinyserve"]
        assert stock["pool"] == "BlockPool" and ours["pool"] == "BestFitBlockPool"
        assert stock["requests_finished"] == ours["requests_finished"] == report["trace"]["requests"]
        # same trace, same free counts: same schedule and token-slot utilisation for both pools
        assert stock["steps"] == ours["steps"] and stock["preemptions"] == ours["preemptions"]
        assert stock["token_slot_utilisation_mean"] == ours["token_slot_utilisation_mean"]
        for summary in (stock, ours):  # every own run after a request's first has one recorded cause
            causes = summary["run_causes_per_request"]
            assert sum(causes.values()) == pytest.approx(summary["own_runs_per_request_mean"] - 1)
    for mode in ("free_space_every_step", "gather_2_runs"):   # same trace, compacting
        for load, compacted in report["replay_compaction"][mode].items():
            assert compacted["requests_finished"] == report["trace"]["requests"]
            assert compacted["blocks_moved_per_request"] >= 0
            assert report["replay"][load]["tinyserve"]["blocks_moved_per_request"] == 0
    costs = report["op_cost"]
    assert len(costs["vllm"]) == len(costs["tinyserve"]) == len(costs["tinyserve_python_references"]) == 2
    for pool_costs in costs.values():
        for at in pool_costs:
            for regime in ("filling", "steady"):
                assert at[regime]["us_per_allocated_block"] > 0 and at[regime]["us_per_freed_block"] > 0
    assert report["compiled_parts"] == "_free_runs.c, _placement.c" and "Python refs ratio" in printed
    copies = report["offload_copy_cpu"]["tinyserve"]
    assert copies["by_runs_copy_calls_per_request"] == copies["runs_per_request"]
    assert copies["by_blocks_copy_calls_per_request"] >= copies["by_runs_copy_calls_per_request"]
    pick = report["gather_pick_cost"]
    assert pick["blocks"] == pick["num_requests"] * 400
    assert pick["tinyserve_ms_per_step"] > 0 and pick["full_read_ms_per_step"] > 0
    assert "reading every table ms/step" in printed
