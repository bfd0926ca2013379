"""ND loss of KD++: student embeddings pulled along the teacher's class means, with large norms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import ProjectedFeatureLoss
from kd_lightning.outputs import ModelOutputs


class NDLoss(ProjectedFeatureLoss):
    """ND (Wang et al., 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and Direction").

    ``1/n sum_i [1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, ||t_i||)]``: the student's
    embedding is projected on the direction of its class's teacher mean ``c_y`` and pushed
    past the larger of the two norms. Taps must give one row per example (``cls``, ``mean``,
    or the pooler with ``none``); rows labelled ``-100`` are ignored. The paper's total is
    CE + KD (weight warmed up) + ND.

    ``class_means`` (``(num_labels, d_t)``, a buffer saved with the checkpoint) must be set
    before training with :meth:`set_class_means`, from the teacher's embeddings of the training
    set (:func:`~kd_lightning.losses.functional.mean_per_class`);
    :class:`~kd_lightning.callbacks.TeacherClassMeans` does this at fit start. A resumed run
    reloads them from the checkpoint.

    Args:
        student, teacher: the tap names (the embeddings before the classifier).
        projection: a learned linear map ``d_s -> d_t``: ``null`` only when the widths differ,
            ``true`` always, ``false`` never (the reference code adds BN and dropout; we do not).
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self, student: str, teacher: str, projection: bool | None = None, weight: float = 1.0, name: str | None = None
    ) -> None:
        super().__init__(student, teacher, projection, weight=weight, name=name)
        self.register_buffer("class_means", None)
        self.register_buffer("has_class_means", torch.tensor(False))

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        super().build(tap_widths, num_labels)
        self.register_buffer("class_means", torch.zeros(num_labels, tap_widths[self.teacher_tap]))

    @torch.no_grad()
    def set_class_means(self, means: Tensor) -> None:
        """Store the teacher's ``(num_labels, d_t)`` class means."""
        if self.class_means is None or self.class_means.shape != means.shape:
            self.register_buffer("class_means", torch.empty_like(means, dtype=torch.float32))
        self.class_means.copy_(means)
        self.has_class_means.fill_(True)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        if not bool(self.has_class_means):
            raise RuntimeError(
                f"loss {self.name!r}: the teacher's class means are not set. Add the TeacherClassMeans callback "
                "or call set_class_means(mean_per_class(teacher_embeddings, labels, num_labels)) before training."
            )
        s, t = self.feature_pair(student, teacher)
        labels = batch["labels"]
        if labels.numel() != s.shape[0]:
            raise ValueError(f"loss {self.name!r} needs one row per example: reduce its taps with cls, mean or none")
        return functional.nd_loss(s, t, self.class_means, labels, self.projection)
