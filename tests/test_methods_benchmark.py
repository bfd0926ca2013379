"""benchmarks/methods.py end to end on a tiny task: a tiny BERT teacher fine-tuned from its config,
a 1-layer student under no KD and KD (with validation alignment logged) for two seeds, the results
table, its statistics and plots, and a rerun that skips what is done and restarts what is not."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import ModuleType

import matplotlib.image
import pandas as pd
import pytest
import torch
import yaml
from conftest import NEGATIVE, POSITIVE, WORDS
from helpers import load_benchmark
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def methods() -> ModuleType:
    return load_benchmark("methods")


@pytest.fixture(scope="module")
def cue_csv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """train/validation/test CSVs: four neutral words and one sentiment word that gives the label."""
    folder = tmp_path_factory.mktemp("cue_csv")
    neutral = [w for w in WORDS if w not in POSITIVE + NEGATIVE]
    files = {}
    for split, n, seed in (("train", 128, 0), ("validation", 32, 1), ("test", 64, 2)):
        rng = random.Random(seed)
        rows = []
        for i in range(n):
            words = rng.sample(neutral, 4)
            words.insert(rng.randint(0, 4), rng.choice(POSITIVE if i % 2 else NEGATIVE))
            rows.append({"text": " ".join(words), "label": i % 2})
        files[split] = str(folder / f"{split}.csv")
        pd.DataFrame(rows).to_csv(files[split], index=False)
    return files


def write_yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def tiny_task(methods: ModuleType, teacher_model: Path, files: dict[str, str], root: Path):
    """The task: the tiny BERT fine-tuned as teacher, a student of its layer 1, tiny CSV data."""
    data = {
        "class_path": "kd_lightning.data.TextClassificationDataModule",
        "init_args": {"data_files": files, "max_length": 16, "batch_size": 8},
    }
    export = root / "teacher"
    teacher = write_yaml(root / "teacher.yaml", {
        "seed_everything": 0,
        "model": {"class_path": "kd_lightning.FineTuneModule", "init_args": {
            "model": str(teacher_model), "num_labels": 2, "optim": {"lr": 3.0e-3, "warmup_ratio": 0.0}}},
        "data": data,
        "trainer": {
            "max_epochs": 3,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "logs"), "name": "teacher"}},
            "callbacks": [{"class_path": "kd_lightning.callbacks.ExportHF", "init_args": {"dirpath": str(export)}}],
        },
    })  # fmt: skip
    kd_model = {
        "teacher": {"name_or_path": str(export)},
        "student": {"config_overrides": {"num_hidden_layers": 1}},
        "taps": {"t_l1": {"module": "teacher", "path": "bert.encoder.layer.1", "reduce": "cls"},
                 "s_l0": {"module": "student", "path": "bert.encoder.layer.0", "reduce": "cls"}},
        "losses": [
            {"class_path": "kd_lightning.losses.CrossEntropy", "init_args": {"weight": 0.5}},
            {"class_path": "kd_lightning.losses.KLDivergence", "init_args": {"weight": 0.5, "temperature": 2.0}},
        ],
        "optim": {"lr": 1.0e-3},
    }  # fmt: skip
    kd = write_yaml(root / "kd.yaml", {
        "model": {"class_path": "kd_lightning.DistillModule", "init_args": kd_model},
        "data": data,
        "trainer": {
            "max_epochs": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "logs"), "name": "kd"}},
            "callbacks": [
                {"class_path": "kd_lightning.callbacks.AlignmentLogger", "init_args": {"pairs": {"last": ["s_l0", "t_l1"]}}},
                {"class_path": "kd_lightning.callbacks.ExportHF", "init_args": {"dirpath": str(root / "student")}},
            ],
        },
    })  # fmt: skip
    return methods.Task(
        name="tiny",
        title="Tiny sentiment task",
        teacher_configs=(teacher,),
        methods=(
            methods.Method(methods.BASELINE, (kd, str(REPO / "configs" / "methods" / "no_kd.yaml")), cache=False),
            methods.Method(methods.REFERENCE, (kd,)),
        ),
    )


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_gap_closed_and_paired_statistics_by_hand(methods):
    rows = [
        {"task": "t", "method": methods.BASELINE, "seed": 0, "accuracy": 0.60, "teacher_accuracy": 0.90},
        {"task": "t", "method": "KD", "seed": 0, "accuracy": 0.75, "teacher_accuracy": 0.90},
        {"task": "t", "method": "KD", "seed": 1, "accuracy": 0.70, "teacher_accuracy": 0.90},  # no baseline for seed 1
        {"task": "u", "method": methods.BASELINE, "seed": 0, "accuracy": 0.80, "teacher_accuracy": 0.80},
        {"task": "u", "method": "KD", "seed": 0, "accuracy": 0.85, "teacher_accuracy": 0.80},  # teacher no better
    ]
    gaps = [r["gap_closed"] for r in methods.with_gap_closed(rows)]
    assert gaps[:2] == [0.0, pytest.approx((0.75 - 0.60) / (0.90 - 0.60))]
    assert all(math.isnan(g) for g in gaps[2:])

    kd = [0.80, 0.82, 0.79, 0.81, 0.83, 0.80]
    other = [0.82, 0.85, 0.80, 0.84, 0.86, 0.81]
    for test, scipy_test in (("ttest", stats.ttest_rel), ("wilcoxon", stats.wilcoxon)):
        assert methods.paired_p_value(other, kd, test) == pytest.approx(scipy_test(other, kd).pvalue)
    assert math.isnan(methods.paired_p_value([0.8], [0.7]))

    table = [
        {"task": "t", "method": name, "seed": seed, "accuracy": acc, "ece": 0.05, "gap_closed": 0.5,
         "wall_time_s": 60.0, "steps": 10, "configs": "a.yaml"}
        for name, accs in (("KD", kd), ("other", other)) for seed, acc in enumerate(accs)
    ]  # fmt: skip
    best, reference = methods.summarise(table, "t", "wilcoxon")
    assert (best.method, reference.method) == ("other", "KD")
    assert best.delta_vs_reference == pytest.approx(sum(o - k for o, k in zip(other, kd, strict=True)) / 6)
    assert best.p_value == pytest.approx(stats.wilcoxon(other, kd).pvalue) and best.significant
    assert best.accuracy == (pytest.approx(sum(other) / 6), pytest.approx(stats.tstd(other)))
    assert math.isnan(reference.p_value)


def test_benchmark_end_to_end_and_resume(methods, tiny_bert, cue_csv, tmp_path):
    torch.set_num_threads(1)  # width-32 models gain nothing from a second thread on the shared machines
    task = tiny_task(methods, tiny_bert, cue_csv, tmp_path)
    out = tmp_path / "out"
    argv = ["--task", "tiny", "--seeds", "0", "1", "--steps", "4", "--val-every", "2", "--accelerator", "cpu", "--out", str(out)]
    report = methods.main(argv, tasks={"tiny": task})

    names = [m.name for m in task.methods]
    assert report.teachers_trained == ["tiny"] and not report.failed and not report.skipped
    assert sorted(report.ran) == sorted(("tiny", name, seed) for name in names for seed in (0, 1))
    results = (out / "results.csv").read_text()
    assert results.splitlines()[0].split(",") == list(methods.COLUMNS)
    rows = methods.read_csv(out / "results.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted((n, s) for n in names for s in (0, 1))
    for row in rows:
        assert row["steps"] == 4 and row["wall_time_s"] > 0 and 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1
        assert row["setting"] == "steps=4;val_every=2;precision=config;cache=float16"

    # gap closed, by hand from the table's own accuracies
    base = {r["seed"]: r for r in rows if r["method"] == methods.BASELINE}
    finite = 0
    for row in rows:
        b = base[row["seed"]]
        denominator = b["teacher_accuracy"] - b["accuracy"]
        expected = (row["accuracy"] - b["accuracy"]) / denominator if denominator > 0 else math.nan
        assert same(row["gap_closed"], expected), row
        finite += math.isfinite(expected) and row["method"] != methods.BASELINE
    assert finite == 2, "the teacher beats the no-KD student of each seed, so the KD rows have a gap closed"

    # paired statistics against scipy, and the Markdown table that reports them
    kd = [r["accuracy"] for r in sorted(rows, key=lambda r: r["seed"]) if r["method"] == methods.REFERENCE]
    no_kd = [r["accuracy"] for r in sorted(rows, key=lambda r: r["seed"]) if r["method"] == methods.BASELINE]
    summary = next(s for s in methods.summarise(rows, "tiny") if s.method == methods.BASELINE)
    assert same(summary.p_value, float(stats.ttest_rel(no_kd, kd).pvalue))
    assert summary.delta_vs_reference == pytest.approx((no_kd[0] - kd[0] + no_kd[1] - kd[1]) / 2)
    assert summary.accuracy[0] == pytest.approx(sum(no_kd) / 2)
    markdown = (out / "results.md").read_text()
    assert "| rank | method | seeds | accuracy |" in markdown and f"| {summary.delta_vs_reference:+.4f} |" in markdown
    assert markdown.count(" | 2 | ") == 2  # both methods ran both seeds

    # plots, and the alignment curves read from the runs' CSV logs (two validations each)
    for name in ("accuracy", "gap_closed", "ece", "alignment"):
        png = out / f"tiny_{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(png).shape[2] in (3, 4)
    alignment = methods.read_csv(out / "alignment.csv")
    for name in names:
        for seed in (0, 1):
            curve = [a for a in alignment if (a["method"], a["seed"]) == (name, seed)]
            steps = [a["step"] for a in curve]
            assert len(curve) == 2 and steps == sorted(steps) and steps[-1] < 4, curve
            assert all(a["pair"] == "last" and 0 <= a["cka"] <= 1 and a["procrustes"] >= 0 for a in curve)

    # run artefacts stay under <out>/runs, without checkpoints or exported students
    assert not list((out / "runs").rglob("*.ckpt")) and not (tmp_path / "student").exists()
    assert (methods.run_dir(methods.Settings(out, [0]), "tiny", "KD", 1) / "csv" / "metrics.csv").is_file()

    # a rerun skips every finished row and reuses the teacher
    again = methods.main(argv, tasks={"tiny": task})
    assert again.ran == [] and len(again.skipped) == 4 and again.teachers_trained == []
    assert (out / "results.csv").read_text() == results

    # an unfinished run (no row, a stale folder) starts again from a clean folder
    kept = [r for r in rows if (r["method"], r["seed"]) != ("KD", 1)]
    (out / "results.csv").write_text(methods.csv_text(kept, methods.COLUMNS))
    stale = methods.run_dir(methods.Settings(out, [0]), "tiny", "KD", 1) / "stale.txt"
    stale.write_text("from an interrupted attempt")
    resumed = methods.main(argv, tasks={"tiny": task})
    assert resumed.ran == [("tiny", "KD", 1)] and len(resumed.skipped) == 3
    assert not stale.exists() and len(methods.read_csv(out / "results.csv")) == 4

    with pytest.raises(SystemExit, match="steps=4"):  # rows of another run length are not mixed in
        methods.main([*argv, "--steps", "6"], tasks={"tiny": task})


def result_folder(methods: ModuleType, folder: Path, rows: list[dict], setting: str = "steps=4;val_every=2") -> Path:
    folder.mkdir(parents=True)
    full = [{"f1": 0.5, "ece": 0.05, "gap_closed": math.nan, "wall_time_s": 1.0, "steps": 4, "configs": "a.yaml",
             "setting": setting, "machine": "m", "command": f"c {folder.name}", **r} for r in rows]  # fmt: skip
    (folder / "results.csv").write_text(methods.csv_text(full, methods.COLUMNS))
    alignment = [{"task": r["task"], "method": r["method"], "seed": r["seed"], "step": 1, "pair": "p", "cka": 0.5,
                  "procrustes": 0.1} for r in rows]  # fmt: skip
    (folder / "alignment.csv").write_text(methods.csv_text(alignment, methods.ALIGNMENT_COLUMNS))
    return folder


def test_merge_joins_split_runs_into_one_table(methods, tmp_path):
    base = {"task": "rt", "teacher_accuracy": 0.9}
    a = result_folder(methods, tmp_path / "a", [
        {**base, "method": methods.BASELINE, "seed": s, "accuracy": 0.6 + 0.01 * s} for s in (0, 1)])  # fmt: skip
    b = result_folder(methods, tmp_path / "b", [
        {**base, "method": methods.REFERENCE, "seed": s, "accuracy": 0.75 + 0.01 * s} for s in (0, 1)])  # fmt: skip
    out = tmp_path / "out"
    report = methods.main(["--merge", str(a), str(b), "--out", str(out)], tasks=methods.TASKS)
    rows = methods.read_csv(out / "results.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [(methods.REFERENCE, 0), (methods.REFERENCE, 1),
                                                               (methods.BASELINE, 0), (methods.BASELINE, 1)]  # fmt: skip
    kd = {r["seed"]: r for r in rows if r["method"] == methods.REFERENCE}
    for seed in (0, 1):  # the gap closed uses the no-KD row of the same seed, from the other folder
        assert kd[seed]["gap_closed"] == pytest.approx((0.75 - 0.6) / (0.9 - 0.6 - 0.01 * seed))
    assert len(methods.read_csv(out / "alignment.csv")) == 4
    assert report.results_md == out / "results.md" and "c a" in report.results_md.read_text()
    assert (out / "rt_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE

    # merging again replaces the rows of the same runs, never duplicates them
    b2 = result_folder(methods, tmp_path / "b2", [{**base, "method": methods.REFERENCE, "seed": 0, "accuracy": 0.8}])
    methods.main(["--merge", str(b2), "--out", str(out)], tasks=methods.TASKS)
    rows = methods.read_csv(out / "results.csv")
    assert len(rows) == 4 and [r["accuracy"] for r in rows if r["method"] == methods.REFERENCE and r["seed"] == 0] == [0.8]


def test_merge_refuses_mixed_settings_duplicates_and_missing_folders(methods, tmp_path):
    row = {"task": "rt", "method": methods.REFERENCE, "seed": 0, "accuracy": 0.7, "teacher_accuracy": 0.9}
    a = result_folder(methods, tmp_path / "a", [row])
    other = result_folder(methods, tmp_path / "other", [{**row, "seed": 1}], setting="steps=8;val_every=2")
    same = result_folder(methods, tmp_path / "same", [row])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="different settings"):
        methods.main(["--merge", str(a), str(other), "--out", str(out)], tasks=methods.TASKS)
    with pytest.raises(SystemExit, match="more than once"):
        methods.main(["--merge", str(a), str(same), "--out", str(out)], tasks=methods.TASKS)
    with pytest.raises(SystemExit, match="no results.csv"):
        methods.main(["--merge", str(tmp_path / "nowhere"), "--out", str(out)], tasks=methods.TASKS)
    assert not (out / "results.csv").exists()  # nothing written by a refused merge


STUB_CHILD = r"""
import csv, json, os, sys, time
args = sys.argv[1:]
opt = lambda name: args[args.index(name) + 1]
task, method, seed, out = opt("--task"), opt("--methods"), int(opt("--seeds")), opt("--out")
with open(os.environ["STUB_TIMES"], "a") as handle:
    handle.write(f"{time.time()} {time.time() + 0.4}\n")
