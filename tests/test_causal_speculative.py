"""Speculative KD: the teacher replaces exactly the student proposals outside its top-K."""

from __future__ import annotations

import torch

from kd_lightning.causal.speculative import (
    SpeculativeKDModule,
    interleaved_sampling,
    is_speculative_step,
    speculative_tokens,
    with_responses,
)
from kd_lightning.data import InstructionDataModule
from kd_lightning.data.instruction import positions_from_mask
from kd_lightning.losses import KLDivergence, NextTokenCrossEntropy
from kd_lightning.models import StudentSpec, TeacherSpec

pytest_plugins = ("causal_fixtures",)


def test_proposals_outside_the_teachers_top_k_are_replaced_on_a_fixed_example():
    teacher_logits = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # top-2 {0, 1}: proposal 1 kept
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # top-2 {5, 4}: proposal 0 replaced by the argmax 5
            [1.0, 9.0, 1.0, 8.0, 1.0, 1.0],  # top-2 {1, 3}: proposal 3 kept
            [2.0, 2.0, 9.0, 2.0, 7.0, 2.0],  # top-2 {2, 4}: proposal 3 replaced by 2
        ]
    )
    proposed = torch.tensor([1, 0, 3, 3])
    tokens, replaced = speculative_tokens(proposed, teacher_logits, top_k=2, replacement="greedy")
    assert tokens.tolist() == [1, 5, 3, 2]
    assert replaced.tolist() == [False, True, False, True]
    # sampled replacements come from the teacher's distribution; kept proposals are never resampled
    peaked = teacher_logits * 50
    generator = torch.Generator().manual_seed(0)
    tokens, replaced = speculative_tokens(proposed, peaked, top_k=2, replacement="sample", generator=generator)
    assert tokens.tolist() == [1, 5, 3, 2] and replaced.tolist() == [False, True, False, True]
    tokens, replaced = speculative_tokens(proposed, teacher_logits, top_k=6, replacement="greedy")
    assert tokens.tolist() == proposed.tolist() and not replaced.any()


def test_interleaved_sampling_keeps_student_tokens_inside_the_top_k_and_replaces_the_rest(tiny_llama, instruction_files):
    top_k = 12
    torch.manual_seed(3)  # a randomly initialised student, so that it disagrees with the teacher
    student_spec = StudentSpec(config_overrides={"num_hidden_layers": 1, "tie_word_embeddings": False})
    module = SpeculativeKDModule(TeacherSpec(str(tiny_llama)), student_spec, [KLDivergence(temperature=1.0)], top_k=top_k)
    data = InstructionDataModule(data_files=instruction_files, tokenizer=str(tiny_llama), max_length=40, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    tokenizer = module.tokenizer
    student, teacher = module.student.eval(), module.teacher
    sample = interleaved_sampling(
        student, teacher, batch["prompt_input_ids"], batch["prompt_attention_mask"], max_new_tokens=6, top_k=top_k,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=module.num_labels,
        proposal="greedy", replacement="greedy",
    )  # fmt: skip
    full = with_responses(batch, sample, tokenizer.pad_token_id)
    inputs = {k: full[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        teacher_logits, student_logits = teacher(**inputs).logits, student(**inputs).logits
    prompt_length = batch["prompt_input_ids"].shape[1]
    verdicts = []
    for row in range(sample.tokens.shape[0]):
        for step in range(int(sample.lengths[row])):
            position = prompt_length + step - 1  # the logits that predict this token
            token = int(sample.tokens[row, step])
            top = teacher_logits[row, position].topk(top_k).indices.tolist()
            proposal = int(student_logits[row, position].argmax())
            replaced = bool(sample.replaced[row, step])
            assert token in top
            assert replaced == (proposal not in top)
            assert token == (int(teacher_logits[row, position].argmax()) if replaced else proposal)
            verdicts.append(replaced)
    assert any(verdicts) and not all(verdicts), "the example should have kept and replaced proposals"
    assert (full["labels"][:, :prompt_length] == -100).all()
    assert int((full["labels"] != -100).sum()) == int(sample.lengths.sum())
    assert torch.equal(full["position_ids"], positions_from_mask(full["attention_mask"]))


def test_the_mix_spreads_speculative_steps_evenly():
    assert [is_speculative_step(s, 0.25) for s in range(8)] == [False, False, False, True] * 2
    assert all(is_speculative_step(s, 1.0) for s in range(5))
    assert not any(is_speculative_step(s, 0.0) for s in range(5))
    assert sum(is_speculative_step(s, 0.3) for s in range(100)) == 30


def test_a_speculative_training_step_distils_on_the_mixed_sequence(tiny_llama, instruction_files):
    losses = [NextTokenCrossEntropy(weight=0.5), KLDivergence(temperature=1.0, chunk_size=3)]
    module = SpeculativeKDModule(
        TeacherSpec(str(tiny_llama)), StudentSpec(from_teacher_layers=[0, 2]), losses, top_k=2, max_new_tokens=5,
        student_fraction=0.5,
    )  # fmt: skip
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    data = InstructionDataModule(data_files=instruction_files, tokenizer=str(tiny_llama), max_length=40, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.training_step(batch, 0).backward()  # step 0 of a 0.5 mix: the data's responses
    assert logged["train/speculative/step"] == 0.0 and "train/speculative/replaced" not in logged
    module.student.zero_grad()
    module._trainer = None
    type(module).global_step = property(lambda self: 1)  # step 1: interleaved samples
    try:
        loss = module.training_step(batch, 1)
    finally:
        del type(module).global_step
    loss.backward()
    assert logged["train/speculative/step"] == 1.0 and 0.0 <= logged["train/speculative/replaced"] <= 1.0
    assert 1.0 <= logged["train/speculative/response_tokens"] <= 5.0
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in module.student.parameters() if p.grad is not None)
