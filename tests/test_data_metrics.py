"""The task metrics against sklearn / scipy on fixed predictions, and the regression losses."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kd_lightning.data import GLUE_TASKS, GlueDataModule
from kd_lightning.losses import LabelMSE, ScoreMSE
from kd_lightning.metrics.glue import MatthewsCorrCoef, glue_metrics, regression_metrics
from kd_lightning.outputs import ModelOutputs


def fixed_probabilities(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, classes, generator=generator) * 2, dim=-1)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return probs, labels


def computed(task: str, probs: torch.Tensor, labels: torch.Tensor, batches: int = 3) -> dict[str, float]:
    metrics = glue_metrics(task, probs.shape[-1] if probs.dim() == 2 else 1)
    for p, y in zip(probs.chunk(batches), labels.chunk(batches), strict=True):
        metrics.update(p, y)
    return {k: float(v) for k, v in metrics.compute().items()}


@pytest.mark.parametrize("task", sorted(t for t in GLUE_TASKS if t != "stsb"))
def test_classification_metrics_match_sklearn(task):
    classes = 3 if task == "mnli" else 2
    probs, labels = fixed_probabilities(203, classes, seed=len(task))
    predicted = probs.argmax(-1).numpy()
    result = computed(task, probs, labels)
    assert result["acc"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    expected = {"acc", "ece"} | {"cola": {"mcc"}, "mrpc": {"f1"}, "qqp": {"f1"}}.get(task, set())
    assert set(result) == expected
    if "mcc" in result:
        assert result["mcc"] == pytest.approx(matthews_corrcoef(labels, predicted), abs=1e-6)
    if "f1" in result:  # F1 of the positive class (label 1), sklearn's default
        assert result["f1"] == pytest.approx(f1_score(labels, predicted), abs=1e-6)


def test_stsb_correlations_match_scipy():
    generator = torch.Generator().manual_seed(0)
    labels = torch.rand(150, generator=generator) * 5
    scores = labels + torch.randn(150, generator=generator)
    result = computed("stsb", scores, labels)
    assert result["pearson"] == pytest.approx(pearsonr(scores, labels).statistic, abs=1e-5)
    assert result["spearman"] == pytest.approx(spearmanr(scores, labels).statistic, abs=1e-5)
    assert result["mse"] == pytest.approx(float(((scores - labels) ** 2).mean()), rel=1e-5)
    assert set(regression_metrics().keys()) == {"pearson", "spearman", "mse"}


@pytest.mark.parametrize(
    "predicted, labels",
    [([0] * 8, [0, 0, 1, 0, 1, 0, 0, 0]), ([1] * 6, [1, 0, 1, 1, 0, 1]), ([0, 1, 1, 0], [0, 0, 0, 0]), ([2, 1, 0], [2, 1, 0])],
)
def test_mcc_is_sklearns_in_degenerate_cases(predicted, labels):
    """torchmetrics returns a non-zero limit when one class is always predicted; GLUE says 0."""
    classes = max(predicted + labels) + 1
    metric = MatthewsCorrCoef(num_classes=classes)
    metric.update(torch.nn.functional.one_hot(torch.tensor(predicted), classes).float(), torch.tensor(labels))
    assert float(metric.compute()) == pytest.approx(matthews_corrcoef(labels, predicted), abs=1e-7)


def test_monitors_are_logged_metrics():
    for task in GLUE_TASKS:
        dm = GlueDataModule(task)
        assert dm.monitor.removeprefix("val/") in dm.task_metrics().keys() and dm.monitor_mode == "max"


def test_score_losses_match_their_formulas():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, 1, generator=generator, requires_grad=True)
    teacher = torch.randn(7, 1, generator=generator)
    labels = torch.rand(7, generator=generator) * 5
    batch = {"labels": labels}
    s, t = ModelOutputs(logits=student), ModelOutputs(logits=teacher)
    kd = ScoreMSE(temperature=2.0)(s, t, batch)
    assert float(kd.detach()) == pytest.approx(float((((student.detach() - teacher) / 2.0) ** 2).mean()), rel=1e-6)
    kd.backward()
    assert student.grad is not None and teacher.grad is None
    assert float(LabelMSE()(s, None, batch).detach()) == pytest.approx(float(((student.detach().squeeze(-1) - labels) ** 2).mean()), rel=1e-6)
    assert not LabelMSE.needs_teacher and ScoreMSE.needs_teacher
    with pytest.raises(ValueError, match="one output per row.*num_labels: 1"):
        ScoreMSE()(ModelOutputs(logits=torch.zeros(3, 2)), t, batch)

