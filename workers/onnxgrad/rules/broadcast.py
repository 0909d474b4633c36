"""Summing a gradient back to the shape of an input that was broadcast."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..autodiff import Context
from ..graph import Shape, same_dim


def unbroadcast(
    ctx: Context, grad: str, input_name: str, output_name: str | None = None,
    out_shape: Shape | None = None,
) -> str:
    """Reduce ``grad`` (shaped like ``output_name``, or ``out_shape``) to the shape of ``input_name``.

    Uses the inferred shapes when they prove which axes were broadcast; otherwise sums,
    at run time, every axis where the input has size 1 (always correct: summing a size-1
    axis that was not broadcast changes nothing).
    """
    in_shape = ctx.shape(input_name)
    if out_shape is None and output_name is not None:
        out_shape = ctx.shape(output_name)
    g = ctx.g
    if in_shape is not None and out_shape is not None and len(in_shape) <= len(out_shape):
        lead = len(out_shape) - len(in_shape)
        axes = list(range(lead))
        provable = True
        for i, d_in in enumerate(in_shape):
            d_out = out_shape[lead + i]
            if d_in == 1 and d_out != 1:
                axes.append(lead + i)
            elif not same_dim(d_in, d_out) and d_in != 1:
                provable = False
                break
        if provable:
            if not axes:
                return grad
            summed = g.reduce("ReduceSum", grad, axes, keepdims=True)
            return g.reshape_like(summed, input_name) if lead else summed
    out_rank = len(out_shape) if out_shape is not None else None
    in_rank = len(in_shape) if in_shape is not None else None
    return _unbroadcast_at_run_time(ctx, grad, input_name, out_rank, in_rank)


def _unbroadcast_at_run_time(
    ctx: Context, grad: str, input_name: str, out_rank: int | None, in_rank: int | None
) -> str:
    g = ctx.g
    if out_rank is None or in_rank is None:
        # Rank unknown: fall back to the rank of the gradient itself at run time.
        out_rank_t = g.op("Size", g.shape(grad))
        in_rank_t = g.op("Size", g.shape(input_name))
        lead = g.op("Sub", out_rank_t, in_rank_t)
        ones = g.op("ConstantOfShape", g.op("Reshape", lead, g.ints([1])),
                    value=numpy_helper.from_array(np.ones(1, np.int64)))
    else:
        ones = g.ints([1] * (out_rank - in_rank)) if out_rank > in_rank else None
    in_shape = g.shape(input_name)
    padded = g.op("Concat", ones, in_shape, axis=0) if ones is not None else in_shape
    axes = g.op("Reshape", g.op("NonZero", g.op("Equal", padded, g.ints([1]))), g.ints([-1]))
    summed = g.op("ReduceSum", grad, axes, keepdims=1, noop_with_empty_axes=1)
    return g.reshape_like(summed, input_name)

