"""Logit losses against brute-force float64 computations: divergences, BD-KD, SinKD, DKD, DIST."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import logits_pair, one_thread  # noqa: F401
from torch.distributions import Categorical, kl_divergence

from kd_lightning.losses import functional as Fn

pytestmark = pytest.mark.usefixtures("one_thread")


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z / temperature
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


def entropy(p: np.ndarray) -> float:
    return float(-np.sum(p * np.log(p)))


def bd_row(p_s: np.ndarray, p_t: np.ndarray, mode: str, sharpness: float = 1.0) -> float:
    gap = entropy(p_t) - entropy(p_s)
    w = float(gap > 0) if mode == "hard" else 1 / (1 + math.exp(-sharpness * gap))
    return w * kl(p_t, p_s) + (1 - w) * kl(p_s, p_t)


T = 2.0
# name -> (function, per-row reference on (p_s, p_t), multiplied by T^2)
DIVERGENCES = {
    "kl": (Fn.kl_divergence, lambda s, t: kl(t, s), True),
    "reverse_kl": (Fn.reverse_kl_divergence, lambda s, t: kl(s, t), True),
    "js": (Fn.js_divergence, lambda s, t: 0.5 * (kl(t, (s + t) / 2) + kl(s, (s + t) / 2)), True),
    "skew_kl": (Fn.skew_kl_divergence, lambda s, t: kl(t, 0.1 * t + 0.9 * s), False),
    "skew_reverse_kl": (Fn.skew_reverse_kl_divergence, lambda s, t: kl(s, 0.1 * s + 0.9 * t), False),
    "tvd": (Fn.total_variation_distance, lambda s, t: 0.5 * np.abs(t - s).sum(), False),
    "bd_hard": (
        lambda s, t, temperature, mask: Fn.balanced_divergence(s, t, temperature, "hard", mask),
        lambda s, t: bd_row(s, t, "hard"),
        True,
    ),
    "bd_soft": (
        lambda s, t, temperature, mask: Fn.balanced_divergence(s, t, temperature, "soft", mask, sharpness=3.0),
        lambda s, t: bd_row(s, t, "soft", 3.0),
        True,
    ),
}


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divergence_matches_brute_force_with_mask(name, dtype):
    fn, per_row, scaled = DIVERGENCES[name]
    s, t = logits_pair((3, 5, 7), seed=1, dtype=dtype)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) > 0.4
    p_s, p_t = softmax(s.double().numpy(), T), softmax(t.double().numpy(), T)
    rows = [per_row(p_s[i, j], p_t[i, j]) for i in range(3) for j in range(5) if mask[i, j]]
    expected = np.mean(rows) * (T**2 if scaled else 1.0)
    value = fn(s, t, temperature=T, mask=mask)
    assert value.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)
    unmasked = np.mean([per_row(a, b) for a, b in zip(p_s.reshape(-1, 7), p_t.reshape(-1, 7), strict=True)])
    assert fn(s, t, temperature=T, mask=None).item() == pytest.approx(unmasked * (T**2 if scaled else 1.0), rel=tol)


def test_kl_agrees_with_torch_distributions():
    s, t = logits_pair((6, 11))
    expected = kl_divergence(Categorical(logits=t / 3), Categorical(logits=s / 3)).mean() * 9
    torch.testing.assert_close(Fn.kl_divergence(s, t, 3.0), expected)
    expected_reverse = kl_divergence(Categorical(logits=s / 3), Categorical(logits=t / 3)).mean() * 9
    torch.testing.assert_close(Fn.reverse_kl_divergence(s, t, 3.0), expected_reverse)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_vanishes_on_identical_logits_and_is_finite_when_fully_masked(name):
    fn = DIVERGENCES[name][0]
    s, _ = logits_pair((4, 9))
    assert fn(s, s.clone(), temperature=T, mask=None).item() == pytest.approx(0.0, abs=1e-12)
    student = s.clone().requires_grad_(True)
    value = fn(student, s.flip(0), temperature=T, mask=torch.zeros(4, dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


CHUNKABLE = {
    "kl": Fn.kl_divergence,
    "reverse_kl": Fn.reverse_kl_divergence,
    "js": Fn.js_divergence,
    "skew_kl": Fn.skew_kl_divergence,
    "tvd": Fn.total_variation_distance,
    "bd_soft": functools.partial(Fn.balanced_divergence, mode="soft"),
}


@pytest.mark.parametrize("name", CHUNKABLE)
def test_chunked_divergence_equals_unchunked_value_and_gradient(name):
    fn = CHUNKABLE[name]
    s, t = logits_pair((2, 13, 50), seed=3)
    mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(4)) > 0.3
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    whole = fn(a, t, temperature=T, mask=mask)
    chunked = fn(b, t, temperature=T, mask=mask, chunk_size=4)
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(whole, chunked)
    torch.testing.assert_close(a.grad, b.grad)


def test_balanced_divergence_picks_forward_kl_for_a_confident_student():
    teacher = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)  # uniform: maximal entropy
    student = torch.tensor([[4.0, 0.0, -1.0]], dtype=torch.float64)  # sharper than the teacher
    forward = Fn.kl_divergence(student, teacher)
    assert Fn.balanced_divergence(student, teacher, mode="hard").item() == pytest.approx(forward.item())
    flipped = Fn.balanced_divergence(student, teacher, mode="hard", confident_student="reverse")
    assert flipped.item() == pytest.approx(Fn.reverse_kl_divergence(student, teacher).item())
    # teacher sharper than the student -> reverse KL
    assert Fn.balanced_divergence(teacher, student, mode="hard").item() == pytest.approx(
        Fn.reverse_kl_divergence(teacher, student).item()
    )


def sinkhorn_reference(s: np.ndarray, t: np.ndarray, temperature: float, eps: float, iterations: int) -> float:
    """The official multiplicative loop (2018cx/SinKD, loss.py) in float64."""
    p_s, p_t = softmax(s, temperature), softmax(t, temperature)
    n = p_s.shape[0]
    cost = np.array([[np.abs(p_s[i] - p_t[j]).sum() for j in range(n)] for i in range(n)])
    plan = np.exp(-cost / eps)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdims=True)
        plan = plan / plan.sum(0, keepdims=True)
    return float((plan * cost).sum())


@pytest.mark.parametrize("epsilon,iterations", [(0.1, 20), (0.5, 3), (1.0, 0)])
def test_sinkhorn_matches_plain_float64_loop(epsilon, iterations):
    s, t = logits_pair((9, 4), seed=5)
    expected = sinkhorn_reference(s.numpy(), t.numpy(), 2.0, epsilon, iterations)
    value = Fn.sinkhorn_distance(s, t, 2.0, epsilon, iterations)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    assert Fn.sinkhorn_distance(s, t, 2.0, epsilon, iterations, reduction="mean").item() == pytest.approx(expected / 9)


def test_sinkhorn_plan_has_unit_columns_and_masks_rows():
    s, t = logits_pair((2, 5, 3), seed=6)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    expected = sinkhorn_reference(s[mask].numpy(), t[mask].numpy(), 2.0, 0.1, 20)
    assert Fn.sinkhorn_distance(s, t, mask=mask).item() == pytest.approx(expected, rel=1e-10)
    assert Fn.sinkhorn_distance(s, t, mask=torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0
    # small epsilon does not underflow in the log domain
    assert torch.isfinite(Fn.sinkhorn_distance(s.float(), t.float(), epsilon=1e-4))


def dkd_reference(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, temperature: float) -> float:
    """mdistiller's dkd_loss written with plain probabilities."""
    total = 0.0
    for zs, zt, label in zip(s, t, y, strict=True):
        p_s, p_t = softmax(zs, temperature), softmax(zt, temperature)
        b_s = np.array([p_s[label], 1 - p_s[label]])
        b_t = np.array([p_t[label], 1 - p_t[label]])
        others = np.arange(len(zs)) != label
        q_s, q_t = softmax(zs[others], temperature), softmax(zt[others], temperature)
        total += alpha * kl(b_t, b_s) + beta * kl(q_t, q_s)
    return total / len(y) * temperature**2


