"""Comparative KD: the student matches the teacher's differences between pairs of examples.

Wilf, Xu, Liang, Obolenskiy, Fried, Morency (2023), "Comparative Knowledge Distillation",
arXiv:2311.02253 (WACV 2025).

For pairs ``(i, j)`` of rows of one batch, the student's difference ``s_i - s_j`` is pulled
towards the teacher's ``t_i - t_j``: a signal about how the teacher tells two examples apart,
with no teacher call beyond the batch's own. The official code (``CKDTrainHelpers.mix_func``:
``x - y`` on the logits of a ``pos`` and a ``neg`` sample, then the relational criterion on the
two differences) applies it to logits; here it applies to logits (:class:`ComparativeKD`) or to
tapped features (:class:`ComparativeFeatureKD`, with a student-side projection when the widths
differ); list both for both.

Readings (UNVERIFIED, configurable): the distance between the two differences is the mean
squared error by default (``distance: mse``), or ``T^2 KL(softmax((t_i - t_j) / T) ||
softmax((s_i - s_j) / T))`` (``distance: kl``); pairs are every ordered pair ``i != j`` of the
batch (``pairs: all``, ``n (n - 1)`` of them) or ``K`` ordered pairs drawn uniformly with
replacement each step (``pairs: K``), rather than the paper's sampled pos/neg groups.

A batch of one example has no pairs: the term is then a zero still attached to the graph (so a
last batch of one does not stop a run), not an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.base import DistillLoss, ProjectedFeatureLoss, float32, positive, row_mask
from kd_lightning.outputs import ModelOutputs

Distance = Literal["mse", "kl"]
DISTANCES: tuple[str, ...] = ("mse", "kl")


def pair_indices(
    n: int,
    pairs: int | Literal["all"] = "all",
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(first, second)`` row indices of ordered pairs ``i != j`` of ``n`` rows: all ``n (n - 1)``
    of them, or ``pairs`` drawn uniformly (with replacement) among them."""
    if pairs == "all":
        first, second = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
        keep = first != second
        return first[keep], second[keep]
    first = torch.randint(0, n, (pairs,), device=device, generator=generator)
    # an offset in 1..n-1 makes the second index uniform over the other n - 1 rows
    second = (first + torch.randint(1, n, (pairs,), device=device, generator=generator)) % n
    return first, second


def comparative_distance(
    student: Tensor,
    teacher: Tensor,
    pairs: int | Literal["all"] = "all",
    distance: Distance = "mse",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean over pairs ``(i, j)`` of ``d(s_i - s_j, t_i - t_j)`` for ``(rows, width)`` inputs.

    ``mse``: ``||(s_i - s_j) - (t_i - t_j)||^2 / width``; with all pairs it is computed in
    ``O(n d)`` as ``2 sum_i ||r_i - mean(r)||^2 / ((n - 1) d)``, ``r = s - t`` (the mean over
    ordered pairs ``i != j`` of ``||r_i - r_j||^2 / d``). ``kl``: ``T^2 KL(softmax((t_i - t_j) / T)
    || softmax((s_i - s_j) / T))``. Fewer than two rows: ``0`` (attached to the graph).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"comparative KD: student rows {tuple(student.shape)} and teacher rows {tuple(teacher.shape)} differ"
        )
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(dtype), teacher.to(dtype)
    n, width = s.shape
    if n < 2:
        return s.sum() * 0.0
    if distance == "mse" and pairs == "all":
        r = s - t
        return 2.0 * (r - r.mean(0)).square().sum() / ((n - 1) * width)
    first, second = pair_indices(n, pairs, s.device, generator)
    ds, dt = s[first] - s[second], t[first] - t[second]
    if distance == "mse":
        return (ds - dt).square().mean()
    log_p_s = F.log_softmax(ds / temperature, -1)
    log_p_t = F.log_softmax(dt / temperature, -1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2


def _check(pairs: int | str, distance: str, owner: str) -> int | Literal["all"]:
    if distance not in DISTANCES:
        raise ValueError(f"{owner}: distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    if pairs == "all":
        return "all"
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"{owner}: pairs must be 'all' or a positive number of sampled pairs, got {pairs!r}")
    return pairs


class ComparativeKD(DistillLoss):
    """Comparative KD on logits (Wilf et al., 2023, arXiv:2311.02253; see the module docstring).

    ``mean_{(i, j), i != j} d(z_s^i - z_s^j, z_t^i - z_t^j)`` over the rows of the logits
    (``(batch, classes)``; token rows of ``(batch, seq, vocab)`` logits outside the mask are
    dropped first), ``d`` = squared error per class (``mse``) or ``T^2 KL`` of the softened
    differences (``kl``).

    Args:
        pairs: ``all`` ordered pairs of the batch, or that many sampled pairs per step.
        distance: ``mse`` or ``kl``.
        temperature: ``T`` of the ``kl`` distance.
        mask_key: batch field that selects the rows (token-level logits); default as
            :func:`~kd_lightning.losses.base.row_mask`.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        pairs: int | Literal["all"] = "all",
        distance: Distance = "mse",
        temperature: float = 1.0,
        mask_key: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.pairs = _check(pairs, distance, type(self).__name__)
        self.distance = distance
        self.temperature = positive(temperature, "temperature", type(self).__name__)
        self.mask_key = mask_key

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = float32(student.logits), float32(teacher.logits)
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        mask = row_mask(student, batch, self.mask_key)
        if mask is not None:
            keep = mask.reshape(-1).to(torch.bool)
            s, t = s[keep], t[keep]
        return comparative_distance(s, t, self.pairs, self.distance, self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairs={self.pairs!r}, distance={self.distance!r}"


class ComparativeFeatureKD(ProjectedFeatureLoss):
    """Comparative KD on tapped features (Wilf et al., 2023, arXiv:2311.02253).

    ``mean_{(i, j), i != j} d(W s_i - W s_j, t_i - t_j)`` over the rows of a student tap and a
    teacher tap (pooled rows, or token rows of a ``tokens`` tap), with ``W`` a learned
    student-side map ``d_s -> d_t`` (only when the widths differ, unless ``projection`` says
    otherwise) and ``d`` as in :class:`ComparativeKD`. Every pair cancels a constant shift of
    either side's rows.

    Args:
        student, teacher: the tap names.
        projection: see :class:`~kd_lightning.losses.base.ProjectedFeatureLoss`.
        pairs, distance, temperature: see :class:`ComparativeKD`.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        student: str,
        teacher: str,
        projection: bool | None = None,
        pairs: int | Literal["all"] = "all",
        distance: Distance = "mse",
        temperature: float = 1.0,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student, teacher, projection=projection, weight=weight, name=name)
        self.pairs = _check(pairs, distance, type(self).__name__)
        self.distance = distance
        self.temperature = positive(temperature, "temperature", type(self).__name__)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = self.feature_pair(student, teacher)
        if self.projection is not None:
            s = self.projection(s.to(self.projection.weight.dtype))
        return comparative_distance(s, t, self.pairs, self.distance, self.temperature)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairs={self.pairs!r}, distance={self.distance!r}"
