"""The mean of a per-row loss over many rows, computed a chunk of rows at a time.

Token-level losses of causal LMs compare ``tokens x vocab`` distributions: for a batch of 16 x 512
tokens over a 49,152-token vocabulary every such tensor is 1.6 GB in float32, and a divergence
builds several of them (two log-softmaxes, their difference, the probabilities) in the forward
pass and as many again in the backward pass. :func:`chunked_row_mean` never holds more than one
chunk of them: the forward pass walks over the kept rows ``chunk_size`` at a time, computes each
chunk's values *and its gradient* right away (``torch.autograd.grad`` on the chunk alone), writes
the gradient into one buffer of the inputs' shape and frees the chunk. The backward pass then
only scales that buffer by the incoming gradient, in place. The memory beyond the inputs is the
gradient buffer (one input-sized tensor, which the backward pass has to produce anyway) plus one
chunk's temporaries, against several input-sized tensors for the direct computation. This is the
approach of fused-loss kernels for large vocabularies (Liger Kernel, Hsu et al., 2024,
arXiv:2410.10989), without fusing the output projection.

Because the gradient is scaled in place, a graph that holds a chunked loss can be
back-propagated once: ``retain_graph=True`` followed by a second backward raises.

A row input need not be a tensor: any :class:`RowSource` — an object that builds rows on
demand — is taken a chunk at a time like a tensor and never needs a gradient. The teacher's
log-probabilities read from a top-k teacher cache
(:class:`~kd_lightning.topk_logprobs.TopKLogProbs`) are one: each chunk's ``chunk x vocab``
rows are rebuilt from the stored top-k entries when the chunk is computed, so no full
``tokens x vocab`` teacher tensor is ever made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor


class RowSource(Protocol):
    """Rows made on demand: ``shape`` (rows first), and ``index_select(0, rows)`` / ``[slice]`` giving tensors."""

    shape: torch.Size

    def index_select(self, dim: int, index: Tensor) -> Tensor: ...

    def __getitem__(self, key: Any) -> Tensor: ...


class _ChunkedRowMean(torch.autograd.Function):
    """``mean_{kept rows r} per_row(rows_1[r], rows_2[r], ...)`` with per-chunk gradients (see the module)."""

    @staticmethod
    def forward(ctx, per_row: Callable[..., Tensor], keep: Tensor | None, chunk_size: int, *rows: Tensor) -> Tensor:
        wants = [ctx.needs_input_grad[3 + i] for i in range(len(rows))]
        kept = keep.nonzero().squeeze(1) if keep is not None else None
        count = int(kept.numel()) if kept is not None else rows[0].shape[0]
        grads = [
            torch.zeros(r.shape, dtype=r.dtype, device=r.device) if w else None
            for r, w in zip(rows, wants, strict=True)
        ]
        total: Tensor | None = None
        for start in range(0, count, chunk_size):
            if kept is None:
                where: Tensor | slice = slice(start, start + chunk_size)
                pieces = [r[where] for r in rows]
            else:
                where = kept[start : start + chunk_size]
                pieces = [r.index_select(0, where) for r in rows]
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(w) for p, w in zip(pieces, wants, strict=True)]
                chunk_sum = per_row(*leaves).sum()
                needed = [leaf for leaf, w in zip(leaves, wants, strict=True) if w]
                chunk_grads = iter(torch.autograd.grad(chunk_sum, needed)) if needed else iter(())
            for grad, w in zip(grads, wants, strict=True):
                if w:
                    grad[where] = next(chunk_grads)
            total = chunk_sum.detach() if total is None else total + chunk_sum.detach()
        scale = 1.0 / max(count, 1)
        for grad in grads:
            if grad is not None:
                grad.mul_(scale)
        ctx.grads = grads
        ctx.consumed = False
        if total is None:  # no kept rows: 0, in the dtype the rows would have given
            probe = [r[:0] for r in rows]
            return per_row(*probe).sum()
        return total * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.consumed:
            raise RuntimeError(
                "a chunked token-level loss was back-propagated twice through the same graph; its gradient is "
                "computed once in the forward pass. Recompute the loss, or set chunk_size: null for this loss."
            )
        ctx.consumed = True
        grads = ctx.grads
        ctx.grads = None
        for grad in grads:
            if grad is not None:
                grad.mul_(grad_output.to(grad.dtype))
        return (None, None, None, *grads)


def chunked_row_mean(
    per_row: Callable[..., Tensor], rows: Sequence[Tensor | RowSource], keep: Tensor | None, chunk_size: int
) -> Tensor:
    """``1/|K| sum_{r in K} per_row(rows[0][r], rows[1][r], ...)`` over the kept rows ``K``, in chunks.

    Args:
        per_row: maps row slices (each ``(chunk, ...)``) to the ``(chunk,)`` values of the loss;
            any float computation, differentiable in the inputs that need a gradient.
        rows: tensors with the same first dimension (views are fine: nothing is copied but the
            chunk being computed); those that require a gradient get one. A :class:`RowSource`
            builds each chunk's rows when the chunk is computed (no gradient).
        keep: ``(rows,)`` boolean mask of the rows that count, or ``None`` for all. No kept row
            gives 0 (and zero gradients), not NaN.
        chunk_size: kept rows per chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if keep is not None:
        keep = keep.reshape(-1).to(torch.bool)
        if keep.shape[0] != rows[0].shape[0]:
            raise ValueError(f"the row mask has {keep.shape[0]} entries for {rows[0].shape[0]} rows")
    return _ChunkedRowMean.apply(per_row, keep, chunk_size, *rows)
