"""The method benchmark: every distillation method on the same task and student, several seeds,
one results table and its plots.

    python benchmarks/methods.py --quick                      # 1 seed, 200 steps, 5 methods, Rotten Tomatoes (CPU, ~30 min)
    python benchmarks/methods.py --accelerator auto           # 3 seeds, every method, both tasks, each config's epochs (GPU)
    python benchmarks/methods.py --task amazon3 --seeds 0 1   # one task, chosen seeds
    python benchmarks/methods.py --report-only                # results.md and the plots again from results.csv
    python benchmarks/methods.py --merge A B --out C          # runs split over processes or machines, into one table
    python benchmarks/methods.py --parallel 16                # 16 runs at a time in their own processes (one GPU)

For each task: the teacher is fine-tuned once by the task's teacher config, unless the folder
that config exports to already holds a teacher trained by the same recipe (model, data, seed and
training length of the config saved in that run's log folder; the quickstart's teacher qualifies);
then the teacher-output cache of every method that can read one is built (``kd_lightning.commands.cache``);
then the student is trained under each method of :data:`TASKS` and each seed, and evaluated on the
test split with its checkpoint of best validation accuracy. ``--quick``: one seed, 200 steps with
validation every 50, the tasks' quick methods (no KD, KD, KD + Procrustes, LELP, SinKD on Rotten
Tomatoes). Otherwise seeds 0, 1, 2, every method, each config's own epochs (one on Rotten Tomatoes,
three on the Amazon snippets) with validation every quarter epoch; ``--steps`` and ``--val-every``
change the length and the interval.

Each run is built from the method's own YAML config(s) by the CLI a user runs (``KDLightningCLI``),
overriding only the seed, the run length and validation interval, where logs go (TensorBoard and a
CSV logger under ``<out>/runs/<task>/<method>/seed<S>``), the device (``--accelerator``,
``--devices``, ``--precision``) and the teacher cache (``--no-cache`` turns it off). The exported
student folder of a config (``ExportHF``) is not written, and checkpoints are deleted once a run is
scored (``--keep-checkpoints`` keeps them). Online BD-KD trains its teacher, so it reads no cache;
LELP and ND/KD++ make their own pass of the teacher over the training set, as they always do.

Outputs in ``--out`` (default ``benchmarks/results/methods``; ``benchmarks/results/methods_quick`` with
``--quick``):

- ``results.csv``: one row per (task, method, seed): test accuracy, macro-F1, ECE, the teacher's test
  accuracy, the teacher-student gap closed ``(acc - acc_noKD) / (acc_teacher - acc_noKD)`` against the
  no-KD run of the same seed (and that run's frozen teacher), wall time (build, fit and test), steps,
  the config files, the run setting, the machine and the command;
- ``alignment.csv``: validation linear CKA and Procrustes distance between the student and teacher
  taps over training, for the methods whose config logs them (``AlignmentLogger``);
- ``results.md``: mean ± std per method ranked by accuracy, and each method against KD: the mean
  paired difference over seeds and a paired test (``--test ttest``: ``scipy.stats.ttest_rel``,
  ``--test wilcoxon``: ``scipy.stats.wilcoxon``), significant differences (p < 0.05) marked;
- ``<task>_accuracy.png``, ``<task>_gap_closed.png``, ``<task>_ece.png``, ``<task>_alignment.png``.

Resuming: a finished run's rows are added to ``results.csv`` (and ``alignment.csv``) by an atomic
rewrite; a rerun skips the (task, method, seed) rows already there and starts an unfinished run
again from scratch in a clean folder. Rows made with another run length, validation interval,
precision or cache setting are not mixed in: the script refuses and names the setting.
Parallel runs: ``--parallel N`` fine-tunes the teachers and builds the caches first, then runs N
(task, method, seed) runs at a time, each in its own process of this script with the same
setting (output in ``<out>/runs/parts/``), and merges each finished row into ``--out`` as it
arrives; small runs leave most of a GPU idle, so many share one.
Splitting: runs split by ``--task``, ``--methods`` and ``--seeds`` over several processes (one GPU
has room for many of these small runs at once) or machines, each with its own ``--out``, are joined
by ``--merge DIR ... --out DIR``: their rows (all made with one setting, or it refuses) go into the
``--out`` folder's results, a row of the same (task, method, seed) replacing the one there, and the
table and plots are written from all of them.
Paths are relative to the repository root (the script runs from there); ``<out>/runs/`` is
ignored by git, the CSV, Markdown and PNG files are meant to be committed.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from short_runs import build_cli, length_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks/results/methods")
DEFAULT_QUICK_OUT = Path("benchmarks/results/methods_quick")
BASELINE = "no KD"
REFERENCE = "KD"
COLUMNS = (
    "task", "method", "seed", "accuracy", "f1", "ece", "teacher_accuracy", "gap_closed",
    "wall_time_s", "steps", "configs", "setting", "machine", "command",
)  # fmt: skip
ALIGNMENT_COLUMNS = ("task", "method", "seed", "step", "pair", "cka", "procrustes")
ALIGNMENT_METRIC = re.compile(r"^val/align/(?P<pair>.+)/(?P<metric>cka|procrustes)$")
#: Trainer settings that change what a teacher fine-tune learns (device and logging settings do not).
TEACHER_TRAINING_KEYS = (
    "max_epochs", "max_steps", "min_epochs", "min_steps", "max_time", "limit_train_batches", "overfit_batches",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "val_check_interval",
    "check_val_every_n_epoch",
)  # fmt: skip


# ---- what runs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a method and the config file(s) it runs.

    Args:
        name: the row's name in the tables.
        configs: YAML files passed as ``--config`` in this order (later ones override earlier ones).
        cache: read the teacher's training outputs from the teacher cache. False where training
            runs no teacher (no KD) or trains it (online BD-KD).
    """

    name: str
    configs: tuple[str, ...]
    cache: bool = True


