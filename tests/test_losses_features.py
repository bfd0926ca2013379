"""Row-wise feature losses (FitNets, PKD cosine, KD++ ND) against brute-force loops."""

from __future__ import annotations

import pytest
import torch
from loss_testing import features, one_thread  # noqa: F401

from kd_lightning.losses import functional as Fn

pytestmark = pytest.mark.usefixtures("one_thread")


def linear(d_in: int, d_out: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out, bias=False).double()


def test_projected_mse_is_the_mean_squared_residual_of_the_projection():
    s, t, proj = features(7, 3, 0), features(7, 5, 1), linear(3, 5, 2)
    residual = t - s @ proj.weight.detach().T
    expected = sum(float(r @ r) for r in residual) / (7 * 5)
    assert Fn.projected_mse(s, t, proj).item() == pytest.approx(expected, rel=1e-12)
    assert Fn.projected_mse(s, s).item() == 0.0


def test_cosine_distance_matches_loop_with_and_without_projection():
    s, t = features(6, 4, 3), features(6, 4, 4)
    expected = sum(float(((a / a.norm() - b / b.norm()) ** 2).sum()) for a, b in zip(s, t, strict=True)) / 6
    assert Fn.cosine_distance(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert Fn.cosine_distance(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-14)
    proj = linear(4, 7, 5)
    wide = features(6, 7, 6)
    projected = s @ proj.weight.detach().T
    expected = sum(float(((a / a.norm() - b / b.norm()) ** 2).sum()) for a, b in zip(projected, wide, strict=True)) / 6
    assert Fn.cosine_distance(s, wide, proj).item() == pytest.approx(expected, rel=1e-12)


def nd_reference(s: torch.Tensor, t: torch.Tensor, means: torch.Tensor, labels: torch.Tensor) -> float:
    """The reference DirectNormLoss (WangYZ1608/Knowledge-Distillation-via-ND, CIFAR/utils.py) as a loop."""
    total = 0.0
    for a, b, y in zip(s, t, labels, strict=True):
        centre = means[y]
        total += float(1 - a @ (centre / centre.norm()) / max(a.norm(), b.norm()))
    return total / len(labels)


def test_nd_loss_matches_reference_loop_and_ignores_unlabelled_rows():
    s, t = features(8, 5, 7), 3 * features(8, 5, 8)
    labels = torch.tensor([0, 1, 2, 1, -100, 0, 2, 2])
    means = Fn.mean_per_class(t, labels, 3)
    keep = labels >= 0
    expected = nd_reference(s[keep], t[keep], means, labels[keep])
    assert Fn.nd_loss(s, t, means, labels).item() == pytest.approx(expected, rel=1e-12)
    # a student along its class mean with a larger norm than the teacher reaches 0
    directions = means / means.norm(dim=-1, keepdim=True)
    aligned = 100 * directions[labels.clamp_min(0)]
    assert Fn.nd_loss(aligned, t, means, labels).item() == pytest.approx(0.0, abs=1e-12)


def test_mean_per_class_is_the_class_average():
    x = features(9, 4, 9)
    labels = torch.tensor([2, 0, 2, 2, 0, -100, 0, 2, 0])
    means = Fn.mean_per_class(x, labels, 4)
    for c in range(4):
        rows = x[labels == c]
        expected = rows.mean(0) if len(rows) else torch.zeros(4, dtype=x.dtype)
        torch.testing.assert_close(means[c], expected)


def test_feature_losses_pass_gradcheck():
    s, t = features(5, 3, 10).requires_grad_(True), features(5, 4, 11).requires_grad_(True)
    proj = linear(3, 4, 12)
    labels = torch.tensor([0, 1, 1, 0, 1])
    means = features(2, 4, 13)
    assert torch.autograd.gradcheck(lambda a, b: Fn.projected_mse(a, b, proj), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: Fn.cosine_distance(a, b, proj), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: Fn.nd_loss(a, b, means, labels, proj), (s, t))


@pytest.mark.parametrize("rows", [torch.zeros(3, 4), torch.ones(3, 4), torch.randn(1, 4), torch.zeros(0, 4)])
def test_feature_losses_are_finite_on_degenerate_rows(rows):
    labels = torch.zeros(rows.shape[0], dtype=torch.long)
    means = torch.zeros(2, 4)  # a class never seen: zero mean
    for fn in (Fn.projected_mse, Fn.cosine_distance, lambda a, b: Fn.nd_loss(a, b, means, labels)):
        s = rows.clone().requires_grad_(True)
        value = fn(s, torch.zeros_like(rows))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
