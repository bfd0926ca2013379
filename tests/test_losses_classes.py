"""Loss classes: wiring to taps and batches, token rows, differing widths, autocast, degenerate input."""

from __future__ import annotations

import pytest
import torch
from loss_testing import features, logits_pair, one_thread  # noqa: F401

from kd_lightning import losses as L
from kd_lightning.losses import functional as Fn
from kd_lightning.outputs import ModelOutputs

pytestmark = pytest.mark.usefixtures("one_thread")

D_S, D_T, CLASSES = 6, 10, 3
TAPS = {"student": "s", "teacher": "t"}

LOGIT_LOSSES = {
    "CrossEntropy": lambda: L.CrossEntropy(),
    "KLDivergence": lambda: L.KLDivergence(temperature=2.0),
    "ReverseKLDivergence": lambda: L.ReverseKLDivergence(temperature=1.5),
    "JSDivergence": lambda: L.JSDivergence(),
    "SkewKLDivergence": lambda: L.SkewKLDivergence(skew=0.2),
    "SkewReverseKLDivergence": lambda: L.SkewReverseKLDivergence(skew=0.3),
    "TotalVariationDistance": lambda: L.TotalVariationDistance(),
    "BalancedDivergence": lambda: L.BalancedDivergence(mode="soft", sharpness=2.0),
    "SinkhornDistance": lambda: L.SinkhornDistance(epsilon=0.5, iterations=5),
    "DKD": lambda: L.DKD(),
    "DIST": lambda: L.DIST(),
}
FEATURE_LOSSES = {
    "ProjectedMSE": lambda: L.ProjectedMSE(**TAPS),
    "CosineDistance": lambda: L.CosineDistance(**TAPS),
    "Procrustes": lambda: L.Procrustes(**TAPS),
    "ProcrustesAngular": lambda: L.Procrustes(**TAPS, angular=True),
    "GramDistance": lambda: L.GramDistance(**TAPS),
    "CKA": lambda: L.CKA(**TAPS),
    "NDLoss": lambda: L.NDLoss(**TAPS),
}
ALL_LOSSES = {**LOGIT_LOSSES, **FEATURE_LOSSES}


def build(name: str) -> L.DistillLoss:
    loss = ALL_LOSSES[name]()
    loss.build({"s": D_S, "t": D_T}, CLASSES)
    if isinstance(loss, L.NDLoss):
        loss.set_class_means(features(CLASSES, D_T, 99))
    return loss.double()


