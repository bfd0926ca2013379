"""GenerationEvaluator: the ROUGE-L it logs is torchmetrics' ROUGE-L of the model's greedy generations."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from causal_helpers import instruction_rows
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.text.rouge import ROUGEScore
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_lightning.callbacks import GenerationEvaluator
from kd_lightning.causal import CausalLMDistillModule
from kd_lightning.data import InstructionDataModule
from kd_lightning.losses import KLDivergence, NextTokenCrossEntropy
from kd_lightning.models import StudentSpec, TeacherSpec

pytest_plugins = ("causal_fixtures",)


def parrot_llama(source: Path, target: Path, word: str) -> Path:
    """``source`` rewired so that greedy decoding says ``word`` at every step: the blocks add
    nothing to the residual stream and every embedding points one way, ``word``'s being the longest."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.get_input_embeddings().weight
        direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(0))
        scales = torch.ones(embeddings.shape[0])
        tokenizer = AutoTokenizer.from_pretrained(source)
        scales[tokenizer.convert_tokens_to_ids(word)] = 2.0
        embeddings.copy_(scales[:, None] * direction[None, :])
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def direct_rouge_l(model, data: InstructionDataModule, num_prompts: int, max_new_tokens: int, word: str) -> float:
    tokenizer = data.tokenizer
    rows = data.datasets["validation"].select(range(num_prompts))
    predictions, was_training = [], model.training
    for prompt in rows["prompt_input_ids"]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.eval().generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        predictions.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    assert any(word in p for p in predictions)
    return float(ROUGEScore(rouge_keys="rougeL")(predictions, list(rows["reference"]))["rougeL_fmeasure"])


def test_logged_rouge_l_matches_torchmetrics_on_the_generations(tiny_llama, instruction_files, tmp_path):
    references = " ".join(row["output"] for row in instruction_rows(6, 1)).split()
    word = max(set(references), key=references.count)  # the validation references' commonest word
    teacher = parrot_llama(tiny_llama, tmp_path / "parrot_llama", word)
    losses = [NextTokenCrossEntropy(), KLDivergence(temperature=1.0, chunk_size=8)]
    module = CausalLMDistillModule(TeacherSpec(str(teacher)), StudentSpec(from_teacher_layers=[1]), losses)
    data = InstructionDataModule(data_files=instruction_files, tokenizer=str(teacher), max_length=40, batch_size=4)
    data.setup("fit")
    evaluator = GenerationEvaluator(num_prompts=6, max_new_tokens=5, batch_size=4, num_samples=2)
    before = direct_rouge_l(module.student, data, 6, 5, word)
    teacher_score = direct_rouge_l(module.teacher, data, 6, 5, word)
    assert before > 0
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="gen")
    trainer = pl.Trainer(
        max_steps=2, val_check_interval=2, limit_val_batches=1, logger=logger, callbacks=[evaluator],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    after = direct_rouge_l(module.student, data, 6, 5, word)

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    student_curve = [(e.step, e.value) for e in events.Scalars("val/rougeL")]
    assert student_curve[0] == (0, pytest.approx(before, abs=1e-6))
    assert len(student_curve) == 2 and student_curve[-1][1] == pytest.approx(after, abs=1e-6)  # start; the validation
    assert events.Scalars("val/teacher/rougeL")[0].value == pytest.approx(teacher_score, abs=1e-6)
    assert evaluator.scores == pytest.approx({"teacher": teacher_score, "student_before": before, "student_after": after})
    text = events.Tensors("val/generations/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.count("**generated**") == 2 and word in text
    assert module.teacher_metrics["val/teacher/rougeL"] == pytest.approx(teacher_score)
    assert (Path(logger.log_dir) / "generation.json").is_file()
