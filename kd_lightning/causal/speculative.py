"""Speculative Knowledge Distillation (Xu et al., 2024, "Speculative Knowledge Distillation: Bridging
the Teacher-Student Gap Through Interleaved Sampling", arXiv:2410.11325).

Supervised KD trains the student on ground-truth prefixes it will never produce itself; on-policy
KD trains it on its own samples, which early in training are so poor that the teacher's
distributions on them teach little. SKD interleaves the two: the student proposes each response
token, ``y_i ~ p_s(. | x, y_<i)`` (or its argmax), and the teacher keeps it when it is among the
teacher's ``K`` most likely tokens at that position, otherwise replaces it with a token drawn
from the teacher, ``y_i ~ p_t(. | x, y_<i)`` (or its argmax):

    y_i = y_i^s                  if y_i^s in top-K(p_t(. | x, y_<i))
    y_i ~ p_t(. | x, y_<i)       otherwise

until the end token or ``max_new_tokens``. The token-level losses (KD / forward KL by default
in the paper, any divergence here) are then computed on this mixed sequence as on ground truth.
A fraction ``student_fraction`` of the training steps use such sequences, the others the
data's responses (supervised KD), in a fixed interleaving (step ``s`` is speculative when
``floor((s + 1) f) > floor(s f)``), so a resumed run makes the same choice at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.causal.module import CausalLMDistillModule
from kd_lightning.data.instruction import positions_from_mask
from kd_lightning.losses.base import DistillLoss
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.taps import TapSpec
from kd_lightning.training import OptimConfig

Choice = Literal["greedy", "sample"]


def pick_tokens(logits: Tensor, how: Choice, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``(batch, vocab)`` logits: the argmax, or a draw from ``softmax(z / T)``."""
    if how == "greedy":
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def speculative_tokens(
    proposed: Tensor,
    teacher_logits: Tensor,
    top_k: int,
    replacement: Choice = "sample",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The teacher's verdict on one proposed token per row.

    Args:
        proposed: ``(batch,)`` the student's tokens.
        teacher_logits: ``(batch, vocab)`` the teacher's logits at the same position.
        top_k: a proposal is kept when it is one of the teacher's ``top_k`` tokens.
        replacement: a rejected proposal becomes the teacher's argmax (``greedy``) or a draw
            from the teacher's distribution (``sample``).

    Returns:
        ``(tokens, replaced)``: the tokens kept or substituted, and which rows were replaced.
    """
    top = teacher_logits.topk(min(top_k, teacher_logits.shape[-1]), dim=-1).indices
    kept = (top == proposed[:, None]).any(-1)
    substitutes = pick_tokens(teacher_logits, replacement, generator=generator)
    return torch.where(kept, proposed, substitutes), ~kept


@dataclass
class InterleavedSample:
    """Responses of interleaved sampling: ``tokens`` ``(batch, new)`` (padding after the end
    token), ``lengths`` of each response (end token included), and which tokens the teacher
    ``replaced``."""

    tokens: Tensor
    lengths: Tensor
    replaced: Tensor


def _last_logits(model: nn.Module, vocab: int, **inputs: Any) -> tuple[Tensor, Any]:
    output = model(**inputs, use_cache=True)
    return output.logits[:, -1, :vocab].float(), output.past_key_values


@torch.no_grad()
def interleaved_sampling(
    student: nn.Module,
    teacher: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    top_k: int,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    proposal: Choice = "sample",
    replacement: Choice = "sample",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> InterleavedSample:
    """SKD's responses to left-padded prompts: student proposals, teacher substitutes outside its
    top-K (see the module docstring). Both models decode with their own key/value caches over the
    same mixed prefix; only the first ``vocab_size`` logits are considered."""
    mask = prompt_mask.long()
    inputs = {"input_ids": prompt_ids, "attention_mask": mask, "position_ids": positions_from_mask(mask)}
    student_logits, student_cache = _last_logits(student, vocab_size, **inputs)
    teacher_logits, teacher_cache = _last_logits(teacher, vocab_size, **inputs)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens, replaced = [], []
    for _ in range(max_new_tokens):
        proposed = pick_tokens(student_logits, proposal, temperature, generator)
        token, swapped = speculative_tokens(proposed, teacher_logits, top_k, replacement, generator)
        tokens.append(torch.where(finished, torch.full_like(token, pad_token_id), token))
        replaced.append(swapped & ~finished)
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
        step = {"input_ids": tokens[-1][:, None], "attention_mask": mask, "position_ids": positions_from_mask(mask)[:, -1:]}
        student_logits, student_cache = _last_logits(student, vocab_size, past_key_values=student_cache, **step)
        teacher_logits, teacher_cache = _last_logits(teacher, vocab_size, past_key_values=teacher_cache, **step)
    generated = mask[:, prompt_ids.shape[1] :]
    return InterleavedSample(torch.stack(tokens, 1), generated.sum(1), torch.stack(replaced, 1))


def with_responses(batch: Mapping[str, Any], sample: InterleavedSample, pad_token_id: int) -> dict[str, Any]:
    """A training batch of the (left-padded) prompts followed by the sampled responses, labels on
    the responses only (end token included)."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"].long()
    steps = torch.arange(sample.tokens.shape[1], device=sample.tokens.device)
    response_mask = (steps[None, :] < sample.lengths[:, None]).long()
    tokens = sample.tokens.masked_fill(response_mask == 0, pad_token_id)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), tokens.masked_fill(response_mask == 0, IGNORE_INDEX)], 1)
    return {
        **batch,
        "input_ids": torch.cat([prompt_ids, tokens], 1),
        "attention_mask": attention_mask,
        "position_ids": positions_from_mask(attention_mask),
        "labels": labels,
    }


