"""Representational alignment over a whole evaluation set: streaming linear CKA and Procrustes.

Both metrics accumulate ``n``, the column sums and the cross-products ``S^T S``, ``T^T T``,
``S^T T`` in float64 (summed across processes), so ``compute()`` equals the one-shot
:func:`~kd_lightning.losses.functional.linear_cka` / ``procrustes_distance`` on the
concatenated rows, whatever the batching. Memory is ``O((d_s + d_t)^2)``, independent of ``n``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from kd_lightning.losses.functional import linear_cka_from_moments, procrustes_from_moments


class RepresentationMoments(Metric):
    """Sufficient statistics of a pair of representations; subclasses turn them into a measure.

    Args:
        student_width: ``d_s``, the width of the student rows.
        teacher_width: ``d_t``, the width of the teacher rows.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, student_width: int, teacher_width: int, **kwargs) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_s", torch.zeros(student_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_t", torch.zeros(teacher_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("ss", torch.zeros(student_width, student_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("tt", torch.zeros(teacher_width, teacher_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("st", torch.zeros(student_width, teacher_width, dtype=f64), dist_reduce_fx="sum")

    def update(self, student: Tensor, teacher: Tensor) -> None:
        """Add ``(rows, d_s)`` student and ``(rows, d_t)`` teacher rows (same rows, same order)."""
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"student and teacher rows differ: {student.shape[0]} vs {teacher.shape[0]}")
        s, t = student.detach().to(torch.float64), teacher.detach().to(torch.float64)
        self.n += s.shape[0]
        self.sum_s += s.sum(0)
        self.sum_t += t.sum(0)
        self.ss += s.mT @ s
        self.tt += t.mT @ t
        self.st += s.mT @ t

    def centred_moments(self) -> tuple[Tensor, Tensor, Tensor]:
        """``S_c^T S_c``, ``T_c^T T_c``, ``S_c^T T_c`` of the column-centred rows seen so far."""
        n = self.n.clamp_min(1.0)
        mean_s, mean_t = self.sum_s / n, self.sum_t / n
        return (
            self.ss - n * torch.outer(mean_s, mean_s),
            self.tt - n * torch.outer(mean_t, mean_t),
            self.st - n * torch.outer(mean_s, mean_t),
        )


class StreamingLinearCKA(RepresentationMoments):
    """Linear CKA (Kornblith et al., 2019) between student and teacher rows of a whole dataset."""

    higher_is_better = True

    def compute(self) -> Tensor:
        return linear_cka_from_moments(*self.centred_moments())


class StreamingProcrustes(RepresentationMoments):
    """Procrustes distance ``2 - 2 ||T^T S||_*`` (normalised rows) over a whole dataset.

    Args:
        student_width, teacher_width: see :class:`RepresentationMoments`.
        squared, angular: as in :func:`~kd_lightning.losses.functional.procrustes_distance`.
    """

    higher_is_better = False

    def __init__(
        self, student_width: int, teacher_width: int, squared: bool = True, angular: bool = False, **kwargs
    ) -> None:
        super().__init__(student_width, teacher_width, **kwargs)
        self.squared = squared
        self.angular = angular

    def compute(self) -> Tensor:
        return procrustes_from_moments(*self.centred_moments(), squared=self.squared, angular=self.angular)
