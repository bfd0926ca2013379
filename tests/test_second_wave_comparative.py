"""Comparative KD (Wilf et al., arXiv:2311.02253): pairwise differences against brute-force loops."""

from __future__ import annotations

import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer
from loss_testing import features, logits_pair, one_thread  # noqa: F401

from kd_lightning import TapSpec
from kd_lightning.losses import ComparativeFeatureKD, ComparativeKD, CrossEntropy, KLDivergence
from kd_lightning.losses.comparative import comparative_distance, pair_indices
from kd_lightning.outputs import ModelOutputs

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(s: torch.Tensor, t: torch.Tensor, distance: str, temperature: float = 1.0, pairs=None) -> float:
    """Mean over ordered pairs i != j (or the given pairs) of d(s_i - s_j, t_i - t_j), one pair at a time."""
    n = s.shape[0]
    pairs = pairs if pairs is not None else [(i, j) for i in range(n) for j in range(n) if i != j]
    total = 0.0
    for i, j in pairs:
        ds, dt = s[i] - s[j], t[i] - t[j]
        if distance == "mse":
            total += float(((ds - dt) ** 2).sum()) / s.shape[1]
        else:
            p_t = torch.softmax(dt / temperature, -1)
            p_s = torch.softmax(ds / temperature, -1)
            total += temperature**2 * float((p_t * (p_t.log() - p_s.log())).sum())
    return total / len(pairs)


def logits_outputs(s: torch.Tensor, t: torch.Tensor) -> tuple[ModelOutputs, ModelOutputs]:
    return ModelOutputs(logits=s), ModelOutputs(logits=t)


@pytest.mark.parametrize("distance,temperature", [("mse", 1.0), ("kl", 1.0), ("kl", 3.0)])
def test_logit_loss_matches_a_double_loop(distance, temperature):
    s, t = logits_pair((7, 4), seed=1)
    loss = ComparativeKD(distance=distance, temperature=temperature)
    value = loss(*logits_outputs(s, t), {})
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(brute_force(s, t, distance, temperature), rel=1e-10)


def test_all_pairs_mse_shortcut_equals_the_explicit_pairs():
    s, t = features(9, 5, 0), features(9, 5, 1)
    first, second = pair_indices(9, "all")
    assert first.numel() == 9 * 8 and not (first == second).any()
    explicit = ((s[first] - s[second]) - (t[first] - t[second])).square().mean()
    torch.testing.assert_close(comparative_distance(s, t, "all", "mse"), explicit, rtol=1e-12, atol=0)


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_sampled_pairs_match_the_loop_over_the_same_pairs(distance):
    s, t = logits_pair((6, 3), seed=2)
    first, second = pair_indices(6, 40, generator=torch.Generator().manual_seed(5))
    assert first.shape == (40,) and not (first == second).any()
    assert set(second.tolist()) <= set(range(6)) and len(set(zip(first.tolist(), second.tolist(), strict=True))) > 10
    value = comparative_distance(s, t, 40, distance, 2.0, generator=torch.Generator().manual_seed(5))
    expected = brute_force(s, t, distance, 2.0, pairs=list(zip(first.tolist(), second.tolist(), strict=True)))
    assert value.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_a_constant_shift_of_either_side_cancels(distance):
    s, t = logits_pair((8, 5), seed=3)
    loss = ComparativeKD(distance=distance)
    shift_t, shift_s = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    base = loss(*logits_outputs(s, t), {})
    torch.testing.assert_close(loss(*logits_outputs(s + shift_t, t + shift_t), {}), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss(*logits_outputs(s + shift_s, t + shift_t), {}), base, rtol=1e-10, atol=1e-12)
    # ... but not a shift that differs between rows, which changes the differences
    assert not torch.allclose(loss(*logits_outputs(s + torch.randn(8, 5, dtype=torch.float64), t), {}), base)


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_permuting_the_batch_leaves_all_pairs_unchanged(distance):
    s, t = logits_pair((7, 3), seed=4)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    loss = ComparativeKD(distance=distance)
    torch.testing.assert_close(loss(*logits_outputs(s[perm], t[perm]), {}), loss(*logits_outputs(s, t), {}))


