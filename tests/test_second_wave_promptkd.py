"""PromptKD: the soft prompt in front of the frozen teacher, its objectives, its gradient and its checkpoint."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import fit_config, quiet_trainer
from test_cli import scalars

from kd_lightning import StudentSpec, TapSpec, TeacherSpec
from kd_lightning.causal import PromptKDModule
from kd_lightning.causal.module import response_token_mask
from kd_lightning.causal.promptkd import prompt_init_ids, sample_responses
from kd_lightning.data import InstructionDataModule
from kd_lightning.data.instruction import positions_from_mask

pytest_plugins = ("causal_fixtures",)

REPO = Path(__file__).resolve().parents[1]
INIT_TEXT = "please answer the question"  # four words of the tiny tokenizer


def promptkd(teacher: Path, **kwargs) -> PromptKDModule:
    kwargs.setdefault("prompt_init_text", INIT_TEXT)
    kwargs.setdefault("max_new_tokens", 5)
    return PromptKDModule(TeacherSpec(str(teacher)), StudentSpec(from_teacher_layers=[0, 2]), **kwargs)


def first_batch(files: dict[str, str], teacher: Path, split: str = "validation", **kwargs) -> dict[str, torch.Tensor]:
    data = InstructionDataModule(data_files=files, tokenizer=str(teacher), max_length=40, batch_size=4, **kwargs)
    data.setup("fit")
    loader = data.train_dataloader() if split == "train" else data.val_dataloader()
    return next(iter(loader))


@pytest.fixture(scope="module")
def module(tiny_llama) -> PromptKDModule:
    return promptkd(tiny_llama, prompt_length=6)


def test_the_prompt_starts_as_the_embeddings_of_its_init_text(module):
    ids = module.tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and module.tokenizer.unk_token_id not in ids
    expected = module.teacher.get_input_embeddings().weight[torch.tensor(ids + ids[:2])]
    assert module.soft_prompt.length == 6
    torch.testing.assert_close(module.soft_prompt.weight, expected, rtol=0, atol=0)
    assert prompt_init_ids([5, 6, 7], None) == [5, 6, 7]
    assert prompt_init_ids([5, 6, 7], 2) == [5, 6]
    assert prompt_init_ids([5, 6, 7], 7) == [5, 6, 7, 5, 6, 7, 5]
    with pytest.raises(ValueError, match="prompt_init_text gives no tokens"):
        prompt_init_ids([], 4)
    # the prompt is the only new trainable tensor; the teacher stays frozen and out of the state dict
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert "soft_prompt.weight" in module.state_dict()
    assert not any(k.startswith("teacher.") for k in module.state_dict())


def manual_prompted_logits(module: PromptKDModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[theta; E(x)]`` through the teacher with the mask and positions extended by hand."""
    n, size = module.soft_prompt.length, batch["input_ids"].shape[0]
    embeds = module.teacher.get_input_embeddings()(batch["input_ids"])
    embeds = torch.cat([module.soft_prompt.weight.detach().unsqueeze(0).repeat(size, 1, 1), embeds], 1)
    mask = torch.cat([torch.ones(size, n, dtype=torch.long), batch["attention_mask"]], 1)
    positions = torch.cat([torch.arange(n).repeat(size, 1), batch["position_ids"] + n], 1)
    with torch.no_grad():
        logits = module.teacher(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    return logits[:, n:]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_prompted_teacher_logits_equal_manual_computations(module, tiny_llama, instruction_files, padding_side):
    batch = first_batch(instruction_files, tiny_llama, padding_side=padding_side)
    with torch.no_grad():
        prompted = module.prompted_teacher_outputs(batch)
    response = response_token_mask(batch["labels"])
    assert prompted.logits.shape == (*batch["input_ids"].shape, module.num_labels)
    torch.testing.assert_close(prompted.logits[response], manual_prompted_logits(module, batch)[response])
    # at initialisation the prompt is the init text's embeddings: the same as the text's tokens
    # in front of each sequence, run through the teacher alone, without padding
    ids = module.tokenizer(INIT_TEXT, add_special_tokens=False)["input_ids"]
    prefix = torch.tensor(ids + ids[:2])
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        tokens = torch.cat([prefix, batch["input_ids"][row][real]])
        with torch.no_grad():
            alone = module.teacher(input_ids=tokens[None]).logits[0, len(prefix) :]
        torch.testing.assert_close(
            prompted.logits[row][real][response[row][real]], alone[response[row][real]], atol=1e-5, rtol=1e-5
        )
    # the prompt changes the teacher's predictions
    with torch.no_grad():
        plain = module.teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
    assert not torch.allclose(plain[response], prompted.logits[response])


def kl_rows(learner: torch.Tensor, target: torch.Tensor) -> float:
    """``1/n sum_rows KL(softmax(learner) || softmax(target))`` in float64 with loops."""
    total = 0.0
    for a, b in zip(learner.double(), target.double(), strict=True):
        za, zb = [math.exp(v) for v in (a - a.max()).tolist()], [math.exp(v) for v in (b - b.max()).tolist()]
        pa, pb = [z / sum(za) for z in za], [z / sum(zb) for z in zb]
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pa, pb, strict=True))
    return total / learner.shape[0]


