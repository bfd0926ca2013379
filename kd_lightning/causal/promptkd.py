"""PromptKD: a student-friendly teacher through a soft prompt, tuned while the student distils.

Kim, Jang, Yang (2024), "PromptKD: Distilling Student-Friendly Knowledge for Generative Language
Models via Prompt Tuning", Findings of EMNLP 2024, arXiv:2402.12842 (reference code
``gmkim-ai/PromptKD``, ``train_promptkd.py``).

The teacher's weights stay frozen; ``n`` trainable virtual-token embeddings ``theta`` are
prepended to its input embeddings, giving the prompted teacher ``q_theta(. | y_<i)``. Its logits at
the prompt positions are dropped, so position ``i`` of the prompted teacher predicts the same
token as position ``i`` of the student. Each training step:

1. **Pseudo-targets**: the student samples a response to each prompt (``responses: student``;
   full-distribution sampling at ``temperature``, as the paper's ``top_k=0, top_p=1``), which
   replaces the data's response (``responses: data`` keeps the data's responses instead).
2. **Prompt update** (student detached), on the response tokens ``R``:

       L_prompt = 1/|R| sum_{i in R} [ KL(q_theta || p_s) + lambda_t KL(q_theta || p_t) ]

   The first term pulls the prompted teacher towards the student (student-friendly); the
   regulariser keeps it close to the un-prompted teacher ``p_t``, with a weight that decays
   linearly over training, ``lambda_t = lambda (1 - step / total_steps)`` (the paper's
   ``base_coef``, 1.0). ``prompt_divergence: forward`` swaps both to ``KL(p || q_theta)``.
3. **Student update** (prompted teacher detached): the configured ``losses`` against the
   prompted teacher's logits; the paper uses the reverse KL ``KL(p_s || q_theta)``
   (:class:`~kd_lightning.losses.ReverseKLDivergence`, ``T = 1``).

The prompt is initialised as the paper does: the input embeddings of the tokens of a text
(``"Suppose you are a student."``), repeated or cut to ``n`` tokens (by default ``n`` is the
text's own length). The attention mask is extended with ones over the prompt; position ids
are ``0..n-1`` on the prompt and the sequence's own positions shifted by ``n``, as a prompt-tuned
model (PEFT) numbers them.

Readings (each a knob where it matters): steps 2 and 3 are one optimiser step here, one
backward pass through the sum (the prompt gets only step 2's gradient, the student only step
3's, and the prompt has its own learning rate ``prompt_lr``); the reference code updates the
prompt first and lets the student distil from the updated prompt, a difference of one prompt
step. The teacher stays in eval mode (no dropout), as every frozen teacher here. The prompt
trains with AdamW and weight decay like the student's parameters, under the run's warm-up and
schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.causal.module import CausalLMDistillModule, response_token_mask
from kd_lightning.causal.speculative import InterleavedSample, pick_tokens, with_student_samples
from kd_lightning.data.instruction import positions_from_mask
from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss
from kd_lightning.losses.logits import ReverseKLDivergence
from kd_lightning.metrics.language_modeling import language_model_metrics
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec
from kd_lightning.training import OptimConfig, decay_groups, model_inputs

Divergence = Literal["reverse", "forward"]


class SoftPrompt(nn.Module):
    """``n`` trainable virtual-token embeddings prepended to a model's input embeddings.

    Args:
        embeddings: ``(n, width)`` initial values (copied).
    """

    def __init__(self, embeddings: Tensor) -> None:
        super().__init__()
        if embeddings.dim() != 2 or embeddings.shape[0] < 1:
            raise ValueError(
                f"a soft prompt needs (tokens >= 1, width) initial embeddings, got shape {tuple(embeddings.shape)}"
            )
        self.weight = nn.Parameter(embeddings.detach().clone().float())

    @property
    def length(self) -> int:
        return int(self.weight.shape[0])

    def prepend(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor) -> dict[str, Tensor]:
        """The model inputs with the prompt in front: embeddings ``[theta; x]``, the mask with
        ones over the prompt, positions ``0..n-1`` then the sequence's own shifted by ``n``."""
        batch, n = inputs_embeds.shape[0], self.length
        prompt = self.weight.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
        steps = torch.arange(n, dtype=position_ids.dtype, device=position_ids.device).expand(batch, -1)
        return {
            "inputs_embeds": torch.cat([prompt, inputs_embeds], dim=1),
            "attention_mask": torch.cat([ones, attention_mask], dim=1),
            "position_ids": torch.cat([steps, position_ids + n], dim=1),
        }


