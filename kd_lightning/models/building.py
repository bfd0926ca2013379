"""Building teachers and students: HF Auto* loading, layer selection and config shrinking."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kd_lightning.models.packaged import resolve_model_path


@dataclass
class TeacherSpec:
    """Where the teacher comes from.

    Args:
        name_or_path: a hub name, a local HF folder, or a packaged model key
            (``all-MiniLM-L6-v2``).
        num_labels: the number of classes; defaults to the checkpoint's own.
    """

    name_or_path: str
    num_labels: int | None = None


@dataclass
class StudentSpec:
    """How the student is built. Exactly one source, optionally with config overrides.

    Args:
        name_or_path: a pretrained checkpoint (hub name, local folder or packaged key).
        from_teacher_layers: copy the teacher and keep these transformer layers, in order
            (DistilBERT-style initialisation), e.g. ``[0, 5]``.
        config_overrides: start from the teacher's config (or ``name_or_path``'s) with these
            fields replaced, e.g. ``{num_hidden_layers: 2, hidden_size: 256}``; weights are
            randomly initialised.
    """

    name_or_path: str | None = None
    from_teacher_layers: list[int] | None = None
    config_overrides: dict[str, Any] | None = None


def load_config(name_or_path: str, **overrides: Any) -> PretrainedConfig:
    return AutoConfig.from_pretrained(resolve_model_path(name_or_path), **overrides)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def load_classifier(name_or_path: str, num_labels: int | None = None) -> PreTrainedModel:
    """A sequence classifier; ``num_labels`` must agree with a fine-tuned checkpoint's head."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    has_head = _checkpoint_has_classifier(path)
    if num_labels is not None and has_head and config.num_labels != num_labels:
        raise ValueError(
            f"{name_or_path} has a trained classification head with {config.num_labels} labels, "
            f"but num_labels={num_labels} was asked for. Use num_labels: {config.num_labels}, "
            "or start from the base encoder instead of this fine-tuned folder."
        )
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def _checkpoint_has_classifier(path: str) -> bool:
    """Whether a local folder was saved from a sequence classifier (its head is trained)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    config = AutoConfig.from_pretrained(path)
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of transformer blocks: the longest list of identical block types."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the transformer layer list of {type(model).__name__}")
    return best


def student_from_teacher_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of the teacher keeping ``layers`` of its transformer stack (weights copied)."""
    stack_path, stack = find_layer_stack(teacher)
    bad = [i for i in layers if not 0 <= i < len(stack)]
    if not layers or bad:
        raise ValueError(
            f"from_teacher_layers={layers}: the teacher has layers 0..{len(stack) - 1}; "
            f"{'list at least one' if not layers else f'{bad} are out of range'}."
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    student = type(teacher)(config)
    pattern = re.compile(rf"^{re.escape(stack_path)}\.(\d+)\.(.*)$")
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in renumber:
            state[f"{stack_path}.{renumber[int(match.group(1))]}.{match.group(2)}"] = value
    student.load_state_dict(state, strict=True)
    return student


def copied_student(spec: StudentSpec, teacher: PreTrainedModel | None) -> PreTrainedModel | None:
    """The student copied from the teacher's layers when ``spec`` asks for it
    (``from_teacher_layers``), else ``None``; checks that ``spec`` names one source."""
    sources = [spec.name_or_path is not None, spec.from_teacher_layers is not None]
    if sum(sources) > 1:
        raise ValueError("student: give either name_or_path or from_teacher_layers, not both")
    if spec.from_teacher_layers is None:
        return None
    if teacher is None:
        raise ValueError("student.from_teacher_layers needs a teacher")
    if spec.config_overrides:
        raise ValueError(
            "student: config_overrides cannot be combined with from_teacher_layers "
            "(copied weights fix the widths); choose layers, or override the config for a random init"
        )
    return student_from_teacher_layers(teacher, list(spec.from_teacher_layers))


def build_headless_student(
    spec: StudentSpec, teacher: PreTrainedModel, load: Callable[[str], PreTrainedModel], auto_class: Any
) -> PreTrainedModel:
    """The student described by ``spec`` for models with no label head to fit (causal LMs,
    encoders): chosen teacher layers (weights copied), a checkpoint (``load(name_or_path)``), or
    the teacher's config (or ``name_or_path``'s) with ``config_overrides`` as a randomly
    initialised ``auto_class`` model."""
    copied = copied_student(spec, teacher)
    if copied is not None:
        return copied
    overrides = dict(spec.config_overrides or {})
    if spec.name_or_path is not None and not overrides:
        return load(spec.name_or_path)
    config = load_config(spec.name_or_path) if spec.name_or_path is not None else copy.deepcopy(teacher.config)
    return model_from_config(config, overrides, auto_class)


def build_student(spec: StudentSpec, teacher: PreTrainedModel | None, num_labels: int) -> PreTrainedModel:
    """The student described by ``spec``; the teacher supplies config and weights where asked."""
    copied = copied_student(spec, teacher)
    if copied is not None:
        return copied
    overrides = dict(spec.config_overrides or {})
    if spec.name_or_path is not None and not overrides:
        path = resolve_model_path(spec.name_or_path)
        own_labels = AutoConfig.from_pretrained(path).num_labels
        if _checkpoint_has_classifier(path) and own_labels != num_labels:
            raise ValueError(
                f"teacher and student have different label counts: teacher {num_labels}, student {own_labels} "
                f"({spec.name_or_path} has a trained head). Start the student from a base encoder or a "
                f"checkpoint with {num_labels} labels."
            )
        return load_classifier(spec.name_or_path, num_labels)
    if spec.name_or_path is not None:
        config = load_config(spec.name_or_path, num_labels=num_labels)
    elif teacher is not None:
        config = copy.deepcopy(teacher.config)
        config.num_labels = num_labels
    else:
        raise ValueError("student: give name_or_path, from_teacher_layers or config_overrides with a teacher")
    return model_from_config(config, overrides, AutoModelForSequenceClassification)


def model_from_config(config: PretrainedConfig, overrides: dict[str, Any], auto_class: Any) -> PreTrainedModel:
    """A randomly initialised ``auto_class`` model (``AutoModelForSequenceClassification``,
    ``AutoModelForCausalLM``) of ``config`` with the fields in ``overrides`` replaced."""
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ValueError(f"student.config_overrides: {type(config).__name__} has no field(s) {unknown}")
    for key, value in overrides.items():
        setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list) and "num_hidden_layers" in overrides:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    try:
        return auto_class.from_config(config)
    except Exception as err:  # widths that do not divide, etc.
        raise ValueError(f"student.config_overrides {overrides} give an invalid {type(config).__name__}: {err}") from err


