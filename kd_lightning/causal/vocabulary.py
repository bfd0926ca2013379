"""Teacher and student must share one vocabulary for token-level distillation.

Token-level losses compare ``p_t(. | y_<i)`` and ``p_s(. | y_<i)`` entry by entry, so entry ``k``
must be the same token for both models: the two tokenizers must map every token to the same id.
Models of one family often pad their output layer to a multiple of 8 or 64 rows beyond the
tokenizer's size (OPT: 50,272 rows for 50,265 tokens), and different sizes of a family may pad
differently; the rows beyond the tokenizer are never a real token, so comparing the first
``min(V_t, V_s)`` logits of both loses nothing. That truncation is allowed only when asked for
(``truncate_vocab: true``), so that a real mismatch is never hidden.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedTokenizerBase


class VocabularyMismatchError(ValueError):
    """Teacher and student do not give logits over the same tokens."""


def output_vocabulary_size(model: nn.Module) -> int:
    """The number of logits the model gives per position (its output layer's rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def _describe(role: str, name: str, tokenizer: PreTrainedTokenizerBase, vocab: int) -> str:
    return f"{role} {name} (tokenizer {type(tokenizer).__name__} with {len(tokenizer)} tokens, {vocab} output logits)"


def shared_vocabulary_size(
    teacher: nn.Module,
    student: nn.Module,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    truncate: bool,
    teacher_name: str = "teacher",
    student_name: str = "student",
) -> int:
    """The number of leading logits teacher and student share; raises when they do not share a vocabulary.

    Raises :class:`VocabularyMismatchError` when the tokenizers map tokens to different ids, when
    the output sizes differ and ``truncate`` is false, or when the smaller output layer does not
    cover every token of the tokenizer (truncation would cut real tokens).
    """
    teacher_vocab, student_vocab = output_vocabulary_size(teacher), output_vocabulary_size(student)
    teacher_side = _describe("teacher", teacher_name, teacher_tokenizer, teacher_vocab)
    student_side = _describe("student", student_name, student_tokenizer, student_vocab)
    if student_tokenizer is not teacher_tokenizer and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise VocabularyMismatchError(
            f"the teacher and the student use different tokenizers: {teacher_side}; {student_side}. Token-level "
            "distillation compares their distributions token by token, so both need the same tokenizer: take a "
            "student of the teacher's family (same tokenizer), or build it from the teacher "
            "(student: {from_teacher_layers: [...]} or {config_overrides: {...}})."
        )
    if teacher_vocab == student_vocab:
        return teacher_vocab
    shared = min(teacher_vocab, student_vocab)
    if shared < len(teacher_tokenizer):
        raise VocabularyMismatchError(
            f"the output vocabularies differ and the smaller one does not cover the tokenizer: {teacher_side}; "
            f"{student_side}. The first {shared} logits miss tokens {shared}..{len(teacher_tokenizer) - 1}; "
            "give the student an output layer of the teacher's size (config_overrides: {vocab_size: "
            f"{teacher_vocab}}})."
        )
    if not truncate:
        raise VocabularyMismatchError(
            f"the output vocabularies differ in size over the same tokenizer: {teacher_side}; {student_side}. The "
            f"rows beyond the tokenizer's {len(teacher_tokenizer)} tokens are padding; set truncate_vocab: true "
            f"(model.init_args.truncate_vocab) to compare the first {shared} logits of both."
        )
    return shared
