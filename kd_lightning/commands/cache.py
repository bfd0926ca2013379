"""``python -m kd_lightning cache --config X.yaml``: build the teacher-output cache of a config.

The config's model must be a ``DistillModule`` (its ``teacher_cache`` settings are used, or
the defaults when it has none). A classifier's cache holds every class's logits; a causal LM's
(``CausalLMDistillModule``) the ``top_k`` log-probabilities of each response token and the
remaining mass. The teacher pass shows a progress bar; the cache folder is printed with its
size, and a later ``fit`` with ``teacher_cache`` set reads from it.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str]) -> Any:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    from kd_lightning.cli import KDLightningCLI

    sys.argv = sys.argv[:1]
    cache = build_teacher_cache(KDLightningCLI(args=argv, run=False))
    print(describe(cache))
    return cache


def describe(cache: Any) -> str:
    """One line: the folder, the examples, the dtype, and for top-k caches the tokens, k and bytes per token."""
    meta = cache.meta
    line = f"teacher cache: {cache.folder} ({len(cache)} examples, {meta['dtype']}"
    if meta.get("layout") == "topk":
        tokens = int(meta["num_tokens"])
        stored = sum(f.stat().st_size for f in cache.folder.glob("*.npy") if not f.name.startswith("tap."))
        line += (
            f", top-{meta['top_k']} of {meta['vocab_size']} log-probabilities for {tokens} response tokens: "
            f"{stored / max(tokens, 1):.1f} bytes per token"
        )
    return line + ")"


def build_teacher_cache(cli: Any) -> Any:
    """Build (or open) the teacher cache of a ``KDLightningCLI`` built with ``run=False``, on the
    trainer's accelerator, connected as ``fit`` connects them; a later ``trainer.fit`` reads it."""
    from kd_lightning.module import DistillModule
    from kd_lightning.teacher_cache import TeacherCacheConfig

    module = cli.model
    if not isinstance(module, DistillModule):
        raise SystemExit(f"cache: the config's model is {type(module).__name__}; a DistillModule config is needed")
    module.teacher_cache_config = module.teacher_cache_config or TeacherCacheConfig()
    cli.trainer.strategy.connect(module)  # as in fit: a data module without a tokenizer takes the module's
    cli.datamodule.trainer = cli.trainer
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    module.to(cli.trainer.strategy.root_device)  # the teacher pass runs on the configured accelerator
    return module.open_teacher_cache(cli.datamodule)
