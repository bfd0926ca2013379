"""Decoupled knowledge distillation: target-class and non-target-class KD weighted apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss, positive
from kd_lightning.outputs import ModelOutputs


class DKD(DistillLoss):
    """DKD (Zhao et al., 2022, "Decoupled Knowledge Distillation").

    ``T^2 [alpha KL(b_t || b_s) + beta KL(q_t || q_s)]``: ``b = [p_y, 1 - p_y]`` (target-class KD)
    and ``q`` the softmax over the non-target classes (non-target-class KD), at temperature
    ``T``. Reads ``batch["labels"]``; rows labelled ``-100`` are ignored. mdistiller's CIFAR
    recipe also warms DKD's weight up over the first epochs: a weight schedule callback, not
    this loss.

    Args:
        alpha: weight of the target-class term (1).
        beta: weight of the non-target-class term (8).
        temperature: ``T`` (4).
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = positive(temperature, "temperature", type(self).__name__)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return functional.dkd_loss(
            student.logits, teacher.logits, batch["labels"], self.alpha, self.beta, self.temperature
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