def test_a_batch_of_one_is_a_zero_with_a_gradient():
    s = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    value = ComparativeKD()(*logits_outputs(s, torch.randn(1, 3, dtype=torch.float64)), {})
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gradients_are_finite_and_equal_differences_give_zero():
    s, t = logits_pair((5, 4), seed=6)
    s.requires_grad_(True)
    for distance in ("mse", "kl"):
        value = ComparativeKD(distance=distance)(*logits_outputs(s, t), {})
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert ComparativeKD(distance=distance)(*logits_outputs(t + 2.0, t), {}).item() == pytest.approx(0.0, abs=1e-12)


def test_token_logits_outside_the_mask_do_not_count():
    s, t = logits_pair((2, 4, 3), seed=7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    student = ModelOutputs(logits=s, attention_mask=mask)
    value = ComparativeKD()(student, ModelOutputs(logits=t), {})
    keep = mask.reshape(-1).bool()
    expected = brute_force(s.reshape(-1, 3)[keep], t.reshape(-1, 3)[keep], "mse")
    assert value.item() == pytest.approx(expected, rel=1e-10)
    changed = s.clone()
    changed[0, 3] += 100.0
    assert ComparativeKD()(
        ModelOutputs(logits=changed, attention_mask=mask), ModelOutputs(logits=t), {}
    ).item() == pytest.approx(value.item(), rel=1e-12)


def test_feature_loss_projects_the_student_then_compares_pairs():
    s, t = features(6, 3, 8), features(6, 5, 9)
    loss = ComparativeFeatureKD(student="s", teacher="t", distance="mse")
    loss.build({"s": 3, "t": 5}, num_labels=2)
    assert loss.projection is not None and loss.projection.weight.shape == (5, 3)
    loss.double()
    student, teacher = (
        ModelOutputs(logits=s[:, :2], features={"s": s}),
        ModelOutputs(logits=t[:, :2], features={"t": t}),
    )
    projected = s @ loss.projection.weight.detach().T
    assert loss(student, teacher, {}).item() == pytest.approx(brute_force(projected, t, "mse"), rel=1e-10)
    # a shift of the student's rows moves the projected rows by a constant: it cancels too
    shifted = ModelOutputs(logits=s[:, :2], features={"s": s + torch.randn(3, dtype=torch.float64)})
    torch.testing.assert_close(loss(shifted, teacher, {}), loss(student, teacher, {}))
    same_width = ComparativeFeatureKD(student="s", teacher="t")
    same_width.build({"s": 5, "t": 5}, num_labels=2)
    assert same_width.projection is None


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="pairs must be 'all' or a positive number"):
        ComparativeKD(pairs=0)
    with pytest.raises(ValueError, match="pairs must be 'all'"):
        ComparativeKD(pairs="some")
    with pytest.raises(ValueError, match="distance must be one of mse, kl"):
        ComparativeKD(distance="cosine")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ComparativeFeatureKD("s", "t", temperature=0.0)


def test_feature_and_logit_terms_train_with_a_projection(tiny_bert, tiny_csv, tmp_path):
    taps = {
        "t": TapSpec("teacher", "bert.encoder.layer.1", "cls"),
        "s": TapSpec("student", "bert.encoder.layer.0", "cls"),
    }
    losses = [
        CrossEntropy(0.5),
        KLDivergence(0.5),
        ComparativeKD(pairs=16),
        ComparativeFeatureKD("s", "t", pairs="all"),
    ]
    module = distill_module(tiny_bert, taps=taps, losses=losses)
    projection = module.losses[3].projection
    assert projection is not None and projection.weight.shape == (32, 16)
    before = projection.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    assert not torch.equal(projection.weight.detach(), before)
    metrics = trainer.callback_metrics
    for name in ("comparative_kd", "comparative_feature_kd"):
        assert torch.isfinite(metrics[f"train/loss/{name}"]) and metrics[f"train/loss/{name}"] > 0
