"""Wasserstein dependency measure KD: the bounds against float64 loops, the Lipschitz constraints
(spectral norms after training, the gradient penalty against autograd by hand), invariances,
edge cases, and its config through the CLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_TEXT_DATA, fit_config
from loss_testing import one_thread  # noqa: F401
from torch.nn.utils import parametrize

from kd_lightning.losses import WassersteinDependency
from kd_lightning.losses import wdm as wdm_lib
from kd_lightning.outputs import ModelOutputs

REPO = Path(__file__).resolve().parents[1]
D_S, D_T = 6, 10


def rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + torch.linspace(-1, 1, d, dtype=torch.float64)).to(
        dtype
    )


def outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[ModelOutputs, ModelOutputs]:
    logits = torch.zeros(s.shape[0], 2, dtype=s.dtype)
    return ModelOutputs(logits, {"s": s}), ModelOutputs(logits, {"t": t})


def built(dtype: torch.dtype = torch.float64, **kwargs) -> WassersteinDependency:
    torch.manual_seed(0)
    kwargs = {"hidden": 12, "embedding": 5, **kwargs}
    loss = WassersteinDependency("s", "t", **kwargs)
    loss.build({"s": D_S, "t": D_T}, 2)
    return loss.to(dtype)


def value(loss: WassersteinDependency, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return loss(*outputs(s, t), {})


# ---- brute force, float64, one pair at a time -------------------------------------------------
def mlp_by_hand(layers: list[torch.nn.Linear], x: torch.Tensor) -> torch.Tensor:
    for k, layer in enumerate(layers):
        x = layer.weight @ x + layer.bias
        if k < len(layers) - 1:
            x = torch.where(x > 0, x, wdm_lib.LEAKY_SLOPE * x)
    return x


@torch.no_grad()
def score_by_hand(loss: WassersteinDependency, t: torch.Tensor, s: torch.Tensor) -> float:
    """``f(t, s)`` for one pair, from the (spectrally normalised) weights."""
    critic, k = loss.critic, loss.lipschitz_constant
    if isinstance(critic, wdm_lib.JointCritic):
        return float(k * mlp_by_hand(list(critic.layers), torch.cat([t, s]))[0])
    g = mlp_by_hand([m for m in critic.teacher_map if isinstance(m, torch.nn.Linear)], t)
    h = mlp_by_hand([m for m in critic.student_map if isinstance(m, torch.nn.Linear)], s)
    return float(k * sum(g[i] * h[i] for i in range(len(g))))


def bound_by_hand(scores: list[list[float]], bound: str, symmetric: bool) -> float:
    n = len(scores)
    if bound == "dual":
        joint = sum(scores[i][i] for i in range(n)) / n
        marginal = sum(scores[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return joint - marginal
    rows_ = sum(scores[i][i] - math.log(sum(math.exp(scores[i][j]) for j in range(n)) / n) for i in range(n)) / n
    if not symmetric:
        return rows_
    columns = sum(scores[j][j] - math.log(sum(math.exp(scores[i][j]) for i in range(n)) / n) for j in range(n)) / n
    return (rows_ + columns) / 2


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "critic, bound, symmetric, normalize",
    [
        ("joint", "infonce", False, True),
        ("joint", "infonce", True, False),
        ("joint", "dual", False, True),
        ("separable", "infonce", False, False),
        ("separable", "infonce", True, True),
        ("separable", "dual", False, False),
    ],
)
def test_the_bound_matches_a_brute_force_loop(critic, bound, symmetric, normalize):
    loss = built(critic=critic, bound=bound, symmetric=symmetric, normalize=normalize, lipschitz_constant=3.0).eval()
    s, t = rows(7, D_S, 1), rows(7, D_T, 2)
    if normalize:
        s_in = [row / math.sqrt(float(row @ row)) for row in s]
        t_in = [row / math.sqrt(float(row @ row)) for row in t]
    else:
        s_in, t_in = list(s), list(t)
    scores = [[score_by_hand(loss, t_in[i], s_in[j]) for j in range(7)] for i in range(7)]
    expected = -bound_by_hand(scores, bound, symmetric)
    torch.testing.assert_close(value(loss, s, t), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_the_bounds_on_known_score_matrices():
    n = 5
    flat = torch.full((n, n), 0.7, dtype=torch.float64)
    assert float(wdm_lib.infonce_bound(flat)) == pytest.approx(0.0, abs=1e-12)  # independent: no information
    assert float(wdm_lib.dual_bound(flat)) == pytest.approx(0.0, abs=1e-12)
    sharp = 50.0 * torch.eye(n, dtype=torch.float64)
    assert float(wdm_lib.infonce_bound(sharp)) == pytest.approx(math.log(n), abs=1e-12)  # its ceiling
    assert float(wdm_lib.dual_bound(sharp)) == pytest.approx(50.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = 3 * torch.randn(n, n, generator=g, dtype=torch.float64)
        assert float(wdm_lib.infonce_bound(scores, symmetric=True)) <= math.log(n) + 1e-12


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("critic, bound", [("joint", "infonce"), ("joint", "dual"), ("separable", "infonce")])
def test_permuting_the_batch_on_both_sides_leaves_the_loss_unchanged(critic, bound):
    loss = built(critic=critic, bound=bound, symmetric=bound == "infonce").eval()
    s, t = rows(9, D_S, 3), rows(9, D_T, 4)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(value(loss, s[order], t[order]), value(loss, s, t), rtol=1e-12, atol=1e-12)
    # pairing matters: permuting one side only changes it
    assert not torch.allclose(value(loss, s[order], t), value(loss, s, t))


@pytest.mark.usefixtures("one_thread")
def test_normalised_rows_make_the_loss_blind_to_the_features_scale():
    s, t = rows(6, D_S, 6), rows(6, D_T, 7)
    normalised, raw = built(normalize=True).eval(), built(normalize=False).eval()
    torch.testing.assert_close(value(normalised, 5 * s, 0.2 * t), value(normalised, s, t))
    assert not torch.allclose(value(raw, 5 * s, 0.2 * t), value(raw, s, t))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("critic", ["joint", "separable"])
def test_every_critic_layer_has_spectral_norm_at_most_one_after_training(critic):
    loss = built(torch.float32, critic=critic, layers=2, lipschitz_constant=2.0)
    layers = list(loss.critic_layers())
    assert len(layers) == (3 if critic == "joint" else 6)
    assert all(parametrize.is_parametrized(layer, "weight") for layer in layers)
    s, t = rows(16, D_S, 8, torch.float32), rows(16, D_T, 9, torch.float32)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        step = value(loss, s, t)
        step.backward()
        optimizer.step()
        losses.append(float(step.detach()))
    assert losses[-1] < losses[0], "the critic learns to raise the bound"
    with torch.no_grad():
        for _ in range(50):  # one power iteration per forward pass: let it converge
            value(loss, s, t)
        for layer in layers:
            raw = torch.linalg.matrix_norm(layer.parametrizations.weight.original, ord=2)
            assert float(torch.linalg.matrix_norm(layer.weight, ord=2)) <= 1 + 1e-3, float(raw)
    if critic == "joint":  # then f itself is K-Lipschitz in (t, s)
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(200, D_T + D_S, generator=g), torch.randn(200, D_T + D_S, generator=g)
        loss.eval()
        with torch.no_grad():
            fa, fb = (loss.critic(x[:, :D_T], x[:, D_T:]) for x in (a, b))
        assert bool(((fa - fb).abs() <= 2.0 * (a - b).norm(dim=-1) * (1 + 1e-3)).all())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("critic", ["joint", "separable"])
def test_the_gradient_penalty_matches_autograd_by_hand(critic):
    loss = built(critic=critic, constraint="gradient_penalty", penalty_weight=7.0, lipschitz_constant=1.5)
    assert not any(parametrize.is_parametrized(layer) for layer in loss.critic_layers())
    s, t = rows(5, D_S, 10), rows(5, D_T, 11)
    penalty = wdm_lib.gradient_penalty(loss.critic, t, s, target=1.5)
    expected = 0.0
    for i in range(5):
        t_i, s_i = t[i : i + 1].clone().requires_grad_(), s[i : i + 1].clone().requires_grad_()
        grad_t, grad_s = torch.autograd.grad(loss.critic(t_i, s_i).sum(), (t_i, s_i))
        norm = math.sqrt(float(grad_t.square().sum() + grad_s.square().sum()))
        expected += (norm - 1.5) ** 2 / 5
    assert float(penalty) == pytest.approx(expected, rel=1e-10)
    # it trains the critic, never the features
    s_leaf = s.clone().requires_grad_()
    penalty = wdm_lib.gradient_penalty(loss.critic, t, s_leaf)
    assert torch.autograd.grad(penalty, s_leaf, allow_unused=True)[0] is None
    weights = [layer.weight for layer in loss.critic_layers()]  # (an output bias leaves input gradients alone)
    assert all(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(penalty, weights))

    # the loss: -I + lambda * penalty at the interpolates drawn from the global generator
    torch.manual_seed(3)
    total = value(loss, s, t)
    torch.manual_seed(3)
    t_hat, s_hat = wdm_lib.interpolates(F.normalize(t, dim=-1), F.normalize(s, dim=-1))
    bound = loss.dependency(F.normalize(t, dim=-1), F.normalize(s, dim=-1))
    torch.testing.assert_close(total, -bound + 7.0 * wdm_lib.gradient_penalty(loss.critic, t_hat, s_hat, 1.5))


def test_interpolates_lie_between_each_row_and_another_rows():
    s, t = rows(6, D_S, 12), rows(6, D_T, 13)
    for seed in range(5):
        t_hat, s_hat = wdm_lib.interpolates(t, s, torch.Generator().manual_seed(seed))
        assert torch.equal(t_hat, t)
        shift = int(torch.randint(1, 6, (1,), generator=torch.Generator().manual_seed(seed)))
        partner = s.roll(-shift, dims=0)
        mix = ((s_hat - partner) / (s - partner))[:, 0]
        torch.testing.assert_close((s_hat - partner), mix[:, None] * (s - partner))
        assert bool(((mix >= 0) & (mix <= 1)).all()) and 1 <= shift <= 5


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"critic": "separable"}, {"constraint": "gradient_penalty"}, {"bound": "dual", "critic": "separable"}],
)
def test_gradients_reach_the_student_rows_and_the_critic_and_are_finite(kwargs):
    loss = built(torch.float32, **kwargs)
    s = rows(8, D_S, 14, torch.float32).requires_grad_()
    t = rows(8, D_T, 15, torch.float32)
    value(loss, s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for name, param in loss.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.usefixtures("one_thread")
def test_degenerate_batches_and_bad_settings():
    loss = built(torch.float32)
    for n in (0, 1):
        s = rows(n, D_S, 16, torch.float32).requires_grad_()
        result = value(loss, s, rows(n, D_T, 17, torch.float32))
        assert float(result) == 0.0
        result.backward()
        assert torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="pair taps with the same reduction"):
        value(loss, rows(4, D_S, 0, torch.float32), rows(5, D_T, 0, torch.float32))
    with pytest.raises(RuntimeError, match="not built"):
        WassersteinDependency("s", "t")(*outputs(rows(3, D_S, 0), rows(3, D_T, 0)), {})
    for kwargs, message in (
        ({"bound": "mine"}, "bound must be one of"),
        ({"critic": "bilinear"}, "critic must be one of"),
        ({"constraint": "clipping"}, "constraint must be one of"),
        ({"bound": "dual", "symmetric": True}, "symmetric applies to bound 'infonce'"),
        ({"critic": "joint", "layers": 0}, "needs layers >= 1"),
        ({"lipschitz_constant": 0.0}, "lipschitz_constant must be > 0"),
        ({"power_iterations": 0}, "power_iterations must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            WassersteinDependency("s", "t", **kwargs)


# ---- the config ------------------------------------------------------------------------------
def test_the_config_parses_and_trains_two_steps(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])
    cli = fit_config(
        REPO / "configs/methods/wdm.yaml", tiny_bert,
        "--model.init_args.taps.t_l5.path=bert.encoder.layer.1", *TINY_TEXT_DATA,
        layers="[0, 1]", data_files=tiny_csv,
    )  # fmt: skip
    module, trainer = cli.model, cli.trainer
    loss = module.losses[2]
    assert isinstance(loss, WassersteinDependency) and loss.critic_kind == "joint" and loss.weight == 1.0
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss/wasserstein_dependency"])
    assert "val/align/last/cka" in trainer.callback_metrics
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in loss.critic.parameters()} <= optimised, "the critic trains with the student"
    assert "losses.2.critic.layers.0.parametrizations.weight.original" in module.state_dict()
