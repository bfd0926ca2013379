"""AD-KD (Wu et al., ACL 2023, arXiv:2305.10010): integrated gradients against brute force,
completeness, top-K views, padding, the matching loss by hand, and where gradients go."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kd_lightning import StudentSpec, TeacherSpec
from kd_lightning.losses import CrossEntropy
from kd_lightning.methods import ADKDModule, AttributionLoss
from kd_lightning.methods.adkd import ATTRIBUTIONS, integrated_gradients, pad_baseline
from kd_lightning.outputs import ModelOutputs

SMALL_STUDENT = StudentSpec(config_overrides={"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 20})


class TinyEncoder(nn.Module):
    """Embedding -> tanh(linear) -> masked mean -> linear head: small enough to differentiate by hand-rolled loops."""

    def __init__(self, vocab: int = 11, width: int = 5, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def encode(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(z.dtype)
        h = torch.tanh(self.mix(z)) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.encode(self.embeddings(input_ids), attention_mask))


def tiny_inputs() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 4, 7, 2, 9], [3, 5, 8, 0, 0]])
    return {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}


def brute_force_ig(model: TinyEncoder, ids: torch.Tensor, cls: int, steps: int) -> torch.Tensor:
    """IG of log p_cls for one unpadded example: a loop over the Riemann points, zero baseline."""
    x = model.embeddings(ids[None]).detach()
    mask = torch.ones(1, ids.shape[0], dtype=torch.long)
    total = torch.zeros_like(x)
    for k in range(1, steps + 1):
        z = (k / steps * x).requires_grad_(True)
        f = torch.log_softmax(model.encode(z, mask), -1)[0, cls]
        (grad,) = torch.autograd.grad(f, z)
        total += grad
    return (x * total / steps)[0]


@pytest.mark.parametrize("steps", [1, 5])
def test_integrated_gradients_match_a_brute_force_loop(steps):
    model = TinyEncoder().double().eval()
    inputs = tiny_inputs()
    result = integrated_gradients(model, model.embeddings, inputs, steps=steps)
    assert result.attributions.shape == (2, 3, 5, 5) and result.targets.tolist() == [[0, 1, 2]] * 2
    assert not result.attributions.requires_grad
    for b, length in ((0, 5), (1, 3)):
        for c in range(3):
            expected = brute_force_ig(model, inputs["input_ids"][b, :length], c, steps)
            torch.testing.assert_close(result.attributions[b, c, :length], expected, rtol=1e-9, atol=1e-12)
        # padded positions get nothing: the model ignores them
        assert torch.equal(result.attributions[b, :, length:], torch.zeros_like(result.attributions[b, :, length:]))
    torch.testing.assert_close(result.logits, model(**inputs).logits)
    assert all(p.grad is None for p in model.parameters())


def test_completeness_sums_approach_the_score_difference_as_steps_grow(tiny_bert):
    from transformers import BertForSequenceClassification, BertTokenizerFast

    model = BertForSequenceClassification.from_pretrained(tiny_bert).double().eval()
    # A freshly initialised BERT has zero biases: every layer is then homogeneous in its input and
    # LayerNorm makes f(alpha x) constant for alpha > 0, with a jump at the zero baseline. Random
    # biases (and a classifier with larger weights) give a smooth path, as in a trained model.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name == "classifier.weight":
                param.copy_(
                    torch.randn(param.shape, generator=g, dtype=param.dtype) * (0.5 if name.endswith("bias") else 1.0)
                )
    tokenizer = BertTokenizerFast.from_pretrained(tiny_bert)
    inputs = dict(tokenizer(["the movie was good fun", "bad"], padding=True, return_tensors="pt"))

    def zero_embeddings(module, args, output):
        return torch.zeros_like(output)

    handle = model.bert.embeddings.register_forward_hook(zero_embeddings)
    with torch.no_grad():
        at_baseline = torch.log_softmax(model(**inputs).logits, -1)
    handle.remove()
    with torch.no_grad():
        at_input = torch.log_softmax(model(**inputs).logits, -1)
    difference = at_input - at_baseline  # (batch, classes): what the attributions must add up to

    assert difference.abs().max() > 0.05
    errors = []
    for steps in (4, 32):
        ig = integrated_gradients(model, model.bert.embeddings, inputs, steps=steps).attributions
        errors.append((ig.sum((-1, -2)) - difference).abs().max().item())
    # the right Riemann sum's error shrinks like 1 / m: 8 times the steps, about an eighth of the error
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.25 * difference.abs().max().item()


def test_completeness_holds_tightly_on_a_smooth_model():
    model = TinyEncoder().double().eval()
    with torch.no_grad():
        model.mix.bias.normal_(0.0, 1.0)
        model.head.weight.mul_(5.0)
    inputs = tiny_inputs()
    at_input = torch.log_softmax(model(**inputs).logits, -1)
    at_baseline = torch.log_softmax(
        model.encode(torch.zeros(2, 5, 5, dtype=torch.float64), inputs["attention_mask"]), -1
    )
    difference = (at_input - at_baseline).detach()
    assert difference.abs().max() > 0.1
    ig = integrated_gradients(model, model.embeddings, inputs, steps=400).attributions
    torch.testing.assert_close(ig.sum((-1, -2)), difference, rtol=0, atol=2e-3 * difference.abs().max().item())


def test_top_k_views_are_the_teachers_best_classes_and_the_student_reuses_them():
    teacher, student = TinyEncoder(seed=1).double().eval(), TinyEncoder(width=4, seed=2).double().eval()
    inputs = tiny_inputs()
    t = integrated_gradients(teacher, teacher.embeddings, inputs, steps=3, targets=2)
    expected = teacher(**inputs).logits.topk(2, -1).indices
    assert torch.equal(t.targets, expected)
    s = integrated_gradients(student, student.embeddings, inputs, steps=3, targets=t.targets)
    assert torch.equal(s.targets, t.targets) and s.attributions.shape == (2, 2, 5, 4)
    for b, length in ((0, 5), (1, 3)):
        for v in range(2):
            cls = int(t.targets[b, v])
            ig = brute_force_ig(student, inputs["input_ids"][b, :length], cls, 3)
            torch.testing.assert_close(s.attributions[b, v, :length], ig, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="classes=4 views, but the model has 3 classes"):
        integrated_gradients(teacher, teacher.embeddings, inputs, targets=4)


def hand_map(ig: torch.Tensor, length: int, top: int | None = None) -> torch.Tensor:
    """One (seq, width) IG to its normalised token map, by loops."""
    values = []
    for pos in range(ig.shape[0]):
        row = ig[pos].abs().sort(descending=True).values[:top] if top else ig[pos]
        values.append(float(row.square().sum()) ** 0.5 if pos < length else 0.0)
    a = torch.tensor(values, dtype=torch.float64)
    return a / float(a.square().sum()) ** 0.5


@pytest.mark.parametrize("top", [None, 2])
def test_matching_loss_equals_a_hand_computation(top):
    g = torch.Generator().manual_seed(0)
    t_ig, s_ig = (
        torch.randn(2, 2, 4, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64),
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    lengths = (4, 2)
    student = ModelOutputs(logits=torch.zeros(2, 2), features={ATTRIBUTIONS: s_ig}, attention_mask=mask)
    teacher = ModelOutputs(logits=torch.zeros(2, 2), features={ATTRIBUTIONS: t_ig}, attention_mask=mask)
    l2, squares, tokens = 0.0, 0.0, 0
    for b in range(2):
        tokens += lengths[b]
        for v in range(2):
            diff = hand_map(t_ig[b, v], lengths[b], top) - hand_map(s_ig[b, v], lengths[b])
            l2 += float(diff.square().sum()) ** 0.5 / 2
            squares += float(diff.square().sum())
    assert AttributionLoss(teacher_dims=top, distance="l2")(student, teacher, {}).item() == pytest.approx(l2, rel=1e-10)
    assert AttributionLoss(teacher_dims=top, distance="mse")(student, teacher, {}).item() == pytest.approx(
        squares / tokens, rel=1e-10
    )
    # whatever sits at padded positions does not count
    noisy = s_ig.clone()
    noisy[1, :, 2:] = 100.0
    noisy_student = ModelOutputs(logits=torch.zeros(2, 2), features={ATTRIBUTIONS: noisy}, attention_mask=mask)
    assert AttributionLoss(teacher_dims=top)(noisy_student, teacher, {}).item() == pytest.approx(l2, rel=1e-10)
    t_map, s_map = AttributionLoss().maps(noisy_student, teacher, mask)
    assert torch.equal(s_map[1, :, 2:], torch.zeros(2, 2, dtype=torch.float64))
    torch.testing.assert_close(s_map.norm(dim=-1), torch.ones(2, 2, dtype=torch.float64))


def test_identical_maps_give_zero_with_a_finite_gradient():
    ig = torch.randn(2, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    outputs = ModelOutputs(logits=torch.zeros(2, 2), features={ATTRIBUTIONS: ig}, attention_mask=torch.ones(2, 3))
    value = AttributionLoss()(outputs, ModelOutputs(logits=torch.zeros(2, 2), features={ATTRIBUTIONS: ig.detach()}), {})
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    value.backward()
    assert torch.isfinite(ig.grad).all()


def adkd_module(teacher, **kwargs) -> ADKDModule:
    return ADKDModule(teacher=TeacherSpec(str(teacher)), student=SMALL_STUDENT, **kwargs)


def text_batch(module: ADKDModule, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = dict(module.tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.arange(len(texts)) % 2
    return batch


def test_gradients_flow_to_the_student_and_not_to_the_teachers_weights(tiny_bert):
    module = adkd_module(tiny_bert, steps=2, losses=[CrossEntropy()])
    batch = text_batch(module, ["the movie was good", "awful plot", "a great film but too long"])
    teacher, student = module.attribution_outputs(batch)
    assert not teacher.features[ATTRIBUTIONS].requires_grad and not teacher.logits.requires_grad
    assert student.features[ATTRIBUTIONS].requires_grad and student.logits.requires_grad
    assert (
        teacher.features[ATTRIBUTIONS].shape[:3]
        == student.features[ATTRIBUTIONS].shape[:3]
        == (3, 2, batch["input_ids"].shape[1])
    )
    torch.testing.assert_close(
        teacher.logits, module.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    )
    term = module.loss_terms(student, teacher, batch)["attribution"]
    assert torch.isfinite(term) and term > 0
    term.backward()  # the attribution term alone
    assert all(p.grad is None for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    for name in (
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "classifier.weight",
    ):
        grad = module.student.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_padding_leaves_an_examples_map_unchanged(tiny_bert):
    module = adkd_module(tiny_bert, steps=2).eval()
    alone = text_batch(module, ["the film was good"])
    padded = text_batch(module, ["the film was good", "a really very long and boring story with bad acting"])
    length = alone["input_ids"].shape[1]
    maps = []
    for batch in (alone, padded):
        teacher, student = module.attribution_outputs(batch)
        maps.append(module.attribution_loss.maps(student, teacher, batch["attention_mask"]))
    for single, batched in zip(maps[0], maps[1], strict=True):
        torch.testing.assert_close(batched[0, :, :length], single[0], rtol=1e-4, atol=1e-6)
        assert torch.equal(batched[0, :, length:], torch.zeros_like(batched[0, :, length:]))


def test_pad_baseline_is_the_embedding_of_pad_tokens(tiny_bert):
    module = adkd_module(tiny_bert)
    batch = text_batch(module, ["good film", "bad"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    base = pad_baseline(module.teacher, module.teacher.bert.embeddings, inputs, 0)
    pads = torch.zeros_like(inputs["input_ids"])
    with torch.no_grad():
        expected = module.teacher.bert.embeddings(input_ids=pads, token_type_ids=inputs["token_type_ids"])
    torch.testing.assert_close(base, expected)
    # with that baseline the views still run and give attributions of the same shape
    pad_module = adkd_module(tiny_bert, baseline="pad", classes=1)
    teacher, student = pad_module.attribution_outputs(batch)
    assert teacher.features[ATTRIBUTIONS].shape[:2] == (2, 1) and torch.isfinite(student.features[ATTRIBUTIONS]).all()


def test_settings_are_checked_with_the_fix_named(tiny_bert):
    with pytest.raises(ValueError, match="classes=3 but the task has 2"):
        adkd_module(tiny_bert, classes=3)
    with pytest.raises(ValueError, match="steps must be a positive number"):
        adkd_module(tiny_bert, steps=0)
    with pytest.raises(ValueError, match="baseline must be 'zeros' or 'pad'"):
        adkd_module(tiny_bert, baseline="uniform")
    with pytest.raises(ValueError, match="embeddings 'bert.embedding' is not a module of the teacher.*bert.embeddings"):
        adkd_module(tiny_bert, embeddings="bert.embedding")
    outputs = ModelOutputs(logits=torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="kd_lightning.methods.ADKDModule"):
        AttributionLoss()(outputs, outputs, {})


def test_the_students_passes_use_the_math_attention_kernel(tiny_bert):
    """Fused attention kernels (flash, memory-efficient) have no second derivative, so on a GPU
    ``create_graph`` through them fails; the student's IG passes must run the math kernel, the
    teacher's (first order only) may use any."""
    module = adkd_module(tiny_bert, steps=2, losses=[CrossEntropy()])
    seen: dict[str, list[tuple[bool, bool, bool]]] = {"teacher": [], "student": []}

    def recorder(side: str):
        def hook(*_: object) -> None:
            seen[side].append(
                (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                 torch.backends.cuda.math_sdp_enabled())
            )  # fmt: skip
        return hook

    handles = [module.teacher.register_forward_hook(recorder("teacher")), module.student.register_forward_hook(recorder("student"))]
    module.attribution_outputs(text_batch(module, ["the movie was good", "awful plot"]))
    for handle in handles:
        handle.remove()
    assert len(seen["student"]) == 2 and all(flags == (False, False, True) for flags in seen["student"])
    assert seen["teacher"] and all(flags[:2] == (True, True) for flags in seen["teacher"])
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()  # restored