def test_the_prompt_objectives_match_a_hand_computation(module, tiny_llama, instruction_files):
    batch = first_batch(instruction_files, tiny_llama)
    response = response_token_mask(batch["labels"])
    with torch.no_grad():
        prompted, student = module.prompted_teacher_outputs(batch), module.student_outputs(batch)
        plain = module.teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    terms = module.prompt_terms(prompted, student, batch, regularizer_weight=1.0)
    q = prompted.logits[response]
    assert terms["prompt_student"].item() == pytest.approx(kl_rows(q, student.logits[response]), rel=1e-4)
    # the regulariser: the prompted teacher against the un-prompted one, non-zero at the text init
    expected = kl_rows(q, plain[response])
    assert terms["prompt_regularizer"].item() == pytest.approx(expected, rel=1e-4) and expected > 0
    assert set(module.prompt_terms(prompted, student, batch, regularizer_weight=0.0)) == {"prompt_student"}
    # forward divergence: KL(p || q)
    forward = promptkd(tiny_llama, prompt_length=6, prompt_divergence="forward")
    forward.soft_prompt.load_state_dict(module.soft_prompt.state_dict())
    terms = forward.prompt_terms(prompted, student, batch, regularizer_weight=1.0)
    assert terms["prompt_regularizer"].item() == pytest.approx(kl_rows(plain[response], q), rel=1e-4)


def test_the_regulariser_weight_decays_linearly_over_the_run(module):
    assert module.current_regularizer_weight() == 1.0  # outside a fit
    try:
        for step, expected in ((0, 1.0), (5, 0.5), (10, 0.0), (12, 0.0)):
            module._trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=step)
            assert module.current_regularizer_weight() == pytest.approx(expected)
        module.regularizer_schedule = "constant"
        assert module.current_regularizer_weight() == 1.0
    finally:
        module._trainer = None
        module.regularizer_schedule = "linear"


@pytest.mark.parametrize("responses", ["data", "student"])
def test_only_the_prompt_gets_a_gradient_on_the_teacher_side(tiny_llama, instruction_files, responses):
    module = promptkd(tiny_llama, responses=responses)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    batch = first_batch(instruction_files, tiny_llama, split="train")
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    grad = module.soft_prompt.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    student_grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert student_grads and all(torch.isfinite(g).all() for g in student_grads)
    assert {"train/loss/reverse_kl_divergence", "train/loss/prompt_student", "train/loss/prompt_regularizer"} <= set(
        logged
    )
    assert logged["train/loss"] == pytest.approx(
        logged["train/loss/student"] + logged["train/loss/prompt_student"] + logged["train/loss/prompt_regularizer"],
        rel=1e-5,
    )
    if responses == "student":
        assert 1.0 <= logged["train/promptkd/response_tokens"] <= 5.0
    # the two updates stay apart: the student's loss sends nothing to the prompt, the prompt's nothing to the student
    module.zero_grad()
    prompted, student = module.prompted_teacher_outputs(batch), module.student_outputs(batch)
    module.prompt_terms(prompted, student, batch, 1.0)["prompt_student"].backward()
    assert all(p.grad is None for p in module.student.parameters())
    module.soft_prompt.weight.grad = None
    with torch.no_grad():
        target = module.prompted_teacher_outputs(batch)
    student = module.student_outputs(batch)
    module.losses[0](student, target, batch).backward()
    assert module.soft_prompt.weight.grad is None
    groups = module.parameter_groups()
    assert any(module.soft_prompt.weight is p for g in groups for p in g["params"])


