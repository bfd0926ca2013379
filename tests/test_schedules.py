"""Loss schedules: the weight / temperature follow the stated schedule during a real fit."""

from __future__ import annotations

import pytest
from helpers import csv_datamodule, distill_module, quiet_trainer

from kd_lightning.callbacks import LossWeightWarmup, TemperatureAnneal
from kd_lightning.callbacks.schedules import linear_ramp
from kd_lightning.losses import CrossEntropy, KLDivergence


def test_linear_ramp_values():
    assert [linear_ramp(s, 0.0, 1.0, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [linear_ramp(s, 4.0, 1.0, 3, offset=2) for s in range(6)] == [4.0, 4.0, 4.0, 3.0, 2.0, 1.0]
    assert linear_ramp(0, 0.0, 1.0, 0) == 1.0


class Recorder(LossWeightWarmup):
    """Records the values the scheduled losses had in each training step."""

    def __init__(self) -> None:
        super().__init__("kl_divergence", steps=1)
        self.seen: list[tuple[int, float, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        kd = pl_module.losses[1]
        self.seen.append((trainer.global_step, kd.weight, kd.temperature))


def test_schedules_drive_weight_and_temperature_during_fit(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert, taps={}, losses=[CrossEntropy(), KLDivergence(weight=1.0, temperature=9.0)])
    recorder = Recorder()
    callbacks = [
        LossWeightWarmup("kl_divergence", start=0.0, end=2.0, steps=4),
        TemperatureAnneal("kl_divergence", start=4.0, end=1.0, steps=3, offset_steps=1),
        recorder,
    ]
    trainer = quiet_trainer(tmp_path, max_steps=6, callbacks=callbacks, val_check_interval=6)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))
    assert [round(w, 6) for _, w, _ in recorder.seen] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert [round(t, 6) for _, _, t in recorder.seen] == [4.0, 4.0, 3.0, 2.0, 1.0, 1.0]
    assert float(trainer.callback_metrics["train/temperature/kl_divergence"]) == 1.0


def test_epoch_ramp_uses_steps_per_epoch(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert, taps={}, losses=[KLDivergence()])
    warmup = LossWeightWarmup("kl_divergence", start=0.0, end=1.0, epochs=1.0)
    trainer = quiet_trainer(tmp_path, max_steps=-1, max_epochs=2, callbacks=[warmup], val_check_interval=1.0)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))  # 96 rows / batch 8 = 12 steps an epoch
    assert warmup.ramp_steps(trainer) == 12
    assert module.losses[0].weight == 1.0


def test_unknown_loss_or_attribute(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert, taps={}, losses=[CrossEntropy(), KLDivergence()])
    with pytest.raises(ValueError, match=r"no loss of that name \(its losses: \['cross_entropy', 'kl_divergence'\]\)"):
        quiet_trainer(tmp_path, callbacks=[LossWeightWarmup("kd", steps=2)]).fit(module, datamodule=csv_datamodule(tiny_csv))
    with pytest.raises(ValueError, match="'cross_entropy' \\(CrossEntropy\\) has no temperature"):
        quiet_trainer(tmp_path, callbacks=[TemperatureAnneal("cross_entropy", steps=2)]).fit(module, datamodule=csv_datamodule(tiny_csv))
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        LossWeightWarmup("kl_divergence")
