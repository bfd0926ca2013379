"""Where a live ``DistillModule`` step spends its host time: variants of contender a of
``benchmarks/throughput.py``, timed side by side with it, the hand loop and the rest.

    python benchmarks/throughput_variants.py --device cuda --teacher T --data-files D --memory-steps 0 \\
        --contenders lightning_live live_nocheck live_nolog hand_live hand_live_copy hand_sync lightning_cache

Extra contenders (every other option and contender is ``throughput.py``'s):

    a1 live_nocheck  a without the non-finite check (its one host synchronisation per step)
    a2 live_nolog    a without the non-finite check and without any ``self.log`` call
    b2 hand_sync     the hand loop with a host synchronisation between forward and backward,
                     where a's non-finite check makes one

Their ratios to the hand loop (and a's to the cached step) are added to the report's ratio table,
with no targets. ``--memory-steps 0``: the memory probes run in fresh processes, which know only
``throughput.py``'s own contenders.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

from kd_lightning import DistillModule  # noqa: E402
from kd_lightning.models import StudentSpec, TeacherSpec  # noqa: E402


class WithoutNonfiniteCheck(DistillModule):
    def _nonfinite_terms(self, terms: Mapping[str, Tensor], total: Tensor) -> list[str]:
        return []


class WithoutLogging(WithoutNonfiniteCheck):
    def checked_total(self, terms: Mapping[str, Tensor], total: Tensor, batch: Mapping[str, Any], batch_size: int) -> Tensor:
        return total


def variant(module: type[DistillModule], name: str, label: str, description: str) -> type[tp.LightningLive]:
    """Contender a with ``module`` in place of ``DistillModule``."""

    class Variant(tp.LightningLive):
        def make_module(self) -> DistillModule:
            config = self.config
            return module(
                teacher=TeacherSpec(config.teacher, config.num_labels),
                student=StudentSpec(from_teacher_layers=list(config.student_layers)),
                losses=tp.kd_lightning_losses(config),
                optim=config.optim(),
            )

    Variant.name, Variant.label, Variant.description = name, label, description
    return Variant


class HandLoopWithSync(tp.HandLoop):
    name = "hand_sync"
    label = "b2"
    description = "b with a host synchronisation between forward and backward (where a's non-finite check is)"

    def loop(self) -> None:
        for batch in self.loader:
            self.pacer.tick(batch)
            batch = tp.to_device(batch, self.config.device)
            inputs = tp.model_inputs(batch)
            with self.config.autocast():
                with torch.no_grad():
                    teacher_logits = self.teacher(**inputs).logits
                student_logits = self._student(**inputs).logits
            loss = tp.hand_objective(student_logits.float(), teacher_logits.float(), batch["labels"], self.config)
            bool(torch.isfinite(loss))
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            self.losses.append(loss.item())


VARIANTS = [
    variant(WithoutNonfiniteCheck, "live_nocheck", "a1", "a without the non-finite check"),
    variant(WithoutLogging, "live_nolog", "a2", "a without the non-finite check and without self.log"),
    HandLoopWithSync,
]
tp.CONTENDERS.update({contender.name: contender for contender in VARIANTS})
tp.TARGETS += [
    ("live_nocheck", "hand_live", "report", None),
    ("live_nolog", "hand_live", "report", None),
    ("hand_sync", "hand_live", "report", None),
    ("lightning_live", "lightning_cache", "report", None),
]

if __name__ == "__main__":
    tp.main()
