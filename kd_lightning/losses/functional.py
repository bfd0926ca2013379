"""Pure tensor functions: the math of every loss and nothing else.

Conventions: logits are ``(..., classes)``; every leading position is a row. ``mask`` (same
leading shape, true = keep) selects the rows that count; results are means over kept rows, and
a fully masked input gives ``0`` rather than NaN. Features are ``(rows, width)``. Computation is
in float32 (or float64 when the inputs are float64), with autocast switched off.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.chunked import chunked_row_mean

Space = Literal["auto", "feature", "gram"]
_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


# ---- conventions ---------------------------------------------------------------------------------
def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _exact(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast off, so it computes in the dtype chosen here even inside autocast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if device not in ("cpu", "cuda"):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _row_keep(logits: Tensor, mask: Tensor | None) -> Tensor | None:
    """``mask`` (the shape of the logits' leading dimensions) as a flat boolean row mask."""
    if mask is None:
        return None
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' rows {tuple(logits.shape[:-1])}")
    return mask.reshape(-1).to(torch.bool)


def _rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """``(..., C)`` logits as ``(rows, C)``, keeping the rows where ``mask`` is true."""
    rows = logits.reshape(-1, logits.shape[-1])
    keep = _row_keep(logits, mask)
    return rows if keep is None else rows[keep]


def _row_mean(values: Tensor) -> Tensor:
    """Mean of per-row values; ``0`` (still attached to the graph) when there are no rows."""
    return values.sum() / max(values.shape[0], 1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row ``KL(p || q) = sum p (log p - log q)`` from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _entropy(log_p: Tensor) -> Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def _divergence(
    per_row: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    """Mean over kept rows of ``per_row(log p_s, log p_t)``, ``p = softmax(z / T)``.

    With ``chunk_size`` the kept rows are processed ``chunk_size`` at a time, each chunk's
    gradient computed with it (:func:`~kd_lightning.losses.chunked.chunked_row_mean`), so the
    ``rows x classes`` probability tensors exist for one chunk at a time, forward and backward.
    """
    dtype = _compute_dtype(student_logits)

    def log_probs(z: Tensor) -> Tensor:
        z = z.to(dtype)
        return F.log_softmax(z if temperature == 1 else z / temperature, -1)

    def values(s: Tensor, t: Tensor) -> Tensor:
        return per_row(log_probs(s), log_probs(t))

    if chunk_size is not None:
        rows = [z.reshape(-1, z.shape[-1]) for z in (student_logits, teacher_logits)]
        return chunked_row_mean(values, rows, _row_keep(student_logits, mask), chunk_size)
    return _row_mean(values(_rows(student_logits, mask), _rows(teacher_logits, mask)))


# ---- divergences between softened distributions --------------------------------------------------
@_exact
def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Forward KL of Hinton et al. (2015), "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)``, averaged over (unmasked) rows.
    """
    kl = _divergence(lambda s, t: _kl(t, s), student_logits, teacher_logits, temperature, mask, chunk_size)
    return kl * temperature**2


@_exact
def reverse_kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Reverse (mode-seeking) KL of MiniLLM (Gu et al., 2024): ``T^2 * KL(p_s || p_t)``."""
    return _divergence(_kl, student_logits, teacher_logits, temperature, mask, chunk_size) * temperature**2


def _js(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
    log_m = torch.logaddexp(log_p_s, log_p_t) - math.log(2.0)
    return 0.5 * (_kl(log_p_t, log_m) + _kl(log_p_s, log_m))


@_exact
def js_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Jensen-Shannon divergence: ``T^2 [KL(p_t || m) + KL(p_s || m)] / 2``, ``m = (p_t + p_s) / 2``."""
    return _divergence(_js, student_logits, teacher_logits, temperature, mask, chunk_size) * temperature**2


def _skewed_kl(skew: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-row ``KL(p || a p + (1 - a) q)`` as a function of ``(log q, log p)``."""
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must lie in [0, 1], got {skew}")

    def per_row(log_q: Tensor, log_p: Tensor) -> Tensor:
        if skew == 0.0:
            return _kl(log_p, log_q)
        if skew == 1.0:
            return torch.zeros_like(log_p[..., 0])
        log_mix = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
        return _kl(log_p, log_mix)

    return per_row


@_exact
def skew_kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    skew: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew KL of DistiLLM (Ko et al., 2024): ``KL(p_t || a p_t + (1 - a) p_s)``, ``a = skew``.

    Not multiplied by ``T^2`` (DistiLLM uses no temperature; keep ``T = 1`` for the paper's loss).
    """
    per_row = _skewed_kl(skew)
    return _divergence(per_row, student_logits, teacher_logits, temperature, mask, chunk_size)


@_exact
def skew_reverse_kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    skew: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., 2024): ``KL(p_s || a p_s + (1 - a) p_t)``. Not x ``T^2``."""
    per_row = _skewed_kl(skew)
    return _divergence(lambda s, t: per_row(t, s), student_logits, teacher_logits, temperature, mask, chunk_size)


@_exact
def total_variation_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Total variation distance ``0.5 sum_c |p_t - p_s|`` (as in DistiLLM's comparisons). Not x ``T^2``."""

    def per_row(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
        return 0.5 * (log_p_t.exp() - log_p_s.exp()).abs().sum(-1)

    return _divergence(per_row, student_logits, teacher_logits, temperature, mask, chunk_size)


@_exact
def balanced_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mode: Literal["hard", "soft"] = "hard",
    mask: Tensor | None = None,
    sharpness: float = 1.0,
    confident_student: Literal["forward", "reverse"] = "forward",
    chunk_size: int | None = None,
) -> Tensor:
    """BD-KD (Amara et al., 2023, "BD-KD: Balancing the Divergences for Online KD"), one reading.

    Per row, ``T^2 [w KL(p_t || p_s) + (1 - w) KL(p_s || p_t)]`` with ``w`` set by the entropy
    gap ``g = H(p_t) - H(p_s)`` of the softened distributions. The paper's exact rule could not
    be verified (METHODS.md); the reading implemented: a student more confident than its
    teacher (``H_s < H_t``, ``g > 0``) is pulled by the mass-covering forward KL, a less
    confident one by the mode-seeking reverse KL.

    - ``mode="hard"``: ``w = 1[g > 0]``;
    - ``mode="soft"``: ``w = sigmoid(sharpness * g)``.

    ``confident_student="reverse"`` flips the rule. ``w`` is a per-row selector and carries no
    gradient.
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    if confident_student not in ("forward", "reverse"):
        raise ValueError(f"confident_student must be 'forward' or 'reverse', got {confident_student!r}")

    def per_row(log_p_s: Tensor, log_p_t: Tensor) -> Tensor:
        with torch.no_grad():
            gap = _entropy(log_p_t) - _entropy(log_p_s)
            if confident_student == "reverse":
                gap = -gap
            w = (gap > 0).to(gap.dtype) if mode == "hard" else torch.sigmoid(sharpness * gap)
        return w * _kl(log_p_t, log_p_s) + (1 - w) * _kl(log_p_s, log_p_t)

    return _divergence(per_row, student_logits, teacher_logits, temperature, mask, chunk_size) * temperature**2


# ---- next-token prediction (causal LMs) -----------------------------------------------------------
IGNORE_INDEX = -100


def next_token_targets(labels: Tensor) -> Tensor:
    """The token each position predicts: ``targets[:, i] = labels[:, i + 1]``, ``-100`` at the end.

    ``labels`` is ``(batch, seq)`` in Hugging Face's convention (aligned with the inputs, ``-100``
    on prompt and padding tokens). ``targets != -100`` marks the positions whose logits the
    token-level losses count: those that predict a response token.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


@_exact
def token_cross_entropy(logits: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Cross-entropy ``-1/n sum_i log softmax(z_i)[y_i]`` over the ``n`` rows whose target is not ``-100``.

    ``logits`` is ``(..., vocab)`` and ``targets`` its leading shape (for next-token prediction,
    :func:`next_token_targets` of the labels). No counted row gives 0. ``chunk_size`` bounds the
    ``rows x vocab`` memory as for the divergences.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match the logits' rows {tuple(logits.shape[:-1])}")
    dtype = _compute_dtype(logits)

    def per_row(z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(z.to(dtype), y, reduction="none")

    keep = targets.reshape(-1) != IGNORE_INDEX
    rows, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if chunk_size is not None:
        return chunked_row_mean(per_row, [rows, flat_targets], keep, chunk_size)
    return _row_mean(per_row(rows[keep], flat_targets[keep]))


# ---- batch-wise and decoupled logit losses -------------------------------------------------------
@_exact
def sinkhorn_distance(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    mask: Tensor | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    """SinKD (Cui et al., 2024, "Sinkhorn Distance Minimization for Knowledge Distillation").

    Batch-wise over the ``n`` kept rows: cost ``W_ij = ||p_s^i - p_t^j||_1`` (``n x n``),
    kernel ``K = exp(-W / eps)``, then ``iterations`` rounds of row- then column-normalisation
    (in the log domain, so a small ``eps`` cannot underflow) give the plan ``P``; the loss is
    ``sum_ij P_ij W_ij``. As in the official code (``2018cx/SinKD``, ``loss.py``) the last step
    normalises columns, so every column of ``P`` sums to 1 and ``P`` carries mass ``n``:
    ``reduction="sum"`` returns that sum (the official scale, which grows with the batch);
    ``reduction="mean"`` divides by ``n``, the cost of a plan with uniform marginals ``1/n``.
    Cost ``O(n^2 C)``: meant for pooled rows, not every token of a long batch.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dtype = _compute_dtype(student_logits)
    p_s = torch.softmax(_rows(student_logits, mask).to(dtype) / temperature, -1)
    p_t = torch.softmax(_rows(teacher_logits, mask).to(dtype) / temperature, -1)
    n = p_s.shape[0]
    if n == 0:
        return p_s.sum() * 0.0
    cost = torch.cdist(p_s, p_t, p=1)
    log_plan = -cost / epsilon
    for _ in range(iterations):
        log_plan = log_plan - log_plan.logsumexp(dim=1, keepdim=True)
        log_plan = log_plan - log_plan.logsumexp(dim=0, keepdim=True)
    total = (log_plan.exp() * cost).sum()
    return total / n if reduction == "mean" else total


@_exact
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Decoupled KD (Zhao et al., 2022, "Decoupled Knowledge Distillation").

    ``T^2 [alpha KL(b_t || b_s) + beta KL(q_t || q_s)]`` per row: ``b = [p_y, 1 - p_y]`` is the
    binary target-vs-rest split (TCKD) and ``q`` the distribution over the non-target classes
    with the target logit masked out (NCKD), all at temperature ``T``. Rows whose label is
    negative (``-100``) are ignored. Computed in the log domain (no ``log(0)``).
    """
    if student_logits.shape[-1] < 2:
        raise ValueError("dkd_loss needs at least two classes")
    keep = labels >= 0 if mask is None else (labels >= 0) & mask.to(torch.bool)
    dtype = _compute_dtype(student_logits)
    z_s = _rows(student_logits, keep).to(dtype) / temperature
    z_t = _rows(teacher_logits, keep).to(dtype) / temperature
    target = labels.reshape(-1)[keep.reshape(-1)].long()
    is_target = F.one_hot(target, z_s.shape[-1]).to(torch.bool)

    def split(z: Tensor) -> tuple[Tensor, Tensor]:
        log_all = z.logsumexp(-1)
        others = z.masked_fill(is_target, float("-inf"))
        log_others = others.logsumexp(-1)
        log_target = z.gather(-1, target[:, None]).squeeze(-1)
        binary = torch.stack([log_target - log_all, log_others - log_all], -1)
        non_target = (others - log_others[:, None]).masked_fill(is_target, 0.0)
        return binary, non_target

    binary_s, non_target_s = split(z_s)
    binary_t, non_target_t = split(z_t)
    tckd = _kl(binary_t, binary_s)
    nckd = (non_target_t.exp().masked_fill(is_target, 0.0) * (non_target_t - non_target_s)).sum(-1)
    return _row_mean(alpha * tckd + beta * nckd) * temperature**2


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float) -> Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


@_exact
def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """DIST (Huang et al., 2022, "Knowledge Distillation from A Stronger Teacher").

    ``T^2 [beta (1 - mean_i rho(p_s^i, p_t^i)) + gamma (1 - mean_c rho(p_s^{:,c}, p_t^{:,c}))]``:
    Pearson correlation ``rho`` of each row (inter-class relation) and of each class column over
    the batch (intra-class relation), as the official code (``eps`` added to the norm product).
    """
    dtype = _compute_dtype(student_logits)
    p_s = torch.softmax(_rows(student_logits, mask).to(dtype) / temperature, -1)
    p_t = torch.softmax(_rows(teacher_logits, mask).to(dtype) / temperature, -1)
    if p_s.shape[0] == 0:
        return p_s.sum() * 0.0
    inter = 1 - _pearson(p_s, p_t, dim=1, eps=eps).mean()
    intra = 1 - _pearson(p_s, p_t, dim=0, eps=eps).mean()
    return (beta * inter + gamma * intra) * temperature**2


# ---- feature losses -------------------------------------------------------------------------------
@_exact
def projected_mse(
    student_features: Tensor, teacher_features: Tensor, projection: torch.nn.Module | None = None
) -> Tensor:
    """FitNets hint loss (Romero et al., 2015): ``||T - S W||_F^2 / (n d_t)``.

    ``projection`` maps student width to teacher width (``None`` when they already agree).
    """
    dtype = _compute_dtype(student_features)
    projected = projection(student_features) if projection is not None else student_features
    return _row_mean((projected.to(dtype) - teacher_features.to(dtype)).square().flatten())


@_exact
def cosine_distance(
    student_features: Tensor, teacher_features: Tensor, projection: torch.nn.Module | None = None
) -> Tensor:
    """PKD (Sun et al., 2019, "Patient Knowledge Distillation for BERT Model Compression").

    ``1/n sum_i || s_i / ||s_i|| - t_i / ||t_i|| ||^2``; ``projection`` maps the student width
    to the teacher's when they differ. A zero row normalises to zero.
    """
    dtype = _compute_dtype(student_features)
    s = projection(student_features) if projection is not None else student_features
    s = F.normalize(s.to(dtype), dim=-1)
    t = F.normalize(teacher_features.to(dtype), dim=-1)
    return _row_mean((s - t).square().sum(-1))


@_exact
def nd_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    class_means: Tensor,
    labels: Tensor,
    projection: torch.nn.Module | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """ND loss of KD++ (Wang et al., 2023, "Improving KD via Regularizing Feature Norm and Direction").

    ``1/n sum_i [1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, ||t_i||)]`` with ``c_y`` the
    mean teacher embedding of class ``y`` (``class_means``, ``(classes, d_t)``), following the
    reference ``DirectNormLoss``. Rows with a negative label are ignored; norms are floored at
    ``eps`` so zero embeddings give finite values.
    """
    dtype = _compute_dtype(teacher_embeddings)
    keep = labels.reshape(-1) >= 0
    s = projection(student_embeddings) if projection is not None else student_embeddings
    s, t = s.to(dtype)[keep], teacher_embeddings.to(dtype)[keep]
    means = class_means.to(dtype)
    directions = means / means.norm(dim=-1, keepdim=True).clamp_min(eps)
    cosine_to_mean = (s * directions[labels.reshape(-1)[keep].long()]).sum(-1)
    scale = torch.maximum(s.norm(dim=-1), t.norm(dim=-1)).clamp_min(eps)
    return _row_mean(1 - cosine_to_mean / scale)


@torch.no_grad()
def mean_per_class(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(classes, width)`` mean embedding of each class (zero for a class with no rows): ND's ``c_y``."""
    keep = labels >= 0
    embeddings, labels = embeddings.to(_compute_dtype(embeddings))[keep], labels[keep].long()
    sums = torch.zeros(num_classes, embeddings.shape[-1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return sums / counts[:, None].to(embeddings.dtype)


# ---- representational geometry --------------------------------------------------------------------
def normalize_features(x: Tensor) -> Tensor:
    """Centre the columns and scale to unit Frobenius norm: ``(X - mean_0 X) / ||X - mean_0 X||_F``.

    A configuration without spread (one row, identical rows, all zeros) maps to zero instead of
    to amplified rounding noise: the centred norm must exceed ``64 eps ||X||_F``.
    """
    x = x.to(_compute_dtype(x))
    if x.shape[0] == 0:
        return x
    centred = x - x.mean(0, keepdim=True)
    norm = torch.linalg.vector_norm(centred)
    floor = 64 * torch.finfo(x.dtype).eps * torch.linalg.vector_norm(x).detach()
    spread = norm > floor
    return torch.where(spread, centred / torch.where(spread, norm, torch.ones_like(norm)), torch.zeros_like(centred))


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0``, exactly 0 (with zero gradient) below the dtype's ``eps``."""
    eps = torch.finfo(x.dtype).eps
    return torch.where(x > eps, x.clamp_min(eps).sqrt(), torch.zeros_like(x))


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _significant(sigma: Tensor, shape: torch.Size) -> Tensor:
    """1 for the singular values above the numerical-rank tolerance, 0 for the rest."""
    tolerance = sigma.max() * max(shape) * torch.finfo(sigma.dtype).eps if sigma.numel() else 0.0
    return (sigma > tolerance).to(sigma.dtype)


class _CrossNuclearNorm(torch.autograd.Function):
    """``||T^T S||_*`` (sum of singular values) with a guarded gradient.

    The gradient with respect to ``M = T^T S`` is ``U_r V_r^T`` over the singular directions
    whose value is numerically non-zero: vanishing values contribute nothing (the minimal-norm
    subgradient) and no ``1 / (sigma_i^2 - sigma_j^2)`` term appears, so nearly equal singular
    values are harmless. With few rows (``n^2 (n + d_t + d_s) < d_t d_s min(d_t, d_s)``), ``T``
    and ``S`` are first reduced by their thin SVDs to an ``n x n`` core with the same singular
    values, so the cost is ``O(n^2 d)`` instead of ``O(d^3)``.
    """

    @staticmethod
    def forward(ctx, t: Tensor, s: Tensor) -> Tensor:
        n, width_t = t.shape
        width_s = s.shape[1]
        need_grad = any(ctx.needs_input_grad)
        if n * n * (n + width_t + width_s) >= width_t * width_s * min(width_t, width_s):  # SVD flops, roughly
            cross = t.mT @ s
            if not need_grad:
                return torch.linalg.svdvals(cross).sum()
            u, sigma, vh = torch.linalg.svd(cross, full_matrices=False)
            direction = (u * _significant(sigma, cross.shape)) @ vh
            grad_t = s @ direction.mT if ctx.needs_input_grad[0] else None
            grad_s = t @ direction if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(grad_t, grad_s)
            return sigma.sum()
        u_t, sigma_t, vh_t = torch.linalg.svd(t, full_matrices=False)
        u_s, sigma_s, vh_s = torch.linalg.svd(s, full_matrices=False)
        sigma_t = sigma_t * _significant(sigma_t, t.shape)
        sigma_s = sigma_s * _significant(sigma_s, s.shape)
        core = sigma_t[:, None] * (u_t.mT @ u_s) * sigma_s[None, :]  # T^T S = V_t core V_s^T
        if not need_grad:
            return torch.linalg.svdvals(core).sum()
        x, sigma, yh = torch.linalg.svd(core)
        direction = (x * _significant(sigma, core.shape)) @ yh
        grad_t = (u_s * sigma_s) @ direction.mT @ vh_t if ctx.needs_input_grad[0] else None
        grad_s = (u_t * sigma_t) @ direction @ vh_s if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(grad_t, grad_s)
        return sigma.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad_t, grad_s = ctx.saved_tensors
        return (None if grad_t is None else grad * grad_t), (None if grad_s is None else grad * grad_s)


def _procrustes_from(norms_sq: Tensor, nuclear: Tensor, squared: bool, angular: bool) -> Tensor:
    """``D^2 = ||S||^2 + ||T||^2 - 2 ||T^T S||_*`` (``2 - 2 ||T^T S||_*`` for unit norms) as asked."""
    d2 = (norms_sq - 2 * nuclear).clamp_min(0.0)
    if angular:  # arccos(||T^T S||_*) = 2 arcsin(D / 2) for unit norms, with a guarded gradient at 0
        return 2 * torch.asin((_safe_sqrt(d2) / 2).clamp(max=1.0))
    return d2 if squared else _safe_sqrt(d2)


@_exact
def procrustes_distance(
    student_features: Tensor, teacher_features: Tensor, squared: bool = True, angular: bool = False
) -> Tensor:
    """Orthogonal Procrustes distance (Williams et al., 2021; the geometry-aware KD paper, seed 000).

    After :func:`normalize_features`, ``D_P^2 = min_{Q^T Q = I} ||T - S Q||_F^2 = 2 - 2 ||T^T S||_*``
    (``Q`` partial-orthogonal when the widths differ; no projection is needed). ``squared=False``
    gives ``D_P``; ``angular=True`` gives ``arccos(||T^T S||_*)`` in ``[0, pi/2]``. Clamped at 0; a
    spread-less side counts as zero (two spread-less sides are at distance 0).
    """
    s, t = normalize_features(student_features), normalize_features(teacher_features)
    if s.shape[0] == 0:
        return s.sum() * t.sum() * 0.0
    nuclear = _CrossNuclearNorm.apply(t, s)
    return _procrustes_from(s.square().sum() + t.square().sum(), nuclear, squared, angular)


def _use_feature_space(n: int, width_s: int, width_t: int, space: Space) -> bool:
    """Feature space (``d x d`` cross-products) when it is cheaper than Gram space (``n x n``)."""
    if space not in ("auto", "feature", "gram"):
        raise ValueError(f"space must be 'auto', 'feature' or 'gram', got {space!r}")
    if space != "auto":
        return space == "feature"
    return width_s * width_t + width_s**2 + width_t**2 <= n * (width_s + width_t)


def _gram_inner_products(s: Tensor, t: Tensor, space: Space) -> tuple[Tensor, Tensor, Tensor]:
    """``<K, K>, <L, L>, <K, L>`` for ``K = S S^T``, ``L = T T^T``, in the cheaper space."""
    if _use_feature_space(s.shape[0], s.shape[1], t.shape[1], space):
        return (s.mT @ s).square().sum(), (t.mT @ t).square().sum(), (s.mT @ t).square().sum()
    k, lt = s @ s.mT, t @ t.mT
    return k.square().sum(), lt.square().sum(), (k * lt).sum()


def cka_from_inner_products(kk: Tensor, ll: Tensor, kl: Tensor) -> Tensor:
    """``<K, L> / (||K||_F ||L||_F)`` clamped to ``[0, 1]``; 0 when either side has no spread."""
    return _safe_ratio(kl, kk.sqrt() * ll.sqrt()).clamp(0.0, 1.0)


@_exact
def linear_cka(student_features: Tensor, teacher_features: Tensor, space: Space = "auto") -> Tensor:
    """Linear CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited").

    ``||S^T T||_F^2 / (||S^T S||_F ||T^T T||_F)`` on centred columns, in ``[0, 1]``; equal to
    ``<K, L> / (||K|| ||L||)`` on the centred Grams. ``space="auto"`` computes in feature space
    (``d x d``) when rows outnumber widths (more exactly: when it is cheaper), else in Gram space
    (``n x n``). Invariant to orthogonal maps and isotropic scaling of either side.
    """
    s, t = normalize_features(student_features), normalize_features(teacher_features)
    return cka_from_inner_products(*_gram_inner_products(s, t, space))


@_exact
def gram_distance(
    student_features: Tensor, teacher_features: Tensor, squared: bool = False, space: Space = "auto"
) -> Tensor:
    """Feature-Gram Frobenius distance of the geometry-aware KD paper (seed 000).

    ``D_FG = || T T^T - S S^T ||_F`` after :func:`normalize_features` (``D_FG = 0`` iff the
    Procrustes distance is 0). Gram space computes the ``n x n`` difference directly; feature
    space uses ``||S^T S||^2 + ||T^T T||^2 - 2 ||S^T T||^2`` (cheaper when rows outnumber widths).
    """
    s, t = normalize_features(student_features), normalize_features(teacher_features)
    if _use_feature_space(s.shape[0], s.shape[1], t.shape[1], space):
        kk, ll, kl = _gram_inner_products(s, t, "feature")
        d2 = (kk + ll - 2 * kl).clamp_min(0.0)
    else:
        d2 = (t @ t.mT - s @ s.mT).square().sum()
    return d2 if squared else _safe_sqrt(d2)


# ---- the same measures from accumulated moments (streaming metrics) -------------------------------
def linear_cka_from_moments(ss: Tensor, tt: Tensor, st: Tensor) -> Tensor:
    """Linear CKA from centred cross-products ``S_c^T S_c``, ``T_c^T T_c``, ``S_c^T T_c``."""
    return cka_from_inner_products(ss.square().sum(), tt.square().sum(), st.square().sum())


def procrustes_from_moments(ss: Tensor, tt: Tensor, st: Tensor, squared: bool = True, angular: bool = False) -> Tensor:
    """Procrustes distance from centred cross-products (what :func:`procrustes_distance` computes).

    ``||S_c||_F^2 = tr(S_c^T S_c)``; a side whose trace is 0 counts as spread-less (zero).
    """
    s_sq, t_sq = ss.diagonal().sum(), tt.diagonal().sum()
    nuclear = _safe_ratio(torch.linalg.svdvals(st).sum(), s_sq.sqrt() * t_sq.sqrt())
    norms_sq = (s_sq > 0).to(ss.dtype) + (t_sq > 0).to(ss.dtype)
    return _procrustes_from(norms_sq, nuclear, squared, angular)
