"""bf16-mixed on CPU: the models run under autocast, every loss in float32 outside it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import csv_datamodule, distill_module, quiet_trainer
from test_losses_classes import ALL_LOSSES, build, example

from kd_lightning import DistillModule
from kd_lightning.outputs import ModelOutputs


def upcast(outputs: ModelOutputs) -> ModelOutputs:
    return ModelOutputs(logits=outputs.logits.float(), features={k: v.float() for k, v in outputs.features.items()})


def to_device(outputs: ModelOutputs, device: str) -> ModelOutputs:
    return ModelOutputs(logits=outputs.logits.to(device), features={k: v.to(device) for k, v in outputs.features.items()})


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=cuda),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=cuda),
]


@pytest.mark.parametrize("device,dtype", AUTOCASTS)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_loss_terms_compute_every_loss_in_float32_under_autocast(name, device, dtype):
    """Through ``DistillModule.loss_terms`` on half-precision model outputs inside autocast, each
    loss is finite, float32, and equal to the same loss on the float32-upcast outputs outside
    autocast: nothing in it ran in half precision (bf16 on CPU and CUDA, fp16 on CUDA)."""
    loss = build(name).float().to(device)
    student, teacher, batch = example(batch=8, dtype=dtype, seed=5)
    student, teacher = to_device(student, device), to_device(teacher, device)
    batch = {key: value.to(device) for key, value in batch.items()}
    holder = SimpleNamespace(losses=[loss])
    with torch.autocast(device, dtype=dtype):
        value = DistillModule.loss_terms(holder, student, teacher, batch)[loss.name]
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, loss(upcast(student), upcast(teacher), batch))


def test_bf16_mixed_fit_with_kd_and_a_feature_loss(tiny_bert, tiny_csv, tmp_path):
    module = distill_module(tiny_bert)  # cross-entropy + KL divergence + projected MSE on taps
    seen: list[tuple[torch.dtype, dict[str, torch.dtype]]] = []
    loss_terms = module.loss_terms

    def recording_loss_terms(student, teacher, batch):
        terms = loss_terms(student, teacher, batch)
        assert all(torch.isfinite(t) for t in terms.values()), terms
        seen.append((student.logits.dtype, {k: t.dtype for k, t in terms.items()}))
        return terms

    module.loss_terms = recording_loss_terms
    student_before = [p.detach().clone() for p in module.student.parameters()]
    trainer = quiet_trainer(tmp_path, precision="bf16-mixed", max_steps=4)
    trainer.fit(module, datamodule=csv_datamodule(tiny_csv))

    assert len(seen) == 4
    for logits_dtype, term_dtypes in seen:
        # (the tapped layer ends in a LayerNorm, which autocast keeps in float32)
        assert logits_dtype == torch.bfloat16, "the models ran under bf16 autocast"
        assert set(term_dtypes.values()) == {torch.float32}, term_dtypes
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters(), strict=True))
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and torch.isfinite(
        trainer.callback_metrics["val/loss"]
    )
