"""The small dataclasses that flow between teacher, student, taps and losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutputs:
    """What one forward pass of a teacher or a student hands to the losses.

    Attributes:
        logits: ``(batch, classes)`` for classifiers, ``(batch, seq, vocab)`` for causal LMs.
        features: tap name -> the tapped activation after its reduction
            (``(rows, width)`` for ``cls``/``mean``/``tokens``, the raw output for ``none``).
        attention_mask: ``(batch, seq)`` mask of real (non-padding) tokens, when the batch has one.
        token_mask: ``(batch, seq)`` mask of the token rows that token-level losses count, when
            it is not the attention mask (causal LMs: the positions that predict a response token).
    """

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    attention_mask: Tensor | None = None
    token_mask: Tensor | None = None


TeacherOutputs = ModelOutputs
StudentOutputs = ModelOutputs
