"""benchmarks/adamw_step.py: every AdamW implementation steps its own copy of the student and is reported."""

from __future__ import annotations

import json

import pytest
from helpers import load_benchmark


def test_every_implementation_is_timed_and_written(tmp_path):
    bench = load_benchmark("adamw_step")
    result = bench.main(["--rounds", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert list(result["results"]) == list(bench.IMPLEMENTATIONS)
    assert all(r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in result["results"].values())
    assert result["results"]["per-tensor loop (default on a CPU)"]["ratio_to_loop"] == pytest.approx(1.0)
    assert result["parameters"] > 10_000_000  # the 2-layer MiniLM student, embeddings included
    assert "| fused (optim.fused) |" in (tmp_path / "adamw_step.md").read_text()
    assert json.loads((tmp_path / "adamw_step.json").read_text())["rounds"] == 2


def test_the_copies_start_equal_and_hold_their_own_gradients():
    bench = load_benchmark("adamw_step")
    optims = list(bench.optimisers("cpu").values())
    firsts = [o.param_groups[0]["params"][0] for o in optims]
    assert all(p is not firsts[0] for p in firsts[1:])  # separate copies
    assert all(p.data.equal(firsts[0].data) and p.grad.equal(firsts[0].grad) for p in firsts[1:])
    assert [o.defaults.get("fused") for o in optims] == [None, None, True]
