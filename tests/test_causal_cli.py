"""Causal-LM distillation end to end through the command line: fit, log, evaluate generations, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_cli import scalars
from transformers import AutoModelForCausalLM

from kd_lightning.cli import main

pytest_plugins = ("causal_fixtures",)


def test_fit_a_causal_student_through_the_cli(tiny_llama, instruction_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "kd_lightning.causal.CausalLMDistillModule",
            "init_args": {
                "teacher": {"name_or_path": str(tiny_llama)},
                "student": {"from_teacher_layers": [0, 2]},
                "taps": {
                    "t": {"module": "teacher", "path": "model.layers.2", "reduce": "tokens"},
                    "s": {"module": "student", "path": "model.layers.1", "reduce": "tokens"},
                },
                "losses": [
                    {"class_path": "kd_lightning.losses.NextTokenCrossEntropy", "init_args": {"weight": 0.5, "chunk_size": 16}},
                    {"class_path": "kd_lightning.losses.ReverseKLDivergence", "init_args": {"temperature": 1.0, "chunk_size": 16}},
                    {"class_path": "kd_lightning.losses.Procrustes", "init_args": {"student": "s", "teacher": "t", "weight": 0.1}},
                ],
                "optim": {"lr": 1.0e-3},
            },
        },
        "data": {
            "class_path": "kd_lightning.data.InstructionDataModule",
            "init_args": {"data_files": instruction_files, "max_length": 40, "batch_size": 8, "padding_side": "left"},
        },
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "lm"}},
            "callbacks": [
                {"class_path": "kd_lightning.callbacks.GenerationEvaluator", "init_args": {"num_prompts": 4, "max_new_tokens": 4}},
                {"class_path": "kd_lightning.callbacks.ExportHF", "init_args": {"dirpath": "student_export"}},
            ],
        },
    }
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", "lm.yaml"])

    run = Path("runs/lm/version_0")
    logged = scalars(str(run))
    for tag in ("train/loss/next_token_cross_entropy", "train/loss/reverse_kl_divergence", "train/loss/procrustes",
                "val/nll", "val/ppl", "val/teacher/nll", "val/rougeL", "val/teacher/rougeL"):  # fmt: skip
        assert tag in logged, f"{tag} not logged; logged: {sorted(logged)}"
    assert logged["val/ppl"][-1] == pytest.approx(2.718281828 ** logged["val/nll"][-1], rel=1e-4)
    record = json.loads((run / "generation.json").read_text())
    assert set(record["rougeL"]) == {"teacher", "student_before", "student_after"}
    assert list(run.glob("checkpoints/best-*.ckpt")), "the checkpoint follows val/nll"
    student = AutoModelForCausalLM.from_pretrained("student_export")
    assert student.config.num_hidden_layers == 2


REPO = Path(__file__).resolve().parents[1]
CAUSAL_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "causal_lm").glob("*.yaml"))


@pytest.mark.parametrize("path", CAUSAL_CONFIGS)
def test_causal_configs_parse(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / path), "--print_config"])
    assert exit_info.value.code in (None, 0)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]["init_args"]
    assert model["class_path"].startswith("kd_lightning.causal.")
    assert config["data"]["class_path"] == "kd_lightning.data.InstructionDataModule"
    if "opt" in path:
        assert data["dataset"] == "databricks/databricks-dolly-15k" and data["template"] == "plain"
        assert model["init_args"]["teacher"]["name_or_path"].startswith("facebook/opt-")
    else:
        assert data["dataset"] == "packaged/alpaca_eval"
        assert model["init_args"]["teacher"]["name_or_path"] == "SmolLM2-135M-Instruct"
