"""Builders shared by the tests (kept out of conftest so tests can import them by name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest

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


#: ``fit_config`` overrides for the tiny text-classification data: short rows, small batches.
TINY_TEXT_DATA = ("--data.init_args.max_length=16", "--data.init_args.batch_size=8")


def fit_config(
    config: Path | str,
    teacher: Path | str,
    *overrides: str,
    layers: str = "[0]",
    data_files: Path | str | dict[str, str] | None = None,
    limit_val_batches: int | None = 1,
) -> Any:
    """``kd_lightning fit`` on a shipped ``config`` for two steps (validation at step 2, no sanity
    check, no progress bar or model summary), with the tiny ``teacher`` swapped in (the student
    copies its ``layers``) and, when given, local ``data_files`` for the config's data set.
    ``overrides``: further ``--key=value`` arguments. Returns the CLI."""
    from kd_lightning.cli import main

    data = [] if data_files is None else ["--data.init_args.dataset=null", f"--data.init_args.data_files={data_files}"]
    limit = [] if limit_val_batches is None else [f"--trainer.limit_val_batches={limit_val_batches}"]
    return main(
        [
            "fit", "--config", str(config),
            f"--model.init_args.teacher.name_or_path={teacher}",
            f"--model.init_args.student.from_teacher_layers={layers}",
            *data,
            *overrides,
            *limit,
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )  # fmt: skip


def interrupt_cache_build(module: Any, data: Any, root: Path) -> None:
    """Kill ``module``'s teacher-cache build at the teacher's second forward pass and check that
    nothing is left under ``root`` that could pass for a complete cache."""
    calls = []

    def crash(module_, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the build")

    handle = module.teacher.register_forward_hook(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            module.open_teacher_cache(data)
    finally:
        handle.remove()
    assert not root.exists() or list(root.iterdir()) == []


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``<name>_benchmark`` (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
