"""Losses between hidden features of a student tap and a teacher tap, row by row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from kd_lightning.losses import functional
from kd_lightning.losses.base import FeatureLoss, ProjectedFeatureLoss
from kd_lightning.outputs import ModelOutputs


class ProjectedMSE(FeatureLoss):
    """FitNets (Romero et al., 2015, "FitNets: Hints for Thin Deep Nets").

    ``||T - S W||_F^2 / (n d_t)`` with ``W`` a learned linear map from the student width
    ``d_s`` to the teacher width ``d_t`` (identity-free: created even when widths agree, as
    in the paper's regressor). ``W`` is a student-side parameter, saved with the student.
    """

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        self.projection = nn.Linear(tap_widths[self.student_tap], tap_widths[self.teacher_tap], bias=False)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = self.feature_pair(student, teacher)
        return functional.projected_mse(s, t, self.projection)


class CosineDistance(ProjectedFeatureLoss):
    """PKD (Sun et al., 2019, "Patient Knowledge Distillation for BERT Model Compression").

    ``1/n sum_i || s_i / ||s_i|| - t_i / ||t_i|| ||^2`` (the paper applies it to the ``[CLS]``
    rows of paired layers: one loss per pair). Needs equal widths or a learned projection.

    Args: see :class:`~kd_lightning.losses.base.ProjectedFeatureLoss`.
    """

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = self.feature_pair(student, teacher)
        return functional.cosine_distance(s, t, self.projection)
