"""Token-level losses of causal LMs: response tokens only, next-token shift, chunked forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from causal_helpers import write_tiny_llama
from loss_testing import one_thread  # noqa: F401

from kd_lightning.causal.module import response_token_mask
from kd_lightning.losses import (
    BalancedDivergence,
    JSDivergence,
    KLDivergence,
    NextTokenCrossEntropy,
    ReverseKLDivergence,
    SkewKLDivergence,
    SkewReverseKLDivergence,
    TotalVariationDistance,
)
from kd_lightning.outputs import ModelOutputs

pytestmark = pytest.mark.usefixtures("one_thread")
T = 2.0


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.log()).sum())


def _balanced(p_s: torch.Tensor, p_t: torch.Tensor) -> float:
    w = 1.0 if _entropy(p_t) > _entropy(p_s) else 0.0
    return T * T * (w * _kl(p_t, p_s) + (1 - w) * _kl(p_s, p_t))


# loss class and its per-position value from the softened distributions (float64, no log-space tricks)
DIVERGENCES = {
    "kl": (lambda c: KLDivergence(temperature=T, chunk_size=c), lambda s, t: T * T * _kl(t, s)),
    "reverse_kl": (lambda c: ReverseKLDivergence(temperature=T, chunk_size=c), lambda s, t: T * T * _kl(s, t)),
    "js": (
        lambda c: JSDivergence(temperature=T, chunk_size=c),
        lambda s, t: T * T * 0.5 * (_kl(t, (s + t) / 2) + _kl(s, (s + t) / 2)),
    ),
    "skew_kl": (
        lambda c: SkewKLDivergence(skew=0.1, temperature=T, chunk_size=c),
        lambda s, t: _kl(t, 0.1 * t + 0.9 * s),
    ),
    "skew_reverse_kl": (
        lambda c: SkewReverseKLDivergence(skew=0.1, temperature=T, chunk_size=c),
        lambda s, t: _kl(s, 0.1 * s + 0.9 * t),
    ),
    "tvd": (lambda c: TotalVariationDistance(temperature=T, chunk_size=c), lambda s, t: 0.5 * float((t - s).abs().sum())),
    "balanced": (lambda c: BalancedDivergence(temperature=T, chunk_size=c), _balanced),
}


def lm_batch(seed: int = 0, batch: int = 3, length: int = 9, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher token logits and labels: prompts of 2..4 tokens, then a response, then padding."""
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    for row, (prompt, end) in enumerate([(2, 9), (4, 7), (3, 6)][:batch]):
        labels[row, :prompt] = -100
        labels[row, end:] = -100
    return student, teacher, labels


