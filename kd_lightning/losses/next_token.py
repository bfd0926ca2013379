"""The causal LM's own objective: next-token cross-entropy on the response tokens."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss
from kd_lightning.outputs import ModelOutputs


class NextTokenCrossEntropy(DistillLoss):
    """Next-token cross-entropy of the student on the response tokens (the supervised part of LM KD).

    ``-1/n sum_{i: y_{i+1} response} log softmax(z_s^i)[y_{i+1}]``: position ``i``'s logits
    against the token at ``i + 1``, counted where that token is a response token (``labels !=
    -100``, prompt and padding excluded), averaged over those ``n`` positions. This is the
    cross-entropy a Hugging Face causal LM computes from ``labels``, chunked over tokens.

    Args:
        chunk_size: token rows per chunk of the log-softmax and its gradient (bounds the
            ``tokens x vocab`` memory); ``None`` for all at once.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    needs_teacher = False

    def __init__(self, chunk_size: int | None = 256, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight=weight, name=name)
        self.chunk_size = chunk_size

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        targets = functional.next_token_targets(batch["labels"])
        return functional.token_cross_entropy(student.logits, targets, chunk_size=self.chunk_size)
