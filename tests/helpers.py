"""Builders shared by the tests (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
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


def distill_model_config(teacher: Path | str) -> dict[str, Any]:
    """A CLI config's ``model`` section: a 1-layer, width-16 student with dropout on (its config
    default) distilled from ``teacher`` (a tiny BERT such as ``tiny_bert``) with cross-entropy,
    KD and a learned projection of features (FitNets), AdamW at lr 1e-3."""
    return {
        "class_path": "kd_lightning.DistillModule",
        "init_args": {
            "teacher": {"name_or_path": str(teacher)},
            "student": {"config_overrides": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20}},
            "taps": {
                "t": {"module": "teacher", "path": "bert.encoder.layer.1", "reduce": "cls"},
                "s": {"module": "student", "path": "bert.encoder.layer.0", "reduce": "mean"},
            },
            "losses": [
                {"class_path": "kd_lightning.losses.CrossEntropy", "init_args": {"weight": 0.5}},
                {"class_path": "kd_lightning.losses.KLDivergence", "init_args": {"weight": 0.5}},
                {"class_path": "kd_lightning.losses.ProjectedMSE", "init_args": {"student": "s", "teacher": "t"}},
            ],
            "optim": {"lr": 1e-3},
        },
    }


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


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``<name>_benchmark`` (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