def loss_value(loss, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = response_token_mask(labels)
    outputs = ModelOutputs(logits=student, token_mask=mask)
    return loss(outputs, ModelOutputs(logits=teacher, token_mask=mask), {"labels": labels})


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_divergences_against_brute_force_on_response_tokens(name, chunk_size):
    make, per_position = DIVERGENCES[name]
    student, teacher, labels = lm_batch()
    values = []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] != -100:  # position i predicts the response token i + 1
                values.append(per_position(torch.softmax(student[b, i] / T, -1), torch.softmax(teacher[b, i] / T, -1)))
    expected = sum(values) / len(values)
    got = loss_value(make(chunk_size), student, teacher, labels)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_next_token_cross_entropy_against_brute_force_and_hugging_face(tmp_path):
    student, _, labels = lm_batch(seed=1)
    terms = [
        -math.log(float(torch.softmax(student[b, i], -1)[labels[b, i + 1]]))
        for b in range(labels.shape[0])
        for i in range(labels.shape[1] - 1)
        if labels[b, i + 1] != -100
    ]
    for chunk_size in (None, 3):
        got = NextTokenCrossEntropy(chunk_size=chunk_size)(ModelOutputs(logits=student), None, {"labels": labels})
        assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-10)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(write_tiny_llama(tmp_path / "lm"))
    ids = torch.randint(6, model.config.vocab_size, labels.shape, generator=torch.Generator().manual_seed(0))
    hf_labels = torch.where(labels == -100, labels, ids)
    output = model(input_ids=ids, labels=hf_labels)
    ours = NextTokenCrossEntropy(chunk_size=5)(ModelOutputs(logits=output.logits), None, {"labels": hf_labels})
    assert float(ours.detach()) == pytest.approx(float(output.loss.detach()), rel=1e-5)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunked_equals_unchunked_values_and_gradients(name):
    make, _ = DIVERGENCES[name]
    base_student, base_teacher, labels = lm_batch(seed=2)
    results = {}
    for chunk_size in (None, 1, 3, 100):
        student = base_student.clone().requires_grad_(True)
        teacher = base_teacher.clone().requires_grad_(True)  # an online teacher gets gradients too
        value = loss_value(make(chunk_size), student, teacher, labels)
        (0.7 * value).backward()
        results[chunk_size] = (value.detach(), student.grad, teacher.grad)
    reference = results.pop(None)
    for chunk_size, (value, grad_s, grad_t) in results.items():
        torch.testing.assert_close(value, reference[0], rtol=1e-12, atol=1e-14, msg=f"chunk_size={chunk_size}")
        torch.testing.assert_close(grad_s, reference[1], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grad_t, reference[2], rtol=1e-10, atol=1e-14)


def test_chunked_cross_entropy_gradients_equal_unchunked_in_float32():
    student, _, labels = lm_batch(seed=3)
    grads = []
    for chunk_size in (None, 2):
        logits = student.float().clone().requires_grad_(True)
        NextTokenCrossEntropy(chunk_size=chunk_size)(ModelOutputs(logits=logits), None, {"labels": labels}).backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_prompt_tokens_contribute_nothing(chunk_size):
    student, teacher, labels = lm_batch(seed=4)
    counted = response_token_mask(labels)
    changed_s, changed_t = student.clone(), teacher.clone()
    noise = 10 * torch.randn(student.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    changed_s[~counted] += noise[~counted]
    changed_t[~counted] -= noise[~counted]
    for name, (make, _) in DIVERGENCES.items():
        results = []
        for s, t in ((student, teacher), (changed_s, changed_t)):
            s = s.clone().requires_grad_(True)
            value = loss_value(make(chunk_size), s, t, labels) + NextTokenCrossEntropy(chunk_size)(
                ModelOutputs(logits=s), None, {"labels": labels}
            )
            value.backward()
            results.append((value.detach(), s.grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-14, msg=name)
        assert (results[0][1][~counted] == 0).all(), f"{name}: prompt and padding positions got gradient"


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_a_fully_masked_sequence_gives_no_nan(chunk_size):
    student, teacher, labels = lm_batch(seed=5)
    labels[1] = -100  # the second sequence has no response token at all
    for name, (make, _) in DIVERGENCES.items():
        s = student.clone().requires_grad_(True)
        value = loss_value(make(chunk_size), s, teacher, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all(), name
        assert (s.grad[1] == 0).all()
        without = loss_value(make(chunk_size), student[[0, 2]], teacher[[0, 2]], labels[[0, 2]])
        assert float(value.detach()) == pytest.approx(float(without), rel=1e-12), name
    labels[:] = -100  # nothing to learn in the whole batch: 0, with zero gradients
    for make, _ in DIVERGENCES.values():
        s = student.clone().requires_grad_(True)
        value = loss_value(make(chunk_size), s, teacher, labels)
        value.backward()
        assert float(value) == 0.0 and (s.grad == 0).all()


def test_a_chunked_loss_refuses_a_second_backward_through_the_same_graph():
    student, teacher, labels = lm_batch(seed=6)
    student.requires_grad_(True)
    value = loss_value(KLDivergence(chunk_size=2), student, teacher, labels)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice.*chunk_size: null"):
        value.backward()
