"""The GLUE and sentiment configs parse (``--print_config``), agree with their tasks, and run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY_TEXT_DATA, fit_config

from kd_lightning.cli import main
from kd_lightning.data import GLUE_TASKS, SENTIMENT_SETS, GlueDataModule

pytest_plugins = ("data_fixtures",)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    str(p.relative_to(REPO))
    for folder in ("configs/glue", "configs/sentiment")
    for p in (REPO / folder).rglob("*.yaml")
)


def printed_config(path: str, capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / path), "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_task_has_a_teacher_and_a_student_config():
    names = {Path(p).stem for p in CONFIGS}
    assert set(GLUE_TASKS) | set(SENTIMENT_SETS) | {"amazon_snippets_3class"} <= names
    for task in GLUE_TASKS:
        assert f"configs/glue/{task}.yaml" in CONFIGS and f"configs/glue/teacher/{task}.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_print_config(path, capsys):
    config = printed_config(path, capsys)
    name = Path(path).stem
    data = config["data"]["init_args"]
    is_teacher = "/teacher/" in path
    model = config["model"]
    assert model["class_path"] == ("kd_lightning.FineTuneModule" if is_teacher else "kd_lightning.DistillModule")
    labels = model["init_args"]["num_labels"] if is_teacher else model["init_args"]["teacher"]["num_labels"]
    if path.startswith("configs/glue/"):
        assert config["data"]["class_path"] == "kd_lightning.data.GlueDataModule" and data["task"] == name
        assert labels == {"stsb": 1, "mnli": 3}.get(name, 2)
        monitor = GlueDataModule(name).monitor
        checkpoints = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        if monitor != "val/acc":  # the task's own checkpoint, first so that ExportHF exports its best
            assert checkpoints and checkpoints[0]["init_args"]["monitor"] == monitor
            assert config["trainer"]["callbacks"].index(checkpoints[0]) == 0
        if not is_teacher:
            assert model["init_args"]["student"]["from_teacher_layers"] == [0, 1, 2, 3, 4, 5]
    elif name in SENTIMENT_SETS:
        assert config["data"]["class_path"] == "kd_lightning.data.SentimentDataModule" and data["dataset"] == name
        assert labels == (5 if name == "amazon_stars" else 2)
    else:
        assert data["dataset"] == f"packaged/{name}" and labels == 3


def test_print_config_through_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "kd_lightning", "fit", "--config", "configs/glue/mnli.yaml", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert yaml.safe_load(result.stdout)["data"]["init_args"]["task"] == "mnli"


def run_glue_config(task: str, encoder: Path) -> None:
    fit_config(REPO / f"configs/glue/{task}.yaml", encoder, *TINY_TEXT_DATA)


def test_a_glue_config_runs_end_to_end(hub, tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_glue_config("cola", tiny_encoder)
    assert (tmp_path / "runs/glue/cola/student/config.json").is_file()
    assert list((tmp_path / "runs/glue/cola/student").parent.glob("**/best-mcc-*.ckpt"))


def test_the_stsb_config_runs_end_to_end(hub, tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_glue_config("stsb", tiny_encoder)
    assert (tmp_path / "runs/glue/stsb/student/config.json").is_file()