time.sleep(0.4)
if method == os.environ.get("STUB_FAIL"):
    print("boom: this run failed")
    sys.exit(3)
row = {"task": task, "method": method, "seed": seed, "accuracy": 0.7 + 0.01 * seed + 0.02 * (method == "KD"),
       "f1": 0.5, "ece": 0.05, "teacher_accuracy": 0.9, "gap_closed": "", "wall_time_s": 0.4, "steps": 4,
       "configs": "a.yaml", "setting": os.environ["STUB_SETTING"], "machine": "m", "command": " ".join(args)}
with open(os.path.join(out, "results.csv"), "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=json.loads(os.environ["STUB_COLUMNS"]))
    writer.writeheader()
    writer.writerow(row)
"""


def test_parallel_runs_each_run_in_its_own_process_and_merges_them(methods, tmp_path, monkeypatch):
    """``--parallel``: the orchestration, with a stand-in child (the real child is this script's
    own sequential path, tested above): at most N processes at once, every finished row merged,
    a failed process reported with its log and run again by the next call."""
    noop = methods.Method
    task = methods.Task("tiny", "Tiny", ("teacher.yaml",), (
        noop(methods.BASELINE, ("a.yaml",), cache=False), noop(methods.REFERENCE, ("a.yaml",)), noop("other", ("a.yaml",))))  # fmt: skip
    real = methods.child_command
    commands = []

    def stand_in(*args):
        command = real(*args)
        commands.append(command)
        return [command[0], "-c", STUB_CHILD, *command[2:]]

    monkeypatch.setattr(methods, "child_command", stand_in)
    monkeypatch.setattr(methods, "ensure_teacher", lambda *args: False)
    monkeypatch.setattr(methods, "build_teacher_caches", lambda *args: None)
    times = tmp_path / "times.txt"
    monkeypatch.setenv("STUB_TIMES", str(times))
    monkeypatch.setenv("STUB_COLUMNS", json.dumps(list(methods.COLUMNS)))
    monkeypatch.setenv("STUB_SETTING", "steps=4;val_every=2;precision=config;cache=float16")
    monkeypatch.setenv("STUB_FAIL", "other")
    out = tmp_path / "out"
    argv = ["--task", "tiny", "--seeds", "0", "1", "--steps", "4", "--val-every", "2", "--parallel", "2", "--out", str(out)]

    report = methods.main(argv, tasks={"tiny": task})
    assert sorted(report.ran) == sorted(("tiny", m, s) for m in (methods.BASELINE, methods.REFERENCE) for s in (0, 1))
    assert sorted((f[1], f[2]) for f in report.failed) == [("other", 0), ("other", 1)]
    assert all("exit 3" in f[3] and "boom" in f[3] for f in report.failed)
    rows = methods.read_csv(out / "results.csv")
    assert len(rows) == 4 and all(r["setting"] == "steps=4;val_every=2;precision=config;cache=float16" for r in rows)
    kd = [r for r in rows if r["method"] == methods.REFERENCE]
    assert all(r["gap_closed"] == pytest.approx(0.02 / (0.9 - 0.7 - 0.01 * r["seed"])) for r in kd)
    spans = [tuple(map(float, line.split())) for line in times.read_text().splitlines()]
    assert len(spans) == 6
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most <= 2, "more processes than --parallel at once"
    for command in commands:  # each child runs one run with the parent's setting and its caches
        assert command[1].endswith("methods.py") and "--parallel" not in command
        assert ["--val-every", "2", "--accelerator", "auto", "--devices", "1", "--steps", "4"] == command[12:20]
        assert command[command.index("--cache-root") + 1] == str((out / "runs" / "teacher_cache").resolve())
        assert str(out.resolve() / "runs" / "parts") in command[command.index("--out") + 1]

    monkeypatch.delenv("STUB_FAIL")
    again = methods.main(argv, tasks={"tiny": task})
    assert sorted(again.ran) == [("tiny", "other", 0), ("tiny", "other", 1)] and len(again.skipped) == 4
    assert len(methods.read_csv(out / "results.csv")) == 6


def test_parallel_needs_a_positive_count(methods, tmp_path):
    with pytest.raises(SystemExit, match="--parallel must be at least 1"):
        methods.main(["--parallel", "0", "--out", str(tmp_path)], tasks=methods.TASKS)
