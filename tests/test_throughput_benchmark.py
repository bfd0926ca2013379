"""benchmarks/throughput.py on a tiny BERT: every contender trains on the same batches, and the report is written.

Timings are not asserted (the machines are shared); the benchmark's own checks are: the same
batches in the same order for every contender, every student parameter changed, the Lightning
runs made the requested optimiser steps, and the objectives agree in value and gradient. The
command line is run with local split files and a teacher folder, in bfloat16 autocast on the CPU
and, where a GPU is present, in quick mode on CUDA with the memory probes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import load_benchmark


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return load_benchmark("throughput")


@pytest.fixture(scope="module")
def tiny_bert_fp16(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT saved in float16 (its config says ``dtype: float16``, so it loads in float16)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert_fp16")
    BertForSequenceClassification.from_pretrained(tiny_bert).half().save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def tiny_config(throughput: ModuleType, teacher: Path, files: dict[str, str], root: Path, contenders: list[str]):
    return throughput.BenchConfig(
        teacher=str(teacher),
        dataset=None,
        data_files=files,
        max_length=16,
        batch_size=8,
        student_layers=[1],
        warmup_steps=0,
        steps=2,
        repeats=1,
        memory_steps=0,
        cache_root=str(root / "cache"),
        contenders=contenders,
    )


def assert_trained(result: dict) -> None:
    for name, row in result["contenders"].items():
        total = row["changed_parameter_tensors"].split("/")[1]
        assert row["changed_parameter_tensors"] == f"{total}/{total}", name
        assert len(row["samples_per_s"]) == result["config"]["repeats"] and min(row["samples_per_s"]) > 0
    assert result["objective_check"]["gradients_equal"]


def test_every_contender_trains_and_the_report_is_written(throughput, tiny_bert, tiny_csv, tmp_path):
    names = [n for n in throughput.CONTENDERS if n not in ("torchdistill_live", "lightning_live_graphs")]  # next tests
    config = tiny_config(throughput, tiny_bert, tiny_csv, tmp_path, names)
    result = throughput.benchmark(config, command="pytest", memory=False, log=lambda line: None)

    assert list(result["contenders"]) == names
    assert_trained(result)
    assert result["contenders"]["lightning_live"]["optimizer_steps"] == 2
    assert result["contenders"]["lightning_minimal"]["optimizer_steps"] == 2
    assert {r["pair"] for r in result["ratios"]} == {"b'/b", "a/b", "c/d", "a/e", "c/e", "a/g", "g/b"}
    assert list((tmp_path / "cache").iterdir()), "the cached contender built its teacher cache"

    md, js = throughput.write_report(result, tmp_path / "results")
    assert "| a | `lightning_live` |" in md.read_text()
    assert json.loads(js.read_text())["config"]["steps"] == 2


def test_torchdistill_contender_trains(throughput, tiny_bert, tiny_csv, tmp_path):
    try:
        throughput.import_torchdistill()
    except ImportError as err:
        pytest.skip(str(err))
    config = tiny_config(throughput, tiny_bert, tiny_csv, tmp_path, ["lightning_live", "torchdistill_live"])
    result = throughput.benchmark(config, command="pytest", memory=False, log=lambda line: None)
    assert_trained(result)
    assert [r["pair"] for r in result["ratios"]] == ["a/f"]


def tiny_command(tiny_bert: Path, tiny_csv: dict[str, str], root: Path) -> list[str]:
    """The command-line options that point the benchmark at the tiny model, the tiny split files and ``root``."""
    folder = Path(tiny_csv["train"]).parent
    return [
        *("--teacher", str(tiny_bert), "--student-layers", "1", "--data-files", str(folder)),
        *("--cache-root", str(root / "cache"), "--out-dir", str(root / "results")),
    ]


def test_a_float16_teacher_folder_trains_in_float32(throughput, tiny_bert_fp16, tiny_csv, tmp_path):
    config = tiny_config(throughput, tiny_bert_fp16, tiny_csv, tmp_path, ["lightning_live"])
    teacher, student = throughput.teacher_and_student(config)
    contender = throughput.LightningLive(config)
    contender.prepare(data=None)  # a Lightning contender prepares its own data module
    contender.tmp.cleanup()
    dtypes = {p.dtype for model in (teacher, student, contender.module, contender.module.teacher) for p in model.parameters()}
    assert dtypes == {torch.float32}


def test_command_line_with_data_files_teacher_folder_and_bf16(throughput, tiny_bert_fp16, tiny_csv, tmp_path):
    contenders = ["lightning_live", "hand_live", "textbrewer_live"]
    short = ["--batch-size", "8", "--max-length", "16", "--warmup-steps", "0", "--steps", "2", "--repeats", "1"]
    argv = tiny_command(tiny_bert_fp16, tiny_csv, tmp_path) + short + ["--memory-steps", "0", "--precision", "bf16-mixed"]
    result = throughput.main(argv + ["--contenders", *contenders])

    assert list(result["contenders"]) == contenders and result["skipped"] == {}
    assert_trained(result)
    config = result["config"]
    assert (config["dataset"], config["device"], config["precision"]) == (None, "cpu", "bf16-mixed")
    assert config["data_files"] == {split: str(Path(path).resolve()) for split, path in tiny_csv.items()}
    assert result["train_rows"] == 96
    report = (tmp_path / "results" / "throughput.md").read_text()
    assert f"local files in {Path(tiny_csv['train']).resolve().parent} (train.csv, validation.csv, test.csv)" in report
    assert "Device: cpu; precision: bf16-mixed" in report
    assert "BertForSequenceClassification, 2 layers; weights stored as float16, upcast to float32 for every contender" in report
    assert "peak RSS MB" in report and "bf16-mixed: Lightning precision='bf16-mixed'" in report


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cuda"], "--device cuda: torch"),
        (["--data-files", "{empty}"], "no train.parquet / train.csv; no validation.parquet / validation.csv"),
        (["--contenders", "hand_live", "torchdistill_live"], "contender torchdistill_live was asked for, but torchdistill"),
        (["--profile", "torchdistill_live"], "contender torchdistill_live was asked for, but torchdistill"),
    ],
)
def test_settings_that_cannot_be_measured_are_refused(throughput, monkeypatch, capsys, tmp_path, argv, message):
    def no_torchdistill() -> None:
        raise ImportError("torchdistill cannot be imported (no module named 'torchdistill')")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(throughput, "import_torchdistill", no_torchdistill)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        throughput.main([a.format(empty=tmp_path / "empty") for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_contenders_whose_library_is_missing_are_skipped_unless_named(throughput, monkeypatch):
    def no_torchdistill() -> None:
        raise ImportError("torchdistill cannot be imported (no module named 'torchdistill')")

    monkeypatch.setattr(throughput, "import_torchdistill", no_torchdistill)
    config = throughput.BenchConfig()
    names, skipped = throughput.resolve_contenders(None, config)
    assert names == [n for n in throughput.CONTENDERS if n not in ("torchdistill_live", "lightning_live_graphs")]
    assert skipped == {
        "torchdistill_live": "torchdistill cannot be imported (no module named 'torchdistill')",
        "lightning_live_graphs": "CUDA graphs need --device cuda",
    }
    assert throughput.resolve_contenders(["hand_live"], config) == (["hand_live"], {})
    with pytest.raises(ValueError, match="unknown contenders"):
        throughput.resolve_contenders(["hand_loop"], config)
    with pytest.raises(ValueError, match="contender lightning_live_graphs was asked for, but CUDA graphs need --device cuda"):
        throughput.resolve_contenders(["lightning_live_graphs"], config)
    cuda = dataclasses.replace(config, device="cuda")
    assert "lightning_live_graphs" in throughput.resolve_contenders(None, cuda)[0]


def test_memory_probe_on_the_cpu_reports_resident_memory(throughput, tiny_bert, tiny_csv, tmp_path):
    config = tiny_config(throughput, tiny_bert, tiny_csv, tmp_path, ["hand_live"])
    config.memory_steps = 1
    probe = throughput.memory_probe(config, "hand_live")
    assert set(probe) == {"after_imports_mb", "after_setup_mb", "peak_rss_mb"}
    assert 0 < probe["after_imports_mb"] <= probe["after_setup_mb"] <= probe["peak_rss_mb"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_mode_on_cuda_with_memory_probes(throughput, tiny_bert, tiny_csv, tmp_path):
    argv = ["--quick", "--device", "cuda", "--precision", "bf16-mixed"] + tiny_command(tiny_bert, tiny_csv, tmp_path)
    result = throughput.main(argv)

    assert_trained(result)
    steps = 2 + 3 * 5  # --quick: 2 warm-up steps, 3 repeats of 5 steps
    assert result["contenders"]["lightning_live"]["optimizer_steps"] == steps
    graphs = result["contenders"]["lightning_live_graphs"]["teacher_graphs"]
    assert graphs["replays"] + graphs["eager"] == steps and 1 <= graphs["captured"] <= graphs["replays"]
    assert {"h/b", "h/a"} <= {r["pair"] for r in result["ratios"]}
    assert result["environment"]["cuda"]["device"] == torch.cuda.get_device_name()
    assert set(result["memory"]) == {"baseline", *result["contenders"]}
    for name in result["contenders"]:
        assert 0 < result["memory"][name]["cuda_after_setup_mb"] <= result["memory"][name]["cuda_peak_mb"], name
    report = (tmp_path / "results" / "throughput.md").read_text()
    assert f"Device: cuda, {torch.cuda.get_device_name()}" in report
    assert "| peak CUDA MB |" in report and "CUDA: the pacer calls torch.cuda.synchronize()" in report


def test_the_variants_of_the_live_step_train_and_are_reported(tiny_bert, tiny_csv, tmp_path):
    """``throughput_variants.py``: a without the non-finite check, a without logging, the hand loop
    with a mid-step synchronisation; each trains, and its ratio to the hand loop is reported."""
    variants = load_benchmark("throughput_variants")
    tp = variants.tp
    names = ["lightning_live", "live_nocheck", "live_nolog", "hand_live", "hand_sync", "lightning_cache"]
    config = tiny_config(tp, tiny_bert, tiny_csv, tmp_path, names)
    result = tp.benchmark(config, command="pytest", memory=False, log=lambda line: None)
    assert_trained(result)
    assert {"a1/b", "a2/b", "b2/b", "a/c", "a/b"} <= {r["pair"] for r in result["ratios"]}
    module = tp.CONTENDERS["live_nolog"](config).make_module()  # no self.log call at all
    logged = []
    module.log = lambda name, *args, **kwargs: logged.append(name)
    batch = dict(module.tokenizer(["a good film", "a dull plot"], return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([1, 0])
    assert torch.isfinite(module.training_step(batch, 0)) and logged == []
