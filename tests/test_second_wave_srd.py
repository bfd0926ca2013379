"""SRD (Yang et al., arXiv:2205.06701): student features through the teacher's frozen head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import csv_datamodule, distill_module, quiet_trainer
from torch import nn

from kd_lightning import StudentSpec, TapSpec, TeacherSpec
from kd_lightning.losses import CrossEntropy, KLDivergence
from kd_lightning.methods import SRDLoss, SRDModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.training import model_inputs

SMALL_STUDENT = StudentSpec(config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20})
POOLED = {"t": TapSpec("teacher", "bert.pooler", "none"), "s": TapSpec("student", "bert.pooler", "none")}


def srd_module(teacher_path, student: StudentSpec = SMALL_STUDENT, **loss_kwargs) -> SRDModule:
    return SRDModule(
        teacher=TeacherSpec(str(teacher_path)), student=student, taps=POOLED,
        losses=[CrossEntropy(), SRDLoss(student="s", **loss_kwargs)],
    )  # fmt: skip


def sample_batch(module, texts=("the movie was good", "awful", "a fun but long film")) -> dict[str, torch.Tensor]:
    batch = dict(module.tokenizer(list(texts), padding=True, return_tensors="pt"))
    batch["labels"] = torch.arange(len(texts)) % 2
    return batch


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_loss_equals_the_head_applied_by_hand(tiny_bert, distance):
    module = srd_module(tiny_bert, teacher="t", distance=distance, temperature=2.0, feature_weight=0.3)
    loss = module.losses[1]
    assert loss.projection is not None and loss.projection.weight.shape == (32, 16)  # student 16 -> teacher head 32
    batch = sample_batch(module)
    teacher, student = module.teacher_outputs(batch), module.student_outputs(batch)
    value = loss(student, teacher, batch)

    projected = student.features["s"] @ loss.projection.weight.T
    head = module.teacher.classifier
    cross = F.linear(projected, head.weight, head.bias)
    if distance == "mse":
        logit_term = ((cross - teacher.logits) ** 2).mean()
    else:
        p_t, log_p_x = torch.softmax(teacher.logits / 2, -1), torch.log_softmax(cross / 2, -1)
        logit_term = 4 * (p_t * (p_t.log() - log_p_x)).sum(-1).mean()
    feature_term = ((projected - teacher.features["t"]) ** 2).mean()
    torch.testing.assert_close(value, logit_term + 0.3 * feature_term)
    # without a teacher tap there is no feature term
    bare = srd_module(tiny_bert, distance=distance, temperature=2.0)
    bare.losses[1].projection.load_state_dict(loss.projection.state_dict())
    torch.testing.assert_close(bare.losses[1](student, teacher, batch), logit_term)


def test_the_teacher_head_stays_frozen_while_the_projection_and_student_train(tiny_bert, tiny_csv, tmp_path):
    module = srd_module(tiny_bert, teacher="t")
    head = module.teacher.classifier
    head_before = [p.detach().clone() for p in head.parameters()]
    projection = module.losses[1].projection
    projection_before = projection.weight.detach().clone()
    student_before = module.student.bert.pooler.dense.weight.detach().clone()

    # one backward of the SRD term alone: gradients pass through the head, none lands on it
    batch = sample_batch(module)
    value = module.losses[1](module.student_outputs(batch), module.teacher_outputs(batch), batch)
    value.backward()
    assert all(p.grad is None and not p.requires_grad for p in head.parameters())
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert module.student.bert.pooler.dense.weight.grad.abs().sum() > 0
    module.zero_grad()

    trainer = quiet_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    for before, after in zip(head_before, head.parameters(), strict=True):
        assert torch.equal(before, after.detach())
    assert not torch.equal(projection.weight.detach(), projection_before)
    assert not torch.equal(module.student.bert.pooler.dense.weight.detach(), student_before)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(projection.weight) in optimised and not any(id(p) in optimised for p in head.parameters())
    assert "losses.1.projection.weight" in module.state_dict()
    assert all(k.startswith(("student.", "losses.")) for k in module.state_dict())  # no teacher weights
    assert torch.isfinite(trainer.callback_metrics["train/loss/srd"])


def test_a_student_with_the_teachers_features_has_zero_logit_loss(tiny_bert):
    # loss level: features equal to the teacher's, identity (no) projection
    module = srd_module(tiny_bert)
    loss = SRDLoss(student="s", teacher="t", projection=False)
    loss.build({"s": 32, "t": 32}, num_labels=2)
    loss.bind_teacher_head(module.teacher)
    assert loss.projection is None
    pooled = torch.randn(5, 32)
    with torch.no_grad():
        logits = module.teacher.classifier(pooled)
    outputs = ModelOutputs(logits=logits, features={"s": pooled, "t": pooled})
    assert loss(outputs, ModelOutputs(logits=logits, features={"t": pooled}), {}).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # model level: a student that is a copy of the teacher (every layer), evaluated without dropout
    copy = srd_module(tiny_bert, student=StudentSpec(from_teacher_layers=[0, 1]), teacher="t", projection=False).eval()
    batch = sample_batch(copy)
    with torch.no_grad():
        value = copy.losses[1](copy.student_outputs(batch), copy.teacher_outputs(batch), batch)
    assert value.item() == pytest.approx(0.0, abs=1e-10)


def test_head_errors_name_the_fix(tiny_bert):
    with pytest.raises(ValueError, match="tap path 'score' does not exist.*Point SRDLoss's head at the teacher's"):
        srd_module(tiny_bert, head="score")
    with pytest.raises(ValueError, match="student tap 's' has width 16 but the teacher head takes 32"):
        srd_module(tiny_bert, projection=False)
    with pytest.raises(ValueError, match="no SRDLoss among the losses"):
        SRDModule(teacher=TeacherSpec(str(tiny_bert)), student=SMALL_STUDENT, losses=[CrossEntropy(), KLDivergence()])
    # a plain DistillModule never hands the loss a head
    module = distill_module(tiny_bert, taps=POOLED, losses=[CrossEntropy(), SRDLoss(student="s")])
    batch = sample_batch(module)
    with pytest.raises(RuntimeError, match="kd_lightning.methods.SRDModule"):
        module.losses[1](module.student_outputs(batch), module.teacher_outputs(batch), batch)
    # a head without a Linear layer and no teacher tap: the input width cannot be known
    loss = SRDLoss(student="s", head="act")
    loss.build({"s": 4}, num_labels=2)
    with pytest.raises(ValueError, match="declare a teacher tap at the head's input"):
        loss.bind_teacher_head(nn.ModuleDict({"act": nn.Tanh()}))


def test_teacher_outputs_from_the_model_match_the_logits_the_loss_matches(tiny_bert):
    # the loss reads the teacher's logits from the outputs; they are the head applied to the pooled tap
    module = srd_module(tiny_bert, teacher="t")
    batch = sample_batch(module)
    teacher = module.teacher_outputs(batch)
    with torch.no_grad():
        direct = module.teacher(**model_inputs(batch)).logits
    torch.testing.assert_close(teacher.logits, direct)
    torch.testing.assert_close(module.losses[1].teacher_head(teacher.features["t"]), direct)


def test_srd_reads_the_teacher_cache(tiny_bert, tiny_csv, tmp_path):
    from kd_lightning.teacher_cache import TeacherCacheConfig

    module = SRDModule(
        teacher=TeacherSpec(str(tiny_bert)), student=SMALL_STUDENT, taps=POOLED,
        losses=[CrossEntropy(), SRDLoss(student="s", teacher="t")],
        teacher_cache=TeacherCacheConfig(root=str(tmp_path / "cache"), dtype="float32"),
    )  # fmt: skip
    trainer = quiet_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    assert module.teacher_cache is not None and len(module.teacher_cache) == 96
    assert torch.isfinite(trainer.callback_metrics["train/loss/srd"])
