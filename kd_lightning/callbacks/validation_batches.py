"""``ValidationBatchReader``: the base of the callbacks that read every validation batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


class ValidationBatchReader(pl.Callback):
    """A callback that reads each validation batch, without gradients, outside the sanity check:
    subclasses implement :meth:`read_validation_batch`."""

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self.read_validation_batch(pl_module, outputs, batch)

    def read_validation_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        """Take in one validation batch: ``outputs`` is what ``validation_step`` returned."""
        raise NotImplementedError


__all__ = ["ValidationBatchReader"]