@dataclass(frozen=True)
class Task:
    """A task of the benchmark: its teacher config and its methods.

    Args:
        name: short name (``--task``, file names, the ``task`` column).
        title: heading in ``results.md``.
        teacher_configs: the teacher fine-tune's config file(s); the ``ExportHF`` callback in them
            names the folder the distillation configs load the teacher from.
        methods: every method run on the task; :data:`BASELINE` and :data:`REFERENCE` among them.
        quick_methods: the names run by ``--quick``.
    """

    name: str
    title: str
    teacher_configs: tuple[str, ...]
    methods: tuple[Method, ...]
    quick_methods: tuple[str, ...] = ()


RT_METHODS = (
    Method(BASELINE, ("configs/losses/kl_divergence.yaml", "configs/methods/no_kd.yaml"), cache=False),
    Method(REFERENCE, ("configs/losses/kl_divergence.yaml",)),
    Method("reverse KL", ("configs/losses/reverse_kl_divergence.yaml",)),
    Method("JS", ("configs/losses/js_divergence.yaml",)),
    Method("skew KL", ("configs/losses/skew_kl_divergence.yaml",)),
    Method("skew reverse KL", ("configs/losses/skew_reverse_kl_divergence.yaml",)),
    Method("TVD", ("configs/losses/total_variation_distance.yaml",)),
    Method("DKD", ("configs/losses/dkd.yaml",)),
    Method("DIST", ("configs/losses/dist.yaml",)),
    Method("SinKD", ("configs/methods/sinkd.yaml",)),
    Method("BD-KD", ("configs/losses/balanced_divergence.yaml",)),
    Method("online BD-KD", ("configs/methods/online_bdkd.yaml",), cache=False),
    Method("KD + projected MSE", ("configs/geometry/projected_mse.yaml",)),
    Method("KD + cosine (PKD)", ("configs/losses/cosine_distance.yaml",)),
    Method("KD + CKA", ("configs/geometry/cka.yaml",)),
    Method("KD + Procrustes", ("configs/geometry/procrustes.yaml",)),
    Method("KD + Gram", ("configs/geometry/gram.yaml",)),
    Method("ND / KD++", ("configs/methods/nd_kdpp.yaml",)),
    Method("LELP", ("configs/methods/lelp.yaml",)),
    Method("Comparative KD", ("configs/methods/comparative_kd.yaml",)),
    Method("SRD", ("configs/methods/srd.yaml",)),
    Method("KD + WDM", ("configs/methods/wdm.yaml",)),
    Method("DPK", ("configs/methods/dpk.yaml",)),
    Method("AD-KD", ("configs/methods/adkd.yaml",), cache=False),
)
AMAZON3_METHODS = (
    Method(BASELINE, ("configs/sentiment/amazon_snippets_3class.yaml", "configs/methods/no_kd.yaml"), cache=False),
    Method(REFERENCE, ("configs/sentiment/amazon_snippets_3class.yaml",)),
    Method("LELP", ("configs/methods/lelp_amazon3.yaml",)),
)
#: The benchmark's tasks: which config(s) each row runs.
TASKS: dict[str, Task] = {
    "rt": Task(
        "rt",
        "Rotten Tomatoes (packaged/rotten_tomatoes, 2 classes; seeded test split)",
        ("configs/quickstart/teacher.yaml",),
        RT_METHODS,
        quick_methods=(BASELINE, REFERENCE, "KD + Procrustes", "LELP", "SinKD"),
    ),
    "amazon3": Task(
        "amazon3",
        "Amazon review snippets, 3 classes (packaged/amazon_snippets_3class; seeded test split)",
        ("configs/sentiment/teacher/amazon_snippets_3class.yaml",),
        AMAZON3_METHODS,
        quick_methods=(BASELINE, REFERENCE, "LELP"),
    ),
}


