"""DistillModule: the frozen-teacher guarantees, the loss sum, projections and start-up errors."""

from __future__ import annotations

import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer

from kd_lightning import StudentSpec, TapSpec, TeacherSpec
from kd_lightning.losses import CrossEntropy, KLDivergence, ProjectedMSE
from kd_lightning.models import parameter_fingerprint


def test_teacher_is_frozen_hidden_and_bit_identical_after_fit(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert)
    teacher = module.teacher
    before = parameter_fingerprint(teacher)
    student_before = parameter_fingerprint(module.student)

    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(name.startswith("_teacher") or ".teacher." in name for name, _ in module.named_parameters())
    assert not any("teacher" in key for key in module.state_dict())
    module.train()
    assert not teacher.training, "train() must not put the teacher in training mode"
    assert module.student.training

    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))

    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    expected = {id(p) for p in module.student.parameters()} | {id(p) for p in module.losses.parameters()}
    assert optimizer_params == expected, "the optimiser holds student and loss-owned parameters, nothing else"
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert parameter_fingerprint(teacher) == before
    assert parameter_fingerprint(module.student) != student_before, "the student must train"


def test_training_step_is_the_weighted_sum_of_terms(tiny_bert, tiny_csv):
    torch.manual_seed(0)
    module = distill_module(tiny_bert)
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.eval()  # no dropout: two passes give the same terms
    teacher = module.teacher_outputs(batch)
    student = module.student_outputs(batch)
    terms = module.loss_terms(student, teacher, batch)
    assert set(terms) == {"cross_entropy", "kl_divergence", "projected_mse"}
    expected_ce = torch.nn.functional.cross_entropy(student.logits, batch["labels"])
    torch.testing.assert_close(terms["cross_entropy"], expected_ce)
    p_t = torch.softmax(teacher.logits / 2, -1)
    expected_kd = 4 * (p_t * (p_t.log() - torch.log_softmax(student.logits / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(terms["kl_divergence"], expected_kd)
    proj = module.losses[2].projection
    assert (proj.in_features, proj.out_features) == (16, 32)
    expected_mse = ((proj(student.features["s_last"]) - teacher.features["t_last"]) ** 2).mean()
    torch.testing.assert_close(terms["projected_mse"], expected_mse)
    module.log = lambda *args, **kwargs: None
    total = module.training_step(batch, 0)
    torch.testing.assert_close(total, 0.5 * expected_ce + 0.5 * expected_kd + 0.1 * expected_mse)


def test_teacher_tap_features_match_hidden_states(tiny_bert, tiny_csv):
    module = distill_module(tiny_bert)
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    features = module.teacher_outputs(batch).features["t_last"]
    from kd_lightning.training import model_inputs

    with torch.no_grad():
        hidden = module.teacher(**model_inputs(batch), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(features, hidden[:, 0])


def test_student_from_teacher_layers_copies_weights(tiny_bert_4layers):
    module = distill_module(
        tiny_bert_4layers,
        student=StudentSpec(from_teacher_layers=[0, 3]),
        taps={},
        losses=[KLDivergence()],
    )
    t, s = module.teacher.state_dict(), module.student.state_dict()
    assert module.student.config.num_hidden_layers == 2
    for key in ("bert.embeddings.word_embeddings.weight", "classifier.weight"):
        assert torch.equal(t[key], s[key])
    for new, old in ((0, 0), (1, 3)):
        name = "attention.self.query.weight"
        assert torch.equal(s[f"bert.encoder.layer.{new}.{name}"], t[f"bert.encoder.layer.{old}.{name}"])


def test_unknown_tap_path_fails_before_training_with_close_matches(tiny_bert):
    taps = {"t": TapSpec("teacher", "bert.encoder.layers.1"), "s": TapSpec("student", "bert.encoder.layer.0")}
    with pytest.raises(ValueError) as err:
        distill_module(tiny_bert, taps=taps, losses=[ProjectedMSE(student="s", teacher="t")])
    assert "tap path 'bert.encoder.layers.1' does not exist in the teacher" in str(err.value)
    assert "bert.encoder.layer.1" in str(err.value)


def test_loss_needing_an_undeclared_tap(tiny_bert):
    with pytest.raises(ValueError) as err:
        distill_module(tiny_bert, losses=[ProjectedMSE(student="s_mid", teacher="t_last")])
    assert "loss 'projected_mse' needs tap(s) ['s_mid']" in str(err.value)
    assert "declared: s_last, t_last" in str(err.value)


def test_teacher_and_student_label_counts_must_agree(tiny_bert, tmp_path):
    from conftest import write_tiny_bert

    three_way = write_tiny_bert(tmp_path / "three", num_labels=3)
    with pytest.raises(ValueError, match="teacher and student have different label counts: teacher 2, student 3"):
        distill_module(tiny_bert, student=StudentSpec(name_or_path=str(three_way)), taps={}, losses=[KLDivergence()])


def test_fine_tuned_teacher_head_size_is_checked(tiny_bert):
    with pytest.raises(ValueError, match="trained classification head with 2 labels, but num_labels=5"):
        distill_module(tiny_bert, teacher=TeacherSpec(str(tiny_bert), num_labels=5))


def test_data_with_other_label_count_is_rejected_at_setup(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert)
    data = csv_datamodule(tiny_csv, label_names=["neg", "pos", "neutral"])
    with pytest.raises(ValueError, match="the data has 3 labels but the model has 2 output"):
        quiet_trainer(tmp_path).fit(module, datamodule=data)


def test_duplicate_loss_names_are_rejected(tiny_bert):
    with pytest.raises(ValueError, match="losses share the name"):
        distill_module(tiny_bert, losses=[KLDivergence(), KLDivergence(temperature=4.0)])
    distill_module(tiny_bert, taps={}, losses=[KLDivergence(), KLDivergence(temperature=4.0, name="kd_t4")])


def test_ce_only_run_does_not_call_the_teacher(tiny_bert, tiny_csv):
    module = distill_module(tiny_bert, taps={}, losses=[CrossEntropy()])
    assert not module.needs_teacher
    calls = []
    module.teacher.register_forward_hook(lambda *a: calls.append(1))
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    module.log = lambda *args, **kwargs: None
    module.training_step(next(iter(data.train_dataloader())), 0)
    assert calls == []