def example(
    batch: int = 5, token_rows: int | None = None, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[ModelOutputs, ModelOutputs, dict]:
    """Student/teacher outputs: class logits, features with ``batch`` (pooled) or ``token_rows`` rows."""
    rows = token_rows or batch
    z_s, z_t = logits_pair((batch, CLASSES), seed=seed, dtype=dtype)
    labels = torch.arange(batch) % CLASSES
    student = ModelOutputs(logits=z_s, features={"s": features(rows, D_S, seed + 1, dtype)})
    teacher = ModelOutputs(logits=z_t, features={"t": features(rows, D_T, seed + 2, dtype)})
    return student, teacher, {"labels": labels}


def expected_value(
    name: str, loss: L.DistillLoss, student: ModelOutputs, teacher: ModelOutputs, batch: dict
) -> torch.Tensor:
    """What the class must compute, written with the functional API."""
    z_s, z_t, s, t = student.logits, teacher.logits, student.features["s"], teacher.features["t"]
    labels = batch["labels"]
    return {
        "CrossEntropy": lambda: torch.nn.functional.cross_entropy(z_s, labels),
        "KLDivergence": lambda: Fn.kl_divergence(z_s, z_t, 2.0),
        "ReverseKLDivergence": lambda: Fn.reverse_kl_divergence(z_s, z_t, 1.5),
        "JSDivergence": lambda: Fn.js_divergence(z_s, z_t, 1.0),
        "SkewKLDivergence": lambda: Fn.skew_kl_divergence(z_s, z_t, skew=0.2),
        "SkewReverseKLDivergence": lambda: Fn.skew_reverse_kl_divergence(z_s, z_t, skew=0.3),
        "TotalVariationDistance": lambda: Fn.total_variation_distance(z_s, z_t),
        "BalancedDivergence": lambda: Fn.balanced_divergence(z_s, z_t, 2.0, "soft", sharpness=2.0),
        "SinkhornDistance": lambda: Fn.sinkhorn_distance(z_s, z_t, 2.0, 0.5, 5),
        "DKD": lambda: Fn.dkd_loss(z_s, z_t, labels, 1.0, 8.0, 4.0),
        "DIST": lambda: Fn.dist_loss(z_s, z_t),
        "ProjectedMSE": lambda: Fn.projected_mse(s, t, loss.projection),
        "CosineDistance": lambda: Fn.cosine_distance(s, t, loss.projection),
        "Procrustes": lambda: Fn.procrustes_distance(s, t),
        "ProcrustesAngular": lambda: Fn.procrustes_distance(s, t, angular=True),
        "GramDistance": lambda: Fn.gram_distance(s, t),
        "CKA": lambda: 1 - Fn.linear_cka(s, t),
        "NDLoss": lambda: Fn.nd_loss(s, t, loss.class_means, labels, loss.projection),
    }[name]()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_class_computes_its_formula(name):
    loss = build(name)
    student, teacher, batch = example()
    torch.testing.assert_close(loss(student, teacher, batch), expected_value(name, loss, student, teacher, batch))


@pytest.mark.parametrize("name", [n for n in FEATURE_LOSSES if n != "NDLoss"])
def test_feature_losses_take_token_rows_of_different_widths_and_train_their_projection(name):
    loss = build(name)
    student, teacher, batch = example(batch=4, token_rows=37)
    student.features["s"].requires_grad_(True)
    value = loss(student, teacher, batch)
    value.backward()
    torch.testing.assert_close(value, expected_value(name, loss, student, teacher, batch))
    assert student.features["s"].grad.abs().sum() > 0
    projection = getattr(loss, "projection", None)
    if projection is not None:
        assert projection.weight.shape == (D_T, D_S) and projection.weight.grad.abs().sum() > 0


def test_projection_is_created_only_when_widths_differ_unless_asked():
    same = L.CosineDistance(**TAPS)
    same.build({"s": 8, "t": 8}, 2)
    assert same.projection is None
    forced = L.CosineDistance(**TAPS, projection=True)
    forced.build({"s": 8, "t": 8}, 2)
    assert isinstance(forced.projection, torch.nn.Linear)
    with pytest.raises(ValueError, match="projection"):
        L.CosineDistance(**TAPS, projection=False).build({"s": 6, "t": 8}, 2)
    for geometry in (L.Procrustes(**TAPS), L.GramDistance(**TAPS), L.CKA(**TAPS)):
        geometry.build({"s": 6, "t": 8}, 2)
        assert not list(geometry.parameters()), "geometry losses need no projection"


DIVERGENCE_CLASSES = [n for n in LOGIT_LOSSES if n not in ("CrossEntropy", "DKD", "SinkhornDistance", "DIST")] + [
    "SinkhornDistance",
    "DIST",
]


@pytest.mark.parametrize("name", DIVERGENCE_CLASSES)
def test_token_logits_count_only_attended_or_named_rows(name):
    loss = build(name)
    z_s, z_t = logits_pair((3, 6, 11), seed=4)
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    response = torch.zeros(3, 6, dtype=torch.bool)
    response[:, 1:3] = True
    student = ModelOutputs(logits=z_s, attention_mask=attention)
    teacher = ModelOutputs(logits=z_t, attention_mask=attention)
    kept = attention.bool()
    expected_attention = loss(ModelOutputs(logits=z_s[kept]), ModelOutputs(logits=z_t[kept]), {})
    expected_response = loss(ModelOutputs(logits=z_s[response]), ModelOutputs(logits=z_t[response]), {})
    torch.testing.assert_close(loss(student, teacher, {}), expected_attention)
    loss.mask_key = "response_mask"
    torch.testing.assert_close(loss(student, teacher, {"response_mask": response}), expected_response)
    assert loss(student, teacher, {"response_mask": torch.zeros_like(response)}).item() == 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_class_gives_finite_float32_under_bf16_autocast(name):
    loss = build(name).float()
    student, teacher, batch = example(batch=8, dtype=torch.bfloat16, seed=5)
    inputs = (student.logits.requires_grad_(True), student.features["s"].requires_grad_(True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(student, teacher, batch)
        value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    grads = [x.grad for x in inputs if x.grad is not None]
    assert len(grads) == 1 and torch.isfinite(grads[0].float()).all() and grads[0].abs().sum() > 0


def degenerate_examples() -> dict[str, tuple[ModelOutputs, ModelOutputs, dict]]:
    one = example(batch=1)
    identical = example(batch=4)
    for outputs in identical[:2]:
        outputs.logits = outputs.logits[:1].repeat(4, 1)
        outputs.features = {k: v[:1].repeat(4, 1) for k, v in outputs.features.items()}
    zeros = example(batch=4)
    for outputs in zeros[:2]:
        outputs.logits = torch.zeros_like(outputs.logits)
        outputs.features = {k: torch.zeros_like(v) for k, v in outputs.features.items()}
    unlabelled = example(batch=4)
    unlabelled[2]["labels"] = torch.full((4,), -100)
    return {"batch_of_one": one, "identical_rows": identical, "all_zero": zeros, "all_unlabelled": unlabelled}


DEGENERATE = degenerate_examples()


@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_class_is_finite_with_finite_gradients_on_degenerate_input(name, case):
    loss = build(name)
    student, teacher, batch = DEGENERATE[case]
    student = ModelOutputs(
        logits=student.logits.clone().requires_grad_(True),
        features={k: v.clone().requires_grad_(True) for k, v in student.features.items()},
    )
    value = loss(student, teacher, batch)
    value.backward()
    assert torch.isfinite(value), f"{name} on {case}: {value}"
    grads = [student.logits.grad, student.features["s"].grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_class_passes_gradcheck_in_float64(name):
    # BD-KD's soft weight is held constant in the backward pass; its hard switch is exact
    loss = build(name) if name != "BalancedDivergence" else L.BalancedDivergence(mode="hard")
    student, teacher, batch = example(batch=4, seed=6)

    def value(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return loss(ModelOutputs(logits=z, features={"s": s}), teacher, batch)

    inputs = (student.logits.requires_grad_(True), student.features["s"].requires_grad_(True))
    assert torch.autograd.gradcheck(value, inputs)


def test_nd_loss_needs_class_means_and_keeps_them_in_its_state():
    loss = L.NDLoss(**TAPS)
    loss.build({"s": D_S, "t": D_T}, CLASSES)
    student, teacher, batch = example(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="class means"):
        loss(student, teacher, batch)
    means = features(CLASSES, D_T, 7, torch.float32)
    loss.set_class_means(means)
    state = loss.state_dict()
    torch.testing.assert_close(state["class_means"], means)
    restored = L.NDLoss(**TAPS)
    restored.build({"s": D_S, "t": D_T}, CLASSES)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(student, teacher, batch), loss(student, teacher, batch))
    with pytest.raises(ValueError, match="one row per example"):
        loss(*example(batch=4, token_rows=9, dtype=torch.float32)[:2], {"labels": torch.zeros(4, dtype=torch.long)})
