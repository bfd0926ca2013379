"""Top-k teacher log-probabilities: what a top-k teacher cache stores of a vocabulary-sized
logit row (the ``k`` largest log-probabilities, their token ids and the log of the remaining
mass), and the rows rebuilt from them a few at a time (:class:`TopKLogProbs`), with the
remaining mass spread evenly over the other ``V - k`` tokens. See
:mod:`kd_lightning.teacher_cache` for the storage layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class TopKCacheError(ValueError):
    """A loss asked reconstructed top-k teacher log-probabilities for something they cannot give."""


def top_k_log_probs(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What a top-k cache stores of each ``(rows, V)`` logit row, in float32 (float64 stays float64).

    Returns ``(values, indices, log_rest)``: the ``k`` largest entries of ``log_softmax(logits)``
    in descending order, their token ids, and ``log(1 - sum exp(values))`` computed as the
    log-sum-exp of the other ``V - k`` log-probabilities (``-inf`` when ``k == V``).
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top_k must lie in 1..{vocab} (the vocabulary), got {k}")
    log_probs = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
    values, indices = log_probs.topk(k, dim=-1)
    if k == vocab:
        return values, indices, torch.full_like(values[..., 0], float("-inf"))
    return values, indices, log_probs.scatter(-1, indices, float("-inf")).logsumexp(-1)


def reconstruct_log_probs(values: Tensor, indices: Tensor, log_rest: Tensor, vocab_size: int) -> Tensor:
    """``(rows, V)`` log-probabilities from top-k entries and the remaining mass (module docstring).

    ``r_j = values`` at ``indices``, ``log_rest - log(V - k)`` elsewhere, then ``log_softmax(r)``
    so every row sums to 1 exactly; computed in the dtype of ``values``.
    """
    rows, k = values.shape
    if k > vocab_size:
        raise ValueError(f"{k} top-k entries per row for a vocabulary of {vocab_size}")
    if k == vocab_size:
        fill = torch.zeros(rows, 1, dtype=values.dtype, device=values.device)  # every entry is overwritten
    else:
        fill = (log_rest.to(values.dtype) - math.log(vocab_size - k)).unsqueeze(-1)
    full = fill.expand(rows, vocab_size).clone()
    full.scatter_(-1, indices.long(), values)
    return torch.log_softmax(full, -1)


class TopKLogProbs:
    """The teacher's ``(batch, seq, vocab)`` log-probabilities, rebuilt from a top-k cache a few rows at a time.

    It stands where :class:`~kd_lightning.outputs.ModelOutputs` has the teacher's ``logits`` when a
    step reads a :class:`TopKTeacherCache`. It holds the batch's cached entries only (``n``
    response positions x ``k``) and rebuilds full rows (:func:`reconstruct_log_probs`) when rows
    are taken: ``index_select(0, rows)``, ``[slice]``, ``[bool mask]`` or ``[row ids]`` on the
    ``(-1, vocab)`` view (``reshape``), or ``[mask]`` with a ``(batch, seq)`` mask. That is what the
    token-level divergences do, a chunk of rows at a time under ``chunk_size``
    (:func:`~kd_lightning.losses.chunked.chunked_row_mean`), so the full ``tokens x vocab`` tensor
    of a batch never exists. Rows are log-probabilities, valid logits for every loss that
    applies ``softmax(z / T)``. Asking for a position that stores nothing (prompt, padding), or
    applying any other tensor operation, raises :class:`TopKCacheError` naming the fix.

    Args:
        values, indices: ``(n, k)`` top-k log-probabilities and token ids of the batch's
            response positions, in ``token_mask`` order (row-major).
        log_rest: ``(n,)`` log of the remaining mass of each position.
        token_mask: ``(batch, seq)`` the positions that have cached rows.
        vocab_size: ``V``.
    """

    def __init__(self, values: Tensor, indices: Tensor, log_rest: Tensor, token_mask: Tensor, vocab_size: int) -> None:
        flat = token_mask.reshape(-1).to(torch.bool)
        positions = flat.nonzero().squeeze(1)
        if positions.numel() != values.shape[0] or indices.shape != values.shape or log_rest.shape != values.shape[:1]:
            raise ValueError(
                f"top-k rows do not fit the token mask: {positions.numel()} masked positions, values "
                f"{tuple(values.shape)}, indices {tuple(indices.shape)}, log_rest {tuple(log_rest.shape)}"
            )
        self.values, self.indices, self.log_rest, self.vocab_size = values, indices, log_rest, int(vocab_size)
        self._row_of = torch.full(flat.shape, -1, dtype=torch.long, device=values.device)
        self._row_of[positions.to(values.device)] = torch.arange(positions.numel(), device=values.device)
        self.shape = torch.Size([*token_mask.shape, self.vocab_size])

    # ---- what the losses read -------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def reshape(self, *shape: int | tuple[int, ...]) -> TopKLogProbs:
        """The same rows under another shape whose last dimension is the vocabulary (e.g. ``(-1, V)``)."""
        dims = list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else list(shape)
        total = self._row_of.numel() * self.vocab_size
        if dims.count(-1) == 1:
            others = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = total // others if others else 0
        if not dims or -1 in dims or math.prod(dims) != total or dims[-1] != self.vocab_size:
            raise TopKCacheError(
                f"reconstructed teacher log-probabilities {tuple(self.shape)} reshape only to (..., {self.vocab_size}) "
                f"with the same rows, not {tuple(shape)}"
            )
        view = object.__new__(TopKLogProbs)
        view.__dict__.update(self.__dict__)
        view.shape = torch.Size(dims)
        return view

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        """Rows ``index`` of the ``(rows, V)`` view, rebuilt: ``(len(index), V)``."""
        if dim != 0 or self.ndim != 2:
            raise TopKCacheError(
                f"index_select(dim={dim}) on {tuple(self.shape)} reconstructed log-probabilities: select rows (dim 0) "
                f"of the (-1, {self.vocab_size}) view"
            )
        return self.rows(index)

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, Tensor) and key.dtype == torch.bool and key.shape == self.shape[:-1]:
            return self.rows(key.reshape(-1).nonzero().squeeze(1))
        if self.ndim == 2 and isinstance(key, slice):
            return self.rows(torch.arange(self.shape[0], device=self.device)[key])
        if self.ndim == 2 and isinstance(key, Tensor) and key.dim() == 1 and not key.dtype.is_floating_point:
            return self.rows(key)
        raise TopKCacheError(
            f"reconstructed teacher log-probabilities {tuple(self.shape)} take rows only: a (batch, seq) boolean mask, "
            f"or a slice, boolean mask or row ids on the (-1, {self.vocab_size}) view; got {type(key).__name__}"
        )

    def rows(self, positions: Tensor) -> Tensor:
        """The rebuilt ``(len(positions), V)`` log-probabilities at flat positions ``positions``."""
        rows = self._row_of[positions.to(self._row_of.device).long()]
        if bool((rows < 0).any()):
            missing = int((rows < 0).sum())
            raise TopKCacheError(
                f"a loss asked for {missing} teacher row(s) that the top-k teacher cache does not hold: it stores only "
                "the positions that predict a response token (labels != -100 after the shift). Drop the loss's "
                "mask_key (it defaults to those positions), or remove teacher_cache to run the live teacher."
            )
        return reconstruct_log_probs(self.values[rows], self.indices[rows], self.log_rest[rows], self.vocab_size)

    # ---- everything else is refused with the reason -----------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        raise TopKCacheError(
            f"{name}() on the teacher's logits, which come from a top-k teacher cache: they are rebuilt a few rows at "
            "a time and support only row selection. This loss needs the teacher's full output tensor; remove "
            "teacher_cache, or give the loss class `accepts_topk_teacher = False` so such configs are refused up front."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"'{name}' is not available on the teacher's logits from a top-k teacher cache (TopKLogProbs): they take "
            "row selection only (index_select, [rows], reshape). Remove teacher_cache for losses that need more."
        )

    def __repr__(self) -> str:
        k = self.values.shape[-1]
        return f"TopKLogProbs(shape={tuple(self.shape)}, rows={self.values.shape[0]}, top_k={k}, dtype={self.dtype})"
