"""benchmarks/throughput.py on a tiny BERT: every contender trains on the same batches, and the report is written.

Timings are not asserted (the machines are shared); the benchmark's own checks are: the same
batches in the same order for every contender, every student parameter changed, the Lightning
runs made the requested optimiser steps, and the objectives agree in value and gradient.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    """The benchmark script as a module (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location("throughput_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def tiny_config(throughput: ModuleType, teacher: Path, files: dict[str, str], root: Path, contenders: list[str]):
    return throughput.BenchConfig(
        teacher=str(teacher),
        dataset=None,
        data_files=files,
        max_length=16,
        batch_size=8,
        student_layers=[1],
        warmup_steps=0,
        steps=2,
        repeats=1,
        memory_steps=0,
        cache_root=str(root / "cache"),
        contenders=contenders,
    )


def assert_trained(result: dict) -> None:
    for name, row in result["contenders"].items():
        total = row["changed_parameter_tensors"].split("/")[1]
        assert row["changed_parameter_tensors"] == f"{total}/{total}", name
        assert len(row["samples_per_s"]) == 1 and row["samples_per_s"][0] > 0
    assert result["objective_check"]["gradients_equal"]


def test_every_contender_trains_and_the_report_is_written(throughput, tiny_bert, tiny_csv, tmp_path):
    names = [n for n in throughput.CONTENDERS if n != "torchdistill_live"]  # see the next test
    config = tiny_config(throughput, tiny_bert, tiny_csv, tmp_path, names)
    result = throughput.benchmark(config, command="pytest", memory=False, log=lambda line: None)

    assert list(result["contenders"]) == names
    assert_trained(result)
    assert result["contenders"]["lightning_live"]["optimizer_steps"] == 2
    assert {r["pair"] for r in result["ratios"]} == {"b'/b", "a/b", "c/d", "a/e", "c/e"}
    assert list((tmp_path / "cache").iterdir()), "the cached contender built its teacher cache"

    md, js = throughput.write_report(result, tmp_path / "results")
    assert "| a | `lightning_live` |" in md.read_text()
    assert json.loads(js.read_text())["config"]["steps"] == 2


def test_torchdistill_contender_trains(throughput, tiny_bert, tiny_csv, tmp_path):
    try:
        throughput.import_torchdistill()
    except ImportError as err:
        pytest.skip(str(err))
    config = tiny_config(throughput, tiny_bert, tiny_csv, tmp_path, ["lightning_live", "torchdistill_live"])
    result = throughput.benchmark(config, command="pytest", memory=False, log=lambda line: None)
    assert_trained(result)
    assert [r["pair"] for r in result["ratios"]] == ["a/f"]