def check_shared_vocabulary(tokenizer: PreTrainedTokenizerBase, student: PreTrainedModel, student_source: str | None) -> None:
    """The student reads the input ids of the teacher's tokenizer: its embeddings must hold every
    id, and a student loaded from a folder with its own tokenizer must share that vocabulary."""
    rows = student.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the teacher's tokenizer has {len(tokenizer)} tokens but the student's input embeddings hold {rows}: "
            "teacher and student must share one vocabulary. Start the student from the teacher "
            "(from_teacher_layers, or config_overrides without vocab_size) or from a checkpoint with the teacher's tokenizer."
        )
    if student_source is None:
        return
    try:
        own = load_tokenizer(student_source).get_vocab()
    except (OSError, ValueError, TypeError, KeyError):  # a checkpoint saved without a tokenizer
        return
    vocab = tokenizer.get_vocab()
    if own != vocab:
        differ = sorted(t for t in vocab.keys() | own.keys() if vocab.get(t) != own.get(t))
        example = ([t for t in differ if t in vocab and t in own] or differ)[0]
        ids = ["absent" if i is None else f"id {i}" for i in (vocab.get(example), own.get(example))]
        raise ValueError(
            f"teacher and student use different tokenizers: {len(differ)} token(s) differ, e.g. {example!r} is "
            f"{ids[0]} for the teacher and {ids[1]} for the student ({student_source}). The "
            "student reads the teacher's input ids, so both need one vocabulary: pick a student checkpoint of the "
            "teacher's family, or build it from the teacher (from_teacher_layers or config_overrides)."
        )


def max_input_length(model: nn.Module) -> int | None:
    """The longest input, in tokens, that the model's learned position embeddings cover (RoBERTa's
    offset of ``padding_idx + 1`` taken off); ``None`` for models without such a table."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    if not isinstance(positions, nn.Embedding):
        return None
    offset = positions.padding_idx + 1 if positions.padding_idx is not None else 0
    return positions.num_embeddings - offset


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze(model: nn.Module) -> nn.Module:
    """No gradients and eval mode, in place."""
    model.requires_grad_(False)
    model.eval()
    return model


@torch.no_grad()
def parameter_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer, for bit-identity checks and cache keys."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
