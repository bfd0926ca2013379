"""``optim.fused``: PyTorch's fused AdamW gives the default implementation's update up to rounding."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer
from loss_testing import one_thread  # noqa: F401

from kd_lightning import StudentSpec
from kd_lightning.training import OptimConfig

NO_DROPOUT = StudentSpec(config_overrides={  # both runs compute the same function
    "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
})  # fmt: skip


def student(tiny_bert, fused: bool = False):
    pl.seed_everything(0)
    return distill_module(tiny_bert, student=NO_DROPOUT, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, fused=fused))


def trained(tiny_bert, tiny_csv, root, fused: bool):
    module = student(tiny_bert, fused)
    trainer = quiet_trainer(root, max_steps=5, limit_val_batches=0)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    return module, trainer.optimizers[0]


@pytest.mark.usefixtures("one_thread")
def test_fused_adamw_matches_the_default_update(tiny_bert, tiny_csv, tmp_path):
    default, default_optimizer = trained(tiny_bert, tiny_csv, tmp_path / "a", fused=False)
    fused, fused_optimizer = trained(tiny_bert, tiny_csv, tmp_path / "b", fused=True)
    assert fused_optimizer.defaults["fused"] is True and not default_optimizer.defaults.get("fused")
    assert [g["weight_decay"] for g in fused_optimizer.param_groups] == [g["weight_decay"] for g in default_optimizer.param_groups]
    start = student(tiny_bert).student.state_dict()
    moved = 0
    for name, value in default.student.state_dict().items():
        torch.testing.assert_close(fused.student.state_dict()[name], value, rtol=1e-4, atol=1e-5)
        moved += not torch.equal(value, start[name])
    assert moved > 0