@dataclass
class Settings:
    """How the runs are made, and where the results go."""

    out: Path
    seeds: list[int]
    steps: int | None = None
    val_every: int | float | None = None
    accelerator: str = "auto"
    devices: str = "1"
    precision: str | None = None
    cache: bool = True
    test: str = "ttest"
    keep_checkpoints: bool = False
    command: str = ""
    cache_root: Path | None = None

    @property
    def setting(self) -> str:
        """What makes results comparable; stored with every row, and a rerun must match it."""
        length = f"steps={self.steps}" if self.steps else "epochs=config"
        return (
            f"{length};val_every={self.val_every or 'config'};precision={self.precision or 'config'};"
            f"cache={'float16' if self.cache else 'off'}"
        )

    def device_overrides(self) -> list[str]:
        overrides = [f"--trainer.accelerator={self.accelerator}", f"--trainer.devices={self.devices}"]
        return overrides + ([f"--trainer.precision={self.precision}"] if self.precision else [])

    def length_overrides(self) -> list[str]:
        """``steps`` optimiser steps (validation every ``val_every`` steps, counted across epochs
        when it is an int), or each config's epochs with validation every ``val_every``."""
        if self.steps:
            across_epochs = ["--trainer.check_val_every_n_epoch=null"] if isinstance(self.val_every, int) else []
            return length_overrides(self.steps, self.val_every or max(1, self.steps // 4)) + across_epochs
        return [f"--trainer.val_check_interval={self.val_every}"] if self.val_every else []

    def run_options(self) -> list[str]:
        """The command-line options that make another process run with this setting and device."""
        options = ["--val-every", str(self.val_every), "--accelerator", self.accelerator, "--devices", self.devices]
        options += ["--steps", str(self.steps)] if self.steps else []
        options += ["--precision", self.precision] if self.precision else []
        options += [] if self.cache else ["--no-cache"]
        return options + (["--keep-checkpoints"] if self.keep_checkpoints else [])

    def cache_overrides(self) -> list[str]:
        root = (self.cache_root or self.out / "runs" / "teacher_cache").resolve()
        return ["--model.init_args.teacher_cache.dtype=float16", f"--model.init_args.teacher_cache.root={root}"]


def config_args(configs: Iterable[str]) -> list[str]:
    return [arg for config in configs for arg in ("--config", str(config))]


def benchmark_trainer_defaults() -> dict[str, Any]:
    """The CLI's trainer defaults without its rich progress bar and model summary: the benchmark
    draws one progress display over all runs (nested rich live displays would fight)."""
    from lightning.pytorch.callbacks import ProgressBar, RichModelSummary

    from kd_lightning.cli import trainer_defaults

    defaults = trainer_defaults()
    defaults["callbacks"] = [c for c in defaults["callbacks"] if not isinstance(c, ProgressBar | RichModelSummary)]
    return {**defaults, "enable_progress_bar": False, "enable_model_summary": False}


# ---- the teacher ---------------------------------------------------------------------------------
def training_recipe(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a resolved config that decide what a fine-tune learns."""
    trainer = config.get("trainer") or {}
    return {
        "seed_everything": config.get("seed_everything"),
        "model": config.get("model"),
        "data": config.get("data"),
        "trainer": {key: trainer.get(key) for key in TEACHER_TRAINING_KEYS},
    }


def export_dirs(config: Mapping[str, Any]) -> list[Path]:
    """The folders the ``ExportHF`` callbacks of a resolved config write to."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return [
        Path(c["init_args"]["dirpath"]).resolve()
        for c in callbacks
        if isinstance(c, Mapping) and str(c.get("class_path", "")).endswith("ExportHF") and c.get("init_args", {}).get("dirpath")
    ]


def exported_recipe(export: Path, log_root: Path, parser: Any) -> dict[str, Any] | None:
    """The recipe of the run that exported ``export``: the newest config saved under ``log_root``
    (``version_*/config.yaml``) that exports there and was written before the export, resolved by
    today's ``parser`` (so that arguments added since take their defaults). None when the folder
    holds no exported model, or no such run is found, or its config no longer parses."""
    if not (export / "config.json").is_file():
        return None
    exported_at = max(p.stat().st_mtime for p in export.iterdir())
    runs = []
    for saved in log_root.glob("*/config.yaml"):
        config = yaml.safe_load(saved.read_text())
        if isinstance(config, Mapping) and export.resolve() in export_dirs(config) and saved.stat().st_mtime <= exported_at:
            runs.append((saved.stat().st_mtime, saved))
    if not runs:
        return None
    try:
        resolved = parser.parse_path(str(max(runs)[1]))
    except (Exception, SystemExit):  # jsonargparse reports a config it cannot parse by exiting
        return None
    return training_recipe(yaml.safe_load(parser.dump(resolved, skip_none=False)))


def ensure_teacher(
    task: Task, settings: Settings, log: Callable[[str], None], callbacks: Sequence[pl.Callback] = ()
) -> bool:
    """Fine-tune the task's teacher (with ``callbacks`` added) unless its export folder holds one
    of the same recipe. Returns whether it was trained."""
    from kd_lightning.cli import KDLightningCLI

    sys.argv = sys.argv[:1]  # LightningCLI warns when sys.argv holds more than the program name
    args = [*config_args(task.teacher_configs), *settings.device_overrides()]
    cli = KDLightningCLI(args=args, run=False, trainer_defaults=benchmark_trainer_defaults())  # keeps ExportHF
    wanted = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    exports = export_dirs(wanted)
    if len(exports) != 1:
        raise ValueError(f"{task.name}: the teacher config must export the teacher with one ExportHF callback, found {len(exports)}")
    export = exports[0]
    logger = cli.trainer.logger
    log_root = Path(logger.root_dir) if logger is not None and getattr(logger, "root_dir", None) else None
    found = exported_recipe(export, log_root, cli.parser) if log_root is not None else None
    if found is not None and found == training_recipe(wanted):
        log(f"{task.name}: teacher {export} was trained by {' + '.join(task.teacher_configs)}; reusing it")
        return False
    reason = "no teacher there" if found is None else "it was trained by another recipe"
    log(f"{task.name}: fine-tuning the teacher ({' + '.join(task.teacher_configs)} -> {export}; {reason})")
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if not (export / "config.json").is_file():
        raise RuntimeError(f"{task.name}: the teacher fine-tune did not export to {export}")
    return True


def build_teacher_caches(task: Task, methods: Sequence[Method], settings: Settings, log: Callable[[str], None]) -> None:
    """Build the teacher-output cache of every method that reads one (methods with the same
    teacher taps share a cache, which is then only opened)."""
    from kd_lightning.commands import cache

    for method in methods:
        if settings.cache and method.cache:
            logs = logger_overrides(run_dir(settings, task.name, method.name, "cache"))  # the data splits record goes there
            built = cache.main([*config_args(method.configs), *settings.device_overrides(), *settings.cache_overrides(), *logs])
            log(f"{task.name}: teacher cache of {method.name}: {built.folder.name}")
            del built
            release_memory()


# ---- one run -------------------------------------------------------------------------------------
class StepProgress(pl.Callback):
    """Advances a rich progress task with the run's optimiser steps."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.progress.reset(self.task, total=trainer.estimated_stepping_batches)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.progress.update(self.task, completed=trainer.global_step)


def release_memory() -> None:
    """Free what a finished (or failed) run held before the next one builds its models."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_dir(settings: Settings, task: str, method: str, seed: int | str) -> Path:
    """``<out>/runs/<task>/<method slug>/seed<seed>`` (``.../cache`` for the cache build's logs)."""
    slug = re.sub(r"[^a-z0-9]+", "_", method.lower()).strip("_")
    return settings.out / "runs" / task / slug / (f"seed{seed}" if isinstance(seed, int) else seed)


def logger_overrides(folder: Path) -> list[str]:
    """TensorBoard (events, config, checkpoints in ``folder``) and a CSV logger (``folder/csv``)."""
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(folder), "name": "", "version": ""}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder), "name": "csv", "version": ""}},
    ]
    return [f"--trainer.logger={yaml.safe_dump(loggers, default_flow_style=True, width=10_000).strip()}"]


