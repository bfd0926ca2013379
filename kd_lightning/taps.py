"""Forward hooks on named submodules, and the reductions applied to what they capture.

A tap names a submodule by its dotted path (``bert.encoder.layer.5``, ``model.layers.7``) and
how to reduce its output to rows:

- ``cls``: the first position, ``(batch, width)``;
- ``mean``: the mean over non-padding positions, ``(batch, width)``;
- ``tokens``: every non-padding position as a row, ``(real tokens, width)``;
- ``none``: the output as it is.

Hooks are registered once; the capture is cleared at the start of every forward pass, so
nothing outlives the step.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

Reduction = Literal["cls", "mean", "tokens", "none"]
REDUCTIONS: tuple[str, ...] = ("cls", "mean", "tokens", "none")


@dataclass
class TapSpec:
    """Where a tap sits and how its output is reduced.

    Args:
        module: ``teacher`` or ``student``.
        path: dotted path of the submodule, as listed by ``model.named_modules()``.
        reduce: ``cls``, ``mean``, ``tokens`` or ``none``.
        capture: the submodule's ``output`` (default) or its first positional ``input`` —
            e.g. ``classifier`` with ``input`` is the embedding the head sees.
    """

    module: Literal["teacher", "student"]
    path: str
    reduce: Reduction = "cls"
    capture: Literal["output", "input"] = "output"


def hidden_states_of(output: Any) -> Tensor:
    """The hidden-state tensor of a module's output (first element of tuples and model outputs)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            if isinstance(output.get(key), Tensor):
                return output[key]
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def reduce_hidden(hidden: Tensor, reduce: str, attention_mask: Tensor | None) -> Tensor:
    """Apply a tap reduction to ``(batch, seq, width)`` hidden states."""
    if reduce == "none":
        return hidden
    if hidden.dim() != 3:
        raise ValueError(f"reduction {reduce!r} needs (batch, seq, width) outputs, got shape {tuple(hidden.shape)}")
    if reduce == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    mask = attention_mask.to(torch.bool)
    if reduce == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if reduce == "tokens":
        return hidden[mask]
    raise ValueError(f"unknown reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")


def resolve_submodule(model: nn.Module, path: str, owner: str = "model") -> nn.Module:
    """The submodule at ``path``; an unknown path raises with the closest valid paths."""
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    prefix = path.rsplit(".", 1)[0]
    siblings = [n for n in names if n.startswith(prefix + ".") and n.count(".") == path.count(".")][:5]
    hints = list(dict.fromkeys(close + siblings))[:6]
    hint = f" Closest valid paths: {', '.join(hints)}." if hints else ""
    raise ValueError(
        f"tap path {path!r} does not exist in the {owner} ({type(model).__name__}).{hint} "
        f"List every path with `python -m kd_lightning modules <model>`."
    )


class FeatureTaps:
    """Forward hooks on one model's submodules, capturing outputs for the current step.

    Args:
        model: the model to tap.
        taps: tap name -> spec; only specs whose ``module`` matches ``owner`` are used.
        owner: ``teacher`` or ``student``.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, TapSpec], owner: str) -> None:
        self.specs = {name: spec for name, spec in taps.items() if spec.module == owner}
        self.owner = owner
        self._captured: dict[str, Tensor] = {}
        self._handles = []
        for name, spec in self.specs.items():
            if spec.reduce not in REDUCTIONS:
                raise ValueError(f"tap {name!r}: unknown reduction {spec.reduce!r}; choose one of {', '.join(REDUCTIONS)}")
            if spec.capture not in ("output", "input"):
                raise ValueError(f"tap {name!r}: capture must be 'output' or 'input', not {spec.capture!r}")
            submodule = resolve_submodule(model, spec.path, owner)
            self._handles.append(submodule.register_forward_hook(self._hook(name, spec.capture == "input")))

    def _hook(self, name: str, of_input: bool):
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[name] = hidden_states_of(args if of_input else output)

        return capture

    def clear(self) -> None:
        self._captured.clear()

    def collect(self, attention_mask: Tensor | None) -> dict[str, Tensor]:
        """Reduced features of the last forward pass; the raw captures are released."""
        return self.reduce(self.take(), attention_mask)

    def take(self) -> dict[str, Tensor]:
        """The raw captures of the last forward pass (tap name -> hidden states), released here."""
        missing = [n for n in self.specs if n not in self._captured]
        if missing:
            raise RuntimeError(
                f"{self.owner} taps {missing} captured nothing in this forward pass: "
                "the tapped submodules did not run (check the paths)."
            )
        captures = {name: self._captured[name] for name in self.specs}
        self._captured.clear()
        return captures

    def reduce(self, captures: Mapping[str, Tensor], attention_mask: Tensor | None) -> dict[str, Tensor]:
        """Each tap's reduction applied to its raw capture (:meth:`take`)."""
        return {name: reduce_hidden(captures[name], spec.reduce, attention_mask) for name, spec in self.specs.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)
