"""Losses on output logits: cross-entropy on labels and the classical divergences."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss
from kd_lightning.outputs import ModelOutputs


class CrossEntropy(DistillLoss):
    """Cross-entropy of the student's logits against the labels (the ``alpha`` part of KD).

    ``-1/n sum_i log softmax(z_s^i)[y_i]``. Rows labelled ``-100`` are ignored.
    """

    needs_teacher = False

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        logits = student.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100)


class KLDivergence(DistillLoss):
    """Knowledge distillation of Hinton et al. (2015): ``T^2 KL(p_t || p_s)``, ``p = softmax(z / T)``.

    Args:
        temperature: softening temperature ``T`` (2 to 4 is usual).
    """

    def __init__(self, temperature: float = 2.0, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = float(temperature)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return functional.kl_divergence(student.logits, teacher.logits, self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
