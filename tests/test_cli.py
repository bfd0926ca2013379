"""The command line end to end on tiny random models: fine-tune a teacher, distil it, export, reload."""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kd_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]


def scalars(run_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(f"{run_dir}/events.out.tfevents.*")
    assert files, f"no event file in {run_dir}"
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_config(path: Path, model: dict, data: dict, trainer: dict) -> Path:
    path.write_text(yaml.safe_dump({"seed_everything": 0, "model": model, "data": data, "trainer": trainer}))
    return path


@pytest.fixture
def run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fine_tune_then_distil_through_the_cli(tiny_bert, tiny_csv, run_in_tmp, monkeypatch):
    import kd_lightning.callbacks.export as export

    said: list[str] = []
    monkeypatch.setattr(export, "rank_zero_info", said.append)
    data = {
        "class_path": "kd_lightning.data.TextClassificationDataModule",
        "init_args": {"data_files": tiny_csv, "max_length": 16, "batch_size": 16},
    }
    trainer = {
        "max_epochs": 2,
        "log_every_n_steps": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "teacher"}},
        "callbacks": [{"class_path": "kd_lightning.callbacks.ExportHF", "init_args": {"dirpath": "teacher_export"}}],
    }
    teacher_cfg = write_config(
        run_in_tmp / "teacher.yaml",
        {"class_path": "kd_lightning.FineTuneModule", "init_args": {"model": str(tiny_bert), "num_labels": 2, "optim": {"lr": 1e-3}}},
        data,
        trainer,
    )
    main(["fit", "--config", str(teacher_cfg)])
    assert (run_in_tmp / "teacher_export" / "config.json").is_file()
    assert "ExportHF: fine-tuned model saved to teacher_export" in said

    trainer["logger"]["init_args"]["name"] = "distill"
    trainer["callbacks"][0]["init_args"]["dirpath"] = "student_export"
    distill_cfg = write_config(
        run_in_tmp / "distill.yaml",
        {
            "class_path": "kd_lightning.DistillModule",
            "init_args": {
                "teacher": {"name_or_path": "teacher_export"},
                "student": {"from_teacher_layers": [1]},
                "taps": {
                    "t": {"module": "teacher", "path": "bert.encoder.layer.1", "reduce": "mean"},
                    "s": {"module": "student", "path": "bert.encoder.layer.0", "reduce": "mean"},
                },
                "losses": [
                    {"class_path": "kd_lightning.losses.CrossEntropy", "init_args": {"weight": 0.5}},
                    {"class_path": "kd_lightning.losses.KLDivergence", "init_args": {"weight": 0.5, "temperature": 2.0}},
                    {"class_path": "kd_lightning.losses.ProjectedMSE", "init_args": {"student": "s", "teacher": "t"}},
                ],
            },
        },
        data,
        trainer,
    )
    main(["fit", "--config", str(distill_cfg), "--trainer.max_steps=6"])

    run_dir = str(run_in_tmp / "runs" / "distill" / "version_0")
    logged = scalars(run_dir)
    for tag in ("train/loss", "train/loss/cross_entropy", "train/loss/kl_divergence", "train/loss/projected_mse"):
        assert len(logged[tag]) == 6, tag
    for step in range(6):
        total = 0.5 * logged["train/loss/cross_entropy"][step] + 0.5 * logged["train/loss/kl_divergence"][step]
        total += logged["train/loss/projected_mse"][step]
        assert logged["train/loss"][step] == pytest.approx(total, rel=1e-5)
    assert "val/teacher/acc" in logged and "val/acc" in logged
    assert glob.glob(f"{run_dir}/checkpoints/*.ckpt")
    assert (Path(run_dir) / "config.yaml").is_file() and (Path(run_dir) / "data_splits.json").is_file()
    import json

    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["exported_student"] == "student_export"
    assert said[-1] == "ExportHF: student saved to student_export"
    assert summary["compression"] == pytest.approx(summary["teacher_parameters"] / summary["student_parameters"])
    assert summary["compression"] > 1 and summary["train_samples_per_second"] > 0
    assert summary["student_metrics"]["val/acc"] == pytest.approx(logged["val/acc"][-1])
    assert summary["teacher_metrics"]["val/teacher/acc"] == pytest.approx(logged["val/teacher/acc"][0])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    student = AutoModelForSequenceClassification.from_pretrained(run_in_tmp / "student_export")
    tokenizer = AutoTokenizer.from_pretrained(run_in_tmp / "student_export")
    assert student.config.num_hidden_layers == 1 and student.config.num_labels == 2
    logits = student(**tokenizer(["a good movie"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)

    # validate / test / predict from a checkpoint; test reports the student and the teacher side by side
    ckpt = glob.glob(f"{run_dir}/checkpoints/last.ckpt")[0]
    validated = main(["validate", "--config", str(distill_cfg), "--ckpt_path", ckpt]).trainer.callback_metrics
    assert 0.0 <= float(validated["val/acc"]) <= 1.0
    tested = main(["test", "--config", str(distill_cfg), "--ckpt_path", ckpt]).trainer.callback_metrics
    assert {"test/acc", "test/f1", "test/ece", "test/teacher/acc"} <= set(tested)
    cli = main(["predict", "--config", str(distill_cfg), "--ckpt_path", ckpt, "--return_predictions=true"])
    probabilities = torch.cat(cli.trainer.predict_loop.predictions)
    assert probabilities.shape == (32, 2)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(32))


@pytest.mark.parametrize("config", ["teacher.yaml", "distill.yaml"])
def test_quickstart_configs_print(config):
    out = subprocess.run(
        [sys.executable, "-m", "kd_lightning", "fit", "--config", f"configs/quickstart/{config}", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    printed = yaml.safe_load(out)
    assert printed["data"]["init_args"]["dataset"] == "packaged/rotten_tomatoes"
    assert printed["trainer"]["max_epochs"] == 1


def test_default_checkpoint_follows_the_data_modules_metric(tiny_bert, tiny_csv, run_in_tmp):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kd_lightning.cli import KDLightningCLI

    model = {"class_path": "kd_lightning.FineTuneModule", "init_args": {"model": str(tiny_bert), "num_labels": 2}}
    data = {"class_path": "kd_lightning.data.TextClassificationDataModule", "init_args": {"data_files": tiny_csv}}
    config = write_config(run_in_tmp / "c.yaml", model, data, {"max_steps": 1})
    cli = KDLightningCLI(args=["--config", str(config)], run=False)
    checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert [(c.monitor, c.mode) for c in checkpoints] == [(cli.datamodule.monitor, "max"), (None, "min")]
    assert checkpoints[1].filename == "last", "the second one keeps last.ckpt current for --ckpt_path last"

    own = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": "val/f1", "mode": "max"}}
    config = write_config(run_in_tmp / "d.yaml", model, data, {"max_steps": 1, "callbacks": [own]})
    cli = KDLightningCLI(args=["--config", str(config)], run=False)
    assert [c.monitor for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)] == ["val/f1"]
