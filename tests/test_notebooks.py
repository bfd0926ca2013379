"""The walkthrough notebooks run top to bottom, at small sizes on a tiny model, and show what they say."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def kernel(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelManager, Path]]:
    """One kernel for the three notebooks, so that the imports (most of their time at these
    sizes) happen once; each notebook starts from an empty namespace. The environment
    variables shrink them: the tiny model as teacher, one step, 64 sentences per split."""
    workdir = tmp_path_factory.mktemp("notebooks")
    env = {
        **os.environ,
        "KD_LIGHTNING_CACHE": str(tmp_path_factory.getbasetemp() / "kd_cache"),
        "KD_NOTEBOOK_MODEL": str(tiny_bert),
        "KD_NOTEBOOK_TEACHER": str(tiny_bert),
        "KD_NOTEBOOK_MAX_STEPS": "1",
        "KD_NOTEBOOK_MAX_SAMPLES": "64",
        "KD_NOTEBOOK_WORKDIR": str(workdir),
        "IPYTHONDIR": str(workdir / ".ipython"),
        "OMP_NUM_THREADS": "1",  # tiny models: one thread, no OpenMP spin-waits on a loaded machine
    }
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env=env, cwd=str(workdir))
    yield manager, workdir
    manager.shutdown_kernel(now=True)


def run(name: str, kernel: tuple[KernelManager, Path]) -> list[nbformat.NotebookNode]:
    """Execute ``notebooks/<name>`` (read from disk, not written back); its code cells, executed."""
    manager, workdir = kernel
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), f"{name} is committed with outputs"
    notebook.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    NotebookClient(notebook, km=manager, timeout=300, resources={"metadata": {"path": str(workdir)}}).execute()
    return [cell for cell in notebook.cells[1:] if cell.cell_type == "code"]


def text_of(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.outputs:
        parts.append(output.get("text", ""))
        parts.extend(str(output.get("data", {}).get(kind, "")) for kind in ("text/plain", "text/html"))
    return "".join(parts)


def images_of(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def test_quickstart_notebook_distils_and_reads_the_run_back(kernel):
    cells = run("01_quickstart.ipynb", kernel)
    table = next(text_of(c) for c in cells if "validation acc" in text_of(c))
    assert "test ece" in table and "teacher" in table
    assert images_of(next(c for c in cells if "events.Images" in c.source)) == 2  # layer CKA, reliability
    assert "kd_lightning.losses.KLDivergence" in text_of(cells[-1])  # the HPARAMS record holds the config
    _, workdir = kernel
    assert (workdir / "runs" / "quickstart" / "student" / "config.json").is_file()


def test_new_method_notebook_trains_the_new_loss_and_subclass(kernel):
    cells = run("02_new_method.ipynb", kernel)
    assert "logit_mse: 0.25 (weight 0.5)" in text_of(next(c for c in cells if "isclose" in c.source))
    results = text_of(cells[-1])
    assert "CalibratedTeacherDistill" in results and "teacher T*" in results and "val/acc" in results
    _, workdir = kernel
    for run_name in ("kd", "calibrated_teacher"):
        assert list((workdir / "runs" / "new_method" / run_name).glob("version_0/events.out.tfevents.*"))


def test_geometry_notebook_shows_zero_projected_mse_beside_nonzero_procrustes(kernel):
    cells = run("03_geometry.ipynb", kernel)
    assert images_of(next(c for c in cells if "cka_heatmap(" in c.source)) == 2  # CKA and Procrustes heatmaps
    table = text_of(cells[-1])
    assert "non-orthogonal A" in table and "Procrustes distance" in table
