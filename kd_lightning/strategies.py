"""FSDP for distillation: the student sharded per transformer block, the frozen teacher sharded
in FSDP units of its own.

Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` wraps the LightningModule; the
teacher of a :class:`~kd_lightning.DistillModule` is not a registered submodule, so plain FSDP
would leave a full copy of it on every GPU. :class:`DistillFSDPStrategy` shards it as a separate
FSDP root with the same process group, auto-wrap policy and mixed-precision settings, so:

- the teacher's parameters are split across GPUs and gathered one block at a time during its
  forward pass (under ``no_grad``: no gradient buffers, no optimizer state);
- the FSDP units that hold trainable parameters (the student, loss-owned projections) never
  contain a teacher parameter, so the optimizer and the student's checkpoint never see one;
- taps keep working: their forward hooks sit on the original submodules, which FSDP runs
  unchanged inside its wrappers;
- under mixed precision the models' parameters are cast for the forward pass, but the loss
  modules' (projections) stay float32, since the losses compute in float32 outside autocast;
- checkpoints hold the student's full (consolidated) state dict by default
  (``state_dict_type: full``), and :class:`~kd_lightning.callbacks.ExportHF` writes it as a
  Hugging Face folder on rank 0.

The auto-wrap policy wraps every module whose class name is listed in ``wrap_blocks``; the
default ``auto`` takes the classes the models declare as not splittable
(``_no_split_modules``: ``BertLayer``, ``LlamaDecoderLayer``, ``OPTDecoderLayer``, ...).
An online method whose teacher trains (``teacher_is_trainable()``) keeps it inside the
LightningModule's FSDP units, where it gets gradients and optimizer state like the student.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

__all__ = ["DistillFSDPStrategy", "transformer_block_classes"]


def _declared_blocks(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def transformer_block_classes(models: Iterable[nn.Module], names: list[str] | Literal["auto"] = "auto") -> set[type[nn.Module]]:
    """The module classes to wrap as FSDP units: those named in ``names`` (class names), or the
    classes the models declare in ``_no_split_modules`` when ``names`` is ``"auto"``.

    Raises:
        ValueError: a listed class name occurs in none of the models (the message lists the
            block-like class names that do), or ``auto`` finds no declared block class.
    """
    models = list(models)
    present: dict[str, type[nn.Module]] = {}
    for model in models:
        for module in model.modules():
            present.setdefault(type(module).__name__, type(module))
    if names == "auto":
        wanted = set().union(*(_declared_blocks(model) for model in models)) & present.keys()
        if not wanted:
            raise ValueError(
                "wrap_blocks: auto found no transformer block class (the models declare no _no_split_modules). "
                "Name the block classes, e.g. strategy.init_args.wrap_blocks: [BertLayer]."
            )
        return {present[name] for name in wanted}
    unknown = [name for name in names if name not in present]
    if unknown:
        close = [match for name in unknown for match in difflib.get_close_matches(name, present, n=3, cutoff=0.75)]
        raise ValueError(
            f"wrap_blocks names module classes that are in neither model: {unknown}. "
            f"Close matches: {close or 'none'}; the repeated blocks of these models are usually {sorted(_declared_blocks(models[0]))}."
        )
    return {present[name] for name in names}


class DistillFSDPStrategy(FSDPStrategy):
    """FSDP that also shards a :class:`~kd_lightning.DistillModule`'s frozen teacher (see the module docstring).

    Args:
        wrap_blocks: class names of the modules that become FSDP units in student and teacher,
            or ``auto`` (the models' ``_no_split_modules``).
        shard_teacher: shard the frozen teacher (``True``) or keep a full copy of it on every GPU.
        **kwargs: as for :class:`~lightning.pytorch.strategies.FSDPStrategy` (``sharding_strategy``,
            ``state_dict_type``, ``cpu_offload``, ``activation_checkpointing_policy``, ...).
    """

    strategy_name = "distill_fsdp"

    def __init__(self, wrap_blocks: list[str] | Literal["auto"] = "auto", shard_teacher: bool = True, **kwargs: Any) -> None:
        if kwargs.pop("auto_wrap_policy", None) is not None:
            raise ValueError("DistillFSDPStrategy builds its auto-wrap policy from wrap_blocks; remove auto_wrap_policy")
        super().__init__(**kwargs)
        self.wrap_blocks = wrap_blocks
        self.shard_teacher = shard_teacher
        self.teacher_is_sharded = False

    @property
    def mixed_precision_config(self) -> Any:
        """Lightning's FSDP mixed-precision settings, with the loss modules left out of them: their
        parameters (projections) stay float32, since every loss computes in float32 outside autocast."""
        from kd_lightning.losses.base import DistillLoss

        config = super().mixed_precision_config
        if config is None or DistillLoss in config._module_classes_to_ignore:
            return config
        return dataclasses.replace(config, _module_classes_to_ignore=(*config._module_classes_to_ignore, DistillLoss))

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise RuntimeError(
                f"DistillFSDPStrategy runs on CUDA GPUs only (FSDP needs an accelerator), but the device is {self.root_device}. "
                "Set trainer.accelerator: gpu, or use strategy: ddp on CPU."
            )
        super().setup_environment()

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        teacher = getattr(model, "_teacher", None)
        frozen_teacher = teacher is not None and not model.teacher_is_trainable()
        models = [model] + ([teacher] if frozen_teacher else [])
        policy = ModuleWrapPolicy(transformer_block_classes(models, self.wrap_blocks))
        self.kwargs["auto_wrap_policy"] = policy
        if frozen_teacher and self.shard_teacher and not isinstance(teacher, FullyShardedDataParallel):
            sharded = FullyShardedDataParallel(
                teacher,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device.index,
                **self.kwargs,
            )
            object.__setattr__(model, "_teacher", sharded)
            self.teacher_is_sharded = True
        elif frozen_teacher:
            teacher.to(self.root_device)
        return super()._setup_model(model)
