"""DPK: Dynamic Prior Knowledge — part of the teacher's features fed into the student as a prior.

Qiu, Cui, Shen, Zhang, Yang, Lin, Qin, Wang (2023), "Better Teacher Better Student: Dynamic
Prior Knowledge for Knowledge Distillation", ICLR 2023, arXiv:2206.06067.

The paper, for a feature map of a student stage: embed the teacher's feature map into the
student's width, replace a random share of the student's positions by the embedded teacher
features (the "prior knowledge"), pass the mixture through a decoder, map it to the teacher's
width and match the teacher's features there with MSE, over every position. The share is
dynamic: ``1 - CKA`` between student and teacher features (an exponential moving average,
momentum 0.9, from 0.5), so the wider the gap, the more of the teacher is given. (The constants
and the direction of the rule are read from a public implementation of the method; the paper's
method section was not available to check them against: UNVERIFIED, all configurable.)

For a transformer student this module reads it token by token (UNVERIFIED reading; the paper
works on CNN / Swin feature maps):

1. the prior: the teacher's output at ``teacher_layer`` (token rows), mapped by a learned linear
   ``P: d_t -> d_s`` (identity-initialised when the widths agree);
2. in the output of the student's ``student_layer``, a share ``r`` of the real (non-padding)
   positions of each sequence — ``floor(r * n_b + 1/2)`` of its ``n_b``, a seeded uniform subset — is
   replaced by the prior at the same positions; padding is never replaced;
3. the decoder is the student's own blocks after ``student_layer``: the forward continues from
   the mixed states to ``student_target``, whose token rows are mapped by a learned linear
   ``U: d_s -> d_t`` (identity-initialised when the widths agree) and matched to the teacher's
   ``teacher_target`` tokens: ``L_DPK = ||U h_s - h_t||^2 / (N d_t)`` over the ``N`` real tokens
   (:class:`DPKFeatureLoss`);
4. the share is set each step by :class:`~kd_lightning.callbacks.DPKShareSchedule`; its ``cka``
   mode is the paper's rule, with the linear CKA between the student's clean token rows at
   ``student_layer`` and the teacher's prior rows, which this module measures every step
   (``train/dpk/cka``).

``prior_pass="separate"`` (default; in the paper the mixture feeds the distillation branch only,
never the classifier): the
configured losses (CE, KD, ...) read a clean student forward and only the DPK loss reads a
second forward with the prior injected — two student passes per step, one teacher pass.
``"shared"``: one forward with the prior injected feeds every loss (cheaper; the task losses
then train on teacher-aided states). Validation, test and prediction never inject anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.losses import functional
from kd_lightning.losses.base import DistillLoss, FeatureLoss
from kd_lightning.losses.logits import CrossEntropy
from kd_lightning.models import StudentSpec, TeacherSpec
from kd_lightning.module import DistillModule
from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import TapSpec, hidden_states_of, resolve_submodule
from kd_lightning.teacher_cache import TeacherCacheConfig
from kd_lightning.training import OptimConfig

TEACHER_PRIOR = "dpk_teacher_prior"
STUDENT_PRIOR = "dpk_student_prior"
TEACHER_TARGET = "dpk_teacher_target"
STUDENT_TARGET = "dpk_student_target"
DPK_TAPS = (TEACHER_PRIOR, STUDENT_PRIOR, TEACHER_TARGET, STUDENT_TARGET)


def replacement_mask(attention_mask: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """``(batch, seq)`` booleans: in each sequence, ``floor(share * n_b + 1/2)`` of its ``n_b`` real
    positions, drawn uniformly at random from ``generator`` (a CPU generator); never padding."""
    real = attention_mask.to(torch.bool)
    scores = torch.rand(real.shape, generator=generator).to(real.device)
    scores = scores.masked_fill(~real, 2.0)  # padding ranks after every real position
    ranks = scores.argsort(dim=1).argsort(dim=1)
    counts = torch.floor(share * real.sum(dim=1) + 0.5).long()
    return ranks < counts[:, None]


def scatter_rows(rows: Tensor, attention_mask: Tensor) -> Tensor:
    """Token rows (a ``tokens`` tap: the real positions in row-major order) back to
    ``(batch, seq, width)``, zeros at padding."""
    real = attention_mask.to(torch.bool)
    if rows.shape[0] != int(real.sum()):
        raise ValueError(
            f"{rows.shape[0]} token rows for {int(real.sum())} real positions: the prior tap must reduce 'tokens'"
        )
    full = rows.new_zeros(*real.shape, rows.shape[-1])
    full[real] = rows
    return full


def replace_hidden_states(output: Any, hidden: Tensor) -> Any:
    """``output`` of a block with its hidden-state tensor (see :func:`~kd_lightning.taps.hidden_states_of`)
    replaced by ``hidden``."""
    if isinstance(output, Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (hidden, *output[1:])
    if isinstance(output, Mapping) and isinstance(output.get("last_hidden_state"), Tensor):
        output["last_hidden_state"] = hidden
        return output
    raise TypeError(f"cannot replace the hidden states in a block output of type {type(output).__name__}")


def _linear(width_in: int, width_out: int) -> nn.Linear:
    """A bias-free linear map, the identity when the widths agree."""
    layer = nn.Linear(width_in, width_out, bias=False)
    if width_in == width_out:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(width_in))
    return layer


class DPKFeatureLoss(FeatureLoss):
    """DPK's feature distillation (Qiu et al., ICLR 2023, arXiv:2206.06067).

    ``||U h_s - h_t||_F^2 / (N d_t)``: the student's ``student_target`` token rows of the forward
    with the prior injected, mapped by ``U: d_s -> d_t``, against the teacher's ``teacher_target``
    token rows (``N`` real tokens). Also owns the prior's map ``P: d_t -> d_s``. Both maps are
    student-side (trained and saved with the student), bias-free and identity-initialised when
    the widths agree. Built by :class:`DPKModule`, which feeds it the injected forward.
    """

    def __init__(self, weight: float = 1.0, name: str | None = "dpk") -> None:
        super().__init__(STUDENT_TARGET, TEACHER_TARGET, weight=weight, name=name)
        self.prior_projection: nn.Linear | None = None
        self.unembedding: nn.Linear | None = None

    @property
    def required_taps(self) -> tuple[str, ...]:
        return DPK_TAPS

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        self.prior_projection = _linear(tap_widths[TEACHER_PRIOR], tap_widths[STUDENT_PRIOR])
        self.unembedding = _linear(tap_widths[STUDENT_TARGET], tap_widths[TEACHER_TARGET])

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        s, t = self.feature_pair(student, teacher)
        return functional.projected_mse(s, t, self.unembedding)


class DPKModule(DistillModule):
    """Distillation with Dynamic Prior Knowledge (see the module docstring for the method and
    the reading implemented).

    Args:
        teacher, student, taps, optim, teacher_cache, nonfinite: as for
            :class:`~kd_lightning.DistillModule`.
        student_layer: dotted path of the student block whose output receives the prior.
        teacher_layer: dotted path of the teacher block whose output is the prior (for a
            student of teacher layers ``[0, 5]``: ``bert.encoder.layer.4``, the input of the
            teacher block the student's second block copies).
        student_target: the student block whose output is matched (after ``student_layer``).
        teacher_target: the teacher block it is matched to.
        share: the share of real positions replaced, until a
            :class:`~kd_lightning.callbacks.DPKShareSchedule` sets it (0.5: the paper's start).
        dpk_weight: weight of the DPK feature loss (logged as ``train/loss/dpk``).
        prior_pass: ``separate`` (the other losses read a clean forward) or ``shared``.
        seed: seed of the replaced positions (with the global step and the batch index).
        losses: the other losses, on the clean forward; default ``[CrossEntropy()]``.
    """

    def __init__(
        self,
        teacher: TeacherSpec,
        student: StudentSpec,
        student_layer: str,
        teacher_layer: str,
        student_target: str,
        teacher_target: str,
        share: float = 0.5,
        dpk_weight: float = 1.0,
        prior_pass: Literal["separate", "shared"] = "separate",
        seed: int = 0,
        losses: list[DistillLoss] | None = None,
        taps: dict[str, TapSpec] | None = None,
        optim: OptimConfig | None = None,
        teacher_cache: TeacherCacheConfig | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        if prior_pass not in ("separate", "shared"):
            raise ValueError(f"DPK: prior_pass must be 'separate' or 'shared', got {prior_pass!r}")
        if student_target == student_layer:
            raise ValueError(
                f"DPK: student_target is the injection layer {student_layer!r}; the prior must pass through at "
                "least one student block before it is matched: set student_target to a later block"
            )
        taps = dict(taps or {})
        clash = [name for name in DPK_TAPS if name in taps]
        if clash:
            raise ValueError(f"DPK: tap names {clash} are reserved for the method's own taps; rename yours")
        taps.update(
            {
                TEACHER_PRIOR: TapSpec("teacher", teacher_layer, "tokens"),
                STUDENT_PRIOR: TapSpec("student", student_layer, "tokens"),
                TEACHER_TARGET: TapSpec("teacher", teacher_target, "tokens"),
                STUDENT_TARGET: TapSpec("student", student_target, "tokens"),
            }
        )
        others = list(losses) if losses is not None else [CrossEntropy()]
        dpk = DPKFeatureLoss(weight=dpk_weight)
        super().__init__(
            teacher, student, [dpk, *others], taps=taps, optim=optim, teacher_cache=teacher_cache, nonfinite=nonfinite
        )
        self.save_hyperparameters(ignore=["losses"])
        self.prior_pass = prior_pass
        self.seed = int(seed)
        self.prior_share = share
        #: linear CKA between the student's clean rows at ``student_layer`` and the prior, last step
        self.prior_cka: Tensor | None = None
        #: the positions replaced in the last injected forward, ``(batch, seq)``
        self.last_replaced: Tensor | None = None
        self._injection: tuple[Tensor, Tensor] | None = None
        # registered after the taps' hooks: the student_prior tap sees the clean output
        block = resolve_submodule(self.student, student_layer, "student")
        self._injection_handle = block.register_forward_hook(self._inject)

    @property
    def dpk_loss(self) -> DPKFeatureLoss:
        return self.losses[0]

    @property
    def prior_share(self) -> float:
        """The share of real positions replaced by the prior in the next training step."""
        return self._prior_share

    @prior_share.setter
    def prior_share(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"DPK: the prior share must lie in [0, 1], got {value}")
        self._prior_share = value

    # ---- the injected forward -----------------------------------------------------------------
    def _inject(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._injection is None or not self.training:
            return None
        prior, replace = self._injection
        hidden = hidden_states_of(output)
        if hidden.shape[:2] != replace.shape:
            raise RuntimeError(
                f"DPK: block output {tuple(hidden.shape)} does not match the batch {tuple(replace.shape)}"
            )
        mixed = torch.where(replace.unsqueeze(-1), prior.to(hidden.dtype), hidden)
        return replace_hidden_states(output, mixed)

    def prior_generator(self, batch_idx: int) -> torch.Generator:
        """The CPU generator of this step's replaced positions: seeded by ``(seed, global step,
        batch index)``, so a resumed run draws the same positions."""
        return torch.Generator().manual_seed(hash((self.seed, self.global_step, batch_idx)) & (2**62 - 1))

    def prior_outputs(self, batch: Mapping[str, Any], teacher: ModelOutputs, batch_idx: int = 0) -> ModelOutputs:
        """The student's forward with the projected teacher prior in ``prior_share`` of the real
        positions of ``student_layer``'s output (training mode only)."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones(input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
        projection = self.dpk_loss.prior_projection
        rows = teacher.features[TEACHER_PRIOR].to(projection.weight.dtype)
        prior = projection(scatter_rows(rows, mask))
        replace = replacement_mask(mask, self.prior_share, self.prior_generator(batch_idx))
        self._injection = (prior, replace)
        try:
            outputs = self.student_outputs(batch)
        finally:
            self._injection = None
        self.last_replaced = replace
        return outputs

    # ---- one training step -----------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        teacher = self.teacher_outputs(batch)
        if self.prior_pass == "separate":
            student = self.student_outputs(batch)
            prior = self.prior_outputs(batch, teacher, batch_idx)
        else:
            student = prior = self.prior_outputs(batch, teacher, batch_idx)
        self.prior_cka = self.feature_gap(student, teacher)
        device_type = student.logits.device.type
        autocast_off = (
            torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
        )
        with autocast_off:
            terms = {
                loss.name: loss(prior if loss is self.dpk_loss else student, teacher, batch) for loss in self.losses
            }
        total = sum(loss.weight * terms[loss.name] for loss in self.losses)
        batch_size = student.logits.shape[0]
        if self.logger_step():
            self.log("train/dpk/share", self.prior_share, batch_size=batch_size)
            self.log("train/dpk/cka", self.prior_cka, batch_size=batch_size)
        return self.checked_total(terms, total, batch, batch_size)

    @torch.no_grad()
    def feature_gap(self, student: ModelOutputs, teacher: ModelOutputs) -> Tensor:
        """Linear CKA between the student's clean token rows at ``student_layer`` and the teacher's
        prior rows: the paper's measure of the feature gap (``1 - CKA`` is its target share)."""
        return functional.linear_cka(
            student.features[STUDENT_PRIOR].detach().float(), teacher.features[TEACHER_PRIOR].float()
        )

    # ---- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpk_share"] = self.prior_share

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "dpk_share" in checkpoint:
            self.prior_share = checkpoint["dpk_share"]
