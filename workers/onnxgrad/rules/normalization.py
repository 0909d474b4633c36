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
    dx = standardized_vjp(ctx, g.op("Mul", gy, scale), g.op("Sub", x, mean), inv_std, axes)
    return [dx if channels_last is None else g.op("Transpose", dx, perm=channels_last[1])]


def standardized_vjp(ctx: Context, gs: str, centred: str, inv_std: str, axes: list[int]) -> str:
    """The VJP of xhat = (x - mean(x)) * inv_std over ``axes`` for the incoming ``gs``:
    inv_std * (gs - mean(gs) - xhat * mean(gs * xhat))."""
    g = ctx.g
    xhat = g.op("Mul", centred, inv_std)
    mean_gs = g.reduce("ReduceMean", gs, axes, keepdims=True)
    mean_gs_xhat = g.reduce("ReduceMean", g.op("Mul", gs, xhat), axes, keepdims=True)
    return g.op("Mul", g.op("Sub", g.op("Sub", gs, mean_gs), g.op("Mul", xhat, mean_gs_xhat)), inv_std)


def _statistics(ctx: Context, x: str, axes: list[int], epsilon: float) -> tuple[str, str]:
    """(x - mean, 1 / sqrt(var + epsilon)) over ``axes``, recomputed from the forward input
    (the operators below output no statistics)."""
    g = ctx.g
    centred = g.op("Sub", x, g.reduce("ReduceMean", x, axes, keepdims=True))
    variance = g.reduce("ReduceMean", g.op("Mul", centred, centred), axes, keepdims=True)
    return centred, g.op("Reciprocal", g.op("Sqrt", g.op("Add", variance, g.const(epsilon))))


def _per_channel(ctx: Context, value: str, rank: int) -> str:
    """A [C] tensor shaped to broadcast over axis 1 of a rank-``rank`` tensor."""
    return ctx.g.op("Reshape", value, ctx.g.ints([-1] + [1] * (rank - 2)))


@register("InstanceNormalization")
def instance_normalization(ctx, node, dy):
    """Per sample and channel over the spatial axes; PyTorch exports GroupNorm as one too
    (on x reshaped to [N, groups, -1], with unit scale)."""
    x, scale = node.input[0], node.input[1]
    rank = ctx.require_rank(x, node)
    axes = list(range(2, rank))
    centred, inv_std = _statistics(ctx, x, axes, attr(node, "epsilon", 1e-5))
    gs = ctx.g.op("Mul", dy[0], _per_channel(ctx, scale, rank))
    return [standardized_vjp(ctx, gs, centred, inv_std, axes)]


@register("GroupNormalization")
def group_normalization(ctx, node, dy):
    """Statistics over x reshaped to [N, groups, -1], a scale per channel (opset 21; ONNX's
    checker refuses opset 18's per-group form as deprecated, so no model reaches here with it)."""
    g = ctx.g
    x, scale = node.input[0], node.input[1]
    rank = ctx.require_rank(x, node)
    grouped = g.ints([0, int(attr(node, "num_groups")), -1])
    centred, inv_std = _statistics(ctx, g.op("Reshape", x, grouped), [2], attr(node, "epsilon", 1e-5))
    gs = g.op("Reshape", g.op("Mul", dy[0], _per_channel(ctx, scale, rank)), grouped)
    return [g.reshape_like(standardized_vjp(ctx, gs, centred, inv_std, [2]), x)]


@register("MeanVarianceNormalization")
def mean_variance_normalization(ctx, node, dy):
    """y = (x - mean) / d, d = std + 1e-9 (ONNX's function body): dx = (dy - mean(dy)) / d
    - mean(dy * y) * y / std."""
    g = ctx.g
    x, y = node.input[0], node.output[0]
    rank = ctx.require_rank(x, node)
    axes = sorted(a + rank if a < 0 else a for a in attr(node, "axes", [0, 2, 3]))
    mean = g.reduce("ReduceMean", x, axes, keepdims=True)
    squares = g.reduce("ReduceMean", g.op("Mul", x, x), axes, keepdims=True)
    std = g.op("Sqrt", g.op("Sub", squares, g.op("Mul", mean, mean)))
    d = g.op("Add", std, g.const(1e-9))
    centred_dy = g.op("Sub", dy[0], g.reduce("ReduceMean", dy[0], axes, keepdims=True))
    correction = g.op("Mul", g.reduce("ReduceMean", g.op("Mul", dy[0], y), axes, keepdims=True),
                      g.op("Div", y, std))
    return [g.op("Sub", g.op("Div", centred_dy, d), correction)]


