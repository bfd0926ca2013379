"""Losses for one-output (regression) students, e.g. STS-B similarity scores.

With one output there is no distribution to soften: the student's score is pulled towards the
teacher's score (``ScoreMSE``) and towards the gold score (``LabelMSE``). This is the regression
branch of the KD of BERT-PKD / AD-KD / SinKD on STS-B (Sun et al., 2019, "Patient Knowledge
Distillation for BERT Model Compression"; repo ``2018cx/SinKD``, ``loss.py``, ``DistillKL`` with
``mode="regression"``: ``MSE(z_s / T, z_t / T)``), mixed as ``alpha * KD + (1 - alpha) * MSE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import DistillLoss, positive
from kd_lightning.outputs import ModelOutputs


def _scores(outputs: ModelOutputs) -> Tensor:
    logits = outputs.logits.float()
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"regression losses need one output per row, got logits of shape {tuple(logits.shape)}; use num_labels: 1")
    return logits.squeeze(-1)


class ScoreMSE(DistillLoss):
    """Distillation of a teacher's score: ``1/n sum_i (z_s^i / T - z_t^i / T)^2``.

    Args:
        temperature: divides both scores (``T``, default 1: plain MSE). SinKD's STS-B recipe
            uses the same ``T`` as its classification KD.
        weight, name: see :class:`~kd_lightning.losses.DistillLoss`.
    """

    def __init__(self, temperature: float = 1.0, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = positive(temperature, "temperature", type(self).__name__)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return F.mse_loss(_scores(student) / self.temperature, _scores(teacher).detach() / self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class LabelMSE(DistillLoss):
    """MSE of the student's score against the gold score: ``1/n sum_i (z_s^i - y_i)^2``
    (the ``1 - alpha`` part of KD for regression, as :class:`CrossEntropy` is for classes)."""

    needs_teacher = False

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        return F.mse_loss(_scores(student), batch["labels"].float())
