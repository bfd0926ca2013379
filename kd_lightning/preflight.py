"""Checks that run before a run starts, so that bad input fails early with the fix in its message.

- :class:`HintingArgumentParser`: the CLI's parser. A config error about an unknown class path,
  argument, option or choice gets the closest valid names appended ("did you mean ...?").
- :func:`check_checkpoint_file`: ``--ckpt_path`` names an existing, readable checkpoint.
- :func:`check_checkpoint_fits`: the checkpoint's tensors have the names and shapes of the
  configured model; checked before anything is written into the run's folder.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import zipfile
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from kd_lightning.suggestions import close_matches, did_you_mean

#: What a config value of each type looks like, for "expected a <type>" errors.
TYPE_EXAMPLES = {"float": "a number (e.g. 0.5)", "int": "an integer (e.g. 8)", "bool": "true or false"}
#: ``--ckpt_path`` values that Lightning resolves itself.
SPECIAL_CHECKPOINTS = ("last", "best", "hpc", "registry")


# ---- config errors -------------------------------------------------------------------------------
def _public_names(module_name: str) -> list[str]:
    """The attributes and submodules of an importable module."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    names = [n for n in dir(module) if not n.startswith("_")]
    names += [info.name for info in pkgutil.iter_modules(getattr(module, "__path__", []))]
    return names


def _init_arguments(class_path: str) -> list[str]:
    """The ``__init__`` arguments of ``class_path``, following ``**kwargs`` to the base classes."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    arguments: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        arguments += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return arguments


def _option_keys(parser: Any) -> list[str]:
    """Every option key of ``parser`` and of its subcommands' parsers."""
    keys = [action.dest for action in getattr(parser, "_actions", [])]
    subcommands = getattr(parser, "_subcommands_action", None)
    for subparser in getattr(subcommands, "_name_parser_map", {}).values():
        keys += _option_keys(subparser)
    return keys


