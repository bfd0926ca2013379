"""Non-finite losses: named (term, global step, examples) and either stop the run or skip the step."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from ddp_fit import PoisonedCrossEntropy
from helpers import csv_datamodule, distill_module, quiet_trainer

from kd_lightning.losses import CrossEntropy, KLDivergence
from kd_lightning.module import NonFiniteLossError

POISONED_EXAMPLE = 37


def poisoned_module(tiny_bert, nonfinite: str = "raise", value: float = math.nan):
    """CE (NaN on the batch holding example 37) + KD, no taps: the quickest module to train."""
    losses = [PoisonedCrossEntropy(poison=POISONED_EXAMPLE, value=value, weight=0.5), KLDivergence(weight=0.5)]
    return distill_module(tiny_bert, losses=losses, taps={}, nonfinite=nonfinite)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_term_stops_the_run_naming_term_step_and_examples(tiny_bert, tiny_csv, tmp_path, value):
    module = poisoned_module(tiny_bert, value=value)
    trainer = quiet_trainer(tmp_path, max_steps=12, limit_val_batches=0)  # one epoch: example 37 comes up
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    [examples] = module.losses[0].poisoned_batches
    message = str(raised.value)
    assert f"['poisoned_cross_entropy'] at global step {trainer.global_step}:" in message
    assert f"poisoned_cross_entropy={value}" in message
    assert f"batch examples (batch['index']): {examples}" in message and POISONED_EXAMPLE in examples
    assert "nonfinite: skip" in message, "the error says how to skip instead"


def test_an_infinite_weight_is_reported_as_the_total(tiny_bert, tiny_csv):
    module = distill_module(tiny_bert, losses=[CrossEntropy(weight=math.inf)], taps={})
    module.log = lambda *args, **kwargs: None
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with pytest.raises(NonFiniteLossError, match=r"\['total'\] at global step 0: total=inf"):
        module.training_step(batch, 0)
    with pytest.raises(ValueError, match="'raise' or 'skip'"):
        distill_module(tiny_bert, nonfinite="ignore")


class PoisonedStepWatch(pl.Callback):
    """The trainable parameters just before and just after the step holding the poisoned example."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if POISONED_EXAMPLE in batch["index"].tolist():
            self.before = [p.detach().clone() for p in module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if POISONED_EXAMPLE in batch["index"].tolist():
            self.after = [p.detach().clone() for p in module.parameters() if p.requires_grad]


def test_skip_drops_the_optimiser_step_and_counts_it(tiny_bert, tiny_csv, tmp_path):
    module = poisoned_module(tiny_bert, nonfinite="skip")
    watch = PoisonedStepWatch()
    trainer = quiet_trainer(tmp_path, max_steps=12, limit_val_batches=0, callbacks=[watch])
    with pytest.warns(RuntimeWarning, match="step skipped"):
        trainer.fit(module, datamodule=csv_datamodule(tiny_csv))

    assert trainer.global_step == 12 and module.skipped_nonfinite == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0
    assert watch.before and all(torch.equal(b, a) for b, a in zip(watch.before, watch.after, strict=True))
    optimizer = trainer.optimizers[0]
    steps = {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}
    assert steps == {11}, "AdamW updated every parameter on the 11 finite steps and on no other"
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_online_bdkd_checks_the_teachers_objective_too(tiny_bert, tiny_csv):
    from kd_lightning.methods import OnlineBDKDModule
    from kd_lightning.models import StudentSpec, TeacherSpec

    student = StudentSpec(config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20})
    module = OnlineBDKDModule(teacher=TeacherSpec(str(tiny_bert)), student=student, teacher_kl_weight=math.nan)
    module.log = lambda *args, **kwargs: None
    data = csv_datamodule(tiny_csv, tokenizer=str(tiny_bert))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with pytest.raises(NonFiniteLossError, match=r"\['teacher'\] at global step 0: teacher=nan"):
        module.training_step(batch, 0)
    module.nonfinite = "skip"
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert module.training_step(batch, 0) is None
