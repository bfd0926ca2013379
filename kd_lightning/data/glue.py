"""``GlueDataModule``: the nine GLUE tasks with their official metrics.

Wang et al. (2019), "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding" (ICLR); hub data set ``nyu-mll/glue``, one config per task, columns ``idx`` and
``label`` (a ``ClassLabel``; a float score for STS-B) plus the task's text columns.

GLUE's test labels are hidden (``-1``), so, like the distillation papers (BERT-PKD, AD-KD,
SinKD), the models are evaluated on the validation ("dev") set: ``test`` is the validation set
again (``trainer.validate`` and ``trainer.test`` report the same rows). MNLI has two validation
sets: ``validation_matched`` is the validation split (checkpoint selection) and
``validation_mismatched`` the test split, so ``fit`` then ``test`` reports MNLI-m and MNLI-mm.
"""

from __future__ import annotations

from typing import Any, Literal

from torchmetrics import MetricCollection

from kd_lightning.data.hub import HubDataModule, HubSchema
from kd_lightning.metrics.glue import glue_metrics
from kd_lightning.suggestions import did_you_mean

GLUE_HUB = "nyu-mll/glue"
DEV_AS_TEST = {"test": "validation"}


def _task(config: str, text: str, pair: str | None, names: tuple[str, ...] | None, splits: dict = DEV_AS_TEST) -> HubSchema:
    return HubSchema(
        GLUE_HUB, config, text_column=text, text_pair_column=pair, label_names=names, regression=names is None, split_names=splits
    )


#: task -> schema; label names in the hub's ``ClassLabel`` order (``None``: a float score).
GLUE_TASKS: dict[str, HubSchema] = {
    "cola": _task("cola", "sentence", None, ("unacceptable", "acceptable")),
    "sst2": _task("sst2", "sentence", None, ("negative", "positive")),
    "mrpc": _task("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent")),
    "qqp": _task("qqp", "question1", "question2", ("not_duplicate", "duplicate")),
    "stsb": _task("stsb", "sentence1", "sentence2", None),
    "mnli": _task(
        "mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
        splits={"validation": "validation_matched", "test": "validation_mismatched"},
    ),
    "qnli": _task("qnli", "question", "sentence", ("entailment", "not_entailment")),
    "rte": _task("rte", "sentence1", "sentence2", ("entailment", "not_entailment")),
    "wnli": _task("wnli", "sentence1", "sentence2", ("not_entailment", "entailment")),
}

#: The validation metric each task selects checkpoints by: GLUE's headline metric, as in
#: SinKD/AD-KD's ``get_eval_metric`` (MCC for CoLA, F1 for MRPC, Spearman for STS-B).
GLUE_MONITOR = {"cola": "val/mcc", "mrpc": "val/f1", "stsb": "val/spearman"}

GlueTask = Literal["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


class GlueDataModule(HubDataModule):
    """One GLUE task: its columns, labels, splits and official metrics.

    ====  ======================  ==============================  =========================
    task  text columns            labels                          metrics (monitor first)
    ====  ======================  ==============================  =========================
    cola  sentence                unacceptable / acceptable       mcc, acc
    sst2  sentence                negative / positive             acc
    mrpc  sentence1, sentence2    not_equivalent / equivalent     f1, acc
    stsb  sentence1, sentence2    score 0..5 (regression)         spearman, pearson, mse
    qqp   question1, question2    not_duplicate / duplicate       acc, f1
    mnli  premise, hypothesis     entailment / neutral / contr.   acc (test = mismatched)
    qnli  question, sentence      entailment / not_entailment     acc
    rte   sentence1, sentence2    entailment / not_entailment     acc
    wnli  sentence1, sentence2    not_entailment / entailment     acc
    ====  ======================  ==============================  =========================

    Classification tasks also log ECE. Validation is the hub's ``validation`` split
    (``validation_matched`` for MNLI) and test is the same set (``validation_mismatched`` for
    MNLI), since GLUE's test labels are hidden.

    Args:
        task: the GLUE task.
        data_files: local files in the hub layout (split -> path(s), hub split names such as
            ``validation_matched``) instead of the hub download.
        **kwargs: loader settings of :class:`~kd_lightning.data.TextClassificationDataModule`.
    """

    def __init__(self, task: GlueTask, data_files: dict[str, str | list[str]] | None = None, **kwargs: Any) -> None:
        if task not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {task!r}; choose one of {', '.join(GLUE_TASKS)}{did_you_mean(task, GLUE_TASKS)}")
        super().__init__(GLUE_TASKS[task], data_files=data_files, **kwargs)
        self.task = task

    def task_metrics(self) -> MetricCollection:
        """GLUE's official metrics of the task (see :func:`kd_lightning.metrics.glue.glue_metrics`)."""
        return glue_metrics(self.task, self.num_labels or len(GLUE_TASKS[self.task].label_names or ()) or 1)

    @property
    def monitor(self) -> str:
        return GLUE_MONITOR.get(self.task, "val/acc")

    @property
    def monitor_mode(self) -> str:
        return "max"
