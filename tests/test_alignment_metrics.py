"""Streaming CKA / Procrustes equal the one-shot functions on the concatenated data; the callback logs them."""

from __future__ import annotations

import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import features, one_thread  # noqa: F401

from kd_lightning.callbacks import AlignmentLogger
from kd_lightning.losses import functional as Fn
from kd_lightning.metrics import StreamingLinearCKA, StreamingProcrustes


def stream(metric, student: torch.Tensor, teacher: torch.Tensor, sizes: list[int]):
    for s, t in zip(student.split(sizes), teacher.split(sizes), strict=True):
        metric.update(s, t)
    return metric.compute()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("n,d_s,d_t", [(60, 5, 8), (12, 16, 20), (40, 7, 7)])
def test_streaming_metrics_equal_one_shot_functions(n, d_s, d_t):
    student, teacher = features(n, d_s, 0), 10 * features(n, d_t, 1) + 3
    sizes = [n // 2, 1, n - n // 2 - 1]
    cka = stream(StreamingLinearCKA(d_s, d_t), student, teacher, sizes)
    torch.testing.assert_close(cka, Fn.linear_cka(student, teacher), rtol=1e-10, atol=1e-12)
    for squared, angular in ((True, False), (False, False), (True, True)):
        metric = StreamingProcrustes(d_s, d_t, squared=squared, angular=angular)
        expected = Fn.procrustes_distance(student, teacher, squared=squared, angular=angular)
        torch.testing.assert_close(stream(metric, student, teacher, sizes), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("one_thread")
def test_streaming_metrics_merge_like_processes_and_reset():
    """Two processes' states summed (what dist_reduce_fx='sum' does) give the full-data value."""
    student, teacher = features(30, 4, 2, torch.float32), features(30, 6, 3, torch.float32)
    full = StreamingProcrustes(4, 6)
    full.update(student, teacher)
    first, second = StreamingProcrustes(4, 6), StreamingProcrustes(4, 6)
    first.update(student[:11], teacher[:11])
    second.update(student[11:], teacher[11:])
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), full.compute())
    torch.testing.assert_close(full.compute(), Fn.procrustes_distance(student.double(), teacher.double()))
    full.reset()
    full.update(student[:5], teacher[:5])
    torch.testing.assert_close(full.compute(), Fn.procrustes_distance(student[:5].double(), teacher[:5].double()))


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 25),
    d_s=st.integers(1, 8),
    d_t=st.integers(1, 8),
    cut=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_streaming_equals_one_shot_over_random_shapes_and_splits(n, d_s, d_t, cut, seed):
    student, teacher = features(n, d_s, seed), features(n, d_t, seed + 1)
    k = int(cut * n)
    sizes = [k, n - k]
    torch.testing.assert_close(
        stream(StreamingLinearCKA(d_s, d_t), student, teacher, sizes),
        Fn.linear_cka(student, teacher),
        rtol=1e-9,
        atol=1e-10,
    )
    torch.testing.assert_close(
        stream(StreamingProcrustes(d_s, d_t), student, teacher, sizes),
        Fn.procrustes_distance(student, teacher),
        rtol=1e-9,
        atol=1e-10,
    )


def test_alignment_logger_logs_the_one_shot_values_of_the_validation_set(tiny_bert, tiny_csv, tmp_path):
    torch.manual_seed(0)
    module = distill_module(tiny_bert)
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    logger = AlignmentLogger(pairs={"last": ["s_last", "t_last"]})
    trainer = quiet_trainer(tmp_path, callbacks=[logger], limit_val_batches=2)
    trainer.validate(module, datamodule=data, verbose=False)
    logged = trainer.callback_metrics

    module.eval()
    rows_s, rows_t = [], []
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i == 2:
                break
            rows_s.append(module.student_outputs(batch).features["s_last"])
            rows_t.append(module.teacher_outputs(batch).features["t_last"])
    s, t = torch.cat(rows_s).double(), torch.cat(rows_t).double()
    assert len(rows_s) == 2 and s.shape[0] > rows_s[0].shape[0]  # accumulated over batches, not the last one
    assert logged["val/align/last/cka"].item() == pytest.approx(Fn.linear_cka(s, t).item(), rel=1e-5)
    assert logged["val/align/last/procrustes"].item() == pytest.approx(Fn.procrustes_distance(s, t).item(), rel=1e-5)


def test_alignment_logger_rejects_unknown_or_misplaced_taps(tiny_bert, tmp_path):
    module = distill_module(tiny_bert)
    with pytest.raises(ValueError, match="not a student tap"):
        AlignmentLogger(pairs={"x": ["t_last", "t_last"]}).setup(None, module, "validate")
    with pytest.raises(ValueError, match="declared teacher taps: t_last"):
        AlignmentLogger(pairs={"x": ["s_last", "missing"]}).setup(None, module, "validate")
    with pytest.raises(ValueError, match="student_tap, teacher_tap"):
        AlignmentLogger(pairs={"x": ["s_last"]})
