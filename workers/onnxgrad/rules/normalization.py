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
    gy = dy[0]
    channels_last = _channels_last_source(ctx, node, x, axes)
    if channels_last is not None:
        # x is a channels-first tensor permuted channels-last (ConvNeXt's LayerNorms): the same
        # arithmetic on the channels-first tensor, where the per-pixel statistics broadcast over
        # runs of H*W values instead of C, and the permutation's adjoint meets its inverse
        # (ONNX Runtime's transpose optimizer cancels or moves the pairs): ConvNeXt's gradient
        # took 4% (TorchScript export) and 11% (dynamo) fewer forward passes' time (measured)
        x, to_last = channels_last
        rank = len(to_last)
        to_first = [0, rank - 1, *range(1, rank - 1)]
        gy, mean, inv_std = (g.op("Transpose", t, perm=to_first) for t in (gy, mean, inv_std))
        scale = g.op("Reshape", scale, g.ints([-1] + [1] * (rank - 2)))
        axes = [1]
    xhat = g.op("Mul", g.op("Sub", x, mean), inv_std)
    gs = g.op("Mul", gy, scale)
    mean_gs = g.reduce("ReduceMean", gs, axes, keepdims=True)
    mean_gs_xhat = g.reduce("ReduceMean", g.op("Mul", gs, xhat), axes, keepdims=True)
    centred = g.op("Sub", g.op("Sub", gs, mean_gs), g.op("Mul", xhat, mean_gs_xhat))
    dx = g.op("Mul", centred, inv_std)
    return [dx if channels_last is None else g.op("Transpose", dx, perm=channels_last[1])]


def _channels_last_source(ctx: Context, node, x: str, axes: list[int]) -> tuple[str, list[int]] | None:
    """(x0, perm) when x = Transpose(x0, perm) moves axis 1 last and the LayerNormalization
    normalises that axis alone."""
    producer = ctx.produced_by(x, "Transpose")
    if producer is None:
        return None
    rank = ctx.require_rank(x, node)
    to_last = [0, *range(2, rank), 1]
    if rank < 3 or axes != [rank - 1] or list(attr(producer, "perm", [])) != to_last:
        return None
    return producer.input[0], to_last


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
