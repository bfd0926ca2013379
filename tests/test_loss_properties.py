"""Properties of the loss library over random shapes, scales and dtypes (hypothesis).

Logit losses: batch 1..8, classes 2..12; feature losses: rows 1..8, widths 1..16; float32 and
float64, and bfloat16 inputs, which every function of :mod:`kd_lightning.losses.functional`
takes by computing in float32. Each property is one the docstrings state (divergences are
non-negative and vanish on equal inputs, the direction of each KL, bounds, the invariances of
softmax and of the normalised geometry) or a classical inequality between them (Pinsker, Lin),
and values are checked against float64 brute-force computations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import one_thread  # noqa: F401

from kd_lightning.losses import functional as Fn

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = settings(max_examples=25, deadline=None)
FLOATS = st.sampled_from([torch.float32, torch.float64])


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> float:
    """Absolute tolerance of a loss computed in ``dtype`` whose terms are of size ``scale``."""
    return (2e-5 if dtype != torch.float64 else 1e-10) * max(1.0, scale)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def logit_pairs(draw: st.DrawFn, dtypes: st.SearchStrategy = FLOATS) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``(batch, classes)`` with a spread from near-uniform to peaked."""
    batch, classes = draw(st.integers(1, 8)), draw(st.integers(2, 12))
    scale = draw(st.floats(0.05, 20.0))
    g = generator(draw(st.integers(0, 2**31 - 1)))
    student = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    teacher = scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)
    dtype = draw(dtypes)
    return student.to(dtype), teacher.to(dtype)


TEMPERATURES = st.floats(0.5, 5.0)


