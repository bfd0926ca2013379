"""benchmarks/cache_equivalence.py end to end on the tiny models: per-seed rows and the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cache_equivalence  # noqa: E402


def test_live_and_cached_runs_per_seed_and_their_summary(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "kd_lightning.DistillModule", "init_args": {
            "teacher": {"name_or_path": str(tiny_bert)},
            "student": {"from_teacher_layers": [0]},
            "losses": [{"class_path": "kd_lightning.losses.CrossEntropy", "init_args": {"weight": 0.5}},
                       {"class_path": "kd_lightning.losses.KLDivergence", "init_args": {"weight": 0.5, "temperature": 2.0}}],
            "optim": {"lr": 1e-3}}},
        "data": {"class_path": "kd_lightning.data.TextClassificationDataModule",
                 "init_args": {"data_files": tiny_csv, "max_length": 16, "batch_size": 8}},
        "trainer": {"enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}}},
    }))
    out = tmp_path / "result"
    result = cache_equivalence.main(["--config", str(config), "--seeds", "0", "1", "--steps", "6", "--val-every", "3", "--out", str(out)])

    assert [(r["seed"], r["mode"]) for r in result["runs"]] == [(0, "live"), (0, "cache"), (1, "live"), (1, "cache")]
    assert all(r["steps"] == 6 for r in result["runs"])
    metrics = {(r["seed"], r["mode"]): r["metrics"] for r in result["runs"]}
    for metric, row in result["summary"].items():
        diffs = [abs(metrics[(s, "live")][metric] - metrics[(s, "cache")][metric]) for s in (0, 1)]
        assert row["max_abs_difference"] == pytest.approx(max(diffs))
    # same seed, same batches: only the float16 rounding of the teacher's logits separates the two
    assert result["summary"]["val/loss"]["max_abs_difference"] < 1e-2
    assert json.loads(out.with_suffix(".json").read_text())["summary"] == result["summary"]
    assert "| metric | max abs live - cache difference |" in out.with_suffix(".md").read_text()
