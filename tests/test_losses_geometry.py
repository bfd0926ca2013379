"""Procrustes, Gram and CKA against explicit minimisations and definitions; invariances; gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import features, one_thread  # noqa: F401
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from kd_lightning.losses import functional as Fn

pytestmark = pytest.mark.usefixtures("one_thread")


def normalized(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    return x / np.linalg.norm(x)


def procrustes_reference(s: np.ndarray, t: np.ndarray) -> float:
    """min over orthogonal Q of ||T - S Q||_F^2, by scipy on zero-padded, normalised inputs."""
    s, t = normalized(s), normalized(t)
    width = max(s.shape[1], t.shape[1])
    s = np.pad(s, ((0, 0), (0, width - s.shape[1])))
    t = np.pad(t, ((0, 0), (0, width - t.shape[1])))
    q, _ = orthogonal_procrustes(s, t)
    return float(np.linalg.norm(t - s @ q) ** 2)


def hsic_cka(s: np.ndarray, t: np.ndarray) -> float:
    n = s.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, lt = s @ s.T, t @ t.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, lt) / np.sqrt(hsic(k, k) * hsic(lt, lt))


SHAPES = [(40, 6, 9), (40, 9, 6), (5, 12, 12), (7, 4, 10), (30, 8, 8)]


@pytest.mark.parametrize("n,d_s,d_t", SHAPES)
def test_procrustes_equals_explicit_minimisation_over_orthogonal_maps(n, d_s, d_t):
    s, t = features(n, d_s, 0), features(n, d_t, 1)
    expected = procrustes_reference(s.numpy(), t.numpy())
    assert Fn.procrustes_distance(s, t).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert Fn.procrustes_distance(s, t, squared=False).item() == pytest.approx(np.sqrt(expected), rel=1e-9)
    angle = np.arccos(1 - expected / 2)
    assert Fn.procrustes_distance(s, t, angular=True).item() == pytest.approx(angle, rel=1e-8)


@pytest.mark.parametrize("n,d_s,d_t", SHAPES)
@pytest.mark.parametrize("space", ["feature", "gram", "auto"])
def test_gram_distance_and_cka_match_their_definitions(n, d_s, d_t, space):
    s, t = features(n, d_s, 2), features(n, d_t, 3)
    sn, tn = normalized(s.numpy()), normalized(t.numpy())
    gram = np.linalg.norm(tn @ tn.T - sn @ sn.T)
    assert Fn.gram_distance(s, t, space=space).item() == pytest.approx(gram, rel=1e-9)
    assert Fn.gram_distance(s, t, squared=True, space=space).item() == pytest.approx(gram**2, rel=1e-9)
    assert Fn.linear_cka(s, t, space=space).item() == pytest.approx(hsic_cka(s.numpy(), t.numpy()), rel=1e-9)


@pytest.mark.parametrize("n,d_s,d_t", SHAPES)
def test_rotation_and_scale_invariance(n, d_s, d_t):
    s, t = features(n, d_s, 4), features(n, d_t, 5)
    rotation = torch.from_numpy(ortho_group.rvs(d_s, random_state=6))
    for fn in (Fn.procrustes_distance, Fn.gram_distance, Fn.linear_cka):
        base = fn(s, t).item()
        assert fn(s @ rotation, t).item() == pytest.approx(base, rel=1e-9, abs=1e-12), fn.__name__
        assert fn(3.7 * s, t).item() == pytest.approx(base, rel=1e-9, abs=1e-12), fn.__name__
        assert fn(s + 5.0, t).item() == pytest.approx(base, rel=1e-9, abs=1e-12), fn.__name__


@pytest.mark.parametrize("d_t,d_s", [(6, 6), (6, 10)])
def test_procrustes_and_gram_vanish_exactly_when_student_is_a_rotated_teacher(d_t, d_s):
    t = features(50, d_t, 7)
    q = torch.from_numpy(ortho_group.rvs(d_s, random_state=8))[:d_t]  # orthonormal rows: T Q keeps T's geometry
    s = t @ q
    assert Fn.procrustes_distance(s, t).item() == pytest.approx(0.0, abs=1e-12)
    assert Fn.gram_distance(s, t).item() == pytest.approx(0.0, abs=1e-7)
    assert Fn.linear_cka(s, t).item() == pytest.approx(1.0, abs=1e-12)
    assert Fn.procrustes_distance(s.float(), t.float()).item() == pytest.approx(0.0, abs=1e-5)


def test_geometry_paper_claim_projection_mse_vanishes_but_procrustes_and_gram_do_not():
    """Seed 000: a student that is an invertible, non-orthogonal linear map of the teacher
    reaches zero projected MSE (with the best projection) while Procrustes and Gram stay positive."""
    n, d = 200, 8
    t = features(n, d, 9)
    mixing = torch.from_numpy(ortho_group.rvs(d, random_state=10)) @ torch.diag(
        torch.logspace(0, 1.5, d, dtype=torch.float64)
    )
    s = t @ mixing
    best = torch.linalg.lstsq(s, t).solution  # least-squares projection W: d_s -> d_t
    projection = torch.nn.Linear(d, d, bias=False).double()
    with torch.no_grad():
        projection.weight.copy_(best.mT)
    assert Fn.projected_mse(s, t, projection).item() < 1e-20
    assert Fn.procrustes_distance(s, t).item() > 0.1
    assert Fn.gram_distance(s, t).item() > 0.1


def gradcheck(fn, *inputs: torch.Tensor) -> bool:
    return torch.autograd.gradcheck(fn, tuple(x.detach().clone().requires_grad_(True) for x in inputs))


@pytest.mark.parametrize("n,d_s,d_t", [(12, 4, 5), (4, 9, 10), (9, 3, 3)])  # (4, 9, 10): the compressed SVD path
def test_geometry_losses_pass_gradcheck(n, d_s, d_t):
    s, t = features(n, d_s, 11), features(n, d_t, 12)
    assert gradcheck(Fn.procrustes_distance, s, t)
    assert gradcheck(lambda a, b: Fn.procrustes_distance(a, b, squared=False), s, t)
    assert gradcheck(lambda a, b: Fn.procrustes_distance(a, b, angular=True), s, t)
    for space in ("feature", "gram"):
        assert gradcheck(lambda a, b, sp=space: Fn.gram_distance(a, b, space=sp), s, t)
        assert gradcheck(lambda a, b, sp=space: Fn.linear_cka(a, b, space=sp), s, t)


@pytest.mark.parametrize("rows,width", [(20, 4), (5, 10)])  # feature-space and compressed (few rows) paths
def test_procrustes_gradcheck_with_nearly_equal_singular_values(rows, width):
    """T^T S with singular values 1, 1 + 1e-9, 1 + 2e-9 (and zeros): no 1 / (s_i^2 - s_j^2) blow-up."""
    centred = torch.randn(rows, rows, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    basis, _ = torch.linalg.qr(centred - centred.mean(0))  # orthonormal columns orthogonal to the ones vector
    u = basis[:, :3]
    t = u * torch.tensor([1.0, 1 + 1e-9, 1 + 2e-9], dtype=torch.float64)
    q = torch.from_numpy(ortho_group.rvs(3, random_state=14))
    s = torch.cat([u @ q, 0.5 * basis[:, 3:4]], dim=1)  # aligned with T up to rotation, plus an off part
    t = torch.nn.functional.pad(t, (0, width - 3))
    s = torch.nn.functional.pad(s, (0, width - 4))
    sigma = torch.linalg.svdvals(Fn.normalize_features(t).mT @ Fn.normalize_features(s))[:3]
    assert (sigma.max() - sigma.min()) / sigma.max() < 1e-8
    assert Fn.procrustes_distance(s, t).item() > 0.05
    assert gradcheck(Fn.procrustes_distance, s, t)


def test_procrustes_gradient_matches_svdvals_autograd_and_both_paths_agree():
    for n, d in ((30, 5), (4, 9)):
        s, t = features(n, d, 15), features(n, d + 2, 16)
        a = s.clone().requires_grad_(True)
        value = Fn.procrustes_distance(a, t)
        value.backward()
        b = s.clone().requires_grad_(True)
        sn, tn = Fn.normalize_features(b), Fn.normalize_features(t)
        if n > d:  # generic full-rank cross matrix: torch's own svdvals gradient is the reference
            reference = 2 - 2 * torch.linalg.svdvals(tn.mT @ sn).sum()
            reference.backward()
            torch.testing.assert_close(value, reference)
            torch.testing.assert_close(a.grad, b.grad)
        else:  # rank-deficient cross matrix: same value as the d x d SVD, finite gradient
            reference = 2 - 2 * torch.linalg.svdvals(tn.mT @ sn).sum()
            torch.testing.assert_close(value, reference.detach())
            assert torch.isfinite(a.grad).all()


def test_procrustes_gradient_descends_when_singular_values_vanish():
    """A rank-one student (all but one singular value of T^T S vanish): finite subgradient that descends."""
    t = features(16, 5, 17)
    s = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(18)) * torch.ones(
        1, 4, dtype=torch.float64
    )
    s = s.requires_grad_(True)
    value = Fn.procrustes_distance(s, t)
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.norm() > 0
    with torch.no_grad():
        assert Fn.procrustes_distance(s - 0.05 * s.grad / s.grad.norm(), t) < value


@pytest.mark.parametrize(
    "student,teacher",
    [
        (torch.randn(1, 6), torch.randn(1, 4)),  # batch of one
        (torch.ones(5, 6), torch.randn(5, 4)),  # identical rows
        (torch.zeros(5, 6), torch.zeros(5, 4)),  # all zeros
        (torch.full((5, 3), 7.0), torch.full((5, 3), 7.0)),  # identical rows on both sides
        (torch.zeros(0, 6), torch.zeros(0, 4)),  # no rows at all
    ],
)
def test_geometry_is_finite_on_degenerate_input(student, teacher):
    for fn in (
        Fn.procrustes_distance,
        lambda a, b: Fn.procrustes_distance(a, b, squared=False),
        lambda a, b: Fn.procrustes_distance(a, b, angular=True),
        Fn.gram_distance,
        Fn.linear_cka,
    ):
        s = student.clone().requires_grad_(True)
        value = fn(s, teacher)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    spread_less = student.shape[0] < 2 or student.std(0).max() == 0
    if spread_less and (teacher.shape[0] < 2 or teacher.std(0).max() == 0):
        assert Fn.procrustes_distance(student, teacher).item() == 0.0
        assert Fn.gram_distance(student, teacher).item() == 0.0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 20), d_s=st.integers(1, 10), d_t=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_geometry_bounds_and_symmetry_over_random_shapes(n, d_s, d_t, seed):
    s, t = features(n, d_s, seed), features(n, d_t, seed + 1)
    procrustes = Fn.procrustes_distance(s, t).item()
    assert 0.0 <= procrustes <= 2.0 + 1e-12
    assert procrustes == pytest.approx(Fn.procrustes_distance(t, s).item(), abs=1e-10)
    cka = Fn.linear_cka(s, t).item()
    assert 0.0 <= cka <= 1.0
    assert cka == pytest.approx(Fn.linear_cka(s, t, space="gram").item(), abs=1e-10)
    gram = Fn.gram_distance(s, t).item()
    assert gram == pytest.approx(Fn.gram_distance(s, t, space="gram").item(), abs=1e-6)
    assert gram <= np.sqrt(2) + 1e-9  # two unit-norm PSD matrices with a non-negative inner product
