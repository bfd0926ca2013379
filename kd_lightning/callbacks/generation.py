"""``GenerationEvaluator``: greedy generations on held-out prompts, scored by ROUGE-L.

The instruction-following evaluation of MiniLLM (Gu et al., 2024) and DistiLLM (Ko et al.,
2024): each prompt's response is generated greedily (``max_new_tokens`` at most) and compared
with the reference response by ROUGE-L (Lin, 2004): the F-measure of the longest common
subsequence of their tokens, ``F = 2 P R / (P + R)`` with ``P = LCS / |generated|`` and
``R = LCS / |reference|``, averaged over the prompts (torchmetrics' ``ROUGEScore``, ``rougeL``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table
from torch import nn
from torchmetrics.text.rouge import ROUGEScore
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def generate_responses(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, inputs: dict[str, torch.Tensor], max_new_tokens: int
) -> list[str]:
    """Greedy responses to left-padded prompts (``input_ids``, ``attention_mask``), decoded
    without special tokens; the model is in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
        )
    finally:
        model.train(was_training)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure of ``predictions`` against ``references`` (torchmetrics)."""
    return float(ROUGEScore(rouge_keys="rougeL")(predictions, references)["rougeL_fmeasure"])


class GenerationEvaluator(pl.Callback):
    """ROUGE-L of greedy generations on the first ``num_prompts`` prompts of a split.

    - at fit start (``at_fit_start``): the teacher (``val/teacher/rougeL``) and the student
      before training (``val/rougeL`` at step 0);
    - after every ``every_n_validations``-th validation: the student (``val/rougeL``);
    - at fit end: the student once more unless the last validation just scored it, then a
      table teacher / student before / student after is printed and written to
      ``<run dir>/generation.json``;
    - at test: ``test/rougeL`` on the test split.

    Each evaluation also writes ``num_samples`` prompts with their generation and reference as
    TensorBoard text (``<stage>/generations``). The data module must offer
    ``generation_batches(split, limit, batch_size)``
    (:class:`~kd_lightning.data.InstructionDataModule`).

    Args:
        num_prompts: prompts scored (the first of the split, the same every time).
        max_new_tokens: longest generation.
        batch_size: prompts generated together.
        num_samples: generations logged as text.
        every_n_validations: score after every n-th validation (generation is slow on CPU).
        at_fit_start: score teacher and untrained student before the first step.
    """

    def __init__(
        self,
        num_prompts: int = 32,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        num_samples: int = 3,
        every_n_validations: int = 1,
        at_fit_start: bool = True,
    ) -> None:
        if num_prompts < 1 or max_new_tokens < 1 or batch_size < 1 or every_n_validations < 1:
            raise ValueError("num_prompts, max_new_tokens, batch_size and every_n_validations must be >= 1")
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.every_n_validations = every_n_validations
        self.at_fit_start = at_fit_start
        self.validations = 0
        self.prompts_scored = 0  # fewer than num_prompts when the split is smaller
        self.scores: dict[str, float] = {}
        self._last_scored_step: int | None = None

    # ---- scoring -------------------------------------------------------------------------------
    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module, split: str, tag: str) -> float:
        """ROUGE-L of ``model`` on ``split``; logs sample generations as text under ``tag``."""
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "generation_batches"):
            raise TypeError(
                f"GenerationEvaluator needs a data module with prompts and references (InstructionDataModule), "
                f"not {type(datamodule).__name__}"
            )
        prompts, predictions, references = [], [], []
        for inputs, refs in datamodule.generation_batches(split, self.num_prompts, self.batch_size):
            inputs = {k: v.to(pl_module.device) for k, v in inputs.items()}
            predictions += generate_responses(model, pl_module.tokenizer, inputs, self.max_new_tokens)
            prompts += pl_module.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            references += refs
        self._log_samples(trainer, tag, prompts, predictions, references)
        self.prompts_scored = len(predictions)
        return rouge_l(predictions, references)

    @rank_zero_only
    def _log_samples(self, trainer: pl.Trainer, tag: str, prompts: list[str], predictions: list[str], references: list[str]) -> None:
        samples = list(zip(prompts, predictions, references, strict=True))[: self.num_samples]
        if not samples:
            return
        text = "\n\n---\n\n".join(
            f"**prompt**\n\n    {p.strip()}\n\n**generated**\n\n    {g}\n\n**reference**\n\n    {r}" for p, g, r in samples
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"{tag}/generations", text, global_step=trainer.global_step)

    # ---- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_fit_start or "student_before" in self.scores:  # resumed runs keep their first scores
            return
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            self.scores["teacher"] = self.score(trainer, pl_module, teacher, "validation", "val/teacher")
        self.scores["student_before"] = self.score(trainer, pl_module, pl_module.student, "validation", "val")
        metrics = {"val/rougeL": self.scores["student_before"]}
        if "teacher" in self.scores:
            metrics["val/teacher/rougeL"] = self.scores["teacher"]
        shown = ", ".join(f"{key.replace('_', ' ')} {value:.4f}" for key, value in self.scores.items())
        rank_zero_info(f"GenerationEvaluator: ROUGE-L on {self.prompts_scored} validation prompts: {shown}")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the teacher's score to the module's teacher metrics (measured at fit start), which
        the run summary reports beside the student's."""
        if "teacher" in self.scores and isinstance(getattr(pl_module, "teacher_metrics", None), dict):
            pl_module.teacher_metrics["val/teacher/rougeL"] = self.scores["teacher"]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        value = self.score(trainer, pl_module, pl_module.student, "validation", "val")
        self.scores["student_after"] = value
        self._last_scored_step = trainer.global_step
        pl_module.log("val/rougeL", value, prog_bar=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_scored_step != trainer.global_step:
            self.scores["student_after"] = self.score(trainer, pl_module, pl_module.student, "validation", "val")
            for logger in trainer.loggers:
                logger.log_metrics({"val/rougeL": self.scores["student_after"]}, step=trainer.global_step)
            self._last_scored_step = trainer.global_step
        self._report(trainer)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = self.score(trainer, pl_module, pl_module.student, "test", "test")
        self.scores["test"] = value
        pl_module.log("test/rougeL", value)

    @rank_zero_only
    def _report(self, trainer: pl.Trainer) -> None:
        labels = {"teacher": "teacher", "student_before": "student before distillation", "student_after": "student after distillation"}
        table = Table(title=f"ROUGE-L of greedy generations ({self.prompts_scored} validation prompts, <= {self.max_new_tokens} new tokens)")
        table.add_column("model")
        table.add_column("ROUGE-L", justify="right")
        for key, label in labels.items():
            if key in self.scores:
                table.add_row(label, f"{self.scores[key]:.4f}")
        Console().print(table)
        if trainer.log_dir:
            os.makedirs(trainer.log_dir, exist_ok=True)
            record = {"prompts": self.prompts_scored, "max_new_tokens": self.max_new_tokens, "rougeL": self.scores}
            with open(os.path.join(trainer.log_dir, "generation.json"), "w") as handle:
                json.dump(record, handle, indent=2)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations, "scores": dict(self.scores)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
        self.scores.update(state_dict.get("scores", {}))