def prompt_init_ids(token_ids: list[int], length: int | None) -> list[int]:
    """The ids whose embeddings initialise the prompt: ``token_ids`` repeated or cut to ``length``
    (its own length for ``None``), as the reference code does."""
    if not token_ids:
        raise ValueError("prompt_init_text gives no tokens: give a non-empty text, e.g. 'Suppose you are a student.'")
    length = len(token_ids) if length is None else length
    if length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {length}")
    return (token_ids * math.ceil(length / len(token_ids)))[:length]


def token_divergence(
    learner_logits: Tensor, target_logits: Tensor, mask: Tensor, direction: Divergence, chunk_size: int | None
) -> Tensor:
    """``KL(q || p)`` (``reverse``: the learner's distribution ``q`` first) or ``KL(p || q)``
    (``forward``) per token row at ``T = 1``, averaged over the rows ``mask`` keeps."""
    if direction == "reverse":
        return functional.reverse_kl_divergence(learner_logits, target_logits, 1.0, mask=mask, chunk_size=chunk_size)
    return functional.kl_divergence(learner_logits, target_logits, 1.0, mask=mask, chunk_size=chunk_size)


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> InterleavedSample:
    """Responses sampled from ``model`` (its first ``vocab_size`` logits, ``softmax(z / T)``) to
    left-padded prompts, with a key/value cache, until the end token or ``max_new_tokens``."""
    mask = prompt_mask.long()
    output = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        token = pick_tokens(output.logits[:, -1, :vocab_size].float(), "sample", temperature, generator)
        tokens.append(torch.where(finished, torch.full_like(token, pad_token_id), token))
        mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
        finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
        output = model(
            input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions_from_mask(mask)[:, -1:],
            past_key_values=output.past_key_values, use_cache=True,
        )  # fmt: skip
    sampled = torch.stack(tokens, 1)
    return InterleavedSample(
        sampled, mask[:, prompt_ids.shape[1] :].sum(1), torch.zeros_like(sampled, dtype=torch.bool)
    )


