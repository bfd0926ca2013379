"""The ``DistillLoss`` base class every distillation objective derives from."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.outputs import ModelOutputs


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class DistillLoss(nn.Module):
    """One term of the training objective: ``weight * forward(student, teacher, batch)``.

    Subclasses implement :meth:`forward` (the unweighted value) and, when they read hidden
    features, list the tap names they need in :attr:`required_taps`. Learnable parts (for
    example a projection between widths) are created in :meth:`build`, which
    :class:`~kd_lightning.DistillModule` calls once the width of every tap is known; they are
    student-side parameters, trained with the student and saved in its checkpoint.

    Args:
        weight: multiplier of this term in the total loss. Callbacks may change it during
            training (see :mod:`kd_lightning.callbacks`).
        name: the name logged as ``train/loss/<name>``; defaults to the class name in
            snake case. Give two losses of the same class different names.
    """

    #: False for losses that use the labels alone (cross-entropy): the teacher is not needed.
    needs_teacher: bool = True

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = float(weight)
        self.name = name or _snake_case(type(self).__name__)

    @property
    def required_taps(self) -> tuple[str, ...]:
        """Names of the taps (declared in the module's ``taps``) this loss reads."""
        return ()

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        """Create learnable parts once the widths of the taps are known. Default: nothing."""

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"


class FeatureLoss(DistillLoss):
    """A loss between one student tap and one teacher tap.

    Args:
        student: name of the student tap.
        teacher: name of the teacher tap.
        weight, name: see :class:`DistillLoss`.
    """

    def __init__(self, student: str, teacher: str, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.student_tap = student
        self.teacher_tap = teacher

    @property
    def required_taps(self) -> tuple[str, ...]:
        return (self.student_tap, self.teacher_tap)

    def feature_pair(self, student: ModelOutputs, teacher: ModelOutputs) -> tuple[Tensor, Tensor]:
        """The (student, teacher) rows of this loss's taps, half precision upcast to float32."""
        s, t = student.features[self.student_tap], teacher.features[self.teacher_tap]
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"loss {self.name!r}: student tap {self.student_tap!r} gives {s.shape[0]} rows but teacher tap "
                f"{self.teacher_tap!r} gives {t.shape[0]}; pair taps with the same reduction"
            )
        return float32(s), float32(t)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, student={self.student_tap!r}, teacher={self.teacher_tap!r}"


def positive(value: float, argument: str, owner: str) -> float:
    """``value`` as a float; a ``ValueError`` naming ``owner``'s ``argument`` unless it is > 0.

    Checked when a loss is built, so a zero or negative temperature fails with the config rather
    than as a NaN loss at the first step.
    """
    value = float(value)
    if not value > 0:  # also NaN
        raise ValueError(f"{owner}: {argument} must be > 0, got {value}; set init_args.{argument} to a positive number")
    return value


def float32(t: Tensor) -> Tensor:
    """Upcast half-precision tensors; the losses compute in float32 under mixed precision."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def row_mask(student: ModelOutputs, batch: Mapping[str, Any], key: str | None = None) -> Tensor | None:
    """Which rows of the student's logits a logit loss averages over.

    ``batch[key]`` when a key is named; else, for ``(batch, seq, vocab)`` logits, the student's
    token mask (causal LMs: the positions that predict a response token) or else its attention
    mask (padding does not count); else ``None`` (every row of ``(batch, classes)`` logits counts).
    """
    if key is not None:
        return batch[key]
    if student.logits.dim() == 3:
        return student.token_mask if student.token_mask is not None else student.attention_mask
    return None


def width_projection(width_s: int, width_t: int, project: bool | None, refusal: str) -> nn.Linear | None:
    """The student-side linear map ``d_s -> d_t`` (no bias) a loss learns: with ``project``
    ``None`` only when the widths differ, ``True`` always, ``False`` never (unequal widths then
    fail with the message ``refusal``)."""
    use = width_s != width_t if project is None else project
    if not use and width_s != width_t:
        raise ValueError(refusal)
    return nn.Linear(width_s, width_t, bias=False) if use else None


class ProjectedFeatureLoss(FeatureLoss):
    """A feature loss that needs equal widths, so may learn a student-side map ``d_s -> d_t``.

    Args:
        student, teacher: the tap names.
        projection: learn a linear map ``d_s -> d_t`` (trained and saved with the student):
            ``null`` only when the widths differ, ``true`` always, ``false`` never.
        weight, name: see :class:`DistillLoss`.
    """

    def __init__(
        self, student: str, teacher: str, projection: bool | None = None, weight: float = 1.0, name: str | None = None
    ) -> None:
        super().__init__(student, teacher, weight=weight, name=name)
        self.project = projection
        self.projection: nn.Linear | None = None

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        width_s, width_t = tap_widths[self.student_tap], tap_widths[self.teacher_tap]
        self.projection = width_projection(
            width_s,
            width_t,
            self.project,
            f"loss {self.name!r}: student width {width_s} != teacher width {width_t}; "
            "allow a projection (projection: true or null)",
        )
