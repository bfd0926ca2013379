"""Every loss and geometry config parses through the CLI, and its losses, taps and callbacks fit together."""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
from pathlib import Path

import pytest
import yaml

from kd_lightning import DistillModule, TapSpec
from kd_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
LIBRARY = (
    "KLDivergence", "ReverseKLDivergence", "JSDivergence", "SkewKLDivergence", "SkewReverseKLDivergence",
    "TotalVariationDistance", "BalancedDivergence", "SinkhornDistance", "DKD", "DIST", "ProjectedMSE",
    "CosineDistance", "Procrustes", "GramDistance", "CKA", "NDLoss",
)  # fmt: skip
CONFIGS = sorted((REPO / "configs" / "losses").glob("*.yaml")) + sorted((REPO / "configs" / "geometry").glob("*.yaml"))


def instantiate(entry: dict):
    module, _, name = entry["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**entry.get("init_args", {}))


def test_every_loss_class_has_a_config_and_the_geometry_recipes_exist():
    used = set()
    for path in CONFIGS:
        used |= {
            entry["class_path"].rpartition(".")[2]
            for entry in yaml.safe_load(path.read_text())["model"]["init_args"]["losses"]
        }
    assert set(LIBRARY) <= used
    assert {"procrustes", "gram", "cka", "projected_mse"} <= {p.stem for p in CONFIGS if p.parent.name == "geometry"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_its_parts_fit_together(config, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])  # the CLI warns when pytest's own arguments are there too
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    model = printed["model"]["init_args"]
    assert model["teacher"]["name_or_path"] == "runs/quickstart/teacher"
    assert model["student"]["from_teacher_layers"] == [0, 5]
    assert printed["data"]["init_args"]["dataset"] == "packaged/rotten_tomatoes"

    losses = [instantiate(entry) for entry in model["losses"]]
    taps = {name: TapSpec(**spec) for name, spec in (model.get("taps") or {}).items()}
    DistillModule._check_losses(losses, taps)  # distinct names, every tap declared
    assert len(losses) >= 2 and all(loss.weight > 0 for loss in losses)
    if config.parent.name == "geometry":  # KD + alpha * D
        assert {type(loss).__name__ for loss in losses} >= {"CrossEntropy", "KLDivergence"}
    for entry in printed["trainer"].get("callbacks") or []:
        callback = instantiate(entry)
        for student_tap, teacher_tap in getattr(callback, "pairs", {}).values():
            assert taps[student_tap].module == "student" and taps[teacher_tap].module == "teacher"
        if hasattr(callback, "loss_name"):  # schedules and class means name a loss of this config
            assert callback.loss_name in {loss.name for loss in losses}