def test_sampled_responses_end_at_the_end_token_and_repeat_with_the_seed(module, tiny_llama, instruction_files):
    batch = first_batch(instruction_files, tiny_llama)
    tokenizer = module.tokenizer
    args = (module.student.eval(), batch["prompt_input_ids"], batch["prompt_attention_mask"], 8, tokenizer.eos_token_id,
            tokenizer.pad_token_id, module.num_labels)  # fmt: skip
    first = sample_responses(*args, generator=torch.Generator().manual_seed(3))
    again = sample_responses(*args, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.lengths, again.lengths)
    for row, length in enumerate(first.lengths.tolist()):
        tokens = first.tokens[row].tolist()
        assert 1 <= length <= 8
        assert tokenizer.eos_token_id not in tokens[: length - 1]
        assert all(t == tokenizer.pad_token_id for t in tokens[length:])
    module.student.train()
    sampled, _ = module.sampled_batch(batch)
    assert torch.equal(sampled["position_ids"], positions_from_mask(sampled["attention_mask"]))
    prompt_width = batch["prompt_input_ids"].shape[1]
    assert (sampled["labels"][:, :prompt_width] == -100).all() and (sampled["labels"] != -100).any()


def test_the_prompt_is_saved_in_checkpoints_and_restored(tiny_llama, instruction_files, tmp_path):
    module = promptkd(tiny_llama, prompt_lr=1e-2, max_new_tokens=4)
    start = module.soft_prompt.weight.detach().clone()
    data = InstructionDataModule(data_files=instruction_files, max_length=40, batch_size=4)
    trainer = quiet_trainer(tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=1, enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    trained = module.soft_prompt.weight.detach().clone()
    assert not torch.allclose(trained, start), "the prompt trains"
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    assert torch.equal(torch.load(checkpoint, weights_only=True)["state_dict"]["soft_prompt.weight"], trained)
    restored = PromptKDModule.load_from_checkpoint(checkpoint)
    assert torch.equal(restored.soft_prompt.weight.detach(), trained)
    assert restored.soft_prompt.length == module.soft_prompt.length
    assert {"val/prompted_teacher/nll", "val/nll"} <= set(trainer.callback_metrics)


def test_bad_settings_fail_with_the_fix(tiny_llama):
    taps = {"t": TapSpec("teacher", "model.layers.1", "cls"), "s": TapSpec("student", "model.layers.1", "tokens")}
    with pytest.raises(ValueError, match="use reduce: tokens or mean"):
        promptkd(tiny_llama, taps=taps)
    with pytest.raises(ValueError, match="prompt_init_text gives no tokens"):
        promptkd(tiny_llama, prompt_init_text="")
    with pytest.raises(ValueError, match="responses must be 'student'"):
        promptkd(tiny_llama, responses="teacher")
    module = promptkd(tiny_llama)
    with pytest.raises(ValueError, match="cannot be cached; remove teacher_cache"):
        module.open_teacher_cache(None)


def test_the_quick_config_trains_a_few_steps_through_the_cli(tiny_llama, instruction_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kd_lightning"])
    fit_config(
        REPO / "configs/causal_lm/promptkd_quick.yaml", tiny_llama,
        "--model.init_args.max_new_tokens=4",
        "--model.init_args.prompt_chunk_size=16",
        "--data.init_args.max_length=40",
        "--data.init_args.max_prompt_length=20",
        "--data.init_args.max_train_samples=null",
        "--data.init_args.max_eval_samples=8",
        "--trainer.max_epochs=1",
        "--trainer.log_every_n_steps=1",
        layers="[0, 2]", data_files=instruction_files["train"], limit_val_batches=None,
    )  # fmt: skip
    logged = scalars("runs/causal_lm_promptkd_quick/version_0")
    for tag in ("train/loss/reverse_kl_divergence", "train/loss/prompt_student", "train/loss/prompt_regularizer",
                "train/weight/prompt_regularizer", "val/nll", "val/prompted_teacher/nll", "val/teacher/nll"):  # fmt: skip
        assert tag in logged, f"{tag} not logged; logged: {sorted(logged)}"
    assert logged["train/weight/prompt_regularizer"][0] == pytest.approx(1.0)