def test_dkd_matches_reference_and_ignores_unlabelled_rows():
    s, t = logits_pair((6, 5), seed=7)
    labels = torch.tensor([0, 4, 2, -100, 1, 3])
    keep = labels >= 0
    expected = dkd_reference(s[keep].numpy(), t[keep].numpy(), labels[keep].numpy(), 1.0, 8.0, 4.0)
    assert Fn.dkd_loss(s, t, labels).item() == pytest.approx(expected, rel=1e-10)
    assert Fn.dkd_loss(s, t, labels, alpha=0.5, beta=2.0, temperature=1.0).item() == pytest.approx(
        dkd_reference(s[keep].numpy(), t[keep].numpy(), labels[keep].numpy(), 0.5, 2.0, 1.0), rel=1e-10
    )
    # binary task: the non-target distribution has one class, NCKD vanishes, TCKD is the KL
    s2, t2 = logits_pair((5, 2), seed=8)
    y2 = torch.tensor([0, 1, 1, 0, 1])
    assert Fn.dkd_loss(s2, t2, y2, beta=100.0, temperature=2.0).item() == pytest.approx(
        Fn.kl_divergence(s2, t2, 2.0).item(), rel=1e-10
    )
    # a confident, saturated teacher (p_y = 1 in float32) stays finite
    big = torch.tensor([[80.0, -80.0, 0.0]])
    assert torch.isfinite(Fn.dkd_loss(torch.zeros(1, 3), big, torch.tensor([0])))


