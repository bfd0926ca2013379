"""``DPKShareSchedule``: the share of student positions that DPK replaces by the teacher's prior,
set before every training batch."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl

from kd_lightning.callbacks.schedules import linear_ramp

Mode = Literal["cka", "linear", "cosine", "constant"]


class DPKShareSchedule(pl.Callback):
    """Sets :attr:`~kd_lightning.methods.DPKModule.prior_share` before each training batch.

    Modes:

    - ``cka`` (the paper's dynamic prior, Qiu et al., ICLR 2023): the share starts at ``start``
      (0.5 in the paper) and after every training batch moves towards the feature gap,
      ``r <- momentum * r + (1 - momentum) * (1 - CKA)``, with ``CKA`` the linear CKA between the
      student's and the teacher's features that the module measured in that batch
      (``train/dpk/cka``) and ``momentum = 0.9``: the further the student is from the teacher,
      the more of the teacher it is given (constants read from a public implementation of the
      method, UNVERIFIED against the paper's text). Kept in the callback's checkpoint state, so
      a resumed run continues from the same share.
    - ``linear`` / ``cosine``: from ``start`` to ``end`` over ``steps`` optimiser steps (or
      ``epochs``), linearly or along a half cosine, then ``end``; a function of the global
      step, so a resumed run continues the schedule.
    - ``constant``: ``start`` throughout.

    The module logs the share it used at every step as ``train/dpk/share``.

    Args:
        mode: ``cka``, ``linear``, ``cosine`` or ``constant``.
        start: share at the first step.
        end: share at the end of a ``linear`` / ``cosine`` schedule.
        steps / epochs: length of a ``linear`` / ``cosine`` schedule (exactly one of them).
        momentum: weight of the previous share in the ``cka`` update.
    """

    def __init__(
        self,
        mode: Mode = "cka",
        start: float = 0.5,
        end: float = 0.0,
        steps: int | None = None,
        epochs: float | None = None,
        momentum: float = 0.9,
    ) -> None:
        if mode not in ("cka", "linear", "cosine", "constant"):
            raise ValueError(f"DPKShareSchedule mode must be 'cka', 'linear', 'cosine' or 'constant', got {mode!r}")
        for argument, value in (("start", start), ("end", end), ("momentum", momentum)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"DPKShareSchedule {argument} must lie in [0, 1], got {value}")
        timed = mode in ("linear", "cosine")
        if timed and (steps is None) == (epochs is None):
            raise ValueError(f"DPKShareSchedule mode {mode!r}: give exactly one of steps and epochs for its length")
        if not timed and (steps is not None or epochs is not None):
            raise ValueError(
                f"DPKShareSchedule: steps/epochs set the length of linear and cosine schedules, not of {mode!r}"
            )
        self.mode = mode
        self.start, self.end, self.momentum = float(start), float(end), float(momentum)
        self.steps, self.epochs = steps, epochs
        self.share = self.start  # the cka mode's running share

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "prior_share") or not hasattr(pl_module, "prior_cka"):
            raise TypeError(
                f"DPKShareSchedule schedules DPK's prior share, but the model is a {type(pl_module).__name__}: "
                "use model class_path kd_lightning.methods.DPKModule, or remove this callback"
            )

    def ramp_steps(self, trainer: pl.Trainer) -> int:
        if self.steps is not None:
            return max(1, int(self.steps))
        per_epoch = trainer.estimated_stepping_batches / max(1, trainer.max_epochs or 1)
        return max(1, round(self.epochs * per_epoch))

    def value_at(self, step: int, trainer: pl.Trainer) -> float:
        """The share of training step ``step``."""
        if self.mode == "cka":
            return self.share
        if self.mode == "constant":
            return self.start
        length = self.ramp_steps(trainer)
        if self.mode == "linear":
            return linear_ramp(step, self.start, self.end, length)
        progress = min(1.0, step / length)
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.prior_share = self.value_at(trainer.global_step, trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.mode != "cka" or pl_module.prior_cka is None:
            return
        gap = 1.0 - float(pl_module.prior_cka)
        self.share = min(1.0, max(0.0, self.momentum * self.share + (1.0 - self.momentum) * gap))

    def state_dict(self) -> dict[str, Any]:
        return {"share": self.share}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.share = float(state_dict.get("share", self.start))