class PromptKDModule(CausalLMDistillModule):
    """PromptKD: token-level distillation from a teacher made student-friendly by a tuned soft prompt.

    See the module docstring for the objectives and the schedule.

    Args:
        teacher, student, taps, optim, save_teacher, truncate_vocab, eval_chunk_size, nonfinite:
            as for :class:`~kd_lightning.causal.CausalLMDistillModule`. Teacher taps see the
            prompted teacher with the prompt positions masked out: use ``tokens`` or ``mean``.
        losses: the student's losses against the prompted teacher; default the paper's reverse
            KL, ``[ReverseKLDivergence(temperature=1, chunk_size=256)]``.
        prompt_init_text: the text whose token embeddings initialise the prompt.
        prompt_length: ``n`` virtual tokens (default: the init text's number of tokens).
        prompt_lr: the prompt's learning rate (default ``optim.lr``).
        regularizer_weight: ``lambda``, the weight of ``KL(q_theta || p_t)`` at the start.
        regularizer_schedule: ``linear`` decay of ``lambda`` to 0 over the run (the paper), or
            ``constant``.
        prompt_divergence: ``reverse`` (``KL(q_theta || p)``, the paper) or ``forward``.
        prompt_chunk_size: token rows per chunk of the prompt's two divergences.
        responses: ``student`` (sampled each step, the paper) or ``data`` (the data's responses).
        max_new_tokens: longest sampled response.
        temperature: of the student's sampling.
        seed: seeds the sampling generator, offset by the global step (reproducible, resumable).
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        losses: list[DistillLoss] | None = None,
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        save_teacher: bool = False,
        truncate_vocab: bool = False,
        eval_chunk_size: int | None = 1024,
        nonfinite: Literal["raise", "skip"] = "raise",
        prompt_init_text: str = "Suppose you are a student.",
        prompt_length: int | None = None,
        prompt_lr: float | None = None,
        regularizer_weight: float = 1.0,
        regularizer_schedule: Literal["linear", "constant"] = "linear",
        prompt_divergence: Divergence = "reverse",
        prompt_chunk_size: int | None = 256,
        responses: Literal["student", "data"] = "student",
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if regularizer_schedule not in ("linear", "constant"):
            raise ValueError(f"regularizer_schedule must be 'linear' or 'constant', got {regularizer_schedule!r}")
        if prompt_divergence not in ("reverse", "forward"):
            raise ValueError(f"prompt_divergence must be 'reverse' or 'forward', got {prompt_divergence!r}")
        if responses not in ("student", "data"):
            raise ValueError(f"responses must be 'student' (sampled, the paper) or 'data', got {responses!r}")
        if regularizer_weight < 0 or max_new_tokens < 1 or not temperature > 0:
            raise ValueError(
                f"regularizer_weight must be >= 0, max_new_tokens >= 1 and temperature > 0; got "
                f"{regularizer_weight}, {max_new_tokens}, {temperature}"
            )
        for name, spec in (taps or {}).items():
            if spec.module == "teacher" and spec.reduce not in ("tokens", "mean"):
                raise ValueError(
                    f"tap {name!r}: PromptKD's teacher sees the prompt in front of every sequence, which reduce "
                    f"{spec.reduce!r} would include; use reduce: tokens or mean (the prompt positions are masked out)"
                )
        losses = losses or [ReverseKLDivergence(temperature=1.0, chunk_size=256)]
        super().__init__(
            teacher, student, losses, taps=taps, optim=optim, save_teacher=save_teacher,
            truncate_vocab=truncate_vocab, eval_chunk_size=eval_chunk_size, nonfinite=nonfinite,
        )  # fmt: skip
        self.save_hyperparameters(ignore=["losses"])
        init_ids = self.tokenizer(prompt_init_text, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(prompt_init_ids(init_ids, prompt_length))
        with torch.no_grad():
            self.soft_prompt = SoftPrompt(self.teacher.get_input_embeddings()(ids.to(self.teacher.device)).cpu())
        self.prompt_lr = prompt_lr
        self.regularizer_weight = float(regularizer_weight)
        self.regularizer_schedule = regularizer_schedule
        self.prompt_divergence: Divergence = prompt_divergence
        self.prompt_chunk_size = prompt_chunk_size
        self.responses = responses
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.prompted_teacher_val_metrics = language_model_metrics(eval_chunk_size).clone(
            prefix="val/prompted_teacher/"
        )

    # ---- the prompted teacher ------------------------------------------------------------------
    def prompted_teacher_outputs(self, batch: Mapping[str, Any]) -> ModelOutputs:
        """The teacher with the soft prompt in front, its prompt positions dropped: logits
        ``(batch, seq, vocab)`` aligned with the student's. Gradients reach the prompt only
        (the teacher's weights are frozen); taps are reduced over the response positions."""
        inputs = model_inputs(batch)
        mask = inputs["attention_mask"]
        positions = inputs.get("position_ids")
        positions = positions_from_mask(mask) if positions is None else positions
        embeds = self.teacher.get_input_embeddings()(inputs["input_ids"])
        prompted = self.soft_prompt.prepend(embeds, mask, positions)
        self.teacher_taps.clear()
        logits = self.teacher(**prompted, use_cache=False).logits[:, self.soft_prompt.length :]
        token_mask = response_token_mask(batch["labels"])
        no_prompt = torch.zeros(
            token_mask.shape[0], self.soft_prompt.length, dtype=token_mask.dtype, device=token_mask.device
        )
        features = self.teacher_taps.collect(torch.cat([no_prompt, token_mask], dim=1))
        return ModelOutputs(
            logits=self.vocabulary_logits(logits), features=features, attention_mask=mask, token_mask=token_mask
        )

    @torch.no_grad()
    def unprompted_teacher_logits(self, batch: Mapping[str, Any]) -> Tensor:
        """The teacher's own logits (no prompt), for the regulariser."""
        logits = self.teacher(**model_inputs(batch), use_cache=False).logits
        self.teacher_taps.clear()
        return self.vocabulary_logits(logits)

    # ---- the objectives ------------------------------------------------------------------------
    def current_regularizer_weight(self) -> float:
        """``lambda (1 - step / total)`` (``linear``) or ``lambda`` (``constant``); ``lambda``
        outside a fit."""
        if self.regularizer_schedule == "constant" or self._trainer is None:
            return self.regularizer_weight
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return self.regularizer_weight * max(0.0, 1.0 - self.global_step / total)

    def prompt_terms(
        self, prompted: ModelOutputs, student: ModelOutputs, batch: Mapping[str, Any], regularizer_weight: float
    ) -> dict[str, Tensor]:
        """``prompt_student``: ``KL(q_theta || p_s)`` (student detached); ``prompt_regularizer``:
        ``KL(q_theta || p_t)``, computed only when its weight is not 0."""
        mask, chunk = prompted.token_mask, self.prompt_chunk_size
        terms = {
            "prompt_student": token_divergence(
                prompted.logits, student.logits.detach(), mask, self.prompt_divergence, chunk
            )
        }
        if regularizer_weight > 0:
            base = self.unprompted_teacher_logits(batch)
            terms["prompt_regularizer"] = token_divergence(prompted.logits, base, mask, self.prompt_divergence, chunk)
        return terms

    def sampled_batch(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], InterleavedSample]:
        """``batch`` with the data's responses replaced by the student's samples (student in eval mode meanwhile)."""

        def draw(pad: int, generator: torch.Generator) -> InterleavedSample:
            return sample_responses(
                self.student, batch["prompt_input_ids"], batch["prompt_attention_mask"], self.max_new_tokens,
                self.tokenizer.eos_token_id, pad, self.num_labels, self.temperature, generator,
            )  # fmt: skip

        return with_student_samples(self, batch, draw)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        size = batch["input_ids"].shape[0]
        logged = self.logger_step()
        if self.responses == "student":
            batch, sample = self.sampled_batch(batch)
            if logged:
                self.log("train/promptkd/response_tokens", sample.lengths.float().mean(), batch_size=size)
        prompted = self.prompted_teacher_outputs(batch)
        student = self.student_outputs(batch)
        target = dataclasses.replace(
            prompted, logits=prompted.logits.detach(), features={k: v.detach() for k, v in prompted.features.items()}
        )
        terms = self.loss_terms(student, target, batch)  # the student learns from the prompted teacher, held fixed
        student_total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        weight = self.current_regularizer_weight()
        prompt = self.prompt_terms(prompted, student, batch, weight)
        prompt_total = prompt["prompt_student"] + weight * prompt.get("prompt_regularizer", 0.0)
        if logged:
            self.log("train/weight/prompt_regularizer", weight, batch_size=size)
            self.log("train/loss/student", student_total.detach(), batch_size=size)
            self.log("train/loss/prompt", prompt_total.detach(), batch_size=size)
        return self.checked_total({**terms, **prompt}, student_total + prompt_total, batch, size)

    # ---- optimisation and evaluation ---------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student's groups, and the prompt's at ``prompt_lr``."""
        lr = self.prompt_lr if self.prompt_lr is not None else self.optim.lr
        return super().parameter_groups() + decay_groups(iter([self.soft_prompt]), self.optim.weight_decay, lr=lr)

    def open_teacher_cache(self, datamodule: Any) -> Any:
        raise ValueError(
            f"{type(self).__name__} trains a prompt in front of its teacher and samples responses each step: the "
            "teacher's outputs change during training and cannot be cached; remove teacher_cache"
        )

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> ModelOutputs:
        """Student metrics, and the prompted teacher's ``val/prompted_teacher/nll`` and ``ppl``."""
        student = super().validation_step(batch, batch_idx)
        with torch.no_grad():
            logits = self.prompted_teacher_outputs(batch).logits
        self.prompted_teacher_val_metrics.update(logits, batch["labels"])
        return student

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_dict(self.prompted_teacher_val_metrics.compute())
        self.prompted_teacher_val_metrics.reset()


__all__ = ["PromptKDModule", "SoftPrompt", "prompt_init_ids", "sample_responses", "token_divergence"]
