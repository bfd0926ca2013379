"""Distil on one CPU process or on two (DDP over gloo) and save what the tests compare.

``python tests/ddp_fit.py TEACHER DATA_DIR OUT --devices 2 --batch-size 4 [--poison 21]``

Run by ``tests/test_ddp.py`` as a script, because Lightning's ``ddp`` strategy starts the other
process by running the same command again. One process reads the training rows in the order
DDP's sampler gives two (and dropout is off), so two processes with batch ``b`` see the same
rows per step as one with batch ``2b``; ``--poison`` makes one example's cross-entropy NaN, and ``nonfinite: skip`` must
then drop that step on every process.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import quiet_trainer
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from kd_lightning import DistillModule, StudentSpec, TapSpec, TeacherSpec
from kd_lightning.data import TextClassificationDataModule
from kd_lightning.losses import CrossEntropy, KLDivergence, ProjectedMSE
from kd_lightning.outputs import ModelOutputs
from kd_lightning.training import OptimConfig


class DistributedOrderDataModule(TextClassificationDataModule):
    """Training rows in the order in which Lightning's ``DistributedSampler`` shuffles them.

    Under DDP Lightning replaces the training sampler by ``DistributedSampler(shuffle=True,
    seed=PL_GLOBAL_SEED)``, a permutation ``P`` of the rows of which process ``r`` takes
    ``P[r::2]``; step ``s`` then covers ``P[2bs : 2b(s + 1)]`` for batch ``b`` per process. One
    process reading ``P`` itself in batches of ``2b`` sees the same rows at every step.
    """

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", self.batch_size, shuffle=False)
        # torch.randperm(rows) from a generator seeded 0, as DistributedSampler draws it in epoch 0
        # (not a DistributedSampler itself: Lightning would keep that one under DDP)
        order = RandomSampler(loader.dataset, generator=torch.Generator().manual_seed(0))
        return DataLoader(loader.dataset, batch_size=self.batch_size, sampler=order, collate_fn=loader.collate_fn)


class PoisonedCrossEntropy(CrossEntropy):
    """Cross-entropy that is NaN (or ``value``) on every batch holding example ``poison``.

    Args:
        poison: the example index (``batch["index"]``) that poisons its batch; None: never.
        value: what the poisoned term is multiplied by (NaN or an infinity).
        weight, name: see :class:`~kd_lightning.losses.DistillLoss`.
    """

    def __init__(
        self, poison: int | None = None, value: float = math.nan, weight: float = 1.0, name: str | None = None
    ):
        super().__init__(weight=weight, name=name)
        self.poison = poison
        self.value = value
        self.poisoned_batches: list[list[int]] = []

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        loss = super().forward(student, teacher, batch)
        if self.poison is not None and bool((batch["index"] == self.poison).any()):
            self.poisoned_batches.append(batch["index"].tolist())
            return loss * self.value
        return loss


class FrozenTeacherUnderDDP(pl.Callback):
    """Asserts, on every process, that DDP wraps exactly the student and loss-owned parameters
    (so it allocates no gradient buckets for the teacher) and that the teacher ends without
    gradients."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: DistillModule) -> None:
        if trainer.world_size == 1:
            return
        wrapped = trainer.strategy.model
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
        teacher = {id(p) for p in pl_module.teacher.parameters()}
        trainable = {id(p) for m in pl_module.trainable_modules() for p in m.parameters()}
        assert {id(p) for p in wrapped.parameters()} == trainable and not teacher & trainable

    def on_train_end(self, trainer: pl.Trainer, pl_module: DistillModule) -> None:
        assert all(p.grad is None and not p.requires_grad for p in pl_module.teacher.parameters())


def build(
    teacher: str, data_dir: str, batch_size: int, poison: int | None
) -> tuple[DistillModule, DistributedOrderDataModule]:
    """The module (1-layer student without dropout, CE + KD + a projected feature loss,
    ``nonfinite: skip``) and the data module, from the same seed on every process."""
    pl.seed_everything(0, verbose=False)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    module = DistillModule(
        teacher=TeacherSpec(teacher),
        student=StudentSpec(
            config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20, **no_dropout}
        ),
        taps={
            "t": TapSpec("teacher", "bert.encoder.layer.1", "cls"),
            "s": TapSpec("student", "bert.encoder.layer.0", "cls"),
        },
        losses=[
            PoisonedCrossEntropy(poison=poison, weight=0.5),
            KLDivergence(weight=0.5, temperature=2.0),
            ProjectedMSE(student="s", teacher="t", weight=0.1),
        ],
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
        nonfinite="skip",
    )
    files = {split: str(Path(data_dir) / f"{split}.csv") for split in ("train", "validation", "test")}
    data = DistributedOrderDataModule(data_files=files, max_length=16, batch_size=batch_size, eval_batch_size=8)
    return module, data


def fit(teacher: str, data_dir: str, root: str, devices: int, batch_size: int, poison: int | None) -> dict[str, Any]:
    """One epoch on ``devices`` CPU processes; what process 0 holds at the end."""
    torch.set_num_threads(1)  # the test machines have two cores for both processes
    module, data = build(teacher, data_dir, batch_size, poison)
    trainer = quiet_trainer(
        Path(root),
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=-1,
        max_epochs=1,
        limit_val_batches=1.0,
        val_check_interval=1.0,
        num_sanity_val_steps=0,
        callbacks=[FrozenTeacherUnderDDP()],
    )
    trainer.fit(module, datamodule=data)
    return {
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "global_step": trainer.global_step,
        "skipped_nonfinite": module.skipped_nonfinite,
        "is_global_zero": trainer.is_global_zero,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("teacher")
    parser.add_argument("data_dir")
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--poison", type=int, default=None)
    args = parser.parse_args()
    result = fit(args.teacher, args.data_dir, str(Path(args.out).parent), args.devices, args.batch_size, args.poison)
    if result.pop("is_global_zero"):
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