def test_dist_matches_numpy_pearson():
    s, t = logits_pair((7, 5), seed=9)
    p_s, p_t = softmax(s.numpy(), 1.5), softmax(t.numpy(), 1.5)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s, p_t, strict=True)])
    intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s.T, p_t.T, strict=True)])
    expected = (2.0 * inter + 0.5 * intra) * 1.5**2
    assert Fn.dist_loss(s, t, beta=2.0, gamma=0.5, temperature=1.5, eps=0.0).item() == pytest.approx(expected, rel=1e-9)


GRADCHECKED = {
    **{name: entry[0] for name, entry in DIVERGENCES.items() if name != "bd_soft"},
    "sinkhorn": lambda s, t, temperature, mask: Fn.sinkhorn_distance(s, t, temperature, epsilon=0.5, iterations=5),
    "dkd": lambda s, t, temperature, mask: Fn.dkd_loss(s, t, torch.tensor([0, 3, 1, 2]), temperature=temperature),
    "dist": lambda s, t, temperature, mask: Fn.dist_loss(s, t, temperature=temperature),
}


@pytest.mark.parametrize("name", GRADCHECKED)
def test_logit_losses_pass_gradcheck(name):
    fn = GRADCHECKED[name]
    s, t = logits_pair((4, 5), seed=10)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, temperature=1.5, mask=None), (s, t))


def test_soft_balanced_divergence_gradient_treats_the_weight_as_a_constant():
    s, t = logits_pair((5, 6), seed=11)
    s.requires_grad_(True)
    Fn.balanced_divergence(s, t, T, "soft", sharpness=2.0).backward()
    log_p_s, log_p_t = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    gap = (-(p_t * log_p_t).sum(-1) + (p_s * log_p_s).sum(-1)).detach()
    w = torch.sigmoid(2.0 * gap)
    forward, reverse = (p_t * (log_p_t - log_p_s)).sum(-1), (p_s * (log_p_s - log_p_t)).sum(-1)
    (expected,) = torch.autograd.grad((T**2 * (w * forward + (1 - w) * reverse)).mean(), s)
    torch.testing.assert_close(s.grad, expected)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    classes=st.integers(2, 9),
    temperature=st.floats(0.5, 4.0),
    seed=st.integers(0, 10_000),
)
def test_divergence_properties_over_random_shapes(rows, classes, temperature, seed):
    s, t = logits_pair((rows, classes), seed=seed)
    for name, (fn, _, _) in DIVERGENCES.items():
        value = fn(s, t, temperature=temperature, mask=None).item()
        assert math.isfinite(value) and value >= -1e-12, name
        bound = {"js": math.log(2) * temperature**2, "tvd": 1.0}.get(name)
        if bound is not None:
            assert value <= bound + 1e-12
    sinkhorn = Fn.sinkhorn_distance(s, t, temperature, reduction="mean").item()
    assert 0.0 <= sinkhorn <= 2.0 + 1e-9  # a plan of mass 1 moves L1 costs of at most 2
