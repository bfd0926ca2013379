"""The AD-KD, Comparative KD and SRD configs parse through the real CLI as shipped, and train
two steps with the tiny fixture teacher and data swapped in, so they cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_TEXT_DATA, fit_config

from kd_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
#: config -> (model class, the method's logged term)
CONFIGS = {
    "adkd.yaml": ("kd_lightning.methods.ADKDModule", "attribution"),
    "comparative_kd.yaml": ("kd_lightning.DistillModule", "comparative_kd"),
    "srd.yaml": ("kd_lightning.methods.SRDModule", "srd"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_parses_and_trains_two_steps(name, tiny_bert, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])  # the CLI warns when pytest's own arguments are there too
    config = REPO / "configs" / "methods" / name
    model_class, term = CONFIGS[name]

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == model_class
    model = printed["model"]["init_args"]
    assert model["teacher"]["name_or_path"] == "runs/quickstart/teacher"
    assert model["student"]["from_teacher_layers"] == [0, 5]
    assert printed["data"]["init_args"]["dataset"] == "packaged/rotten_tomatoes"

    cli = fit_config(config, tiny_bert, *TINY_TEXT_DATA, data_files=tiny_csv)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics[f"train/loss/{term}"]) and torch.isfinite(metrics["train/loss"])
    assert (tmp_path / "runs" / "methods" / config.stem / "student" / "config.json").is_file()
