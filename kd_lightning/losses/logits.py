"""Losses on output logits: cross-entropy on labels and the divergences between softened outputs.

Every divergence works on ``(batch, classes)`` logits and on ``(batch, seq, vocab)`` token logits;
for the latter the rows that count are the attention mask's, or ``batch[mask_key]`` (e.g. the
response tokens), and ``chunk_size`` bounds the memory of the ``tokens x vocab`` tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss, float32, positive, row_mask
from kd_lightning.outputs import ModelOutputs


class CrossEntropy(DistillLoss):
    """Cross-entropy of the student's logits against the labels (the ``alpha`` part of KD).

    ``-1/n sum_i log softmax(z_s^i)[y_i]``. Rows labelled ``-100`` are ignored (none labelled: 0).
    """

    needs_teacher = False

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        logits = float32(student.logits)
        labels = batch["labels"].reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, ignore_index=-100, reduction="sum")
        return total / (labels != -100).sum().clamp_min(1)


class LogitDivergence(DistillLoss):
    """Base of the row-wise divergences between ``p_s = softmax(z_s / T)`` and ``p_t = softmax(z_t / T)``.

    A subclass names its :mod:`~kd_lightning.losses.functional` form in :attr:`function` and
    returns any extra keyword arguments of it from :meth:`options`.

    Args:
        temperature: softening temperature ``T``.
        chunk_size: process at most this many rows at a time (activation checkpointing), for
            token-level losses over a large vocabulary; ``None`` for all at once.
        mask_key: batch key of a ``(batch, seq)`` mask of the rows that count; default: the
            attention mask for token logits, every row for class logits.
        weight, name: see :class:`DistillLoss`.
    """

    #: ``f(student_logits, teacher_logits, temperature, mask=..., chunk_size=..., **options)``
    function: Callable[..., Tensor]

    def __init__(
        self,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = positive(temperature, "temperature", type(self).__name__)
        self.chunk_size = chunk_size
        self.mask_key = mask_key

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`function` beyond the shared ones."""
        return {}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        mask = row_mask(student, batch, self.mask_key)
        return self.function(
            student.logits, teacher.logits, self.temperature, mask=mask, chunk_size=self.chunk_size, **self.options()
        )

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"{super().extra_repr()}, temperature={self.temperature}{options}"


class KLDivergence(LogitDivergence):
    """Knowledge distillation of Hinton et al. (2015): ``T^2 KL(p_t || p_s)``, ``p = softmax(z / T)``.

    Args:
        temperature: softening temperature ``T`` (2 to 4 is usual).
        chunk_size, mask_key, weight, name: see :class:`LogitDivergence`.
    """

    function = staticmethod(functional.kl_divergence)

    def __init__(
        self,
        temperature: float = 2.0,
        chunk_size: int | None = None,
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(temperature, chunk_size, mask_key, weight, name)


class ReverseKLDivergence(LogitDivergence):
    """Reverse, mode-seeking KL of MiniLLM (Gu et al., 2024): ``T^2 KL(p_s || p_t)``."""

    function = staticmethod(functional.reverse_kl_divergence)


class JSDivergence(LogitDivergence):
    """Jensen-Shannon divergence: ``T^2 [KL(p_t || m) + KL(p_s || m)] / 2``, ``m = (p_t + p_s) / 2``."""

    function = staticmethod(functional.js_divergence)


class TotalVariationDistance(LogitDivergence):
    """Total variation distance ``0.5 sum_c |p_t - p_s|`` (not scaled by ``T^2``)."""

    function = staticmethod(functional.total_variation_distance)


class SkewKLDivergence(LogitDivergence):
    """Skew KL of DistiLLM (Ko et al., 2024): ``KL(p_t || a p_t + (1 - a) p_s)`` (not scaled by ``T^2``).

    Args:
        skew: the teacher's share ``a`` of the mixture (0.1 in the paper).
        temperature, chunk_size, mask_key, weight, name: see :class:`LogitDivergence`.
    """

    function = staticmethod(functional.skew_kl_divergence)

    def __init__(
        self,
        skew: float = 0.1,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(temperature, chunk_size, mask_key, weight, name)
        if not 0.0 <= skew <= 1.0:
            raise ValueError(f"skew must lie in [0, 1], got {skew}")
        self.skew = float(skew)

    def options(self) -> dict[str, Any]:
        return {"skew": self.skew}


class SkewReverseKLDivergence(SkewKLDivergence):
    """Skew reverse KL of DistiLLM (Ko et al., 2024): ``KL(p_s || a p_s + (1 - a) p_t)`` (not x ``T^2``)."""

    function = staticmethod(functional.skew_reverse_kl_divergence)


class BalancedDivergence(LogitDivergence):
    """BD-KD (Amara et al., 2023): forward or reverse KL per row, by the entropy gap.

    ``T^2 [w KL(p_t || p_s) + (1 - w) KL(p_s || p_t)]`` with ``g = H(p_t) - H(p_s)`` and
    ``w = 1[g > 0]`` (``mode="hard"``) or ``sigmoid(sharpness * g)`` (``mode="soft"``): a
    student more confident than its teacher gets the forward KL, a less confident one the
    reverse KL. The paper's rule is UNVERIFIED; this is METHODS.md's reading, and
    ``confident_student="reverse"`` flips it. ``w`` carries no gradient. The online variant
    (teacher trained too) is a ``DistillModule`` subclass, not this loss.

    Args:
        mode: ``hard`` switch or ``soft`` sigmoid weighting.
        sharpness: slope of the soft weighting, per nat of entropy gap.
        confident_student: the divergence given to a more confident student.
        temperature, chunk_size, mask_key, weight, name: see :class:`LogitDivergence`.
    """

    function = staticmethod(functional.balanced_divergence)

    def __init__(
        self,
        mode: Literal["hard", "soft"] = "hard",
        sharpness: float = 1.0,
        confident_student: Literal["forward", "reverse"] = "forward",
        temperature: float = 2.0,
        chunk_size: int | None = None,
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(temperature, chunk_size, mask_key, weight, name)
        if mode not in ("hard", "soft") or confident_student not in ("forward", "reverse"):
            raise ValueError(
                f"mode must be hard/soft and confident_student forward/reverse, got {mode!r}, {confident_student!r}"
            )
        self.mode = mode
        self.sharpness = float(sharpness)
        self.confident_student = confident_student

    def options(self) -> dict[str, Any]:
        return {"mode": self.mode, "sharpness": self.sharpness, "confident_student": self.confident_student}