def alignment_rows(metrics_csv: Path, key: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``val/align/<pair>/{cka,procrustes}`` values a CSV logger wrote, one row per (step, pair)."""
    if not metrics_csv.is_file():
        return []
    points: dict[tuple[int, str], dict[str, Any]] = {}
    with metrics_csv.open() as handle:
        for record in csv.DictReader(handle):
            for column, value in record.items():
                match = ALIGNMENT_METRIC.match(column or "")
                if match and value not in ("", None):
                    step, pair = int(record["step"]), match["pair"]
                    points.setdefault((step, pair), {**key, "step": step, "pair": pair})[match["metric"]] = float(value)
    return [points[k] for k in sorted(points)]


def run_method(task: Task, method: Method, seed: int, settings: Settings, progress: Progress, step_task: TaskID) -> tuple[dict, list[dict]]:
    """Train and test one (method, seed); its result row and alignment rows. The run exports no
    student folder (``build_cli`` leaves out the configs' ``ExportHF``)."""
    folder = run_dir(settings, task.name, method.name, seed)
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished earlier attempt: start again cleanly
    cache = settings.cache_overrides() if settings.cache and method.cache else []
    args = [
        *config_args(method.configs), f"--seed_everything={seed}", *settings.length_overrides(),
        *settings.device_overrides(), *logger_overrides(folder), *cache,
    ]  # fmt: skip
    start = time.perf_counter()
    cli = build_cli(args, trainer_defaults=benchmark_trainer_defaults())
    trainer = cli.trainer
    trainer.callbacks.append(StepProgress(progress, step_task))
    trainer.fit(cli.model, datamodule=cli.datamodule)
    steps = trainer.global_step
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    metrics = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best" if best else None, verbose=False)[0]
    wall = time.perf_counter() - start
    if not settings.keep_checkpoints:
        for checkpoint in folder.rglob("*.ckpt"):
            checkpoint.unlink()
    key = {"task": task.name, "method": method.name, "seed": seed}
    row = {
        **key,
        "accuracy": float(metrics["test/acc"]),
        "f1": float(metrics.get("test/f1", math.nan)),
        "ece": float(metrics.get("test/ece", math.nan)),
        "teacher_accuracy": float(metrics.get("test/teacher/acc", math.nan)),
        "gap_closed": math.nan,
        "wall_time_s": round(wall, 1),
        "steps": steps,
        "configs": " + ".join(method.configs),
        "setting": settings.setting,
        "machine": machine(),
        "command": settings.command,
    }
    return row, alignment_rows(folder / "csv" / "metrics.csv", key)


# ---- results on disk -----------------------------------------------------------------------------
def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in columns} for row in rows)
    return buffer.getvalue()


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a results or alignment CSV with numbers as numbers (empty cells as NaN)."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as handle:
        for record in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in record.items():
                if key in ("seed", "steps", "step"):
                    row[key] = int(value)
                elif key in ("task", "method", "pair", "configs", "setting", "machine", "command"):
                    row[key] = value
                else:
                    row[key] = float(value) if value not in ("", None) else math.nan
            rows.append(row)
    return rows