@register("RMSNormalization")
def rms_normalization(ctx, node, dy):
    """y = x * r * scale, r = 1 / sqrt(mean(x^2) + eps): dx = r * (gs - x * r^2 * mean(gs * x))."""
    g = ctx.g
    x, scale = node.input[0], node.input[1]
    axes = _axes(ctx, node, x, attr(node, "axis", -1))
    mean_square = g.reduce("ReduceMean", g.op("Mul", x, x), axes, keepdims=True)
    r = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, g.const(attr(node, "epsilon", 1e-5)))))
    gs = g.op("Mul", dy[0], scale)
    projection = g.op("Mul", g.op("Mul", x, g.op("Mul", r, r)),
                      g.reduce("ReduceMean", g.op("Mul", gs, x), axes, keepdims=True))
    return [g.op("Mul", r, g.op("Sub", gs, projection))]


@register("LpNormalization")
def lp_normalization(ctx, node, dy):
    """y = x / n, n the L1 or L2 norm along the axis: dx = (dy - s * sum(dy * y)) / n, with
    s = y for L2 and sign(x) for L1. Where n = 0 (y jumps there) the gradient is 0, not NaN."""
    g = ctx.g
    x, y = node.input[0], node.output[0]
    rank = ctx.require_rank(x, node)
    axis = attr(node, "axis", -1)
    axis = axis + rank if axis < 0 else axis
    p = attr(node, "p", 2)
    if p not in (1, 2):
        raise unsupported(node, f"p={p} is not defined (only 1 and 2)")
    norm = g.reduce("ReduceL2" if p == 2 else "ReduceL1", x, [axis], keepdims=True)
    direction = y if p == 2 else g.op("Sign", x)
    along = g.reduce("ReduceSum", g.op("Mul", dy[0], y), [axis], keepdims=True)
    zero = g.op("Equal", norm, g.const(0.0))
    safe_norm = g.op("Where", zero, g.const(1.0), norm)
    dx = g.op("Div", g.op("Sub", dy[0], g.op("Mul", direction, along)), safe_norm)
    return [g.op("Where", zero, g.const(0.0), dx)]


@register("LRN")
def local_response_normalization(ctx, node, dy):
    """y = x * s^-beta, s = bias + alpha / size * (sum of x^2 over a window of channels):
    dx = dy * s^-beta - 2 alpha beta / size * x * (the window's adjoint sum of dy * y / s)."""
    g = ctx.g
    x, y = node.input[0], node.output[0]
    rank = ctx.require_rank(x, node)
    size = int(attr(node, "size"))
    alpha, beta, bias = attr(node, "alpha", 1e-4), attr(node, "beta", 0.75), attr(node, "bias", 1.0)
    before, after = (size - 1) // 2, size // 2  # channels c - before .. c + after
    window = _channel_window_sum(ctx, g.op("Mul", x, x), rank, size, before, after)
    s = g.op("Add", g.const(bias), g.op("Mul", g.const(alpha / size), window))
    direct = g.op("Mul", dy[0], g.op("Pow", s, g.const(-beta)))
    spread = _channel_window_sum(ctx, g.op("Div", g.op("Mul", dy[0], y), s), rank, size, after, before)
    return [g.op("Sub", direct, g.op("Mul", g.op("Mul", x, spread), g.const(2 * alpha * beta / size)))]


def _channel_window_sum(ctx: Context, t: str, rank: int, size: int, before: int, after: int) -> str:
    """out[:, c] = sum of t[:, c - before .. c + after] (zero outside): a Conv of ones over the
    channel axis, made spatial by an Unsqueeze."""
    g = ctx.g
    ones = g.const(np.ones([1, 1, size] + [1] * (rank - 2)))
    pads = [before] + [0] * (rank - 2) + [after] + [0] * (rank - 2)
    summed = g.op("Conv", g.unsqueeze(t, [1]), ones, pads=pads)
    return g.op("Squeeze", summed, g.ints([1]))


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
