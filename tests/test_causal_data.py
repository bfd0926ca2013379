"""Instruction data: prompt formatting, response-only labels, padding sides, schemas, sources and splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from causal_helpers import WORDS, instruction_rows, write_rows, write_tiny_gpt2
from data_helpers import serve_from_mirror
from test_data_packaged import tar_gz
from transformers import AutoModelForCausalLM

from kd_lightning.data import InstructionDataModule
from kd_lightning.data.instruction import PLAIN_PROMPT, PLAIN_PROMPT_WITH_INPUT
from kd_lightning.data.instruction_sources import (
    PACKAGED_INSTRUCTION_SETS,
    AlpacaEvalExamples,
    ChatterbotPairs,
    SourceArchive,
)
from kd_lightning.losses.functional import next_token_targets, token_cross_entropy

pytest_plugins = ("causal_fixtures",)


def setup_data(**kwargs) -> InstructionDataModule:
    kwargs.setdefault("max_length", 48)
    kwargs.setdefault("batch_size", 4)
    data = InstructionDataModule(**kwargs)
    data.setup("fit")
    return data


def test_prompts_use_the_chat_template_and_only_response_tokens_are_labelled(tiny_llama, instruction_files):
    data = setup_data(data_files=instruction_files, tokenizer=str(tiny_llama))
    tokenizer = data.tokenizer
    rows = instruction_rows(48, 0)
    for example, row in zip(data.datasets["train"], rows, strict=False):
        prompt = example["prompt_input_ids"]
        ids, labels = example["input_ids"], example["labels"]
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        assert tokenizer.decode(prompt) == f"<|user|> {' '.join(user.split())} </s> <|assistant|>"  # words, spaced
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]
        assert tokenizer.decode(ids[len(prompt) :]) == f"{row['output']} </s>"
        assert example["reference"] == row["output"]
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape == batch["position_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["prompt_attention_mask"][:, -1] == 1).all(), "prompts are left-padded for generation"


def test_the_plain_template_closes_responses_with_the_end_token(tmp_path, instruction_files):
    template_words = tuple(sorted(set((PLAIN_PROMPT + PLAIN_PROMPT_WITH_INPUT).split()) - set(WORDS)))
    model = write_tiny_gpt2(tmp_path / "gpt2", extra_words=template_words)
    data = setup_data(data_files=instruction_files, tokenizer=str(model), max_length=100)
    tokenizer = data.tokenizer
    for example, row in zip(data.datasets["train"], instruction_rows(48, 0), strict=False):
        template = PLAIN_PROMPT_WITH_INPUT if row["input"] else PLAIN_PROMPT
        expected = template.format(instruction=row["instruction"], input=row["input"])
        assert tokenizer.decode(example["prompt_input_ids"]) == " ".join(expected.split())  # words, spaced
        assert tokenizer.decode(example["input_ids"][len(example["prompt_input_ids"]) :]) == f"{row['output']} </s>"
        assert example["labels"][-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="has no chat template; use template: plain"):
        setup_data(data_files=instruction_files, tokenizer=str(model), template="chat")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_and_right_padding_give_the_same_losses(family, tmp_path, tiny_llama, instruction_files):
    folder = write_tiny_gpt2(tmp_path / "gpt2") if family == "gpt2" else tiny_llama
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    per_example = {}
    for side in ("left", "right"):
        data = setup_data(data_files=instruction_files, tokenizer=str(folder), padding_side=side, max_length=80)
        batch = next(iter(data.val_dataloader()))
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            logits = model(**inputs).logits
        targets = next_token_targets(batch["labels"])
        per_example[side] = torch.stack([token_cross_entropy(logits[i], targets[i]) for i in range(len(targets))])
    torch.testing.assert_close(per_example["left"], per_example["right"], rtol=1e-5, atol=1e-5)


def test_long_prompts_are_left_out_and_counted(tiny_llama, tmp_path):
    rows = instruction_rows(20, 0)
    rows[3]["instruction"] = "repeat : " + " ".join(["cat"] * 40)
    files = {"train": write_rows(tmp_path / "train.json", rows), "validation": write_rows(tmp_path / "val.json", rows[:6])}
    files["test"] = files["validation"]
    data = setup_data(data_files=files, tokenizer=str(tiny_llama), max_length=40, max_prompt_length=20)
    assert len(data.datasets["train"]) == 19 and data.split_record["dropped_long_prompts"]["train"] == 1
    assert 3 not in data.datasets["train"]["index"]
    assert max(len(ids) for ids in data.datasets["train"]["input_ids"]) <= 40


def test_a_single_file_is_split_with_the_seed_and_recorded(tiny_llama, tmp_path):
    path = tmp_path / "all.csv"
    pd.DataFrame(instruction_rows(40, 1)).to_csv(path, index=False)
    first = setup_data(data_files=str(path), tokenizer=str(tiny_llama), split_seed=3)
    again = setup_data(data_files=str(path), tokenizer=str(tiny_llama), split_seed=3)
    other = setup_data(data_files=str(path), tokenizer=str(tiny_llama), split_seed=4)
    assert first.datasets["validation"]["index"] == again.datasets["validation"]["index"]
    assert first.datasets["validation"]["reference"] != other.datasets["validation"]["reference"]
    sizes = {s: len(first.datasets[s]) for s in ("train", "validation", "test")}
    assert sizes == {"train": 32, "validation": 4, "test": 4}
    assert first.split_record["carved_from_train"]["test"] and first.split_record["seed"] == 3
    parquet = tmp_path / "all.parquet"
    pd.DataFrame(instruction_rows(40, 1)).to_parquet(parquet)
    assert setup_data(data_files=str(parquet), tokenizer=str(tiny_llama), split_seed=3).datasets["test"]["reference"] == (
        first.datasets["test"]["reference"]
    )


HUB_LAYOUTS = {
    "dolly": (
        ("databricks/databricks-dolly-15k", None),
        [{"instruction": "say hello", "context": "hi", "response": "hello", "category": "open_qa"}],
        ("say hello", "hi", "hello"),
    ),
    "self_instruct": (
        ("yizhongw/self_instruct", "self_instruct"),
        [{"prompt": "Task: say hello\n\nOutput:", "completion": " hello<|endoftext|>"}],
        ("Task: say hello\n\nOutput:", "", "hello"),
    ),
    "self_instruct_human_eval": (
        ("yizhongw/self_instruct", "human_eval"),
        [{"id": "user_oriented_task_0", "motivation_app": "Grammarly", "instruction": "say hello",
          "instances": {"input": ["to a cat", "to a dog"], "output": ["hello cat", "hello dog"]}}],
        ("say hello", "to a dog", "hello dog"),
    ),
    "super_natural_instructions": (
        ("Muennighoff/natural-instructions", None),
        [{"task_name": "task001", "id": "task001-1", "definition": "say hello", "inputs": "to a cat", "targets": "hello cat"}],
        ("say hello", "to a cat", "hello cat"),
    ),
    "unnatural_instructions": (
        ("mrm8488/unnatural-instructions-core", None),
        [{"instruction": "say hello to the animal",
          "instances": [{"instruction_with_input": "say hello to the cat", "input": "cat", "constraints": "None.", "output": "hello cat"},
                        {"instruction_with_input": "say hello to the dog", "input": "dog", "constraints": "None.", "output": "hello dog"}]}],
        ("say hello to the dog", "", "hello dog"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("schema", sorted(HUB_LAYOUTS))
def test_hub_schemas_read_local_files_and_hub_names(schema, tiny_llama, tmp_path, monkeypatch):
    (hub_path, config), rows, (instruction, given, output) = HUB_LAYOUTS[schema]
    rows = rows * 12
    local = write_rows(tmp_path / "train.jsonl", rows)
    from_files = setup_data(data_files={"train": local}, schema=schema, tokenizer=str(tiny_llama))
    parquet = tmp_path / "train.parquet"
    from datasets import load_dataset

    load_dataset("json", data_files=local)["train"].to_parquet(str(parquet))
    served = serve_from_mirror(monkeypatch, {(hub_path, config): {"train": str(parquet)}})
    from_hub = setup_data(dataset=hub_path, dataset_config=config, tokenizer=str(tiny_llama))
    assert served and served[0][:2] == (hub_path, config)
    examples = from_files._examples("train", from_files.load_raw()["train"])
    assert (examples[-1]["instruction"], examples[-1]["input"], examples[-1]["output"]) == (instruction, given, output)
    per_row = 2 if "instances" in json.dumps(rows[0]) else 1
    assert sum(len(from_files.datasets[s]) for s in ("train", "validation", "test")) == 12 * per_row
    assert from_hub.datasets["train"]["reference"] == from_files.datasets["train"]["reference"]


def test_missing_columns_name_the_schema_and_column_options(tiny_llama, tmp_path):
    local = write_rows(tmp_path / "train.jsonl", [{"question": "hi", "answer": "hello"}] * 10)
    with pytest.raises(ValueError, match=r"no column\(s\) \['instruction', 'input', 'output'\].*instruction_column"):
        setup_data(data_files=local, tokenizer=str(tiny_llama))
    data = setup_data(data_files=local, tokenizer=str(tiny_llama), instruction_column="question", input_column="", output_column="answer")
    assert set(data.datasets["train"]["reference"]) == {"hello"}


def test_alpaca_eval_examples_come_from_the_source_archive_with_seeded_splits(tiny_llama, tmp_path, monkeypatch):
    rows = [{"instruction": f"say {w}", "output": w, "generator": "example", "dataset": "vicuna", "datasplit": "eval"} for w in ("hi", "hello", "yes", "no") * 5]
    payload = json.dumps(rows).encode()
    archive = tar_gz({"alpaca_eval-0.6.6/example/outputs.json": payload})
    spec = SourceArchive(
        requirement="alpaca-eval==0.6.6", filename="alpaca_eval-0.6.6.tar.gz", sha256=hashlib.sha256(archive).hexdigest(),
        members=("alpaca_eval-0.6.6/example/outputs.json",), member_sha256=hashlib.sha256(payload).hexdigest(),
    )  # fmt: skip
    monkeypatch.setitem(PACKAGED_INSTRUCTION_SETS, "packaged/alpaca_eval", AlpacaEvalExamples(archive=spec))
    spec.manual_path.parent.mkdir(parents=True, exist_ok=True)
    spec.manual_path.write_bytes(archive)  # as `pip download` would leave it (the download itself: test_data_packaged)
    first = setup_data(dataset="packaged/alpaca_eval", tokenizer=str(tiny_llama), validation_fraction=0.2, test_fraction=0.2)
    again = setup_data(dataset="packaged/alpaca_eval", tokenizer=str(tiny_llama), validation_fraction=0.2, test_fraction=0.2)
    assert {s: len(first.datasets[s]) for s in ("train", "validation", "test")} == {"train": 12, "validation": 4, "test": 4}
    assert first.datasets["test"]["index"] == again.datasets["test"]["index"]
    assert sorted(first.split_record["row_ids"]["test"]) == sorted(first.datasets["test"]["index"])
    assert first.split_record["source_sha256"] == hashlib.sha256(payload).hexdigest()


class FolderAsset:
    """A stand-in for an installed package folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self) -> str:
        return str(self.folder)


