"""DPK (Dynamic Prior Knowledge): the replaced positions, the injected forward (share 0, share 1,
a seeded share in between), gradients to the projections, the feature loss against a loop, the
share schedule per step, no injection at validation or test, and its config through the CLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import TINY_TEXT_DATA, csv_datamodule, fit_config, quiet_trainer

from kd_lightning import StudentSpec, TeacherSpec
from kd_lightning.callbacks import DPKShareSchedule
from kd_lightning.callbacks.schedules import linear_ramp
from kd_lightning.losses import CrossEntropy, KLDivergence
from kd_lightning.methods import DPKModule
from kd_lightning.methods import dpk as dpk_lib
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import hidden_states_of
from kd_lightning.training import model_inputs

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    "student_layer": "bert.encoder.layer.0",
    "teacher_layer": "bert.encoder.layer.0",
    "student_target": "bert.encoder.layer.1",
    "teacher_target": "bert.encoder.layer.1",
}
# a random student of width 16 (the teacher's is 32): the prior must go through the learned map
STUDENT = StudentSpec(config_overrides={"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 20})


def dpk_module(teacher: Path, **kwargs) -> DPKModule:
    torch.manual_seed(0)
    kwargs = {"losses": [CrossEntropy(weight=0.5), KLDivergence(weight=0.5)], **LAYERS, **kwargs}
    return DPKModule(TeacherSpec(str(teacher)), STUDENT, **kwargs)


def deterministic(module: DPKModule) -> DPKModule:
    """A module in training mode (so it injects) whose student has dropout off (comparable passes)."""
    module.train()
    module.student.eval()
    return module


@pytest.fixture(scope="module")
def batch(tiny_bert, tiny_csv) -> dict:
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert not batch["attention_mask"].bool().all(), "the batch needs padding"
    return batch


class Capture:
    """The hidden states a block outputs (after any hook registered before this one)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.outputs: list[torch.Tensor] = []
        self.handle = block.register_forward_hook(lambda m, a, out: self.outputs.append(hidden_states_of(out).detach()))


def teacher_prior(module: DPKModule, batch: dict) -> torch.Tensor:
    capture = Capture(module.teacher.bert.encoder.layer[0])
    with torch.no_grad():
        module.teacher(**model_inputs(batch))
    capture.handle.remove()
    return capture.outputs[-1]


