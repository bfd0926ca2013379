"""``InstructionDataModule``: prompt/response pairs for causal-LM distillation and generation.

Each example is an instruction (with an optional input) and a response. The prompt is written
with the tokenizer's chat template when it has one (one user turn, then the assistant's turn
opened), else with the plain Alpaca template (Taori et al., 2023; MiniLLM uses it too)::

    Below is an instruction that describes a task[, paired with an input that provides further
    context]. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    [### Input:
    {input}

    ]### Response:
    {output}<eos>

A batch holds ``input_ids`` (prompt then response), ``labels`` (the same ids with ``-100`` on the
prompt and on padding: only response tokens are learnt), ``attention_mask`` and
``position_ids`` (counted over real tokens, so left padding gives the same positions as right
padding), padded on one side (``padding_side``); and the prompt alone, always left-padded for
generation (``prompt_input_ids``, ``prompt_attention_mask``). The reference response of every
example stays in the split's ``reference`` column, for ROUGE-L against generations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import MetricCollection
from transformers import PreTrainedTokenizerBase

from kd_lightning.data.instruction_sources import (
    INSTRUCTION_SCHEMAS,
    PACKAGED_INSTRUCTION_SETS,
    InstructionSchema,
    schema_for,
)
from kd_lightning.data.text_classification import TextClassificationDataModule, _digest, _map_rows
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.metrics.language_modeling import language_model_metrics

PLAIN_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PLAIN_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids counted over real tokens (``cumsum - 1``; 1 on padding), as ``generate`` does."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def pad(sequences: Sequence[Tensor], value: int, side: Literal["left", "right"]) -> tuple[Tensor, Tensor]:
    """``(batch, longest)`` ids padded with ``value`` on ``side``, and the mask of real tokens."""
    ids = pad_sequence(list(sequences), batch_first=True, padding_value=value, padding_side=side)
    lengths = [len(s) for s in sequences]
    mask = pad_sequence([torch.ones(n, dtype=torch.long) for n in lengths], batch_first=True, padding_side=side)
    return ids, mask


@dataclass
class PromptFormat:
    """Writes and tokenises prompts and responses for one tokenizer.

    Args:
        tokenizer: the model's tokenizer.
        template: ``chat`` (the tokenizer's chat template), ``plain`` (the Alpaca template), or
            ``auto``: chat when the tokenizer has a template.
    """

    tokenizer: PreTrainedTokenizerBase
    template: Literal["auto", "chat", "plain"] = "auto"

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be auto, chat or plain, got {self.template!r}")
        has_chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.template == "chat" and not has_chat:
            raise ValueError(
                f"template: chat, but the tokenizer {type(self.tokenizer).__name__} ({self.tokenizer.name_or_path}) "
                "has no chat template; use template: plain (or auto)"
            )
        self.chat = self.template == "chat" or (self.template == "auto" and has_chat)
        if not self.chat and self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer {self.tokenizer.name_or_path} has no end-of-sequence token to close responses")

    @staticmethod
    def user_text(instruction: str, given: str) -> str:
        """The user's turn of a chat: the instruction, then the input after a blank line."""
        return f"{instruction}\n\n{given}" if given else instruction

    def prompt(self, instruction: str, given: str) -> str:
        """The prompt text: everything before the response."""
        if not self.chat:
            template = PLAIN_PROMPT_WITH_INPUT if given else PLAIN_PROMPT
            return template.format(instruction=instruction, input=given)
        messages = [{"role": "user", "content": self.user_text(instruction, given)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def response(self, instruction: str, given: str, prompt: str, output: str) -> str:
        """The response text as the template closes it (a chat template's end-of-turn marker);
        for the plain template the output alone (the end token is added as an id)."""
        if not self.chat:
            return output
        messages = [
            {"role": "user", "content": self.user_text(instruction, given)},
            {"role": "assistant", "content": output},
        ]
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt) :]
        return output + (self.tokenizer.eos_token or "")

    def encode(self, instructions: list[str], inputs: list[str], outputs: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids of the prompts and of the responses (the plain template's end token appended)."""
        prompts = [self.prompt(i, x) for i, x in zip(instructions, inputs, strict=True)]
        responses = [self.response(i, x, p, o) for i, x, p, o in zip(instructions, inputs, prompts, outputs, strict=True)]
        prompt_ids = self.tokenizer(prompts, add_special_tokens=not self.chat)["input_ids"]
        response_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        if not self.chat:
            response_ids = [ids + [self.tokenizer.eos_token_id] for ids in response_ids]
        return prompt_ids, response_ids


@dataclass
class InstructionCollator:
    """Pads a list of tokenised examples into a batch (see the module docstring for the fields)."""

    pad_token_id: int
    padding_side: Literal["left", "right"] = "right"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        ids = [torch.as_tensor(r["input_ids"]) for r in rows]
        input_ids, attention_mask = pad(ids, self.pad_token_id, self.padding_side)
        labels, _ = pad([torch.as_tensor(r["labels"]) for r in rows], IGNORE_INDEX, self.padding_side)
        prompt_ids, prompt_mask = pad([torch.as_tensor(r["prompt_input_ids"]) for r in rows], self.pad_token_id, "left")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": positions_from_mask(attention_mask),
            "labels": labels,
            "prompt_input_ids": prompt_ids,
            "prompt_attention_mask": prompt_mask,
            "index": torch.as_tensor([int(r["index"]) for r in rows]),
        }


class InstructionDataModule(TextClassificationDataModule):
    """Instruction-following data for causal LMs: formatted prompts, response-only labels,
    prompts kept for generation, seeded splits.

    The data comes from one of:

    - ``dataset``: ``packaged/alpaca_eval`` or ``packaged/chatterbot`` (offline, see
      :mod:`~kd_lightning.data.instruction_sources`), or a hub data set whose schema is known
      (``databricks/databricks-dolly-15k``, ``yizhongw/self_instruct``,
      ``Muennighoff/natural-instructions``, ``mrm8488/unnatural-instructions-core``);
    - ``data_files``: local ``json``/``jsonl``/``csv``/``parquet`` files with ``instruction``,
      ``input`` (optional) and ``output`` columns, or in a hub set's layout (``schema: dolly``).

    Splits the source lacks are carved from ``train`` with ``split_seed`` and recorded in the
    run's ``data_splits.json``. Examples whose prompt is longer than ``max_prompt_length``
    tokens are left out (counted in the record); responses are cut at ``max_length`` tokens in
    all. Tokenisation is cached by ``datasets`` fingerprints.

    Args:
        dataset / dataset_config / revision: a packaged or hub data set.
        data_files: local files, split -> path(s), or one path.
        schema: a key of :data:`~kd_lightning.data.instruction_sources.INSTRUCTION_SCHEMAS`;
            default: the hub data set's own, else ``alpaca``.
        instruction_column / input_column / output_column: replace the schema's columns (an
            empty ``input_column`` means no input).
        template: ``auto`` (the chat template when the tokenizer has one), ``chat`` or ``plain``.
        split_names / validation_fraction / test_fraction / split_seed: as for
            :class:`~kd_lightning.data.TextClassificationDataModule`.
        tokenizer: a tokenizer name or folder; default: the model's.
        max_length: tokens of prompt and response together.
        max_prompt_length: longest prompt kept, in tokens (default ``max_length // 2``).
        max_train_samples / max_eval_samples: keep N examples of the split, drawn at random with
            ``split_seed`` and kept in the split's order (sources sorted by task stay mixed).
        batch_size / eval_batch_size: examples per batch (evaluation: ``2 * batch_size``).
        padding_side: ``right`` or ``left`` padding of the training and evaluation batches.
        shuffle_seed / num_workers: as for :class:`~kd_lightning.data.TextClassificationDataModule`.
    """

    packaged_sets = PACKAGED_INSTRUCTION_SETS
    data_kind = "instruction data set"

    def __init__(
        self,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | dict[str, str | list[str]] | None = None,
        schema: str | None = None,
        instruction_column: str | None = None,
        input_column: str | None = None,
        output_column: str | None = None,
        template: Literal["auto", "chat", "plain"] = "auto",
        split_names: dict[str, str] | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        revision: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        max_prompt_length: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        padding_side: Literal["left", "right"] = "right",
        shuffle_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        base = schema_for(dataset, dataset_config, schema)
        columns = {"instruction": instruction_column, "input": input_column, "output": output_column}
        overrides = {k: v for k, v in columns.items() if v is not None}
        if overrides.get("input") == "":
            overrides["input"] = None  # an empty input column: the data has no input
        self.schema: InstructionSchema = dataclasses.replace(base, **overrides)
        if dataset is not None and dataset == self.schema.path and dataset_config is None:
            dataset_config = self.schema.config
        super().__init__(
            dataset=dataset,
            dataset_config=dataset_config,
            data_files=data_files,
            split_names={**self.schema.split_names, **(split_names or {})},
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            revision=revision,
            tokenizer=tokenizer,
            max_length=max_length,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle_seed=shuffle_seed,
            num_workers=num_workers,
        )
        self.max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 0 < self.max_prompt_length < max_length:
            raise ValueError(
                f"max_prompt_length must lie between 1 and max_length - 1 = {max_length - 1} (room for a response), "
                f"got {self.max_prompt_length}"
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.template = template
        self.padding_side = padding_side

    # ---- the task --------------------------------------------------------------------------------
    def task_metrics(self) -> MetricCollection:
        """Negative log-likelihood and perplexity of the response tokens (``val/nll``, ``val/ppl``)."""
        return language_model_metrics()

    @property
    def monitor(self) -> str:
        return "val/nll"

    @property
    def monitor_mode(self) -> str:
        return "min"

    # ---- loading -------------------------------------------------------------------------------
    def _offline_choices(self) -> str:
        return (
            f"{' or '.join(PACKAGED_INSTRUCTION_SETS)}, or data_files in the set's layout with schema: "
            f"<one of {', '.join(INSTRUCTION_SCHEMAS)}>."
        )

    def _check_source_columns(self, split: str, data: Any) -> None:
        missing = [c for c in self.schema.row_columns if c not in data.column_names]
        if missing:
            raise ValueError(
                f"the {split} split has no column(s) {missing}; its columns are {data.column_names}. Name the schema "
                f"of its layout (schema: {' / '.join(INSTRUCTION_SCHEMAS)}) or the columns (instruction_column, "
                "input_column, output_column)."
            )
        if len(data) == 0:
            raise ValueError(f"the {split} split is empty: check the files, split_names or max_*_samples")

    def _examples(self, split: str, data: Any) -> Any:
        """The split as ``instruction``/``input``/``output``/``source_row`` rows."""
        fingerprint = _digest(data._fingerprint, "instruction-triples", repr(self.schema))
        return _map_rows(data, self.schema.triples, fingerprint, f"Reading {split} examples")

    def _tokenize_examples(self, split: str, data: Any) -> Any:
        """Prompt and response ids, response-only labels; prompts over ``max_prompt_length`` left out."""
        prompt_format = PromptFormat(self.tokenizer, self.template)
        max_length, max_prompt = self.max_length, self.max_prompt_length

        def encode(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
            prompts, responses = prompt_format.encode(rows["instruction"], rows["input"], rows["output"])
            out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_input_ids": [], "reference": [], "index": []}
            for prompt, response, output, row in zip(prompts, responses, rows["output"], rows["source_row"], strict=True):
                if len(prompt) > max_prompt:
                    continue
                response = response[: max_length - len(prompt)]
                out["input_ids"].append(prompt + response)
                out["labels"].append([IGNORE_INDEX] * len(prompt) + response)
                out["prompt_input_ids"].append(prompt)
                out["reference"].append(output)
                out["index"].append(row)
            return out

        fingerprint = _digest(data._fingerprint, self._tokenizer_key(), prompt_format.chat, max_length, max_prompt)
        return _map_rows(data, encode, fingerprint, f"Tokenising {split}", with_indices=False)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer()
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer {self.tokenizer.name_or_path} has neither a padding nor an end token to pad with")
        splits = self._named_splits(self.load_raw())
        dropped = {}
        for split, data in splits.items():
            self._check_source_columns(split, data)
            examples = self._subset(split, self._examples(split, data))
            tokenized = self._tokenize_examples(split, examples)
            if len(tokenized) == 0:
                raise ValueError(
                    f"no {split} example has a prompt of at most max_prompt_length={self.max_prompt_length} tokens "
                    f"({len(examples)} examples): raise max_prompt_length / max_length"
                )
            dropped[split] = len(examples) - len(tokenized)
            self.datasets[split] = tokenized
        self.split_record["sizes_used"] = {split: len(d) for split, d in self.datasets.items()}
        self.split_record["dropped_long_prompts"] = dropped
        self.split_record["schema"] = dataclasses.asdict(self.schema)
        self._record_splits()

    # ---- batches -------------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        """The id padding uses: the tokenizer's padding token, else its end token (masked anyway)."""
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collator(self) -> InstructionCollator:
        return InstructionCollator(self.pad_token_id, self.padding_side)

    def generation_batches(self, split: str, limit: int, batch_size: int) -> Iterator[tuple[dict[str, Tensor], list[str]]]:
        """The first ``limit`` prompts of ``split`` in batches: ``input_ids``, ``attention_mask``
        (left-padded, ready for ``generate``) and the reference responses."""
        data = self.datasets[split]
        count = min(limit, len(data))
        for start in range(0, count, batch_size):
            rows = data[start : min(start + batch_size, count)]
            ids, mask = pad([torch.as_tensor(p) for p in rows["prompt_input_ids"]], self.pad_token_id, "left")
            yield {"input_ids": ids, "attention_mask": mask}, list(rows["reference"])
