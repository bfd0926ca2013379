"""One pass of a frozen model over a data split, with a progress bar: the shared loop behind
teacher caches and precomputed teacher statistics (class means, LELP subspaces)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning.outputs import ModelOutputs
from kd_lightning.taps import FeatureTaps, TapSpec


@dataclass
class PassBatch:
    """One batch of a pass: the batch itself, the model's logits and the reduced tap features."""

    batch: Mapping[str, Any]
    logits: Tensor
    features: dict[str, Tensor]


def _device_batches(
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
    batch_size: int,
    device: torch.device,
    description: str,
) -> Iterator[dict[str, Any]]:
    """``dataset`` in order, in collated batches moved to ``device``, advancing a progress bar."""
    loader = DataLoader(dataset.with_format("torch"), batch_size=batch_size, shuffle=False, collate_fn=collate)
    with Progress() as progress:
        task = progress.add_task(f"{description} ({len(dataset)} examples)", total=len(dataset))
        for batch in loader:
            yield {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            progress.advance(task, len(next(v for v in batch.values() if isinstance(v, Tensor))))


@torch.no_grad()
def model_pass(
    model: nn.Module,
    taps: Mapping[str, TapSpec],
    owner: str,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
    batch_size: int = 64,
    description: str = "Teacher pass",
) -> Iterator[PassBatch]:
    """Run ``model`` (in eval mode, no gradients) over ``dataset`` in order, yielding each batch's
    logits and the ``owner``'s taps. Hooks are removed and the training mode restored after."""
    from kd_lightning.training import model_inputs

    model_taps = FeatureTaps(model, taps, owner)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in _device_batches(dataset, collate, batch_size, device, description):
            model_taps.clear()
            logits = model(**model_inputs(batch)).logits
            yield PassBatch(batch, logits, model_taps.collect(batch.get("attention_mask")))
    finally:
        model_taps.remove()
        model.train(was_training)


@torch.no_grad()
def outputs_pass(
    outputs: Callable[[Mapping[str, Any]], ModelOutputs],
    model: nn.Module,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
    batch_size: int,
    description: str = "Teacher pass",
) -> Iterator[tuple[Mapping[str, Any], ModelOutputs]]:
    """``(batch, outputs(batch))`` over ``dataset`` in order, ``model`` in eval mode and no gradients.

    ``outputs`` is the forward pass a training step runs (e.g. a module's live teacher outputs,
    with its own taps and masks), so that what a pass stores is what a step would have seen.
    The training mode of ``model`` is restored after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in _device_batches(dataset, collate, batch_size, device, description):
            yield batch, outputs(batch)
    finally:
        model.train(was_training)


def training_split(datamodule: Any) -> tuple[Any, Callable]:
    """The tokenised training split of a kd_lightning data module and the collator of its
    training batches (its ``collator()``; else dynamic padding of the tokenizer fields)."""
    if getattr(datamodule, "datasets", {}).get("train") is None:
        datamodule.setup("fit")
    if callable(getattr(datamodule, "collator", None)):
        return datamodule.datasets["train"], datamodule.collator()
    from transformers import DataCollatorWithPadding

    return datamodule.datasets["train"], DataCollatorWithPadding(datamodule.tokenizer)
