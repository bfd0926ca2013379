"""Teacher and student must share a vocabulary; padded output layers are truncated only on request."""

from __future__ import annotations

import re

import pytest
from causal_helpers import tiny_tokenizer, write_tiny_llama

from kd_lightning.causal import CausalLMDistillModule, VocabularyMismatchError
from kd_lightning.losses import KLDivergence, NextTokenCrossEntropy
from kd_lightning.models import StudentSpec, TeacherSpec

pytest_plugins = ("causal_fixtures",)


def causal_module(teacher: str, student: StudentSpec, **kwargs) -> CausalLMDistillModule:
    losses = [NextTokenCrossEntropy(), KLDivergence(temperature=1.0, chunk_size=4)]
    return CausalLMDistillModule(TeacherSpec(teacher), student, losses, **kwargs)


def test_different_tokenizers_fail_at_start_up_naming_both(tiny_llama, tmp_path):
    other = write_tiny_llama(tmp_path / "other_family", layers=1, extra_words=("zebra", "yak"))
    with pytest.raises(VocabularyMismatchError) as err:
        causal_module(str(tiny_llama), StudentSpec(name_or_path=str(other)))
    message = str(err.value)
    size = len(tiny_tokenizer())
    assert "different tokenizers" in message
    assert re.search(rf"teacher {re.escape(str(tiny_llama))} \(tokenizer \w+ with {size} tokens, {size} output logits\)", message)
    assert re.search(rf"student {re.escape(str(other))} \(tokenizer \w+ with {size + 2} tokens, {size + 2} output logits\)", message)
    assert "from_teacher_layers" in message


def test_padded_vocabularies_need_truncate_vocab(tiny_llama, tmp_path):
    padded = write_tiny_llama(tmp_path / "padded", layers=1, vocab_padding=8, seed=1)
    size = len(tiny_tokenizer())
    with pytest.raises(VocabularyMismatchError, match=rf"set truncate_vocab: true .*first {size} logits") as err:
        causal_module(str(tiny_llama), StudentSpec(name_or_path=str(padded)))
    assert f"{size} output logits" in str(err.value) and f"{size + 8} output logits" in str(err.value)

    module = causal_module(str(tiny_llama), StudentSpec(name_or_path=str(padded)), truncate_vocab=True)
    assert module.num_labels == size
    assert module.student.get_output_embeddings().weight.shape[0] == size + 8  # the student keeps its own head
    batch = {
        "input_ids": module.tokenizer(["say hello", "what is a cat"], padding=True, return_tensors="pt")["input_ids"],
    }
    batch["attention_mask"] = batch["input_ids"] != module.tokenizer.pad_token_id
    batch["labels"] = batch["input_ids"].masked_fill(~batch["attention_mask"], -100)
    outputs = module.student_outputs(batch)
    assert outputs.logits.shape[-1] == size
    module.log = lambda *args, **kwargs: None
    loss = module.training_step(batch, 0)
    loss.backward()
    assert module.student.get_output_embeddings().weight.grad[size:].abs().sum() == 0


def test_an_output_layer_smaller_than_the_tokenizer_is_refused(tmp_path):
    teacher = write_tiny_llama(tmp_path / "teacher", layers=1, vocab_padding=8)
    size = len(tiny_tokenizer())
    student = StudentSpec(config_overrides={"vocab_size": size - 2})
    with pytest.raises(VocabularyMismatchError, match=rf"does not cover the tokenizer.*vocab_size: {size + 8}"):
        causal_module(str(teacher), student, truncate_vocab=True)


def test_a_class_level_cross_entropy_is_refused_for_language_models(tiny_llama):
    from kd_lightning.losses import CrossEntropy

    with pytest.raises(ValueError, match="NextTokenCrossEntropy"):
        CausalLMDistillModule(TeacherSpec(str(tiny_llama)), StudentSpec(from_teacher_layers=[0]), [CrossEntropy()])
