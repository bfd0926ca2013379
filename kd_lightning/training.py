"""What every trainable-student module shares: evaluation, metrics, optimiser and export."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_lightning.metrics import class_probabilities, classification_metrics
from kd_lightning.metrics.glue import regression_metrics

#: Batch fields handed to the models; ``position_ids`` when a batch carries them (left-padded LM batches).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class OptimConfig:
    """AdamW with a warm-up then a schedule over the run's optimiser steps.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and norm weights).
        betas: Adam betas.
        warmup_ratio: share of the total steps spent warming up linearly from 0.
        schedule: ``linear`` decay to 0, ``cosine`` decay to 0, or ``constant`` after warm-up.
        fused: PyTorch's fused AdamW (``torch.optim.AdamW(fused=True)``: one kernel over all
            parameters, on CPUs and GPUs). Same update up to rounding, and much less time per
            step than the default per-tensor loop on a CPU; off by default, so that runs keep
            the default implementation's numbers.
    """

    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    fused: bool = False


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate factor at ``step`` of ``total`` with ``warmup`` linear warm-up steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tokenizer fields of a batch, as the HF model takes them."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def default_task_metrics(num_labels: int) -> MetricCollection:
    """The metrics of a model with ``num_labels`` outputs and no data module to ask: accuracy,
    macro F1 and ECE for classes; Pearson, Spearman and MSE for one output (regression)."""
    return regression_metrics() if num_labels == 1 else classification_metrics(num_labels)


def decay_groups(modules: Iterator[nn.Module], weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Two parameter groups of the trainable parameters of ``modules`` (each once): with weight
    decay, and without it for biases and norm weights."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, **extra},
        {"params": no_decay, "weight_decay": 0.0, **extra},
    ]


class StudentModule(pl.LightningModule):
    """Base of the modules that train a student classifier (or, with one output, a regressor).

    Subclasses set ``self.student`` (an HF sequence classifier), ``self.tokenizer`` and
    ``self.num_labels`` in ``__init__``, then call :meth:`_init_metrics`, and implement
    ``training_step``.

    One output (``num_labels = 1``) means regression, as in HF's ``problem_type``: the logits
    are squeezed to scores, the supervised loss is MSE and predictions are scores. The
    evaluation metrics are the data module's (``datamodule.task_metrics()``, e.g. GLUE's
    official ones) when the module is attached to one, else :func:`default_task_metrics`.
    """

    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    num_labels: int
    #: The metric collections that evaluate the task; rebuilt from the data module's metrics.
    task_metric_collections: tuple[str, ...] = ("val_metrics", "test_metrics")

    def __init__(self, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.optim = optim or OptimConfig()
        self._final_step: tuple[int, float] | None = None  # (trainer id, its last optimiser step): see logger_step

    def _init_metrics(self) -> None:
        self.student.train()  # from_pretrained returns eval mode; Lightning keeps modules as they are
        metrics = default_task_metrics(self.num_labels)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def logger_step(self) -> bool:
        """Whether this training step's logged values reach the loggers: Lightning writes them every
        ``Trainer(log_every_n_steps)`` steps (every step under ``fast_dev_run``); the run's last
        step counts too, so that ``trainer.callback_metrics`` ends with the final values.

        Values only the loggers read (each loss term, the loss weights, a method's diagnostics)
        are logged on these steps alone, which leaves the loggers' output unchanged: each
        ``self.log`` call costs Lightning about a millisecond of host time (it builds and moves a
        result record), a sizeable share of a small model's GPU step. ``train/loss`` (the progress
        bar's value) is logged at every step.
        """
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run:
            return True
        connector = getattr(trainer, "_logger_connector", None)  # holds Lightning's own test of the step
        if connector is None or bool(getattr(connector, "should_update_logs", True)):
            return True
        if self._final_step is None or self._final_step[0] != id(trainer):
            self._final_step = (id(trainer), trainer.estimated_stepping_batches)
        return self.global_step + 1 >= self._final_step[1]

    @property
    def is_regression(self) -> bool:
        """One output: scores and MSE rather than classes and cross-entropy."""
        return self.num_labels == 1

    # ---- data checks --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_labels = getattr(datamodule, "num_labels", None)
        if data_labels is not None and data_labels != self.num_labels:
            kind = "is a regression task (one output)" if data_labels == 1 else f"has {data_labels} labels"
            raise ValueError(
                f"the data {kind} but the model has {self.num_labels} output(s): set the "
                f"model's num_labels to {data_labels}, or fix the data's label_names / label column"
            )
        self._check_max_length(getattr(datamodule, "max_length", None))
        if callable(getattr(datamodule, "task_metrics", None)):
            self._use_task_metrics(datamodule.task_metrics())

    def _check_max_length(self, max_length: int | None) -> None:
        """The data's ``max_length`` must fit the position embeddings of the models that read the
        inputs, or the first long enough text would fail mid-run."""
        from kd_lightning.models import max_input_length

        for role in ("student", "teacher"):
            model = getattr(self, role, None)
            limit = max_input_length(model) if isinstance(model, nn.Module) and max_length is not None else None
            if limit is not None and max_length > limit:
                raise ValueError(
                    f"the data's max_length {max_length} exceeds the {role}'s {limit} position embeddings "
                    f"({type(model).__name__}): set data max_length to at most {limit} "
                    f"(--data.init_args.max_length={limit})"
                )

    def _use_task_metrics(self, metrics: MetricCollection) -> None:
        """Rebuild the collections named in :attr:`task_metric_collections` from the task's
        ``metrics``, each keeping its prefix."""
        for name in self.task_metric_collections:
            if hasattr(self, name):
                setattr(self, name, metrics.clone(prefix=getattr(self, name).prefix))

    # ---- evaluation ---------------------------------------------------------------------------
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def class_logits(self, logits: Tensor) -> Tensor:
        """The task logits (class level) of the student's raw outputs; methods with other heads
        (LELP's sub-classes) map their outputs to classes here."""
        return logits

    def student_logits(self, batch: Mapping[str, Any]) -> Tensor:
        """The student's task logits for evaluation and prediction."""
        return self.class_logits(self.student(**model_inputs(batch)).logits)

    def _evaluate(self, batch: Mapping[str, Any], metrics: nn.Module, stage: str, logits: Tensor | None = None) -> Tensor:
        logits = self.student_logits(batch) if logits is None else logits
        loss = self.supervised_loss(logits, batch["labels"])
        metrics.update(self.predictions(logits), batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=False, batch_size=batch["labels"].shape[0], sync_dist=True)
        return logits

    def supervised_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on class labels, or MSE of the squeezed scores for regression (float32)."""
        if self.is_regression:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def predictions(self, logits: Tensor) -> Tensor:
        """What the metrics take: class probabilities ``(n, C)``, or scores ``(n,)`` for regression."""
        return logits.float().squeeze(-1) if self.is_regression else class_probabilities(logits)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=False)
        self.test_metrics.reset()

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        return self.predictions(self.student_logits(batch))

    # ---- optimisation -------------------------------------------------------------------------
    def trainable_modules(self) -> Iterator[nn.Module]:
        """The modules whose parameters the optimiser holds (student + loss-owned parts)."""
        yield self.student

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups over :meth:`trainable_modules`: weight decay except on biases and norms."""
        return decay_groups(self.trainable_modules(), self.optim.weight_decay)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [g for g in self.parameter_groups() if g["params"]]
        fused = {"fused": True} if self.optim.fused else {}
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), **fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.optim.warmup_ratio * total)
        schedule = self.optim.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total, warmup, schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- export -------------------------------------------------------------------------------
    def export(self, dirpath: str, state_dict: dict[str, Tensor] | None = None) -> str:
        """Save the student and its tokenizer as an HF folder that the Auto classes load.

        ``state_dict`` (the student's keys, without the ``student.`` prefix) replaces the
        module's own weights, e.g. the consolidated weights of a sharded student."""
        os.makedirs(dirpath, exist_ok=True)
        self.student.save_pretrained(dirpath, state_dict=state_dict)
        self.tokenizer.save_pretrained(dirpath)
        return dirpath