def with_gap_closed(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``gap_closed = (acc - acc_noKD) / (acc_teacher - acc_noKD)``, each against
    the no-KD row of its task and seed (its frozen teacher's accuracy); NaN without that row or
    when the teacher is no better than no KD."""
    baselines = {(r["task"], r["seed"]): r for r in rows if r["method"] == BASELINE}
    out = []
    for row in rows:
        base = baselines.get((row["task"], row["seed"]))
        gap = math.nan
        if base is not None and base["teacher_accuracy"] - base["accuracy"] > 0:
            gap = (row["accuracy"] - base["accuracy"]) / (base["teacher_accuracy"] - base["accuracy"])
        out.append({**row, "gap_closed": gap})
    return out


@dataclass
class ResultStore:
    """``results.csv`` and ``alignment.csv`` of an output folder, rewritten atomically per finished run."""

    folder: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    alignment: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = read_csv(self.results_csv)
        self.alignment = read_csv(self.alignment_csv)

    @property
    def results_csv(self) -> Path:
        return self.folder / "results.csv"

    @property
    def alignment_csv(self) -> Path:
        return self.folder / "alignment.csv"

    def done(self, task: str, method: str, seed: int) -> bool:
        return any(run_key(r) == (task, method, seed) for r in self.rows)

    def row(self, task: str, method: str, seed: int) -> dict[str, Any]:
        """The stored row of one run (with its gap closed)."""
        return next(r for r in self.rows if run_key(r) == (task, method, seed))

    def check_setting(self, setting: str) -> None:
        other = sorted({r["setting"] for r in self.rows} - {setting})
        if other:
            raise SystemExit(
                f"{self.results_csv} holds runs made with {other[0]!r}, this run asks for {setting!r}: "
                "give another --out, or delete that folder to start over"
            )

    def merge(self, others: Sequence[ResultStore]) -> int:
        """Add every row of ``others`` (and its alignment rows), replacing rows of the same (task,
        method, seed); all rows must share one setting. Returns the number of rows added."""
        settings = {r["setting"] for store in (self, *others) for r in store.rows}
        if len(settings) > 1:
            raise SystemExit(
                f"cannot merge runs made with different settings {sorted(settings)}: results of one table must "
                "share their run length, validation interval, precision and cache setting"
            )
        added = [r for store in others for r in store.rows]
        if len({run_key(r) for r in added}) < len(added):
            raise SystemExit("the folders to merge hold the same (task, method, seed) more than once: merge one of each")
        self._replace(added, [a for store in others for a in store.alignment])
        return len(added)

    def add(self, row: Mapping[str, Any], alignment: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Record a finished run (replacing any alignment rows left by an unfinished attempt);
        returns its row with the gap closed."""
        self._replace([row], alignment)
        return self.row(*run_key(row))

    def _replace(self, rows: Sequence[Mapping[str, Any]], alignment: Sequence[Mapping[str, Any]]) -> None:
        """Put ``rows`` and ``alignment`` in place of the stored rows of the same runs, recompute
        the gap closed, and rewrite both CSVs atomically."""
        keys = {run_key(r) for r in rows}
        self.alignment = [a for a in self.alignment if run_key(a) not in keys] + [dict(a) for a in alignment]
        self.rows = with_gap_closed([r for r in self.rows if run_key(r) not in keys] + [dict(r) for r in rows])
        write_atomically(self.alignment_csv, csv_text(self.alignment, ALIGNMENT_COLUMNS))
        write_atomically(self.results_csv, csv_text(self.rows, COLUMNS))


def run_key(row: Mapping[str, Any]) -> tuple[str, str, int]:
    """The (task, method, seed) a result or alignment row belongs to."""
    return row["task"], row["method"], row["seed"]


# ---- statistics ----------------------------------------------------------------------------------
def paired_p_value(values: Sequence[float], reference: Sequence[float], test: str = "ttest") -> float:
    """p-value of a paired two-sided test of ``values`` against ``reference`` (paired by seed):
    ``scipy.stats.ttest_rel`` or ``scipy.stats.wilcoxon``; NaN with fewer than two pairs or when
    the test is undefined (all differences zero)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = stats.wilcoxon(values, reference) if test == "wilcoxon" else stats.ttest_rel(values, reference)
        except ValueError:
            return math.nan
    return float(result.pvalue)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value) of the finite values."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


@dataclass
class MethodSummary:
    """One method on one task over its seeds."""

    method: str
    seeds: list[int]
    accuracy: tuple[float, float]
    ece: tuple[float, float]
    gap_closed: tuple[float, float]
    wall_time_s: float
    steps: float
    configs: str
    delta_vs_reference: float = math.nan
    p_value: float = math.nan

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < 0.05


def summarise(rows: Sequence[Mapping[str, Any]], task: str, test: str = "ttest") -> list[MethodSummary]:
    """Mean ± std per method of ``task``, ranked by mean accuracy, each compared with KD over
    the seeds both ran (mean paired difference of accuracy and the paired test's p-value)."""
    rows = [r for r in rows if r["task"] == task]
    by_method: dict[str, dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["seed"]] = row
    reference = by_method.get(REFERENCE, {})
    summaries = []
    for method, runs in by_method.items():
        seeds = sorted(runs)
        summary = MethodSummary(
            method=method,
            seeds=seeds,
            accuracy=mean_std([runs[s]["accuracy"] for s in seeds]),
            ece=mean_std([runs[s]["ece"] for s in seeds]),
            gap_closed=mean_std([runs[s]["gap_closed"] for s in seeds]),
            wall_time_s=float(np.mean([runs[s]["wall_time_s"] for s in seeds])),
            steps=float(np.mean([runs[s]["steps"] for s in seeds])),
            configs=runs[seeds[0]]["configs"],
        )
        paired = [s for s in seeds if s in reference]
        if method != REFERENCE and paired:
            values = [runs[s]["accuracy"] for s in paired]
            ref = [reference[s]["accuracy"] for s in paired]
            summary.delta_vs_reference = float(np.mean(np.subtract(values, ref)))
            summary.p_value = paired_p_value(values, ref, test)
        summaries.append(summary)
    return sorted(summaries, key=lambda s: -s.accuracy[0] if math.isfinite(s.accuracy[0]) else math.inf)


# ---- report --------------------------------------------------------------------------------------
def fmt(pair: tuple[float, float], digits: int = 4) -> str:
    mean, std = pair
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"


def teacher_accuracy(rows: Sequence[Mapping[str, Any]], task: str) -> float:
    """The frozen teacher's test accuracy (from the no-KD runs, which never train it)."""
    values = [r["teacher_accuracy"] for r in rows if r["task"] == task and r["method"] == BASELINE]
    return float(np.mean(values)) if values else math.nan


def markdown(rows: Sequence[Mapping[str, Any]], tasks: Mapping[str, Task], settings: Settings, plots: Mapping[str, list[Path]]) -> str:
    test_name = "Wilcoxon signed-rank test (`scipy.stats.wilcoxon`)" if settings.test == "wilcoxon" else "paired t-test (`scipy.stats.ttest_rel`)"
    lines = [
        "# Method benchmark",
        "",
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. The runs were made by",
        "",
        *[
            f"- `{command}` on {where}"
            for command, where in dict.fromkeys((r.get("command") or "?", r.get("machine") or "?") for r in rows)
        ],
        "",
        f"Setting of every run: `{rows[0]['setting'] if rows else settings.setting}`"
        + (" (`epochs=config`: each config's own epochs)." if rows and "epochs=config" in rows[0]["setting"] else "."),
        "",
        "Test split of each task, with the checkpoint of best validation accuracy. ECE: 15 equal-width bins. "
        "Gap closed = (acc − acc_noKD) / (acc_teacher − acc_noKD), per seed against the no-KD run of the same seed "
        "and its frozen teacher. Δ vs KD: mean over seeds of the paired accuracy difference to KD; "
        f"p: {test_name} over the seeds both ran; **bold** and * where p < 0.05. "
        "Wall time: building, training and testing one run (teacher caches built beforehand). "
        "Per-run values: `results.csv`; alignment over training: `alignment.csv`.",
    ]
    for name in sorted({r["task"] for r in rows}, key=lambda t: list(tasks).index(t) if t in tasks else len(tasks)):
        summaries = summarise(rows, name, settings.test)
        title = tasks[name].title if name in tasks else name
        teacher = teacher_accuracy(rows, name)
        shown = f"{teacher:.4f}" if math.isfinite(teacher) else "n/a (no no-KD run)"
        lines += ["", f"## {title}", "", f"Teacher test accuracy (frozen): {shown}.", ""]
        if settings.test == "wilcoxon" and max(len(s.seeds) for s in summaries) < 6:
            lines += ["With fewer than 6 seeds no two-sided Wilcoxon p-value can fall below 0.05.", ""]
        lines += [
            "| rank | method | seeds | accuracy | ECE | gap closed | Δ acc vs KD | p | wall time | steps | config(s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for rank, s in enumerate(summaries, 1):
            delta = f"{s.delta_vs_reference:+.4f}" if math.isfinite(s.delta_vs_reference) else "—"
            p = f"{s.p_value:.3f}" if math.isfinite(s.p_value) else "—"
            if s.significant:
                delta, p = f"**{delta}**", f"**{p}** *"
            configs = ", ".join(f"`{c}`" for c in s.configs.split(" + "))
            lines.append(
                f"| {rank} | {s.method} | {len(s.seeds)} | {fmt(s.accuracy)} | {fmt(s.ece)} | {fmt(s.gap_closed, 3)} | "
                f"{delta} | {p} | {s.wall_time_s / 60:.1f} min | {s.steps:.0f} | {configs} |"
            )
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots.get(name, [])]
    return "\n".join(lines) + "\n"


def plot_task(rows: Sequence[Mapping[str, Any]], alignment: Sequence[Mapping[str, Any]], task: str, title: str, out: Path, test: str) -> list[Path]:
    """The task's PNGs: accuracy (per-seed points, mean ± std), gap closed, ECE and, when logged,
    validation alignment over training. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarise(rows, task, test)[::-1]  # best at the top of horizontal charts
    names = [s.method for s in summaries]
    y = np.arange(len(names))
    height = 0.6 + 0.35 * len(names)
    paths = []

    def save(fig: Any, name: str) -> None:
        path = out / f"{task}_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(8, height + 1))
    for i, s in enumerate(summaries):
        accs = [r["accuracy"] for r in rows if r["task"] == task and r["method"] == s.method]
        ax.scatter(accs, [i] * len(accs), color="0.6", s=14, zorder=2)
    means, stds = zip(*(s.accuracy for s in summaries), strict=True)
    ax.errorbar(means, y, xerr=np.nan_to_num(stds), fmt="o", color="C0", capsize=3, zorder=3, label="mean ± std over seeds")
    for value, label, style in ((teacher_accuracy(rows, task), "teacher", "--"), (next((s.accuracy[0] for s in summaries if s.method == BASELINE), math.nan), "no KD", ":")):
        if math.isfinite(value):
            ax.axvline(value, color="0.3", linestyle=style, label=f"{label} {value:.4f}")
    ax.set(yticks=y, yticklabels=names, xlabel="test accuracy", title=f"{title}: accuracy")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "accuracy")

    for key, label in (("gap_closed", "teacher-student gap closed"), ("ece", "test ECE (15 bins)")):
        fig, ax = plt.subplots(figsize=(8, height + 1))
        means, stds = zip(*(getattr(s, key) for s in summaries), strict=True)
        ax.barh(y, np.nan_to_num(means), xerr=np.nan_to_num(stds), color="C1" if key == "ece" else "C2", capsize=3)
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.set(yticks=y, yticklabels=names, xlabel=label, title=f"{title}: {label}")
        save(fig, key)

    points = [a for a in alignment if a["task"] == task]
    if points:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, label in zip(axes, ("cka", "procrustes"), ("linear CKA (higher: closer)", "Procrustes distance (lower: closer)"), strict=True):
            for n, curve in enumerate(sorted({(a["method"], a["pair"]) for a in points})):
                steps = sorted({a["step"] for a in points if (a["method"], a["pair"]) == curve})
                values = [[a[metric] for a in points if (a["method"], a["pair"]) == curve and a["step"] == s] for s in steps]
                mean = np.array([np.mean(v) for v in values])
                ax.plot(steps, mean, marker="o", color=f"C{n}", label=f"{curve[0]} ({curve[1]})")
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=f"C{n}", alpha=0.2)
            ax.set(xlabel="training step (as logged)", ylabel=label, title=f"validation {label.split(' (')[0]}: student vs teacher taps")
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}: alignment over training (mean, min-max over seeds)", fontsize=10)
        save(fig, "alignment")
    return paths


def write_report(store: ResultStore, tasks: Mapping[str, Task], settings: Settings) -> Path:
    """``results.md`` and the plots of every task in ``store``."""
    plots = {}
    for task in sorted({r["task"] for r in store.rows}):
        title = tasks[task].title.split(" (")[0] if task in tasks else task
        plots[task] = plot_task(store.rows, store.alignment, task, title, store.folder, settings.test)
    path = store.folder / "results.md"
    write_atomically(path, markdown(store.rows, tasks, settings, plots))
    return path


# ---- runs in parallel processes ------------------------------------------------------------------
def part_dir(settings: Settings, task: str, method: str, seed: int) -> Path:
    """The ``--out`` of the process that runs one (task, method, seed): ``<out>/runs/parts/...``."""
    return settings.out / "runs" / "parts" / run_dir(settings, task, method, seed).relative_to(settings.out / "runs")


def child_command(task: Task, method: Method, seed: int, settings: Settings, part: Path) -> list[str]:
    """This script, run for one (task, method, seed) with ``settings``' options, results in ``part``,
    reading the teacher caches the parent built."""
    cache_root = settings.cache_root or settings.out / "runs" / "teacher_cache"
    return [
        sys.executable, str(Path(__file__).resolve()), "--task", task.name, "--methods", method.name,
        "--seeds", str(seed), "--out", str(part.resolve()), "--cache-root", str(cache_root.resolve()),
        *settings.run_options(),
    ]  # fmt: skip


def run_in_parallel(
    todo: Sequence[tuple[Task, Method, int]], settings: Settings, workers: int, store: ResultStore,
    report: BenchmarkReport, on_done: Callable[[str], None], log: Callable[[str], None],
) -> None:  # fmt: skip
    """Run each (task, method, seed) in its own process of this script, at most ``workers`` at a
    time (small runs leave most of a GPU idle; several share it), and merge each finished run's row
    into ``store`` as it arrives. A process that ends without its row is a failed run, with the
    end of its log (``<part>/run.log``) in the report."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)), "TOKENIZERS_PARALLELISM": "false"}
    queue = list(todo)
    running: dict[Any, tuple[Task, Method, int, Path, Any]] = {}
    while queue or running:
        while queue and len(running) < workers:
            task, method, seed = queue.pop(0)
            part = part_dir(settings, task.name, method.name, seed)
            if part.exists():
                shutil.rmtree(part)  # an unfinished earlier attempt
            part.mkdir(parents=True)
            handle = (part / "run.log").open("w")
            command = child_command(task, method, seed, settings, part)
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running[process] = (task, method, seed, part, handle)
        time.sleep(0.5)
        for process in [p for p in running if p.poll() is not None]:
            task, method, seed, part, handle = running.pop(process)
            handle.close()
            label = f"{task.name} · {method.name} · seed {seed}"
            done = ResultStore(part)
            if process.returncode == 0 and done.done(task.name, method.name, seed):
                store.merge([done])
                row = store.row(task.name, method.name, seed)
                report.ran.append((task.name, method.name, seed))
                log(f"{label}: acc {row['accuracy']:.4f}  ECE {row['ece']:.4f}  {row['wall_time_s'] / 60:.1f} min")
            else:
                tail = " | ".join((part / "run.log").read_text(errors="replace").strip().splitlines()[-3:])
                report.failed.append((task.name, method.name, seed, f"exit {process.returncode}: {tail}"))
                log(f"{label}: FAILED (exit {process.returncode}; log {part / 'run.log'})")
            on_done(label)


# ---- main ----------------------------------------------------------------------------------------
@dataclass
class BenchmarkReport:
    """What a call of :func:`main` did."""

    ran: list[tuple[str, str, int]]
    skipped: list[tuple[str, str, int]]
    failed: list[tuple[str, str, int, str]]
    teachers_trained: list[str]
    results_md: Path | None


def parse_args(argv: Sequence[str], tasks: Mapping[str, Task]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 200 steps, validation every 50, the tasks' quick methods")
    parser.add_argument("--task", nargs="+", choices=[*tasks, "both"], help="tasks to run (default: rt with --quick, else all)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="run only these methods (names as in the tables)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 with --quick, else 0 1 2)")
    parser.add_argument("--steps", type=int, help="optimiser steps per run (default: 200 with --quick, else each config's epochs)")
    parser.add_argument("--val-every", help="validate every N steps (int) or fraction of an epoch (float); default steps / 4, or 0.25")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto); default auto")
    parser.add_argument(
        "--devices", default="1", help="Lightning devices per run (default 1; the runs share this process, so no DDP)"
    )
    parser.add_argument("--precision", help="Lightning precision, e.g. bf16-mixed or 16-mixed (default: the configs')")
    parser.add_argument("--no-cache", action="store_true", help="run the live teacher in every step instead of its cache")
    parser.add_argument("--test", choices=("ttest", "wilcoxon"), default="ttest", help="paired test against KD over seeds")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints under <out>/runs")
    parser.add_argument("--report-only", action="store_true", help="only write results.md and the plots from results.csv")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="N",
        help="run N runs at once, each in its own process (several small runs share one GPU); default 1",
    )  # fmt: skip
    parser.add_argument("--cache-root", type=Path, help=argparse.SUPPRESS)  # the parent's caches, for --parallel's processes
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="DIR",
        help="add the results of these output folders (runs split over processes or machines) to --out, then report",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help=f"output folder (default {DEFAULT_OUT}, or {DEFAULT_QUICK_OUT} with --quick)")
    return parser.parse_args(list(argv))


def selected(args: argparse.Namespace, tasks: Mapping[str, Task]) -> list[tuple[Task, list[Method]]]:
    """The (task, methods) pairs to run, in table order."""
    if args.task:
        names = list(tasks) if "both" in args.task else list(dict.fromkeys(args.task))
    else:
        names = ["rt"] if args.quick and "rt" in tasks else list(tasks)
    known = {m.name for name in names for m in tasks[name].methods}
    unknown = sorted(set(args.methods or []) - known)
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; the methods of {names} are {sorted(known)}")
    plan = []
    for name in names:
        task = tasks[name]
        wanted = args.methods or (task.quick_methods if args.quick else [m.name for m in task.methods])
        methods = [m for m in task.methods if m.name in wanted]
        if methods:
            plan.append((task, methods))
    return plan


def main(argv: Sequence[str] | None = None, tasks: Mapping[str, Task] | None = None) -> BenchmarkReport:
    """Run the benchmark (``argv`` as on the command line) over ``tasks`` (default :data:`TASKS`)."""
    from kd_lightning.cli import _quiet_transformers

    tasks = TASKS if tasks is None else tasks
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, tasks)
    steps = args.steps or (200 if args.quick else None)
    val_every = None if args.val_every is None else (int(args.val_every) if args.val_every.isdigit() else float(args.val_every))
    settings = Settings(
        out=args.out or (DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT),
        seeds=args.seeds or ([0] if args.quick else [0, 1, 2]),
        steps=steps,
        val_every=val_every or (max(1, steps // 4) if steps else 0.25),
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        cache=not args.no_cache,
        test=args.test,
        keep_checkpoints=args.keep_checkpoints,
        command=" ".join(["python benchmarks/methods.py", *argv]),
        cache_root=args.cache_root,
    )
    if args.parallel < 1:
        raise SystemExit(f"--parallel must be at least 1, got {args.parallel}")
    store = ResultStore(settings.out)
    console = Console()
    report = BenchmarkReport([], [], [], [], None)
    if args.merge:
        missing = [str(folder) for folder in args.merge if not (folder / "results.csv").is_file()]
        if missing:
            raise SystemExit(f"no results.csv in {missing}: give the --out folders of finished benchmark runs")
        added = store.merge([ResultStore(folder) for folder in args.merge])
        console.print(f"merged {added} rows from {len(args.merge)} folder(s) into {store.results_csv}")
    if args.report_only or args.merge:
        report.results_md = write_report(store, tasks, settings)
        console.print(f"wrote {report.results_md}")
        return report

    _quiet_transformers()
    store.check_setting(settings.setting)
    plan = selected(args, tasks)
    runs = [(task, method, seed) for task, methods in plan for seed in settings.seeds for method in methods]
    todo = [(t, m, s) for t, m, s in runs if not store.done(t.name, m.name, s)]
    report.skipped = [(t.name, m.name, s) for t, m, s in runs if store.done(t.name, m.name, s)]
    console.print(
        f"Method benchmark: {len(runs)} runs ({len(report.skipped)} already in {store.results_csv}), "
        f"setting {settings.setting}, results in {settings.out}"
    )
    started = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        overall = progress.add_task("runs", total=len(runs), completed=len(report.skipped))
        steps_task = progress.add_task("steps", total=None, visible=False)
        log = progress.console.print
        for task in dict.fromkeys(t for t, _, _ in todo):
            pending = [m for t, m, _ in todo if t is task]
            progress.update(steps_task, description=f"{task.name}: teacher", completed=0, visible=True)
            if ensure_teacher(task, settings, log, [StepProgress(progress, steps_task)]):
                report.teachers_trained.append(task.name)
            build_teacher_caches(task, list(dict.fromkeys(pending)), settings, log)
            if args.parallel > 1:
                continue
            for _, method, seed in [r for r in todo if r[0] is task]:
                number = len(report.skipped) + len(report.ran) + len(report.failed) + 1
                label = f"[{number}/{len(runs)}] {task.name} · {method.name} · seed {seed}"
                progress.update(steps_task, description=label, completed=0, visible=True)
                try:
                    row, alignment = run_method(task, method, seed, settings, progress, steps_task)
                except Exception as error:  # one failed run must not lose the others
                    report.failed.append((task.name, method.name, seed, f"{type(error).__name__}: {error}"))
                    log(f"{label}: FAILED ({type(error).__name__}: {error})")
                else:
                    row = store.add(row, alignment)
                    report.ran.append((task.name, method.name, seed))
                    gap = f"{row['gap_closed']:.3f}" if math.isfinite(row["gap_closed"]) else "n/a"
                    log(
                        f"{label}: acc {row['accuracy']:.4f}  ECE {row['ece']:.4f}  gap closed {gap}  "
                        f"teacher {row['teacher_accuracy']:.4f}  {row['steps']} steps  {row['wall_time_s'] / 60:.1f} min"
                    )
                release_memory()  # after the except clause, whose traceback holds a failed run's models
                progress.update(overall, advance=1)
        if args.parallel > 1 and todo:
            release_memory()
            progress.update(steps_task, description=f"{args.parallel} processes at a time", visible=True)
            run_in_parallel(todo, settings, args.parallel, store, report, lambda _: progress.update(overall, advance=1), log)
        progress.update(steps_task, visible=False)
    if store.rows:
        report.results_md = write_report(store, tasks, settings)
    console.print(f"{len(report.ran)} runs in {(time.perf_counter() - started) / 60:.1f} min; results: {report.results_md}")
    if report.failed:
        console.print(f"{len(report.failed)} run(s) failed and will run again next time: {report.failed}")
    return report


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(1 if main().failed else 0)