# ---- the replaced positions ------------------------------------------------------------------
def test_the_replaced_positions_are_a_seeded_subset_of_the_expected_size():
    lengths = torch.tensor([5, 3, 0, 8, 1])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    for share in (0.0, 0.25, 0.5, 0.9, 1.0):
        replaced = dpk_lib.replacement_mask(mask, share, torch.Generator().manual_seed(0))
        assert not bool((replaced & ~mask).any()), "padding is never replaced"
        assert replaced.sum(1).tolist() == [math.floor(share * n + 0.5) for n in lengths.tolist()]
    same = [dpk_lib.replacement_mask(mask, 0.5, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*same)
    others = [dpk_lib.replacement_mask(mask, 0.5, torch.Generator().manual_seed(seed)) for seed in range(8)]
    assert any(not torch.equal(others[0], other) for other in others[1:])
    # uniform over the real positions of a row
    generator = torch.Generator().manual_seed(1)
    frequency = torch.stack([dpk_lib.replacement_mask(mask, 0.25, generator)[3] for _ in range(2000)]).float().mean(0)
    assert bool(((frequency - 0.25).abs() < 0.04).all()), frequency


def test_token_rows_scatter_back_to_their_positions():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = torch.arange(6.0).reshape(3, 2)
    full = dpk_lib.scatter_rows(rows, mask)
    assert full.tolist() == [[[0, 1], [2, 3], [0, 0]], [[4, 5], [0, 0], [0, 0]]]
    with pytest.raises(ValueError, match="must reduce 'tokens'"):
        dpk_lib.scatter_rows(rows[:2], mask)


# ---- the injected forward ------------------------------------------------------------------------
def test_share_zero_leaves_the_students_outputs_as_they_are(tiny_bert, batch):
    module = deterministic(dpk_module(tiny_bert, share=0.0))
    with torch.no_grad():
        teacher = module.teacher_outputs(batch)
        prior = module.prior_outputs(batch, teacher)
        plain = module.student(**model_inputs(batch)).logits
    assert torch.equal(prior.logits, plain)
    assert not bool(module.last_replaced.any())


def test_share_one_puts_the_projected_teacher_feature_at_every_real_position(tiny_bert, batch):
    module = deterministic(dpk_module(tiny_bert, share=1.0))
    capture = Capture(module.student.bert.encoder.layer[0])  # registered after the injection hook
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        teacher = module.teacher_outputs(batch)
        prior = module.prior_outputs(batch, teacher)
        clean = module.student(**model_inputs(batch)).logits
        projected = module.dpk_loss.prior_projection(teacher_prior(module, batch))
    injected, plain = capture.outputs
    assert projected.shape[-1] == 16 != teacher_prior(module, batch).shape[-1]
    torch.testing.assert_close(injected[mask], projected[mask])
    assert torch.equal(injected[~mask], plain[~mask]), "padding positions keep the student's own states"
    assert torch.equal(module.last_replaced, mask)
    assert not torch.allclose(prior.logits, clean), "the injected forward continues from the mixed states"


def test_a_share_in_between_replaces_the_seeded_positions(tiny_bert, batch):
    module = deterministic(dpk_module(tiny_bert, share=0.4, seed=11))
    capture = Capture(module.student.bert.encoder.layer[0])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        teacher = module.teacher_outputs(batch)
        module.prior_outputs(batch, teacher, batch_idx=3)
        module.student(**model_inputs(batch))
        projected = module.dpk_loss.prior_projection(teacher_prior(module, batch))
    injected, plain = capture.outputs
    replaced = module.last_replaced
    assert torch.equal(replaced, dpk_lib.replacement_mask(mask, 0.4, module.prior_generator(3)))
    assert replaced.sum(1).tolist() == [math.floor(0.4 * n + 0.5) for n in mask.sum(1).tolist()]
    torch.testing.assert_close(injected[replaced], projected[replaced])
    assert torch.equal(injected[~replaced], plain[~replaced])
    assert module.prior_generator(3).initial_seed() != module.prior_generator(4).initial_seed()


def test_gradients_reach_both_projections(tiny_bert, batch):
    module = deterministic(dpk_module(tiny_bert, share=0.5))
    teacher = module.teacher_outputs(batch)
    loss = module.dpk_loss(module.prior_outputs(batch, teacher), teacher, batch)
    loss.backward()
    for layer in (module.dpk_loss.prior_projection, module.dpk_loss.unembedding):
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    kept = module.student.bert.encoder.layer[0].output.dense.weight.grad
    assert kept.abs().sum() > 0, "the kept positions train the student"

    nothing = deterministic(dpk_module(tiny_bert, share=0.0))
    teacher = nothing.teacher_outputs(batch)
    nothing.dpk_loss(nothing.prior_outputs(batch, teacher), teacher, batch).backward()
    grad = nothing.dpk_loss.prior_projection.weight.grad  # in the graph (same parameters each step, DDP-safe), unused
    assert grad is not None and not grad.any(), "share 0 injects nothing"


def test_the_feature_loss_matches_a_loop():
    loss = dpk_lib.DPKFeatureLoss()
    loss.build(
        {dpk_lib.TEACHER_PRIOR: 5, dpk_lib.STUDENT_PRIOR: 3, dpk_lib.STUDENT_TARGET: 3, dpk_lib.TEACHER_TARGET: 4}, 2
    )
    loss.double()
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    u = loss.unembedding.weight
    expected = 0.0
    for i in range(7):
        for k in range(4):
            expected += (sum(u[k, j] * s[i, j] for j in range(3)) - t[i, k]) ** 2 / (7 * 4)
    value = loss(ModelOutputs(s, {dpk_lib.STUDENT_TARGET: s}), ModelOutputs(t, {dpk_lib.TEACHER_TARGET: t}), {})
    torch.testing.assert_close(value, expected)
    # equal widths start from the identity
    square = dpk_lib.DPKFeatureLoss()
    square.build(dict.fromkeys(dpk_lib.DPK_TAPS, 4), 2)
    assert torch.equal(square.prior_projection.weight, torch.eye(4))
    assert torch.equal(square.unembedding.weight, torch.eye(4))


@pytest.mark.parametrize("prior_pass", ["separate", "shared"])
def test_the_other_losses_read_the_clean_forward_unless_shared(tiny_bert, batch, prior_pass):
    module = deterministic(dpk_module(tiny_bert, share=1.0, prior_pass=prior_pass))
    seen: list[torch.Tensor] = []
    cross_entropy = module.losses[1]
    forward = cross_entropy.forward

    def recording(student, teacher, batch):
        seen.append(student.logits.detach())
        return forward(student, teacher, batch)

    cross_entropy.forward = recording
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached
        total = module.training_step(batch, 0)
    assert torch.isfinite(total) and 0.0 <= float(module.prior_cka) <= 1.0
    with torch.no_grad():
        clean = module.student(**model_inputs(batch)).logits
    assert torch.allclose(seen[0], clean) == (prior_pass == "separate")


def test_bad_settings_fail_with_the_fix(tiny_bert):
    with pytest.raises(ValueError, match="set student_target to a later block"):
        dpk_module(tiny_bert, student_target=LAYERS["student_layer"])
    with pytest.raises(ValueError, match="reserved"):
        dpk_module(tiny_bert, taps={dpk_lib.TEACHER_PRIOR: {"module": "teacher", "path": "bert.pooler"}})
    with pytest.raises(ValueError, match="prior_pass must be"):
        dpk_module(tiny_bert, prior_pass="both")
    module = dpk_module(tiny_bert)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        module.prior_share = 1.5
    checkpoint: dict = {}
    module.prior_share = 0.3
    module.on_save_checkpoint(checkpoint)
    module.prior_share = 0.9
    module.on_load_checkpoint(checkpoint)
    assert module.prior_share == 0.3
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        DPKShareSchedule(mode="linear")
    with pytest.raises(ValueError, match="not of 'cka'"):
        DPKShareSchedule(mode="cka", steps=3)
    with pytest.raises(TypeError, match="DPKModule"):
        DPKShareSchedule().on_fit_start(None, pl.LightningModule())


# ---- the schedule, and evaluation without prior ------------------------------------------------
class Recorder(pl.Callback):
    """Per training step the share used and the gap measured; around the injection block, its raw
    output (a hook run before the injection hook) and its final output (run after), so that every
    step shows whether anything was injected."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.shares: list[tuple[int, float]] = []
        self.gaps: list[float] = []
        self.injected: dict[str, list[bool]] = {"train": [], "validation": [], "test": []}
        self.raw, self.final = Capture(block), Capture(block)
        self.raw.handle.remove()
        self.raw.handle = block.register_forward_hook(
            lambda m, a, out: self.raw.outputs.append(hidden_states_of(out).detach()), prepend=True
        )

    def _injected(self, stage: str) -> None:
        self.injected[stage].append(not torch.equal(self.raw.outputs[-1], self.final.outputs[-1]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shares.append((trainer.global_step, pl_module.prior_share))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.gaps.append(float(pl_module.prior_cka))
        self._injected("train")  # the last forward of the step: the one with the prior

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._injected("validation")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._injected("test")


def test_the_timed_schedules_by_step():
    linear = DPKShareSchedule(mode="linear", start=1.0, end=0.2, steps=4)
    cosine = DPKShareSchedule(mode="cosine", start=0.8, end=0.0, epochs=0.5)
    constant = DPKShareSchedule(mode="constant", start=0.3)
    trainer = SimpleNamespace(estimated_stepping_batches=40, max_epochs=2)  # 20 steps per epoch: 10 for cosine
    for step in range(14):
        assert linear.value_at(step, trainer) == pytest.approx(linear_ramp(step, 1.0, 0.2, 4))
        progress = min(1.0, step / 10)
        assert cosine.value_at(step, trainer) == pytest.approx(0.4 * (1 + math.cos(math.pi * progress)))
        assert constant.value_at(step, trainer) == 0.3


def test_the_cka_schedule_sets_the_share_per_step_and_evaluation_injects_nothing(tiny_bert, tiny_csv, tmp_path):
    module = dpk_module(tiny_bert)
    recorder = Recorder(module.student.bert.encoder.layer[0])
    schedule = DPKShareSchedule(mode="cka", start=0.5, momentum=0.9)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        limit_test_batches=1,
        callbacks=[schedule, recorder],
    )
    data = csv_datamodule(tiny_csv)
    trainer.fit(module, datamodule=data)
    shares = [share for _, share in recorder.shares]
    assert [step for step, _ in recorder.shares] == [0, 1, 2, 3] and len(recorder.gaps) == 4
    expected = 0.5  # the paper's rule: r <- 0.9 r + 0.1 (1 - CKA), from 0.5
    for share, gap in zip(shares, recorder.gaps, strict=True):
        assert share == pytest.approx(expected)
        assert 0.0 <= gap <= 1.0
        expected = 0.9 * expected + 0.1 * (1 - gap)
    assert schedule.state_dict() == {"share": pytest.approx(expected)}
    assert trainer.callback_metrics["train/dpk/share"] == pytest.approx(shares[-1])
    resumed = DPKShareSchedule(mode="cka")
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.value_at(0, trainer) == pytest.approx(expected)

    trainer.test(module, datamodule=data)
    assert recorder.injected["train"] == [True] * 4, "every training step injects (share > 0)"
    assert len(recorder.injected["validation"]) == 3 and not any(recorder.injected["validation"])  # sanity check + 2
    assert recorder.injected["test"] == [False]


# ---- the config ------------------------------------------------------------------------------
def test_the_config_parses_and_trains_two_steps(tiny_bert, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])
    cli = fit_config(
        REPO / "configs/methods/dpk.yaml", tiny_bert,
        "--model.init_args.teacher_layer=bert.encoder.layer.0",
        "--model.init_args.teacher_target=bert.encoder.layer.1",
        *TINY_TEXT_DATA,
        layers="[0, 1]", data_files=tiny_csv,
    )  # fmt: skip
    module, trainer = cli.model, cli.trainer
    assert isinstance(module, DPKModule) and module.prior_pass == "separate"
    assert [loss.name for loss in module.losses] == ["dpk", "cross_entropy", "kl_divergence"]
    assert any(isinstance(c, DPKShareSchedule) and c.mode == "cka" for c in trainer.callbacks)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss/dpk"]) and 0.0 <= float(metrics["train/dpk/share"]) <= 1.0
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.dpk_loss.parameters()} <= optimised, "the projections train with the student"
