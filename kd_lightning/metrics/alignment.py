"""Representational alignment over a whole evaluation set: streaming linear CKA and Procrustes,
and the linear CKA of every student layer against every teacher layer.

Both metrics accumulate ``n``, the column sums and the cross-products ``S^T S``, ``T^T T``,
``S^T T`` in float64 (summed across processes), so ``compute()`` equals the one-shot
:func:`~kd_lightning.losses.functional.linear_cka` / ``procrustes_distance`` on the
concatenated rows, whatever the batching. Memory is ``O((d_s + d_t)^2)``, independent of ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from kd_lightning.losses.functional import cka_from_inner_products, linear_cka_from_moments, procrustes_from_moments


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


class CrossLayerCKA(Metric):
    """Linear CKA between every student layer and every teacher layer, over a whole dataset.

    ``compute()`` returns a ``(teacher layers, student layers)`` matrix whose entry ``(j, i)``
    equals :class:`StreamingLinearCKA` of student layer ``i`` against teacher layer ``j``. Each
    layer's moments are kept once (``S_i^T S_i``, ``T_j^T T_j``) and each pair's cross-product
    ``S_i^T T_j`` once, in float64: ``L_s d_s^2 + L_t d_t^2 + L_s L_t d_s d_t`` numbers, about
    40 MB for six 384-wide teacher layers against two student layers.

    Args:
        student_layers: ``L_s``, the number of student layers.
        student_width: ``d_s``, the width of every student layer.
        teacher_layers: ``L_t``.
        teacher_width: ``d_t``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, student_layers: int, student_width: int, teacher_layers: int, teacher_width: int, **kwargs) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_s", torch.zeros(student_layers, student_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_t", torch.zeros(teacher_layers, teacher_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("ss", torch.zeros(student_layers, student_width, student_width, dtype=f64), dist_reduce_fx="sum")
        self.add_state("tt", torch.zeros(teacher_layers, teacher_width, teacher_width, dtype=f64), dist_reduce_fx="sum")
        shape = (student_layers, teacher_layers, student_width, teacher_width)
        self.add_state("st", torch.zeros(shape, dtype=f64), dist_reduce_fx="sum")

    def update(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> None:
        """Add the same rows of every layer: ``L_s`` tensors ``(rows, d_s)``, ``L_t`` tensors ``(rows, d_t)``."""
        s = torch.stack([layer.detach().to(torch.float64) for layer in student])
        t = torch.stack([layer.detach().to(torch.float64) for layer in teacher])
        if s.shape[0] != self.ss.shape[0] or t.shape[0] != self.tt.shape[0]:
            raise ValueError(
                f"expected {self.ss.shape[0]} student and {self.tt.shape[0]} teacher layers, got {s.shape[0]} and {t.shape[0]}"
            )
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"student and teacher rows differ: {s.shape[1]} vs {t.shape[1]}")
        self.n += s.shape[1]
        self.sum_s += s.sum(1)
        self.sum_t += t.sum(1)
        self.ss += s.mT @ s
        self.tt += t.mT @ t
        self.st += torch.einsum("inx,jny->ijxy", s, t)

    def compute(self) -> Tensor:
        n = self.n.clamp_min(1.0)
        mean_s, mean_t = self.sum_s / n, self.sum_t / n
        ss = self.ss - n * mean_s.unsqueeze(-1) * mean_s.unsqueeze(-2)
        tt = self.tt - n * mean_t.unsqueeze(-1) * mean_t.unsqueeze(-2)
        st = self.st - n * mean_s[:, None, :, None] * mean_t[None, :, None, :]
        kk = ss.square().sum((-2, -1))[:, None]
        ll = tt.square().sum((-2, -1))[None, :]
        return cka_from_inner_products(kk, ll, st.square().sum((-2, -1))).mT