def config_hints(message: str, parser: Any = None) -> list[str]:
    """Suggestions for the mistakes a jsonargparse error ``message`` reports."""
    hints: list[str] = []
    for module_name, name in re.findall(r"module '([\w.]+)' has no attribute '(\w+)'", message):
        matches = close_matches(name, _public_names(module_name))
        if matches:
            hints.append(f"'{module_name}.{name}' does not exist; did you mean {' or '.join(f'{module_name}.{m}' for m in matches)}?")
    for module_name in re.findall(r"No module named '([\w.]+)'", message):
        parent, _, name = module_name.rpartition(".")
        matches = close_matches(name, _public_names(parent)) if parent else []
        if matches:
            hints.append(f"there is no module '{module_name}'; did you mean {' or '.join(f'{parent}.{m}' for m in matches)}?")
    for class_path, key in re.findall(r"class_path '([\w.]+)':\s+Option '([\w.]+)' is not accepted", message):
        arguments = _init_arguments(class_path)
        if arguments:
            name = key.split(".")[0]
            hints.append(f"{class_path} takes no argument '{name}'{did_you_mean(name, arguments)}; its arguments: {', '.join(arguments)}")
    for key in re.findall(r"does not accept option '([\w.]+)'", message):
        matches = close_matches(key, _option_keys(parser)) if parser is not None else []
        if matches:
            hints.append(f"there is no option '{key}'; did you mean {' or '.join(repr(m) for m in matches)}?")
    for key, kind, value in re.findall(r'Parser key "([\w.]+)":\s+Expected a <class \'(\w+)\'>\. Got value: (.+)', message):
        example = TYPE_EXAMPLES.get(kind)
        if example:
            hints.append(f"'{key}' takes {example}, not {value.strip()!r}")
    for choices, value in re.findall(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (\S+)", message):
        options = re.findall(r"'([^']*)'", choices)
        hint = did_you_mean(value, options)
        if hint:
            hints.append(f"{value!r} is not one of {', '.join(options)}{hint}")
    return list(dict.fromkeys(hints))


class HintingArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors end with the closest valid names of what was mistyped."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # nested parsers (of class-typed arguments) raise to this one: only the parser that exits adds hints
        hints = config_hints(message, getattr(ex, "subcommand_parser", None) or self) if self.exit_on_error else []
        if hints:
            message = message.rstrip() + "\n" + "\n".join(f"hint: {hint}" for hint in hints)
        super().error(message, ex)


# ---- checkpoints ---------------------------------------------------------------------------------
class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be read, or that was saved from another model."""


def _is_local(ckpt_path: Any) -> bool:
    return isinstance(ckpt_path, (str, os.PathLike)) and str(ckpt_path) not in SPECIAL_CHECKPOINTS and "://" not in str(ckpt_path)


def _run_config(ckpt_path: Path) -> str:
    """The fix that names the config a checkpoint was trained with, when its run folder has one."""
    config = ckpt_path.resolve().parent.parent / "config.yaml"
    if config.is_file():
        return f"resume with the config it was trained with ({config})"
    return "resume with the config it was trained with"


def check_checkpoint_file(ckpt_path: Any) -> None:
    """A local ``ckpt_path`` must exist and be a PyTorch checkpoint (a zip archive with ``data.pkl``).
    Folders (sharded checkpoints) are left to the strategy that reads them."""
    if not _is_local(ckpt_path) or Path(ckpt_path).is_dir():
        return
    path = Path(ckpt_path)
    if not path.is_file():
        siblings = [p.name for p in path.parent.glob("*.ckpt")] if path.parent.is_dir() else []
        near = close_matches(path.name, siblings) or sorted(siblings)[:3]
        shown = f"; checkpoints in {path.parent}: {', '.join(near)}" if near else ""
        raise CheckpointMismatchError(
            f"--ckpt_path {str(ckpt_path)!r} does not exist{shown}. Give an existing .ckpt file, "
            "`--ckpt_path last` for the newest run's last checkpoint, or leave it out to start afresh."
        )
    readable = zipfile.is_zipfile(path)
    if readable:
        with zipfile.ZipFile(path) as archive:
            readable = any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    if not readable:
        raise CheckpointMismatchError(
            f"--ckpt_path {str(ckpt_path)!r} is not a readable PyTorch checkpoint (damaged, truncated or another kind "
            f"of file, {path.stat().st_size} bytes). Resume from another checkpoint of the run (e.g. a best-*.ckpt "
            "beside it), or leave --ckpt_path out to start afresh."
        )


def _shape(value: Any) -> tuple[int, ...] | None:
    """A state entry's shape; ``None`` for the non-tensor extra state some modules keep."""
    return tuple(value.shape) if hasattr(value, "shape") else None


def check_checkpoint_fits(model: Any, ckpt_path: Any) -> None:
    """The checkpoint's ``state_dict`` has every tensor of ``model`` with the same shape, and no other.

    Runs before the trainer starts, so a resume with the wrong config writes nothing (not even the
    run's ``config.yaml``). The checkpoint is memory-mapped, not read into memory.
    """
    if not _is_local(ckpt_path) or not Path(ckpt_path).is_file():
        return
    import torch

    check_checkpoint_file(ckpt_path)
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # objects a weights-only load refuses: leave the check to Lightning's own load
        if "weights only" in str(err).lower():
            return
        raise CheckpointMismatchError(f"cannot read the checkpoint {str(ckpt_path)!r}: {err}") from err
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        raise CheckpointMismatchError(
            f"{str(ckpt_path)!r} has no 'state_dict': it is not a Lightning checkpoint. Give a .ckpt file written by a fit."
        )
    current = model.state_dict()
    differing = [k for k in saved.keys() & current.keys() if _shape(saved[k]) != _shape(current[k])]
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    if not (differing or missing or unexpected):
        return
    problems = []
    if differing:
        key = min(differing, key=lambda name: (not name.startswith("student."), name))  # the student's first
        problems.append(
            f"{len(differing)} tensor(s) differ in shape, e.g. {key}: checkpoint {_shape(saved[key])}, "
            f"model {_shape(current[key])}"
        )
    if missing:
        problems.append(f"{len(missing)} tensor(s) of the model are not in the checkpoint, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) of the checkpoint are not in the model, e.g. {unexpected[0]}")
    raise CheckpointMismatchError(
        f"the checkpoint {str(ckpt_path)!r} was saved from another model than this config builds: "
        f"{'; '.join(problems)}. It comes from another student (or loss) architecture: "
        f"{_run_config(Path(ckpt_path))}, or leave --ckpt_path out to start a new run with this config."
    )