# ---- brute force in float64 ----------------------------------------------------------------------
def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, -1)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` of each row, with ``0 log 0 = 0``."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def skew_mixture(p: torch.Tensor, q: torch.Tensor, skew: float) -> torch.Tensor:
    return skew * p + (1 - skew) * q


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


def balanced_rows(p_s: torch.Tensor, p_t: torch.Tensor, sharpness: float | None) -> torch.Tensor:
    """BD-KD per row: forward KL weighted by ``w`` (a step, or a sigmoid of ``sharpness``, of the
    entropy gap ``H(p_t) - H(p_s)``), reverse KL by ``1 - w``."""
    gap = entropy(p_t) - entropy(p_s)
    w = (gap > 0).double() if sharpness is None else torch.sigmoid(sharpness * gap)
    return w * kl_rows(p_t, p_s) + (1 - w) * kl_rows(p_s, p_t)


#: name -> (function of (student, teacher, temperature), brute-force row value of (p_s, p_t), scaled by T^2)
DIVERGENCES: dict[str, tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]] = {
    "kl": (Fn.kl_divergence, lambda s, t: kl_rows(t, s), True),
    "reverse_kl": (Fn.reverse_kl_divergence, lambda s, t: kl_rows(s, t), True),
    "js": (Fn.js_divergence, lambda s, t: 0.5 * (kl_rows(t, (s + t) / 2) + kl_rows(s, (s + t) / 2)), True),
    "tvd": (Fn.total_variation_distance, lambda s, t: 0.5 * (t - s).abs().sum(-1), False),
    "skew_kl": (
        functools.partial(Fn.skew_kl_divergence, skew=0.1),
        lambda s, t: kl_rows(t, skew_mixture(t, s, 0.1)),
        False,
    ),
    "skew_reverse_kl": (
        functools.partial(Fn.skew_reverse_kl_divergence, skew=0.3),
        lambda s, t: kl_rows(s, skew_mixture(s, t, 0.3)),
        False,
    ),
    "balanced_soft": (
        functools.partial(Fn.balanced_divergence, mode="soft", sharpness=2.0),
        functools.partial(balanced_rows, sharpness=2.0),
        True,
    ),
    "balanced_hard": (functools.partial(Fn.balanced_divergence, mode="hard"), functools.partial(balanced_rows, sharpness=None), True),
}


def divergence(name: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return DIVERGENCES[name][0](student, teacher, temperature=temperature)


# ---- divergences between softened distributions -----------------------------------------------------
@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES)
def test_divergences_match_float64_brute_force_and_are_non_negative(pair, temperature):
    student, teacher = pair
    p_s, p_t = probabilities(student, temperature), probabilities(teacher, temperature)
    for name, (_, reference, scaled) in DIVERGENCES.items():
        value = divergence(name, student, teacher, temperature)
        assert value.dtype == student.dtype and value.shape == ()
        expected = reference(p_s, p_t).mean() * (temperature**2 if scaled else 1.0)
        atol = tolerance(student.dtype, temperature**2 if scaled else 1.0)
        assert abs(float(value) - float(expected)) <= atol + 1e-4 * float(expected), name
        assert float(value) >= -atol, name


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES)
def test_divergences_vanish_when_the_student_is_the_teacher(pair, temperature):
    student, _ = pair
    for name in DIVERGENCES:
        value = divergence(name, student, student.clone(), temperature)
        assert abs(float(value)) <= tolerance(student.dtype, temperature**2), name


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES)
def test_directions_of_the_divergences(pair, temperature):
    """Forward KL is ``KL(p_t || p_s)`` and reverse KL ``KL(p_s || p_t)``, so swapping the models
    swaps them; the same for the two skew KLs; JS, TVD and BD-KD (whose rule gives the forward
    KL to the more confident side) are symmetric."""
    s, t = pair
    atol = tolerance(s.dtype, temperature**2)
    directions = (
        (Fn.kl_divergence, Fn.reverse_kl_divergence),
        (functools.partial(Fn.skew_kl_divergence, skew=0.2), functools.partial(Fn.skew_reverse_kl_divergence, skew=0.2)),
    )
    for forward, reverse in directions:
        torch.testing.assert_close(forward(s, t, temperature), reverse(t, s, temperature), atol=atol, rtol=1e-5)
    for name in ("js", "tvd", "balanced_soft"):
        torch.testing.assert_close(divergence(name, s, t, temperature), divergence(name, t, s, temperature), atol=atol, rtol=1e-5)


def test_forward_and_reverse_kl_differ():
    """The asymmetry the two directions exist for: a flat student under a peaked teacher puts
    mass where the teacher has little, which the reverse KL ``KL(p_s || p_t)`` charges more."""
    peaked, flat = torch.tensor([[6.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 4)
    forward, reverse = Fn.kl_divergence(flat, peaked, 1.0), Fn.reverse_kl_divergence(flat, peaked, 1.0)
    assert float(reverse) > 2 * float(forward) > 0


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES)
def test_bounds_between_the_divergences(pair, temperature):
    """``0 <= TVD <= 1``; ``JS <= T^2 log 2`` and Lin's ``JS <= T^2 TVD log 2``; Pinsker's
    ``TVD <= sqrt(KL / 2)`` (KL unscaled); BD-KD between forward and reverse KL on one row."""
    s, t = pair
    square = temperature**2
    atol = tolerance(s.dtype, square)
    tvd = float(Fn.total_variation_distance(s, t, temperature))
    js = float(Fn.js_divergence(s, t, temperature))
    assert -atol <= tvd <= 1.0 + atol
    assert js <= square * math.log(2) + atol
    assert js <= square * tvd * math.log(2) + 2 * atol
    row = slice(0, 1)
    kl = float(Fn.kl_divergence(s[row], t[row], temperature)) / square
    reverse = float(Fn.reverse_kl_divergence(s[row], t[row], temperature))
    assert float(Fn.total_variation_distance(s[row], t[row], temperature)) <= math.sqrt(max(kl, 0.0) / 2) + 10 * atol
    for mode in ("hard", "soft"):
        balanced = float(Fn.balanced_divergence(s[row], t[row], temperature, mode))
        assert min(kl * square, reverse) - atol <= balanced <= max(kl * square, reverse) + atol


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES, skew=st.floats(0.01, 0.99))
def test_skew_kl_is_bounded_by_its_mixture_and_spans_kl_to_zero(pair, temperature, skew):
    """``KL(p_t || a p_t + (1 - a) p_s) <= -log a`` (the mixture is at least ``a p_t``); skew 0 is
    the (unscaled) forward KL and skew 1 is zero."""
    s, t = pair
    atol = tolerance(s.dtype, 1.0)
    for fn in (Fn.skew_kl_divergence, Fn.skew_reverse_kl_divergence):
        assert -atol <= float(fn(s, t, temperature, skew=skew)) <= -math.log(skew) + atol
        assert float(fn(s, t, temperature, skew=1.0)) == 0.0
    torch.testing.assert_close(
        Fn.skew_kl_divergence(s, t, temperature, skew=0.0) * temperature**2,
        Fn.kl_divergence(s, t, temperature),
        atol=tolerance(s.dtype, temperature**2),
        rtol=1e-5,
    )


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES, data=st.data())
def test_softmax_invariances(pair, temperature, data):
    """Adding a constant to a row of logits changes nothing; nor does permuting the classes of
    both models alike, or the rows; and ``f(a z_s, a z_t, a T) = a^2 f(z_s, z_t, T)`` for the
    ``T^2``-scaled divergences (the others: unchanged)."""
    s, t = pair
    g = generator(data.draw(st.integers(0, 2**31 - 1)))
    shift_s = 10 * torch.randn(s.shape[0], 1, generator=g, dtype=torch.float64).to(s.dtype)
    shift_t = 10 * torch.randn(t.shape[0], 1, generator=g, dtype=torch.float64).to(t.dtype)
    classes = torch.randperm(s.shape[1], generator=g)
    rows = torch.randperm(s.shape[0], generator=g)
    factor = data.draw(st.floats(0.25, 4.0))
    for name, (_, _, scaled) in DIVERGENCES.items():
        value = divergence(name, s, t, temperature)
        atol = tolerance(s.dtype, 100 * temperature**2)  # a shift of 10 costs float32 digits
        torch.testing.assert_close(divergence(name, s + shift_s, t + shift_t, temperature), value, atol=atol, rtol=1e-4)
        torch.testing.assert_close(divergence(name, s[:, classes], t[:, classes], temperature), value, atol=atol, rtol=1e-5)
        torch.testing.assert_close(divergence(name, s[rows], t[rows], temperature), value, atol=atol, rtol=1e-5)
        rescaled = divergence(name, factor * s, factor * t, factor * temperature)
        torch.testing.assert_close(rescaled, value * (factor**2 if scaled else 1.0), atol=atol * factor**2, rtol=1e-4)


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES, data=st.data())
def test_a_mask_keeps_exactly_its_rows(pair, temperature, data):
    s, t = pair
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=s.shape[0], max_size=s.shape[0])))
    for name in DIVERGENCES:
        fn = DIVERGENCES[name][0]
        masked = fn(s, t, temperature=temperature, mask=keep)
        expected = fn(s[keep], t[keep], temperature=temperature) if keep.any() else torch.zeros((), dtype=s.dtype)
        torch.testing.assert_close(masked, expected, atol=tolerance(s.dtype, temperature**2), rtol=1e-5)


@EXAMPLES
@given(pair=logit_pairs(), temperature=TEMPERATURES, data=st.data())
def test_batch_losses_dkd_dist_and_sinkhorn(pair, temperature, data):
    """DKD is a sum of two KLs (>= 0, zero on equal logits, blind to row shifts); DIST's two
    ``1 - Pearson`` terms lie in ``[0, 2]``; the Sinkhorn plan moves L1 costs of at most 2 per row."""
    s, t = pair
    atol = tolerance(s.dtype, 16 * temperature**2)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, s.shape[1] - 1), min_size=s.shape[0], max_size=s.shape[0])))
    dkd = Fn.dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=temperature)
    assert float(dkd) >= -atol
    assert abs(float(Fn.dkd_loss(s, s.clone(), labels, temperature=temperature))) <= atol
    torch.testing.assert_close(Fn.dkd_loss(s + 3.0, t - 2.0, labels, temperature=temperature), dkd, atol=atol, rtol=1e-4)
    dist = float(Fn.dist_loss(s, t, beta=1.0, gamma=1.0, temperature=temperature))
    assert -atol <= dist <= 4.0 * temperature**2 + atol
    mean = Fn.sinkhorn_distance(s, t, temperature, epsilon=0.1, iterations=10, reduction="mean")
    total = Fn.sinkhorn_distance(s, t, temperature, epsilon=0.1, iterations=10, reduction="sum")
    assert -atol <= float(mean) <= 2.0 + atol
    torch.testing.assert_close(total, mean * s.shape[0], atol=atol, rtol=1e-5)


def assert_finite_with_finite_gradient(
    name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: torch.Tensor, t: torch.Tensor
) -> None:
    """``fn(s, t)`` and its gradient in ``s`` are finite; bfloat16 inputs give the float32 value
    of their upcast, and a bfloat16 gradient."""
    student = s.clone().requires_grad_(True)
    value = fn(student, t)
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(value) and torch.isfinite(grad).all(), name
    assert grad.dtype == s.dtype and grad.shape == s.shape, name
    if s.dtype == torch.bfloat16:
        assert value.dtype == torch.float32, name
        reference = fn(s.float().requires_grad_(True), t.float())  # the same path: with gradients
        assert torch.equal(value, reference), f"{name}: bfloat16 inputs compute as their float32 values"


LOGIT_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    **{name: functools.partial(fn, temperature=2.0) for name, (fn, _, _) in DIVERGENCES.items()},
    "dkd": lambda s, t: Fn.dkd_loss(s, t, torch.arange(s.shape[0]) % s.shape[1]),
    "dist": Fn.dist_loss,
    "sinkhorn": functools.partial(Fn.sinkhorn_distance, epsilon=0.1, iterations=10),
}


@EXAMPLES
@given(pair=logit_pairs(dtypes=st.sampled_from([torch.float32, torch.float64, torch.bfloat16])), same=st.booleans())
def test_logit_losses_and_gradients_are_finite(pair, same):
    """Finite values and gradients for every generated input, equal logits included, and for
    bfloat16 logits, which compute in float32."""
    s, t = pair
    for name, fn in LOGIT_FUNCTIONS.items():
        assert_finite_with_finite_gradient(name, fn, s, s.clone() if same else t)


# ---- representational geometry ------------------------------------------------------------------------
@st.composite
def feature_pairs(
    draw: st.DrawFn, dtypes: st.SearchStrategy = FLOATS, min_rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student ``(n, d_s)`` and teacher ``(n, d_t)`` rows with column means that differ (centring
    matters); ``min_rows = 2`` for rows with a spread (one row normalises to zero)."""
    n, width_s, width_t = draw(st.integers(min_rows, 8)), draw(st.integers(1, 16)), draw(st.integers(1, 16))
    g = generator(draw(st.integers(0, 2**31 - 1)))

    def rows(width: int) -> torch.Tensor:
        scale, offset = draw(st.floats(0.1, 10.0)), draw(st.floats(0.0, 3.0))
        x = torch.randn(n, width, generator=g, dtype=torch.float64) + offset * torch.linspace(-1, 1, width, dtype=torch.float64)
        return scale * x

    dtype = draw(dtypes)
    return rows(width_s).to(dtype), rows(width_t).to(dtype)


def orthogonal(width: int, seed: int) -> torch.Tensor:
    """A random orthogonal ``width x width`` matrix (float64)."""
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def normalised(x: torch.Tensor) -> torch.Tensor:
    """Centred, unit Frobenius norm, in float64; zero when the rows have no spread."""
    x = x.double() - x.double().mean(0)
    norm = torch.linalg.norm(x)
    return x / norm if norm > 1e-9 else torch.zeros_like(x)


def brute_force(s: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Procrustes ``D^2``, the squared Gram distance and linear CKA, from their definitions in float64."""
    s, t = normalised(s), normalised(t)
    nuclear = torch.linalg.svdvals(t.T @ s).sum()
    gram = torch.linalg.norm(t @ t.T - s @ s.T)
    ss, tt = torch.linalg.norm(s.T @ s), torch.linalg.norm(t.T @ t)
    cka = (torch.linalg.norm(s.T @ t) ** 2 / (ss * tt)) if ss > 0 and tt > 0 else torch.zeros(())
    return {
        "procrustes": float((s.square().sum() + t.square().sum() - 2 * nuclear).clamp_min(0)),
        "gram": float(gram**2),
        "cka": float(cka),
    }


#: The squared distances: in float32 a square root turns the rounding of a zero distance (a few
#: eps) into ~5e-4, so values and invariances are compared before it.
GEOMETRY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "procrustes": Fn.procrustes_distance,
    "gram": functools.partial(Fn.gram_distance, squared=True),
    "cka": Fn.linear_cka,
}


@EXAMPLES
@given(pair=feature_pairs(min_rows=2))
def test_geometry_matches_float64_definitions_and_bounds(pair):
    """Procrustes ``D^2`` in ``[0, 2]`` (angular in ``[0, pi/2]``), the Gram distance in
    ``[0, sqrt 2]``, CKA in ``[0, 1]``: each as its definition computes it in float64 (squared
    distances); all three symmetric."""
    s, t = pair
    expected = brute_force(s, t)
    atol = 1e-4 if s.dtype == torch.float32 else 1e-9
    for name, fn in GEOMETRY.items():
        value = float(fn(s, t))
        assert abs(value - expected[name]) <= atol, name
        assert abs(value - float(fn(t, s))) <= atol, f"{name} is symmetric"
    assert -atol <= float(Fn.procrustes_distance(s, t)) <= 2 + atol
    assert 0.0 <= float(Fn.procrustes_distance(s, t, angular=True)) <= math.pi / 2 + atol
    assert -atol <= float(Fn.gram_distance(s, t)) <= math.sqrt(2) + atol
    assert 0.0 <= float(Fn.linear_cka(s, t)) <= 1.0


@EXAMPLES
@given(pair=feature_pairs(min_rows=2), seed=st.integers(0, 2**31 - 1), factor=st.floats(0.1, 10.0), shift=st.floats(-5.0, 5.0))
def test_geometry_is_blind_to_rotations_scale_and_translation(pair, seed, factor, shift):
    """An orthogonal map of either side's features, an isotropic scaling and a translation of the
    rows change none of the three measures."""
    s, t = pair
    q_s = orthogonal(s.shape[1], seed).to(s.dtype)
    q_t = orthogonal(t.shape[1], seed + 1).to(t.dtype)
    atol = 2e-4 if s.dtype == torch.float32 else 1e-9
    for name, fn in GEOMETRY.items():
        value = fn(s, t)
        for moved_s, moved_t in ((s @ q_s, t), (s, t @ q_t), (factor * s + shift, t), (s, factor * t - shift)):
            torch.testing.assert_close(fn(moved_s, moved_t), value, atol=atol, rtol=0, msg=name)


@EXAMPLES
@given(pair=feature_pairs(min_rows=2), seed=st.integers(0, 2**31 - 1))
def test_geometry_of_a_representation_with_itself(pair, seed):
    """``D_P(S, S) = 0`` and ``D_P(S, S Q) = 0`` for orthogonal ``Q`` (the Gram distance too), and
    ``CKA(S, S) = 1``, whenever the rows have a spread."""
    s, _ = pair
    atol = 1e-4 if s.dtype == torch.float32 else 1e-9
    rotated = s @ orthogonal(s.shape[1], seed).to(s.dtype)
    for other in (s.clone(), rotated):
        assert abs(float(Fn.procrustes_distance(s, other))) <= atol
        assert abs(float(Fn.gram_distance(s, other, squared=True))) <= atol
        assert abs(float(Fn.linear_cka(s, other)) - 1.0) <= atol


@EXAMPLES
@given(pair=feature_pairs(), data=st.data())
def test_row_feature_losses(pair, data):
    """Projected MSE >= 0 and 0 on equal rows; the cosine distance ``|s/|s| - t/|t||^2`` lies in
    ``[0, 4]``, is 0 on equal rows and blind to a positive scale of each row; the ND loss lies in
    ``[0, 2]``."""
    s, t = pair
    width = min(s.shape[1], t.shape[1])
    s, t = s[:, :width], t[:, :width]
    atol = tolerance(s.dtype, 1.0)
    assert float(Fn.projected_mse(s, t)) >= 0 and float(Fn.projected_mse(s, s.clone())) == 0.0
    cosine = float(Fn.cosine_distance(s, t))
    assert -atol <= cosine <= 4 + atol
    assert abs(float(Fn.cosine_distance(s, s.clone()))) <= atol
    scales = torch.tensor(data.draw(st.lists(st.floats(0.1, 10.0), min_size=s.shape[0], max_size=s.shape[0])), dtype=s.dtype)
    torch.testing.assert_close(Fn.cosine_distance(scales[:, None] * s, t), Fn.cosine_distance(s, t), atol=10 * atol, rtol=1e-4)
    classes = data.draw(st.integers(1, 4))
    labels = torch.arange(s.shape[0]) % classes
    means = Fn.mean_per_class(t, labels, classes)
    nd = float(Fn.nd_loss(s, t, means, labels))
    assert -atol <= nd <= 2 + atol


GEOMETRY_GRADIENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    **GEOMETRY,
    "procrustes_distance": functools.partial(Fn.procrustes_distance, squared=False),
    "procrustes_angular": functools.partial(Fn.procrustes_distance, angular=True),
    "gram_distance": Fn.gram_distance,
    "projected_mse": Fn.projected_mse,
    "cosine": Fn.cosine_distance,
}


@EXAMPLES
@given(pair=feature_pairs(dtypes=st.sampled_from([torch.float32, torch.float64, torch.bfloat16])), same=st.booleans())
def test_feature_losses_and_gradients_are_finite(pair, same):
    """Finite values and gradients for every generated input, one row, identical sides and
    bfloat16 features included (which compute in float32)."""
    s, t = pair
    t = s.clone() if same else t
    for name, fn in GEOMETRY_GRADIENTS.items():
        if name in ("projected_mse", "cosine") and s.shape[1] != t.shape[1]:
            continue  # the row losses need equal widths (or a projection); the geometry takes any
        assert_finite_with_finite_gradient(name, fn, s, t)
