"""Values only the loggers read (loss terms, weights, schedules) are logged on the steps the
loggers write: the loggers' output is unchanged, ``trainer.callback_metrics`` ends with the final
values, and the per-step ``self.log`` calls (about a millisecond of host time each) drop to one."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from helpers import csv_datamodule, distill_module, quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from loss_testing import one_thread  # noqa: F401

from kd_lightning.callbacks import LossWeightWarmup

TERMS = ("cross_entropy", "kl_divergence", "projected_mse")


def logged_steps(metrics_csv: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("train/") and value not in ("", None):
                    steps.setdefault(key, []).append(int(row["step"]))
    return steps


def fit(tiny_bert: Path, tiny_csv: dict[str, str], root: Path, log_every: int, max_steps: int):
    module = distill_module(tiny_bert)
    calls: Counter[str] = Counter()
    log = module.log

    def counting_log(name: str, *args, **kwargs):
        calls[name] += 1
        return log(name, *args, **kwargs)

    module.log = counting_log
    logger = CSVLogger(str(root), name="csv", version="")
    warmup = LossWeightWarmup(loss="projected_mse", start=0.0, end=1.0, steps=max_steps)
    trainer = quiet_trainer(
        root, max_steps=max_steps, log_every_n_steps=log_every, logger=logger, limit_val_batches=0, callbacks=[warmup]
    )
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv, batch_size=4))
    return trainer, module, calls, logged_steps(Path(logger.log_dir) / "metrics.csv")


@pytest.mark.usefixtures("one_thread")
def test_terms_are_logged_on_the_loggers_steps_and_the_last_one(tiny_bert, tiny_csv, tmp_path):
    trainer, module, calls, steps = fit(tiny_bert, tiny_csv, tmp_path, log_every=3, max_steps=7)
    written = [2, 5]  # Lightning writes when (step + 1) % log_every_n_steps == 0
    assert steps["train/loss"] == written
    for name in TERMS:
        assert steps[f"train/loss/{name}"] == written and steps[f"train/weight/{name}"] == written
    # self.log calls: train/loss at every step; the terms and weights at the written steps and the last
    assert calls["train/loss"] == 7
    for name in TERMS:
        warmed = name == "projected_mse"  # its weight is logged by the module and by the warm-up callback
        assert calls[f"train/loss/{name}"] == 3 and calls[f"train/weight/{name}"] == (6 if warmed else 3), dict(calls)
    # the run ends with the final step's values in callback_metrics
    final = trainer.callback_metrics
    total = sum(float(final[f"train/loss/{n}"]) * float(final[f"train/weight/{n}"]) for n in TERMS)
    assert float(final["train/loss"]) == pytest.approx(total, rel=1e-5)
    assert float(final["train/weight/projected_mse"]) == pytest.approx(module.losses[2].weight)  # the warm-up's last value
    assert 0.0 < module.losses[2].weight < 1.0


@pytest.mark.usefixtures("one_thread")
def test_every_step_is_logged_when_the_loggers_write_every_step(tiny_bert, tiny_csv, tmp_path):
    _, _, calls, steps = fit(tiny_bert, tiny_csv, tmp_path, log_every=1, max_steps=4)
    for name in ("train/loss", *(f"train/loss/{n}" for n in TERMS), *(f"train/weight/{n}" for n in TERMS)):
        assert steps[name] == [0, 1, 2, 3], name
        assert calls[name] == (8 if name == "train/weight/projected_mse" else 4), name  # + the warm-up's


def test_outside_a_trainer_every_step_counts(tiny_bert):
    assert distill_module(tiny_bert).logger_step()
