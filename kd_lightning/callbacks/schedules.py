"""Loss schedules as callbacks: a loss's weight or temperature as a function of the training step.

Both set the attribute before every training batch from ``trainer.global_step``, so a resumed
run continues the schedule where it stopped. The module logs ``train/weight/<name>`` each step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from kd_lightning.losses.base import DistillLoss


def linear_ramp(step: int, start: float, end: float, steps: int, offset: int = 0) -> float:
    """``start`` before ``offset``, then linearly to ``end`` over ``steps`` steps, then ``end``."""
    if step < offset:
        return start
    if steps <= 0:
        return end
    progress = min(1.0, (step - offset) / steps)
    return start + (end - start) * progress


def find_loss(pl_module: pl.LightningModule, name: str) -> DistillLoss:
    losses = getattr(pl_module, "losses", None)
    names = [loss.name for loss in losses] if losses is not None else []
    for loss in losses or []:
        if loss.name == name:
            return loss
    raise ValueError(f"schedule for loss {name!r}: the module has no loss of that name (its losses: {names})")


class _StepSchedule(pl.Callback):
    attribute: str

    def __init__(self, loss: str, start: float, end: float, steps: int | None, epochs: float | None, offset_steps: int) -> None:
        if (steps is None) == (epochs is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of steps and epochs for the ramp length")
        self.loss_name = loss
        self.start, self.end = float(start), float(end)
        self.steps, self.epochs, self.offset_steps = steps, epochs, offset_steps

    def ramp_steps(self, trainer: pl.Trainer) -> int:
        if self.steps is not None:
            return int(self.steps)
        per_epoch = trainer.estimated_stepping_batches / max(1, trainer.max_epochs or 1)
        return max(1, round(self.epochs * per_epoch))

    def value_at(self, step: int, trainer: pl.Trainer) -> float:
        return linear_ramp(step, self.start, self.end, self.ramp_steps(trainer), self.offset_steps)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = find_loss(pl_module, self.loss_name)
        if not hasattr(loss, self.attribute):
            raise ValueError(f"{type(self).__name__}: loss {self.loss_name!r} ({type(loss).__name__}) has no {self.attribute}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        value = self.value_at(trainer.global_step, trainer)
        setattr(find_loss(pl_module, self.loss_name), self.attribute, value)
        logger_step = getattr(pl_module, "logger_step", None)  # StudentModule: the steps the loggers write
        if logger_step is None or logger_step():
            pl_module.log(f"train/{self.attribute}/{self.loss_name}", value, on_step=True, on_epoch=False, batch_size=1)


class LossWeightWarmup(_StepSchedule):
    """Ramp a loss's weight linearly from ``start`` to ``end``.

    KD++ (Wang et al., 2023) warms the KD weight up linearly over the first epochs; any loss can
    be scheduled the same way.

    Args:
        loss: the loss's ``name``.
        start / end: weight at the start and after the ramp.
        steps / epochs: ramp length, in optimiser steps or epochs (one of them).
        offset_steps: steps to hold ``start`` before the ramp begins.
    """

    attribute = "weight"

    def __init__(self, loss: str, start: float = 0.0, end: float = 1.0, steps: int | None = None,
                 epochs: float | None = None, offset_steps: int = 0) -> None:
        super().__init__(loss, start, end, steps, epochs, offset_steps)


class TemperatureAnneal(_StepSchedule):
    """Anneal a loss's ``temperature`` linearly from ``start`` to ``end`` (SinKD: down to 1).

    Args:
        loss: the loss's ``name``; it must have a ``temperature`` attribute.
        start / end: temperature at the start and after the ramp.
        steps / epochs: ramp length, in optimiser steps or epochs (one of them).
        offset_steps: steps to hold ``start`` before the ramp begins.
    """

    attribute = "temperature"

    def __init__(self, loss: str, start: float = 4.0, end: float = 1.0, steps: int | None = None,
                 epochs: float | None = None, offset_steps: int = 0) -> None:
        super().__init__(loss, start, end, steps, epochs, offset_steps)