def test_chatterbot_pairs_are_consecutive_turns_kept_together_by_conversation(tiny_llama, tmp_path, monkeypatch):
    corpus = tmp_path / "english"
    corpus.mkdir()
    conversations = [["how are you ?", "fine thanks", "what is a cat ?"], ["hi", "hello"]] * 6
    (corpus / "greetings.yml").write_text(json.dumps({"categories": ["greetings"], "conversations": conversations}))
    monkeypatch.setitem(PACKAGED_INSTRUCTION_SETS, "packaged/chatterbot", ChatterbotPairs(corpus=FolderAsset(corpus)))
    data = setup_data(dataset="packaged/chatterbot", tokenizer=str(tiny_llama), validation_fraction=0.25, test_fraction=0.25)
    pairs = {(row["instruction"], row["output"]) for split in ("train", "validation", "test") for row in data._examples(split, data.load_raw()[split])}
    assert pairs == {("how are you ?", "fine thanks"), ("fine thanks", "what is a cat ?"), ("hi", "hello")}
    conversation_of = [number for number, turns in enumerate(conversations) for _ in turns[1:]]
    splits_of: dict[int, set[str]] = {}
    for split in ("train", "validation", "test"):
        for index in data.datasets[split]["index"]:
            splits_of.setdefault(conversation_of[index], set()).add(split)
    assert all(len(splits) == 1 for splits in splits_of.values()), "a conversation's pairs share one split"
    assert sum(len(data.datasets[s]) for s in ("train", "validation", "test")) == 18
