"""Figures of the validation diagnostics, drawn on matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from kd_lightning.metrics.calibration import ReliabilityCurve


def figure_to_image(figure: Figure) -> Tensor:
    """The rendered figure as a ``(3, height, width)`` uint8 image tensor (TensorBoard's CHW)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)


def margins(width: float, height: float, left: float, right: float, bottom: float, top: float) -> dict[str, float]:
    """``subplots_adjust`` fractions for margins given in inches (fixed margins render much faster
    than matplotlib's constrained layout, which measures every label)."""
    return {"left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height}


def split_paths(paths: Sequence[str]) -> tuple[str, list[str]]:
    """The dotted prefix shared by module paths, and what remains of each:
    ``[bert.encoder.layer.0, bert.encoder.layer.1]`` -> ``("bert.encoder.layer.", ["0", "1"])``.
    A single path keeps its last component."""
    parts = [p.split(".") for p in paths]
    if not parts:
        return "", []
    shared = min(len(os.path.commonprefix(parts)), *(len(p) - 1 for p in parts))  # each keeps its last part
    prefix = ".".join(parts[0][:shared]) + "." if shared else ""
    return prefix, [".".join(p[shared:]) for p in parts]


def cka_heatmap(matrix: Tensor, teacher_layers: Sequence[str], student_layers: Sequence[str], title: str = "linear CKA") -> Figure:
    """A teacher-layer x student-layer heatmap of CKA values in ``[0, 1]``, annotated when small."""
    values = matrix.detach().cpu().double().numpy()
    rows, columns = values.shape
    width, height = max(4.5, 2.5 + 0.7 * columns), max(3.5, 1.5 + 0.5 * rows)
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(**margins(width, height, left=1.0, right=1.1, bottom=0.6, top=0.4))
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, fraction=0.08, pad=0.04)
    (student_prefix, student_labels), (teacher_prefix, teacher_labels) = split_paths(student_layers), split_paths(teacher_layers)
    axes.set_xticks(range(columns), student_labels)
    axes.set_yticks(range(rows), teacher_labels)
    axes.set_xlabel(f"student {student_prefix or 'layer'}")
    axes.set_ylabel(f"teacher {teacher_prefix or 'layer'}")
    axes.set_title(title)
    if rows * columns <= 144:
        for j in range(rows):
            for i in range(columns):
                colour = "black" if values[j, i] > 0.6 else "white"
                axes.text(i, j, f"{values[j, i]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    return figure


def reliability_diagram(curves: Mapping[str, ReliabilityCurve]) -> Figure:
    """One panel per model: accuracy per confidence bin against the diagonal of perfect calibration."""
    width, height = 3.6 * len(curves), 3.6
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(wspace=0.3, **margins(width, height, left=0.7, right=0.2, bottom=0.6, top=0.4))
    for k, (name, curve) in enumerate(curves.items()):
        axes = figure.add_subplot(1, len(curves), k + 1)
        edges = curve.edges.cpu().numpy()
        filled = curve.count.cpu().numpy() > 0
        left, width = edges[:-1][filled], np.diff(edges)[filled]
        accuracy, confidence = curve.accuracy.cpu().numpy()[filled], curve.confidence.cpu().numpy()[filled]
        axes.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
        axes.bar(left, confidence - accuracy, bottom=accuracy, width=width, align="edge", color="tab:red",
                 alpha=0.3, edgecolor="tab:red", label="gap to confidence")
        axes.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
        axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
                 title=f"{name}: ECE {float(curve.ece):.4f}")
        if k == 0:
            axes.legend(loc="upper left", fontsize=8)
    return figure
