"""The metrics behind the validation diagnostics: layer-by-layer CKA and reliability bins."""

from __future__ import annotations

import pytest
import torch
from loss_testing import features, one_thread  # noqa: F401
from torchmetrics.classification import MulticlassCalibrationError

from kd_lightning.losses import functional as Fn
from kd_lightning.metrics import CrossLayerCKA, ReliabilityBins
from kd_lightning.plots import split_paths


@pytest.mark.usefixtures("one_thread")
def test_cross_layer_cka_equals_one_shot_cka_of_every_layer_pair():
    n, widths = 40, (5, 7)
    student = [features(n, widths[0], seed) for seed in range(2)]
    teacher = [3 * features(n, widths[1], 10 + seed) + student[0][:, :1] * seed for seed in range(3)]
    metric = CrossLayerCKA(2, widths[0], 3, widths[1])
    for rows in (slice(0, 13), slice(13, 14), slice(14, n)):
        metric.update([s[rows] for s in student], [t[rows] for t in teacher])
    matrix = metric.compute()
    expected = torch.stack([torch.stack([Fn.linear_cka(s, t) for s in student]) for t in teacher])
    assert matrix.shape == (3, 2)
    torch.testing.assert_close(matrix, expected, rtol=1e-10, atol=1e-12)
    assert matrix.max() < 1 and matrix.min() > 0


def test_cross_layer_cka_checks_the_layer_count_and_rows():
    metric = CrossLayerCKA(1, 4, 2, 4)
    with pytest.raises(ValueError, match="expected 1 student and 2 teacher layers, got 1 and 1"):
        metric.update([torch.randn(3, 4)], [torch.randn(3, 4)])
    with pytest.raises(ValueError, match="rows differ: 3 vs 5"):
        metric.update([torch.randn(3, 4)], [torch.randn(5, 4), torch.randn(5, 4)])


def test_reliability_bins_give_torchmetrics_ece_and_per_bin_accuracy():
    g = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(300, 3, generator=g), dim=-1)
    probabilities[:4] = torch.tensor([1.0, 0.0, 0.0])  # confidence exactly 1: torchmetrics' own bin
    labels = torch.randint(0, 3, (300,), generator=g)
    metric = ReliabilityBins(n_bins=10)
    for part in (slice(0, 100), slice(100, 300)):
        metric.update(probabilities[part], labels[part])
    curve = metric.compute()
    reference = MulticlassCalibrationError(num_classes=3, n_bins=10, norm="l1")(probabilities, labels)
    assert curve.ece.item() == pytest.approx(reference.item(), abs=1e-6)

    confidence, predicted = probabilities.double().max(-1)
    top = confidence >= 0.9  # the display merges c = 1 into the top bin [0.9, 1]
    assert curve.count.tolist()[-1] == top.sum().item() and curve.count.sum() == 300
    assert curve.accuracy[-1].item() == pytest.approx((predicted[top] == labels[top]).double().mean().item())
    assert curve.confidence[-1].item() == pytest.approx(confidence[top].mean().item())
    middle = (confidence >= 0.5) & (confidence < 0.6)
    assert curve.accuracy[5].item() == pytest.approx((predicted[middle] == labels[middle]).double().mean().item())
    assert curve.edges.tolist() == pytest.approx([i / 10 for i in range(11)])
    assert curve.accuracy[0] == 0 and curve.count[0] == 0  # empty bin (3 classes: confidence >= 1/3)


def test_layer_labels_drop_the_shared_prefix():
    assert split_paths(["bert.encoder.layer.0", "bert.encoder.layer.5"]) == ("bert.encoder.layer.", ["0", "5"])
    assert split_paths(["model.layers.3"]) == ("model.layers.", ["3"])
    assert split_paths(["a.b", "a.b.c"]) == ("a.", ["b", "b.c"])
