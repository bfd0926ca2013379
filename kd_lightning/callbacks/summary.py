"""``RunSummary``: at the end of fit, teacher vs student in a table and in ``summary.json``."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from kd_lightning.models import count_parameters


def batch_examples(batch: Any) -> int:
    """The number of examples in a batch: its ``index`` (every data module's batches carry one;
    retrieval batches have no ``labels``), else ``labels``, else ``input_ids``; 0 when none is there."""
    if not hasattr(batch, "get"):
        return 0
    for key in ("index", "labels", "input_ids"):
        value = batch.get(key)
        if value is not None and hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return 0


class RunSummary(pl.Callback):
    """Prints and saves what a run produced: validation metrics of teacher and student,
    parameter counts and the compression ratio, training throughput, and where the logs, the
    best checkpoint and the exported student are. Written to ``<run dir>/summary.json``."""

    def __init__(self) -> None:
        self.samples = 0
        self.train_seconds = 0.0
        self._start: float | None = None
        self.summary: dict[str, Any] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.samples += batch_examples(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.train_seconds += time.perf_counter() - self._start
            self._start = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_end(trainer, pl_module)  # validation time is not training time

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training:
            self._start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_end(trainer, pl_module)
        student = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and "/teacher/" not in k}
        teacher = dict(getattr(pl_module, "teacher_metrics", {}))
        teacher.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/teacher/")})
        student_params = count_parameters(pl_module.student)
        teacher_model = getattr(pl_module, "teacher", None)
        teacher_params = count_parameters(teacher_model) if teacher_model is not None else None
        checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        exports = [getattr(cb, "exported_to", None) for cb in trainer.callbacks]
        self.summary = {
            "student_metrics": student,
            "teacher_metrics": teacher,
            "student_parameters": student_params,
            "teacher_parameters": teacher_params,
            "compression": teacher_params / student_params if teacher_params else None,
            "train_samples_per_second": self.samples / self.train_seconds if self.train_seconds else None,
            "steps": trainer.global_step,
            "log_dir": trainer.log_dir,
            "best_checkpoint": checkpoint,
            "exported_student": next((e for e in exports if e), None),
        }
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: pl.Trainer) -> None:
        s = self.summary
        table = Table(title="Run summary")
        table.add_column("")
        table.add_column("teacher", justify="right")
        table.add_column("student", justify="right")
        for key in sorted(k.removeprefix("val/") for k in s["student_metrics"] if k != "val/loss"):
            t = s["teacher_metrics"].get(f"val/teacher/{key}")
            table.add_row(f"val {key}", f"{t:.4f}" if t is not None else "—", f"{s['student_metrics'][f'val/{key}']:.4f}")
        if s["teacher_parameters"]:
            table.add_row("parameters", f"{s['teacher_parameters'] / 1e6:.1f} M", f"{s['student_parameters'] / 1e6:.1f} M")
            table.add_row("compression", "", f"{s['compression']:.2f}x")
        else:
            table.add_row("parameters", "—", f"{s['student_parameters'] / 1e6:.1f} M")
        if s["train_samples_per_second"]:
            table.add_row("training throughput", "", f"{s['train_samples_per_second']:.1f} samples/s")
        console = Console()
        console.print(table)
        for label, key in (("logs", "log_dir"), ("best checkpoint", "best_checkpoint"), ("exported student", "exported_student")):
            if s[key]:
                console.print(f"{label}: {s[key]}")
        if s["log_dir"]:  # not trainer.log_dir: under DDP that is a collective, and this runs on rank 0 only
            os.makedirs(s["log_dir"], exist_ok=True)
            with open(os.path.join(s["log_dir"], "summary.json"), "w") as handle:
                json.dump(s, handle, indent=2)
