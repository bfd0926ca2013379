"""Builders shared by the tests (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from kd_lightning import DistillModule, StudentSpec, TapSpec, TeacherSpec
from kd_lightning.data import TextClassificationDataModule
from kd_lightning.losses import CrossEntropy, KLDivergence, ProjectedMSE


def distill_module(teacher_path: Path, **overrides: Any) -> DistillModule:
    kwargs: dict[str, Any] = {
        "teacher": TeacherSpec(str(teacher_path)),
        "student": StudentSpec(config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20}),
        "taps": {
            "t_last": TapSpec("teacher", "bert.encoder.layer.1", "cls"),
            "s_last": TapSpec("student", "bert.encoder.layer.0", "mean"),
        },
        "losses": [
            CrossEntropy(weight=0.5),
            KLDivergence(weight=0.5, temperature=2.0),
            ProjectedMSE(student="s_last", teacher="t_last", weight=0.1),
        ],
    }
    kwargs.update(overrides)
    return DistillModule(**kwargs)


def csv_datamodule(files: dict[str, str], **overrides: Any) -> TextClassificationDataModule:
    kwargs: dict[str, Any] = {"data_files": files, "max_length": 16, "batch_size": 8}
    kwargs.update(overrides)
    return TextClassificationDataModule(**kwargs)


def quiet_trainer(root: Path, **overrides: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = {
        "default_root_dir": str(root),
        "max_steps": 4,
        "limit_val_batches": 2,
        "val_check_interval": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "accelerator": "cpu",
    }
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)
