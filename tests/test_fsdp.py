"""FSDP: the configuration builds on CPU; on a CUDA GPU the real run (sharded frozen teacher,
taps inside sharded blocks, bf16 / fp16 autocast, consolidated export) — those tests skip
without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import distill_module

from kd_lightning.cli import KDLightningCLI
from kd_lightning.strategies import DistillFSDPStrategy, transformer_block_classes

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "scale" / "fsdp.yaml"


def build_fsdp_cli(tiny_bert, tiny_csv, tmp_path, *extra: str) -> KDLightningCLI:
    """The shipped FSDP config with the tiny teacher and data swapped in, built but not run."""
    return KDLightningCLI(
        run=False,
        args=[
            "--config", str(CONFIG),
            f"--model.init_args.teacher.name_or_path={tiny_bert}",
            "--model.init_args.student.from_teacher_layers=[0, 1]",
            "--model.init_args.taps.t_last.path=bert.encoder.layer.1",
            "--data.init_args.dataset=null",
            f"--data.init_args.data_files={tiny_csv}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.callbacks.init_args.dirpath={tmp_path / 'export'}",
            *extra,
        ],
    )


def test_the_fsdp_config_builds_the_distillation_strategy(tiny_bert, tiny_csv, tmp_path):
    cli = build_fsdp_cli(tiny_bert, tiny_csv, tmp_path, "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32")
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DistillFSDPStrategy)
    assert strategy.wrap_blocks == "auto" and strategy.shard_teacher
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
    assert strategy.kwargs["use_orig_params"] is True
    module = cli.model
    blocks = {cls.__name__: cls for cls in transformer_block_classes([module, module.teacher])}
    assert set(blocks) == {"BertEmbeddings", "BertLayer"}, "the classes BERT declares as not splittable"
    assert {type(m) for m in module.student.bert.encoder.layer} == {blocks["BertLayer"]}
    # a CPU fit stops at once with the fix in the message, before any checkpoint is written
    with pytest.raises(RuntimeError, match="CUDA GPUs only.*strategy: ddp on CPU"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_wrap_block_names_are_checked(tiny_bert):
    module = distill_module(tiny_bert)
    [layer] = transformer_block_classes([module.student], ["BertLayer"])
    assert layer is type(module.student.bert.encoder.layer[0])
    with pytest.raises(ValueError, match=r"\['BertLayr'\].*Close matches: \['BertLayer'\]"):
        transformer_block_classes([module.student], ["BertLayr"])
    with pytest.raises(ValueError, match="found no transformer block class.*wrap_blocks: \\[BertLayer\\]"):
        transformer_block_classes([torch.nn.Sequential(torch.nn.Linear(2, 2))])
    with pytest.raises(ValueError, match="remove auto_wrap_policy"):
        DistillFSDPStrategy(auto_wrap_policy={torch.nn.Linear})


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP runs on CUDA GPUs only")


@pytest.fixture
def own_process_group():
    """The fit's process group ends with the test, so later single-device tests see none."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_fsdp_fit_shards_the_frozen_teacher_and_exports_the_student(tiny_bert, tiny_csv, tmp_path, precision, own_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForSequenceClassification

    cli = build_fsdp_cli(
        tiny_bert, tiny_csv, tmp_path, f"--trainer.precision={precision}", "--trainer.devices=1",
        "--trainer.max_steps=6", "--trainer.max_epochs=-1", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
    )
    module, trainer = cli.model, cli.trainer
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    terms: list[dict[str, float]] = []
    loss_terms = module.loss_terms

    def recording(student, teacher, batch):
        values = loss_terms(student, teacher, batch)
        terms.append({name: float(value.detach()) for name, value in values.items()})
        return values

    module.loss_terms = recording
    trainer.fit(module, datamodule=cli.datamodule)

    assert isinstance(module._teacher, FSDP) and trainer.strategy.teacher_is_sharded
    assert all(not p.requires_grad and p.grad is None for p in module._teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module._teacher.parameters()}, "no teacher parameter in the optimiser"
    assert len(terms) == 6 and all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in terms)
    assert all(t["projected_mse"] > 0 for t in terms), "the taps inside sharded blocks produced features"
    with FSDP.summon_full_params(module._teacher):
        after = module._teacher.module.state_dict()
        assert all(torch.equal(teacher_before[k].cpu(), after[k].cpu()) for k in teacher_before), "teacher frozen"

    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    student = {k.removeprefix("student."): v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    assert not any(k.startswith("_teacher") or k.startswith("teacher") for k in checkpoint["state_dict"])
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, student[name].float(), msg=f"exported {name} differs from the checkpoint")
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/acc"])))
