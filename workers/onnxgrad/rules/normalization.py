"""Normalisation layers (inference semantics) and softmax."""

from __future__ import annotations

import numpy as np

from ..autodiff import Context, attr, register, unsupported


def _axes(ctx: Context, node, x: str, first_axis: int) -> list[int]:
    rank = ctx.require_rank(x, node)
    first = first_axis + rank if first_axis < 0 else first_axis
    return list(range(first, rank))


@register("BatchNormalization")
def batch_normalization(ctx, node, dy):
    """Inference mode: a per-channel affine map, dx = dy * scale / sqrt(var + eps)."""
    if attr(node, "training_mode", 0):
        raise unsupported(node, "training_mode=1 uses batch statistics; export the model in eval mode")
    g = ctx.g
    x, scale, _, _, var = node.input[:5]
    rank = ctx.require_rank(x, node)
    eps = attr(node, "epsilon", 1e-5)
    broadcast_shape = [-1] + [1] * (rank - 2)
    scale_v, var_v = ctx.constant(scale), ctx.constant(var)
    if scale_v is not None and var_v is not None:
        factor = (scale_v.astype(np.float64) / np.sqrt(var_v.astype(np.float64) + eps))
        factor_name = g.const(factor.reshape(broadcast_shape))
    else:
        std = g.op("Sqrt", g.op("Add", var, g.const(eps)))
        factor_name = g.op("Reshape", g.op("Div", scale, std), g.ints(broadcast_shape))
    return [g.op("Mul", dy[0], factor_name)]


@register("LayerNormalization")
def layer_normalization(ctx, node, dy):
    """dx = inv_std * (gs - mean(gs) - xhat * mean(gs * xhat)), gs = dy * scale.

    The statistics come from the forward node's own Mean and InvStdDev outputs.
    """
    g = ctx.g
    x, scale = node.input[0], node.input[1]
    axes = _axes(ctx, node, x, attr(node, "axis", -1))
    outputs = list(node.output) + [""] * (3 - len(node.output))
    for position, hint in ((1, "ln_mean"), (2, "ln_inv_std")):
        if not outputs[position]:
            outputs[position] = g.fresh(hint)
    del node.output[:]
    node.output.extend(outputs)
    mean, inv_std = outputs[1], outputs[2]
    if ctx.elem_type(x) != ctx.elem_type(mean):  # statistics are kept in stash_type (float32)
        mean, inv_std = g.op("CastLike", mean, x), g.op("CastLike", inv_std, x)
    xhat = g.op("Mul", g.op("Sub", x, mean), inv_std)
    gs = g.op("Mul", dy[0], scale)
    mean_gs = g.reduce("ReduceMean", gs, axes, keepdims=True)
    mean_gs_xhat = g.reduce("ReduceMean", g.op("Mul", gs, xhat), axes, keepdims=True)
    centred = g.op("Sub", g.op("Sub", gs, mean_gs), g.op("Mul", xhat, mean_gs_xhat))
    return [g.op("Mul", centred, inv_std)]


def _softmax_axis(ctx: Context, node) -> int:
    return attr(node, "axis", -1)


@register("Softmax")
def softmax(ctx, node, dy):
    g = ctx.g
    y = node.output[0]
    axis = _softmax_axis(ctx, node)
    dot = g.reduce("ReduceSum", g.op("Mul", dy[0], y), [axis], keepdims=True)
    return [g.op("Mul", y, g.op("Sub", dy[0], dot))]


@register("LogSoftmax")
def log_softmax(ctx, node, dy):
    g = ctx.g
    axis = _softmax_axis(ctx, node)
    total = g.reduce("ReduceSum", dy[0], [axis], keepdims=True)
    return [g.op("Sub", dy[0], g.op("Mul", g.op("Exp", node.output[0]), total))]