def with_student_samples(
    module: CausalLMDistillModule,
    batch: Mapping[str, Any],
    draw: Callable[[int, torch.Generator], InterleavedSample],
) -> tuple[dict[str, Any], InterleavedSample]:
    """``batch`` with its responses replaced by ``draw(pad_token_id, generator)``'s sample: drawn
    with ``module``'s student in eval mode meanwhile and a generator seeded by ``module.seed``
    offset by the global step (reproducible, resumable); padded with the tokenizer's padding
    token, else its end token."""
    tokenizer = module.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=module.device).manual_seed(module.seed + module.global_step)
    was_training = module.student.training
    module.student.eval()
    try:
        sample = draw(pad, generator)
    finally:
        module.student.train(was_training)
    return with_responses(batch, sample, pad), sample


def is_speculative_step(step: int, fraction: float) -> bool:
    """Whether training step ``step`` uses sampled responses: ``floor((s + 1) f) > floor(s f)``
    spreads a fraction ``f`` of the steps evenly (every step for 1, none for 0)."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


class SpeculativeKDModule(CausalLMDistillModule):
    """Speculative KD: token-level distillation on student proposals verified by the teacher.

    Args:
        teacher, student, losses, taps, optim, save_teacher, truncate_vocab, eval_chunk_size,
            nonfinite: as for :class:`~kd_lightning.causal.CausalLMDistillModule`.
        top_k: ``K``, the teacher's top tokens a proposal must be among (25 in the paper).
        student_fraction: share of training steps on interleaved samples (the rest on the
            data's responses).
        max_new_tokens: longest sampled response.
        proposal: the student proposes by ``sample`` (the paper) or ``greedy``.
        replacement: a rejected proposal is replaced by a teacher ``sample`` (the paper) or
            its ``greedy`` choice.
        temperature: of the student's proposals.
        seed: seeds the sampling generator, offset by the global step (reproducible, resumable).
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss],
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        save_teacher: bool = False,
        truncate_vocab: bool = False,
        eval_chunk_size: int | None = 1024,
        nonfinite: Literal["raise", "skip"] = "raise",
        top_k: int = 25,
        student_fraction: float = 1.0,
        max_new_tokens: int = 128,
        proposal: Choice = "sample",
        replacement: Choice = "sample",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= student_fraction <= 1.0:
            raise ValueError(f"student_fraction must lie in [0, 1], got {student_fraction}")
        if proposal not in ("greedy", "sample") or replacement not in ("greedy", "sample"):
            raise ValueError(f"proposal and replacement must be greedy or sample, got {proposal!r}, {replacement!r}")
        if max_new_tokens < 1 or not temperature > 0:
            raise ValueError(f"max_new_tokens must be >= 1 and temperature > 0, got {max_new_tokens}, {temperature}")
        super().__init__(
            teacher, student, losses, taps=taps, optim=optim, save_teacher=save_teacher,
            truncate_vocab=truncate_vocab, eval_chunk_size=eval_chunk_size, nonfinite=nonfinite,
        )  # fmt: skip
        self.top_k = top_k
        self.student_fraction = student_fraction
        self.max_new_tokens = max_new_tokens
        self.proposal: Choice = proposal
        self.replacement: Choice = replacement
        self.temperature = temperature
        self.seed = seed

    def speculative_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], InterleavedSample]:
        """``batch`` with its responses replaced by interleaved samples (student in eval mode meanwhile)."""

        def draw(pad: int, generator: torch.Generator) -> InterleavedSample:
            return interleaved_sampling(
                self.student, self.teacher, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                self.max_new_tokens, self.top_k, self.tokenizer.eos_token_id, pad, self.num_labels,
                self.proposal, self.replacement, self.temperature, generator,
            )  # fmt: skip

        return with_student_samples(self, batch, draw)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        speculative = is_speculative_step(self.global_step, self.student_fraction)
        size = batch["input_ids"].shape[0]
        if speculative:
            batch, sample = self.speculative_batch(batch)
        if self.logger_step():
            if speculative:
                replaced = sample.replaced.sum() / sample.lengths.sum().clamp_min(1)
                self.log("train/speculative/replaced", replaced, batch_size=size)
                self.log("train/speculative/response_tokens", sample.lengths.float().mean(), batch_size=size)
            self.log("train/speculative/step", float(speculative), batch_size=size)
        return super().training_step(batch, batch_idx)
