"""Pure tensor functions: the math of every loss and nothing else.

Conventions: logits are ``(..., classes)``; every leading position is a row. ``mask`` (same
leading shape, true = keep) selects the rows that count; results are means over kept rows, and
a fully masked input gives ``0`` rather than NaN. Computation is in float32 (or float64 when the
inputs are float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_row_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-row values over the rows where ``mask`` is true (0 when none are)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kl_divergence(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Forward KL of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)``, averaged over (unmasked) rows.
    """
    dtype = _compute_dtype(student_logits)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return _masked_row_mean(per_row, mask) * temperature**2


def projected_mse(student_features: Tensor, teacher_features: Tensor, projection: torch.nn.Module | None = None) -> Tensor:
    """FitNets hint loss (Romero et al., 2015): ``||T - S W||_F^2 / (n d_t)``.

    ``projection`` maps student width to teacher width (``None`` when they already agree).
    """
    dtype = _compute_dtype(student_features)
    projected = projection(student_features) if projection is not None else student_features
    return F.mse_loss(projected.to(dtype), teacher_features.to(dtype))
