"""``GeneralisationDiagnostic``: per student layer, the sliced Wasserstein distance between its
representations of (a fixed subset of) the training split and of the validation split.

He and Goldfeld, "Information-Theoretic Generalization Bounds for Deep Neural Networks"
(arXiv:2404.03176; named in seed 002) bound the generalisation error, layer by layer, by the
1-Wasserstein distance between the train and test distributions of that layer's internal
representation, with a "generalisation funnel" layer where it is smallest: a reason to watch that
distance per layer. The full-dimensional W_1 is out of reach on a few thousand rows of width
hundreds; the sliced distance is its tractable stand-in:

    SW_p(X, Y) = ( 1/L sum_l W_p^p(theta_l . X, theta_l . Y) )^(1/p),

with ``L`` fixed random unit directions ``theta_l`` (seeded, so that values of successive
validations are comparable) and the 1-D ``W_p`` exact from the sorted projections
(:func:`wasserstein_1d`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from kd_lightning.callbacks.validation_batches import ValidationBatchReader
from kd_lightning.taps import FeatureTaps, TapSpec, resolve_submodule


# ---- the distances ------------------------------------------------------------------------------
def wasserstein_1d(x: Tensor, y: Tensor, p: float = 1.0) -> Tensor:
    """``W_p^p`` between the empirical distributions of the columns of ``x`` (``n x L``) and ``y``
    (``m x L``), one value per column: ``int_0^1 |F_x^{-1}(u) - F_y^{-1}(u)|^p du``.

    The empirical quantile functions are step functions with steps at ``i/n`` and ``j/m``; on the
    merged grid of both sets of steps each is constant, so the integral is an exact finite sum
    (unequal sample counts need no resampling). A 1-D input is one column. Returns ``W_p^p``,
    not ``W_p``.
    """
    if x.dim() == 1:
        return wasserstein_1d(x[:, None], y[:, None], p)[0]
    n, m = x.shape[0], y.shape[0]
    if n == 0 or m == 0:
        raise ValueError(f"wasserstein_1d needs samples on both sides, got {n} and {m}")
    dtype = torch.promote_types(x.dtype, y.dtype)
    x_sorted, y_sorted = x.to(dtype).sort(dim=0).values, y.to(dtype).sort(dim=0).values
    steps_x = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) / n
    steps_y = torch.arange(1, m + 1, dtype=torch.float64, device=x.device) / m
    grid = torch.cat([steps_x, steps_y]).sort().values
    widths = torch.diff(grid, prepend=grid.new_zeros(1))
    middle = grid - widths / 2  # inside each interval (zero-width intervals weigh nothing)
    index_x = (middle * n).floor().long().clamp(0, n - 1)
    index_y = (middle * m).floor().long().clamp(0, m - 1)
    gaps = (x_sorted[index_x] - y_sorted[index_y]).abs().pow(p)
    return (widths.to(dtype)[:, None] * gaps).sum(0)


def random_directions(width: int, count: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``count`` unit vectors of ``width`` dimensions, uniform on the sphere (normalised
    Gaussians), the same for the same ``(width, count, seed)``: ``(width, count)``."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(width, count, generator=generator, dtype=torch.float64)
    return (gaussian / gaussian.norm(dim=0, keepdim=True)).to(dtype)


def sliced_wasserstein(x: Tensor, y: Tensor, directions: Tensor, p: float = 2.0) -> Tensor:
    """``SW_p = (1/L sum_l W_p^p(theta_l . X, theta_l . Y))^(1/p)`` for rows ``x`` (``n x d``),
    ``y`` (``m x d``) and unit ``directions`` (``d x L``)."""
    if x.shape[-1] != y.shape[-1] or x.shape[-1] != directions.shape[0]:
        raise ValueError(
            f"sliced_wasserstein: widths differ (x {x.shape[-1]}, y {y.shape[-1]}, directions {directions.shape[0]})"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    directions = directions.to(dtype)
    return wasserstein_1d(x.to(dtype) @ directions, y.to(dtype) @ directions, p).mean().pow(1.0 / p)


# ---- the callback -------------------------------------------------------------------------------
class GeneralisationDiagnostic(ValidationBatchReader):
    """At the end of each validation, log ``val/generalisation/sw/<tap>``: the sliced
    Wasserstein distance ``SW_p = (1/L sum_l W_p^p(theta_l . X_train, theta_l . X_val))^(1/p)``
    between one student layer's pooled representations of a fixed training subset and of the
    validation split — the per-layer train/test distance of He and Goldfeld's information-theoretic
    generalisation bounds (arXiv:2404.03176), sliced to be computable (module docstring).

    The validation rows come from hooks on the validation step's own forward pass; the training
    subset (``train_samples`` examples drawn once with ``seed``, kept for the whole run and in
    the callback's checkpoint state) is passed through the student once more per validation, in
    eval mode, without gradients and under the run's precision, like the validation split. The directions are drawn once per width from ``seed``. Only the
    scalars are logged; nothing is written to disk. Under DDP each process's validation rows
    are gathered first, so every process computes the distance on the whole split.

    Args:
        taps: what to measure: names of student taps declared on the module, or dotted paths
            of student submodules (``python -m kd_lightning modules MODEL`` lists them). Default:
            the module's student taps, or every block of the student's layer stack when it
            declares none. Each is measured at its path's output, pooled by ``reduce`` (whatever
            the reduction a declared tap has). The metric is named by the tap's name or path.
        reduce: how a layer's output becomes one row per example: ``mean`` over real tokens
            (default) or ``cls``.
        directions: ``L``, the number of random directions.
        p: the order of the distance (``p >= 1``).
        train_samples: size of the training subset (all of it when the split is smaller).
        batch_size: batch size of the pass over the training subset.
        seed: seed of the training subset and of the directions.
    """

    def __init__(
        self,
        taps: Sequence[str] | None = None,
        reduce: Literal["mean", "cls"] = "mean",
        directions: int = 128,
        p: float = 2.0,
        train_samples: int = 512,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if reduce not in ("mean", "cls"):
            raise ValueError(f"GeneralisationDiagnostic reduce must be 'mean' or 'cls', got {reduce!r}")
        if not float(p) >= 1:
            raise ValueError(f"GeneralisationDiagnostic p must be >= 1 (a Wasserstein order), got {p}")
        if directions < 1 or train_samples < 1 or batch_size < 1:
            raise ValueError("GeneralisationDiagnostic directions, train_samples and batch_size must be >= 1")
        self.requested = list(taps) if taps is not None else None
        self.reduce = reduce
        self.num_directions = int(directions)
        self.p = float(p)
        self.train_samples = int(train_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.paths: dict[str, str] = {}  # metric name -> student submodule path
        self.values: dict[str, float] = {}  # the last logged values
        self.train_indices: list[int] | None = None
        self._directions: dict[int, Tensor] = {}
        self._taps: FeatureTaps | None = None
        self._rows: dict[str, list[Tensor]] = {}

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        student = getattr(pl_module, "student", None)
        if not isinstance(student, nn.Module):
            raise TypeError(
                "GeneralisationDiagnostic needs a module with a `student` model (DistillModule, FineTuneModule)"
            )
        if trainer is not None and getattr(trainer, "datamodule", None) is None:
            raise ValueError(
                "GeneralisationDiagnostic compares the training and validation splits of a data module: pass "
                "`datamodule=` to the trainer (or a `data:` section in the config), not bare dataloaders"
            )
        specs: Mapping[str, TapSpec] = getattr(pl_module, "tap_specs", None) or {}
        declared = {name: spec.path for name, spec in specs.items() if spec.module == "student"}
        if self.requested is None:
            self.paths = dict(declared) or {path: path for path in _layer_paths(student)}
        else:
            self.paths = {entry: declared.get(entry, entry) for entry in self.requested}
        for name, path in self.paths.items():
            if name not in declared:
                try:
                    resolve_submodule(student, path, "student")
                except ValueError as error:
                    known = ", ".join(declared) or "none"
                    raise ValueError(
                        f"GeneralisationDiagnostic tap {name!r} is neither a student tap of the module "
                        f"(declared: {known}) nor a path in the student: {error}"
                    ) from None

    def _training_subset(self, trainer: pl.Trainer) -> tuple[Any, Any]:
        from kd_lightning.teacher_pass import training_split

        dataset, collate = training_split(trainer.datamodule)
        if self.train_indices is None:
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(dataset), generator=generator)[: self.train_samples]
            self.train_indices = sorted(order.tolist())
        return dataset.select(self.train_indices), collate

    # ---- one validation epoch ----------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._rows = {name: [] for name in self.paths}
        self._taps = FeatureTaps(pl_module.student, self._specs(), "student")

    def _specs(self) -> dict[str, TapSpec]:
        return {name: TapSpec("student", path, self.reduce) for name, path in self.paths.items()}

    def read_validation_batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        if self._taps is None:
            return
        for name, rows in self._taps.collect(batch.get("attention_mask")).items():
            self._rows[name].append(rows.detach().float())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._taps is None:
            return
        self._remove_hooks()
        validation = {name: _gather_rows(trainer, pl_module, rows) for name, rows in self._rows.items()}
        self._rows = {}
        if any(rows.shape[0] == 0 for rows in validation.values()):
            return
        training = self._training_rows(trainer, pl_module)
        for name in self.paths:
            x, y = training[name].to(pl_module.device), validation[name].to(pl_module.device)
            value = sliced_wasserstein(x, y, self._directions_for(x.shape[-1]).to(x.device), self.p)
            self.values[name] = float(value)
            pl_module.log(f"val/generalisation/sw/{name}", value)

    @torch.no_grad()
    def _training_rows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The pooled rows of the training subset, from the student in eval mode under the run's
        precision (as the validation rows). No progress bar: a second rich live display would
        clash with the trainer's."""
        from torch.utils.data import DataLoader

        from kd_lightning.training import model_inputs

        dataset, collate = self._training_subset(trainer)
        loader = DataLoader(dataset.with_format("torch"), batch_size=self.batch_size, shuffle=False, collate_fn=collate)
        student = pl_module.student
        taps = FeatureTaps(student, self._specs(), "student")
        rows: dict[str, list[Tensor]] = {name: [] for name in self.paths}
        was_training = student.training
        student.eval()
        try:
            for batch in loader:
                batch = {k: v.to(pl_module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                taps.clear()
                with trainer.strategy.precision_plugin.forward_context():
                    student(**model_inputs(batch))
                for name, features in taps.collect(batch.get("attention_mask")).items():
                    rows[name].append(features.float())
        finally:
            taps.remove()
            student.train(was_training)
            module_taps = getattr(pl_module, "student_taps", None)
            if module_taps is not None:
                module_taps.clear()  # the module's own hooks captured this pass too: release it
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def _directions_for(self, width: int) -> Tensor:
        if width not in self._directions:
            self._directions[width] = random_directions(width, self.num_directions, self.seed)
        return self._directions[width]

    def _remove_hooks(self) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        return {"train_indices": self.train_indices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_indices = state_dict.get("train_indices")


def _layer_paths(model: nn.Module) -> list[str]:
    from kd_lightning.models import find_layer_stack

    name, stack = find_layer_stack(model)
    return [f"{name}.{i}" for i in range(len(stack))]


def _gather_rows(trainer: pl.Trainer, pl_module: pl.LightningModule, parts: list[Tensor]) -> Tensor:
    """This process's rows, or under DDP every process's (padded to a common count for the gather)."""
    rows = torch.cat(parts) if parts else torch.zeros(0, 0, device=pl_module.device)
    if trainer.world_size == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=pl_module.device)
    counts = pl_module.all_gather(count).reshape(-1)
    width = int(pl_module.all_gather(torch.tensor([rows.shape[-1]], device=pl_module.device)).max())
    padded = rows.new_zeros(int(counts.max()), width)
    padded[: rows.shape[0], : rows.shape[-1]] = rows
    gathered = pl_module.all_gather(padded)
    return torch.cat([gathered[i, : int(c)] for i, c in enumerate(counts.tolist())])
