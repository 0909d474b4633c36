"""Reductions: broadcast the gradient back over the reduced axes."""

from __future__ import annotations

import numpy as np

from ..autodiff import Context, attr, register, unsupported
from ..graph import all_static

_REDUCTIONS = (
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
)


def reduced_axes(ctx: Context, node) -> list[int] | None:
    """Normalised axes of a reduction; None when it reduces nothing (noop_with_empty_axes)."""
    x = node.input[0]
    rank = ctx.require_rank(x, node)
    axes = attr(node, "axes")
    if len(node.input) > 1 and node.input[1]:
        value = ctx.constant(node.input[1])
        if value is None:
            raise unsupported(node, "reduction axes computed at run time are not supported")
        axes = value.reshape(-1).tolist()
    if not axes:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a + rank if a < 0 else a for a in axes)


@register(*_REDUCTIONS)
def reduction(ctx, node, dy):
    g = ctx.g
    x, y = node.input[0], node.output[0]
    axes = reduced_axes(ctx, node)
    if axes is None:
        return [_elementwise_of_identity(ctx, node, dy[0])]
    kept_dy = dy[0] if attr(node, "keepdims", 1) else g.unsqueeze(dy[0], axes)
    kept_y = y if attr(node, "keepdims", 1) else g.unsqueeze(y, axes)
    op = node.op_type
    if op in ("ReduceSum", "ReduceMean"):
        spread = g.op("Expand", kept_dy, g.shape(x))
        if op == "ReduceSum":
            return [spread]
        return [g.op("Mul", spread, _inverse_count(ctx, node, axes))]
    if op in ("ReduceMax", "ReduceMin"):
        mask = g.op("CastLike", g.op("Equal", x, kept_y), kept_dy)
        ties = g.reduce("ReduceSum", mask, axes, keepdims=True)
        return [g.op("Mul", mask, g.op("Div", kept_dy, ties))]
    if op == "ReduceSumSquare":
        local = g.op("Mul", x, g.const(2.0))
    elif op == "ReduceL1":
        local = g.op("Sign", x)
    elif op == "ReduceL2":
        local = g.op("Div", x, kept_y)
    else:  # ReduceLogSumExp
        local = g.op("Exp", g.op("Sub", x, kept_y))
    return [g.op("Mul", local, kept_dy)]


def _elementwise_of_identity(ctx: Context, node, dy: str) -> str:
    """With noop_with_empty_axes=1 and no axes, every reduction is applied to single cells."""
    g = ctx.g
    x = node.input[0]
    op = node.op_type
    if op == "ReduceSumSquare":
        return g.op("Mul", dy, g.op("Mul", x, g.const(2.0)))
    if op in ("ReduceL1", "ReduceL2"):
        return g.op("Mul", dy, g.op("Sign", x))
    return dy


def _inverse_count(ctx: Context, node, axes: list[int]) -> str:
    g = ctx.g
    x = node.input[0]
    shape = ctx.shape(x)
    dims = [shape[a] for a in axes] if shape is not None else [None]
    if all_static(dims):
        return g.const(1.0 / float(np.prod(dims)))
    picked = g.op("Gather", g.shape(x), g.ints(axes))
    count = g.op("ReduceProd", picked, keepdims=0)
    return g.op("Reciprocal", g.op("Cast", count, to=1))
