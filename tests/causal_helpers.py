"""Tiny causal LMs with a tiny word-level tokenizer, and small instruction files, for the causal-LM tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = (
    "repeat reverse the words say hello hi how are you fine thanks what is a an cat dog bird fish red green blue "
    "one two three four five big small : ? ! . please answer in context question yes no"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat: bool = True, extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`; with ``chat`` a one-line chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS, *extra_words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def saved(folder: Path, model: Any, tokenizer: PreTrainedTokenizerFast) -> Path:
    """``model`` and ``tokenizer`` saved as an HF folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_llama(
    folder: Path, layers: int = 2, hidden: int = 32, vocab_padding: int = 0, chat: bool = True, seed: int = 0, **tokenizer_kwargs: Any
) -> Path:
    """A random Llama causal LM (tied embeddings) with :func:`tiny_tokenizer`, saved as an HF folder.

    ``vocab_padding`` adds output rows beyond the tokenizer (a padded vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(chat, **tokenizer_kwargs)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_padding,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return saved(folder, LlamaForCausalLM(config), tokenizer)


def write_tiny_gpt2(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0, **tokenizer_kwargs: Any) -> Path:
    """A random GPT-2 causal LM (learned absolute positions) with the tiny tokenizer, no chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer(chat=False, **tokenizer_kwargs)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return saved(folder, GPT2LMHeadModel(config), tokenizer)


def instruction_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-layout rows of a copy task: "repeat : w1 w2 w3" answered "w1 w2 w3"."""
    rng = random.Random(seed)
    nouns = ["cat", "dog", "bird", "fish", "red", "green", "blue", "one", "two", "three", "big", "small"]
    rows = []
    for i in range(n):
        words = rng.sample(nouns, rng.randint(1, 4))
        given = " ".join(rng.sample(nouns, 2)) if i % 3 == 0 else ""
        rows.append({"instruction": "repeat : " + " ".join(words), "input": given, "output": " ".join(words)})
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> str:
    """``rows`` as JSON lines (``.jsonl``) or one JSON list (``.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)
