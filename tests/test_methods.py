"""Methods beyond a loss: LELP's subspaces and targets, ND's class means, online BD-KD."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer

from kd_lightning import StudentSpec, TapSpec, TeacherSpec
from kd_lightning.callbacks import TeacherClassMeans
from kd_lightning.losses import CrossEntropy, KLDivergence, NDLoss
from kd_lightning.methods import LELPModule, OnlineBDKDModule
from kd_lightning.methods import lelp as lelp_lib
from kd_lightning.models import parameter_fingerprint
from kd_lightning.training import model_inputs

SMALL_STUDENT = StudentSpec(config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20})


def lelp_module(teacher, **kwargs):
    return LELPModule(teacher=TeacherSpec(str(teacher)), student=SMALL_STUDENT, subclasses=3, **kwargs)


def test_subspaces_are_orthogonal_to_the_classifier_and_orthonormal():
    torch.manual_seed(0)
    weight = torch.randn(3, 10)
    embeddings = torch.randn(60, 10)
    labels = torch.arange(60) % 3
    means, directions = lelp_lib.class_subspaces(embeddings, labels, weight, subclasses=4, seed=0)
    assert means.shape == (3, 10) and directions.shape == (3, 10, 4)
    torch.testing.assert_close(weight @ directions, torch.zeros(3, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(weight @ means.T, torch.zeros(3, 3), atol=1e-5, rtol=0)
    for c in range(3):
        torch.testing.assert_close(directions[c].T @ directions[c], torch.eye(4), atol=1e-5, rtol=0)
        # the rotated directions span the top-4 principal subspace of the class's null-space part
        projected = embeddings[labels == c].double() @ lelp_lib.null_space_projector(weight.double())
        _, _, vh = torch.linalg.svd(projected - projected.mean(0), full_matrices=False)
        top = vh[:4].T.float()
        torch.testing.assert_close(top @ top.T, directions[c] @ directions[c].T, atol=1e-4, rtol=0)
    again = lelp_lib.class_subspaces(embeddings, labels, weight, subclasses=4, seed=0)[1]
    assert torch.equal(again, directions)
    assert not torch.allclose(lelp_lib.class_subspaces(embeddings, labels, weight, 4, seed=1)[1], directions)


def test_targets_split_each_class_probability_over_its_subclasses():
    torch.manual_seed(1)
    logits, embeddings = torch.randn(7, 3), torch.randn(7, 10)
    means, directions = torch.randn(3, 10), torch.randn(3, 10, 4)
    q = lelp_lib.subclass_targets(logits, embeddings, means, directions, tau=2.0, beta=0.5)
    assert q.shape == (7, 12)
    torch.testing.assert_close(q.reshape(7, 3, 4).sum(-1), torch.softmax(logits / 2.0, -1))
    # brute force for one example and class: the split is softmax((h - mu_c) U_c / beta)
    coords = (embeddings[2] - means[1]) @ directions[1]
    expected = torch.softmax(logits[2] / 2.0, -1)[1] * torch.softmax(coords / 0.5, -1)
    torch.testing.assert_close(q[2, 4:8], expected)


def test_class_logits_sum_subclass_probabilities():
    logits = torch.randn(5, 6)
    class_probs = torch.softmax(lelp_lib.class_logits_from_subclasses(logits, 2), -1)
    torch.testing.assert_close(class_probs, torch.softmax(logits, -1).reshape(5, 2, 3).sum(-1))


def test_lelp_trains_and_a_resumed_run_restores_the_subspaces(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    module = lelp_module(tiny_bert)
    assert module.student.classifier.out_features == 6
    trainer = quiet_trainer(tmp_path, max_steps=3, enable_checkpointing=True, val_check_interval=3)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    loss = module.lelp_loss
    assert bool(loss.has_subspaces)
    weight = module.teacher.classifier.weight.detach()
    torch.testing.assert_close(weight @ loss.directions, torch.zeros(2, 2, 3), atol=1e-4, rtol=0)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    saved_directions = loss.directions.clone()

    # evaluation goes through class logits: predictions are class probabilities
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    module.eval()
    probs = module.predict_step(batch, 0)
    raw = torch.softmax(module.student(**model_inputs(batch)).logits, -1).reshape(-1, 2, 3).sum(-1)
    torch.testing.assert_close(probs, raw)

    def no_recompute(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the checkpoint's subspaces")

    monkeypatch.setattr(lelp_lib, "teacher_embeddings", no_recompute)
    resumed = lelp_module(tiny_bert, rotation_seed=123)  # a different seed would give other directions
    quiet_trainer(tmp_path, max_steps=5, val_check_interval=2).fit(resumed, datamodule=csv_datamodule(tiny_csv), ckpt_path=ckpt)
    assert torch.equal(resumed.lelp_loss.directions, saved_directions)


def test_nd_class_means_equal_a_brute_force_mean(tiny_bert, tiny_csv, tmp_path):
    taps = {"t": TapSpec("teacher", "bert.pooler", "none"), "s": TapSpec("student", "bert.pooler", "none")}
    module = distill_module(tiny_bert, taps=taps, losses=[CrossEntropy(), KLDivergence(), NDLoss("s", "t")])
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[TeacherClassMeans("nd_loss")], val_check_interval=2)
    data = csv_datamodule(tiny_csv)
    trainer.fit(module, datamodule=data)
    means = module.losses[2].class_means

    # brute force: every training row through the teacher, one at a time
    teacher = module.teacher.eval()
    sums, counts = torch.zeros(2, 32), torch.zeros(2)
    for row in data.datasets["train"]:
        inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            pooled = teacher.bert(**inputs).pooler_output[0]
        sums[row["labels"]] += pooled
        counts[row["labels"]] += 1
    torch.testing.assert_close(means, sums / counts[:, None], atol=1e-5, rtol=1e-5)
    assert module.losses[2].projection is not None  # student width 16 -> teacher width 32


def test_online_bdkd_trains_the_teacher(tiny_bert, tiny_csv, tmp_path):
    module = OnlineBDKDModule(teacher=TeacherSpec(str(tiny_bert)), student=SMALL_STUDENT, teacher_lr=1e-3)
    before = parameter_fingerprint(module.teacher)
    modes: list[bool] = []

    class TeacherMode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            modes.append(all(m.training for m in pl_module.teacher.modules()))

    trainer = quiet_trainer(tmp_path, max_steps=3, val_check_interval=3, callbacks=[TeacherMode()])
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    assert modes == [True, True, True], "the teacher trains in training mode (dropout on) at every step"
    assert parameter_fingerprint(module.teacher) != before
    optimizer = trainer.optimizers[0]
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    teacher_groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & teacher_ids]
    assert teacher_groups and all(g["initial_lr"] == 1e-3 for g in teacher_groups)
    assert any(k.startswith("teacher.") or k.startswith("online_teacher.") for k in module.state_dict())
    metrics = trainer.callback_metrics
    assert {"val/acc", "val/ece", "val/teacher/acc", "val/teacher/ece"} <= set(metrics)


def test_online_teacher_loss_is_ce_plus_reverse_kl(tiny_bert):
    module = OnlineBDKDModule(teacher=TeacherSpec(str(tiny_bert)), student=SMALL_STUDENT, teacher_kl_weight=0.3)
    from kd_lightning.outputs import ModelOutputs

    zt, zs, y = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2, requires_grad=True), torch.tensor([0, 1, 1, 0])
    value = module.teacher_loss(ModelOutputs(zt), ModelOutputs(zs), y)
    p_t, p_s = torch.softmax(zt / 2, -1), torch.softmax(zs / 2, -1)
    expected = torch.nn.functional.cross_entropy(zt, y) + 0.3 * 4 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    assert zs.grad is None and zt.grad is not None


def test_online_teacher_cannot_be_cached(tiny_bert, tiny_csv):
    from kd_lightning.teacher_cache import TeacherCacheConfig

    module = OnlineBDKDModule(teacher=TeacherSpec(str(tiny_bert)), student=SMALL_STUDENT)
    module.teacher_cache_config = TeacherCacheConfig()
    with pytest.raises(ValueError, match="trains its teacher"):
        module.open_teacher_cache(csv_datamodule(tiny_csv, tokenizer=str(tiny_bert)))
