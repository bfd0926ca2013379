"""Where instruction data comes from, and how each source's rows become (instruction, input, output).

Hub data sets of the MiniLLM evaluation (Gu et al., 2024, "MiniLLM: Knowledge Distillation of
Large Language Models") and of instruction-tuning work, each described by an
:class:`InstructionSchema` that also reads local files in the same layout:

===============================  ===============================================  ==========================================
schema                           hub data set                                      columns used
===============================  ===============================================  ==========================================
``alpaca`` (local files)         —                                                 ``instruction``, ``input``, ``output``
``dolly``                        ``databricks/databricks-dolly-15k``               ``instruction``, ``context``, ``response``
``self_instruct``                ``yizhongw/self_instruct`` (``self_instruct``)    ``prompt``, ``completion``
``self_instruct_human_eval``     ``yizhongw/self_instruct`` (``human_eval``)       ``instruction``, ``instances[].input/output``
``super_natural_instructions``   ``Muennighoff/natural-instructions``              ``definition``, ``inputs``, ``targets``
``unnatural_instructions``       ``mrm8488/unnatural-instructions-core``           ``instances[].instruction_with_input/output``
===============================  ===============================================  ==========================================

A row with several ``instances`` gives one example per instance. Self-Instruct completions end
with ``<|endoftext|>``, which is removed (each model's own end token is appended instead).

Two offline sets ship inside PyPI packages and get seeded train / validation / test splits:

- ``packaged/alpaca_eval``: the 805 ``{instruction, output}`` examples of the AlpacaEval set
  (Li et al., 2023) in ``alpaca_eval-0.6.6/example/outputs.json`` of alpaca-eval's source archive
  (package Apache-2.0, data CC BY-NC 4.0), fetched once with ``pip download`` and verified;
- ``packaged/chatterbot``: the English conversations of ``chatterbot-corpus==1.3.3`` (BSD),
  every consecutive pair of turns as (instruction, output); the pairs of one conversation stay
  in one split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_lightning.data.packaged import SourceArchive
from kd_lightning.models.packaged import PackagedAsset

TRIPLE = ("instruction", "input", "output")


@dataclass(frozen=True)
class InstructionSchema:
    """How one data set's rows become ``(instruction, input, output)`` examples.

    Args:
        path / config: the hub data set (``datasets.load_dataset(path, config)``); ``None`` for
            a layout that only local files have.
        instruction / input / output: the columns (``input`` may be ``None``: no input). With
            ``instances`` they name fields of each instance instead, except ``instruction``
            when ``instruction_in_instance`` is false.
        instances: a column holding a list of instances (or a dict of lists), one example each.
        instruction_in_instance: the instruction is a field of the instance, not of the row.
        strip_suffix: removed from the end of outputs (Self-Instruct's ``<|endoftext|>``).
        split_names: our split -> the source's split name.
    """

    path: str | None
    config: str | None = None
    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    instances: str | None = None
    instruction_in_instance: bool = False
    strip_suffix: str | None = None
    split_names: Mapping[str, str] = field(default_factory=dict)

    @property
    def row_columns(self) -> list[str]:
        """The columns a source file must have."""
        if self.instances is None:
            return [c for c in (self.instruction, self.input, self.output) if c]
        return [self.instances] + ([] if self.instruction_in_instance else [self.instruction])

    def triples(self, rows: Mapping[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        """A batch of source rows (columns -> lists, at positions ``indices`` of their split) as
        ``instruction``/``input``/``output``/``source_row`` lists; ``source_row`` is the row's
        ``row_id`` when the source has one, else its position. A row with several instances
        gives several examples."""
        out: dict[str, list[Any]] = {"instruction": [], "input": [], "output": [], "source_row": []}
        for i, position in enumerate(indices):
            for example in self._examples({k: v[i] for k, v in rows.items()}):
                for key, value in zip(TRIPLE, example, strict=True):
                    out[key].append(value)
                out["source_row"].append(int(rows["row_id"][i]) if "row_id" in rows else position)
        return out

    def _examples(self, row: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        if self.instances is None:
            return [self._triple(row, row)]
        instances = row[self.instances] or []
        if isinstance(instances, Mapping):  # a Sequence(dict) feature reads as a dict of lists
            keys = list(instances)
            instances = [dict(zip(keys, values, strict=True)) for values in zip(*instances.values(), strict=True)]
        return [self._triple(row, instance) for instance in instances]

    def _triple(self, row: Mapping[str, Any], fields: Mapping[str, Any]) -> tuple[str, str, str]:
        instruction = (fields if self.instruction_in_instance else row)[self.instruction]
        given = fields.get(self.input) if self.input else None
        output = _text(fields[self.output])
        if self.strip_suffix and output.endswith(self.strip_suffix):
            output = output[: -len(self.strip_suffix)]
        return _text(instruction).strip(), _text(given).strip(), output.strip()


def _text(value: Any) -> str:
    """A cell as text: ``None`` is empty, a one-element list (Natural Instructions' targets) its item."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return _text(value[0]) if value else ""
    return str(value)


INSTRUCTION_SCHEMAS: dict[str, InstructionSchema] = {
    "alpaca": InstructionSchema(path=None),
    "dolly": InstructionSchema("databricks/databricks-dolly-15k", input="context", output="response"),
    "self_instruct": InstructionSchema(
        "yizhongw/self_instruct", "self_instruct", instruction="prompt", input=None, output="completion",
        strip_suffix="<|endoftext|>",
    ),
    "self_instruct_human_eval": InstructionSchema("yizhongw/self_instruct", "human_eval", instances="instances"),
    "super_natural_instructions": InstructionSchema(
        "Muennighoff/natural-instructions", instruction="definition", input="inputs", output="targets"
    ),
    "unnatural_instructions": InstructionSchema(
        "mrm8488/unnatural-instructions-core",
        instruction="instruction_with_input",
        input=None,
        output="output",
        instances="instances",
        instruction_in_instance=True,
    ),
}


def schema_for(dataset: str | None, dataset_config: str | None, schema: str | None) -> InstructionSchema:
    """The schema named by ``schema``, else the one of the hub data set ``dataset`` (and config),
    else ``alpaca`` (``instruction``/``input``/``output``)."""
    if schema is not None:
        if schema not in INSTRUCTION_SCHEMAS:
            raise ValueError(f"unknown instruction schema {schema!r}; choose one of {', '.join(INSTRUCTION_SCHEMAS)}")
        return INSTRUCTION_SCHEMAS[schema]
    matches = [s for s in INSTRUCTION_SCHEMAS.values() if s.path == dataset and (dataset_config in (None, s.config))]
    return matches[0] if matches else INSTRUCTION_SCHEMAS["alpaca"]


# ---- packaged offline sets -------------------------------------------------------------------------
ALPACA_EVAL_ARCHIVE = SourceArchive(
    requirement="alpaca-eval==0.6.6",
    filename="alpaca_eval-0.6.6.tar.gz",
    sha256="94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
    members=("alpaca_eval-0.6.6/example/outputs.json",),
    member_sha256="4337273753e16055c9c9a2c3c917a43de8b7a50d538f2c0a6200d21ff711eed5",
)

CHATTERBOT_ENGLISH = PackagedAsset(
    package="chatterbot_corpus", subdir="data/english", install="pip install --no-deps chatterbot-corpus==1.3.3"
)


@dataclass(frozen=True)
class AlpacaEvalExamples:
    """AlpacaEval's 805 instructions with the reference outputs of its example file."""

    archive: SourceArchive = ALPACA_EVAL_ARCHIVE
    label_names: tuple[str, ...] = ()

    def source_file(self) -> str:
        return str(self.archive.path())

    def frame(self, path: str) -> pd.DataFrame:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        ids = np.arange(len(rows))
        return pd.DataFrame(
            {
                "instruction": [r["instruction"] for r in rows],
                "input": [""] * len(rows),
                "output": [r["output"] for r in rows],
                "origin": [r.get("dataset", "") for r in rows],
                "row_id": ids,
                "group": ids,
            }
        )


@dataclass(frozen=True)
class ChatterbotPairs:
    """Consecutive turns of chatterbot-corpus's English conversations as (instruction, output) pairs."""

    corpus: PackagedAsset = CHATTERBOT_ENGLISH
    label_names: tuple[str, ...] = ()

    def source_file(self) -> str:
        return self.corpus.path()

    def frame(self, path: str) -> pd.DataFrame:
        import yaml

        records = []
        for file in sorted(Path(path).glob("*.yml")):
            conversations = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations") or []
            for number, turns in enumerate(conversations):
                for asked, answered in zip(turns[:-1], turns[1:], strict=False):
                    records.append((str(asked).strip(), str(answered).strip(), file.stem, f"{file.stem}/{number}"))
        frame = pd.DataFrame(records, columns=["instruction", "output", "category", "group"])
        frame.insert(1, "input", "")
        frame["row_id"] = np.arange(len(frame))
        return frame


PACKAGED_INSTRUCTION_SETS = {
    "packaged/alpaca_eval": AlpacaEvalExamples(),
    "packaged/chatterbot": ChatterbotPairs(),
}
