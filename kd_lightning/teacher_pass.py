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

from kd_lightning.taps import FeatureTaps, TapSpec


@dataclass
class PassBatch:
    """One batch of a pass: the batch itself, the model's logits and the reduced tap features."""

    batch: Mapping[str, Any]
    logits: Tensor
    features: dict[str, Tensor]


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
    loader = DataLoader(dataset.with_format("torch"), batch_size=batch_size, shuffle=False, collate_fn=collate)
    was_training = model.training
    model.eval()
    try:
        with Progress() as progress:
            task = progress.add_task(f"{description} ({len(dataset)} examples)", total=len(dataset))
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                model_taps.clear()
                logits = model(**model_inputs(batch)).logits
                yield PassBatch(batch, logits, model_taps.collect(batch.get("attention_mask")))
                progress.advance(task, logits.shape[0])
    finally:
        model_taps.remove()
        model.train(was_training)


def training_split(datamodule: Any) -> tuple[Any, Callable]:
    """The tokenised training split of a kd_lightning data module and its padding collator."""
    from transformers import DataCollatorWithPadding

    if getattr(datamodule, "datasets", {}).get("train") is None:
        datamodule.setup("fit")
    return datamodule.datasets["train"], DataCollatorWithPadding(datamodule.tokenizer)
