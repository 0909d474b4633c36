"""Quantized models: QuantizeLinear -> DequantizeLinear pairs differentiated straight through.

A QDQ model (ONNX Runtime's ``quantize_static``, PyTorch's PT2E export, TensorRT's format)
simulates int8 arithmetic with pairs y = (clamp(round(x / s) + z, qmin, qmax) - z) * s around
float operators. The pair's true derivative is zero almost everywhere: gradient attacks would
see no gradient at all and the model would look robust. Like PyTorch's fake_quantize (and
BPDA, Athalye et al. 2018), the pair's gradient is taken as 1 where round(x / s) + z lies in
[qmin, qmax] and 0 where the clamp saturates (which keeps a folded ReLU's mask). The forward
pass is untouched: predictions are the quantized model's own. The verdict names the pairs
(``straight_through``), so a reader knows the attacks used this approximation.

Only the pair is differentiated: the integer tensor between them may feed nothing but
DequantizeLinear nodes with the same scale and zero point (a QOperator model's QLinearConv
or MatMulInteger has no rule and is named as blocking gradients).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..autodiff import Context, attr, refuse, register, unsupported

# Integer ranges of the quantized types whose pairs have a straight-through gradient.
QUANTIZED_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT4: (-8, 7),
}

# quantize_dynamic's scales follow each batch's range, and its ConvInteger / MatMulInteger take
# integers: no pair to pass straight through
refuse("a dynamically quantized model (onnxruntime's quantize_dynamic) has no straight-through "
       "rule; quantize it statically in the QDQ format (quantize_static, QuantFormat.QDQ)",
       "DynamicQuantizeLinear")


def _parameters(ctx: Context, node) -> tuple[np.ndarray, np.ndarray, int]:
    """(scale, zero point, axis) of a QuantizeLinear or DequantizeLinear node, constants only."""
    if attr(node, "block_size", 0):
        raise unsupported(node, "blocked quantization (block_size) has no straight-through rule")
    scale = ctx.constant(node.input[1])
    if scale is None:
        raise unsupported(node, "its scale is computed in the graph; a straight-through gradient "
                                "needs a constant scale")
    zero = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int64)
    if zero is None:
        raise unsupported(node, "its zero point is computed in the graph; a straight-through "
                                "gradient needs a constant zero point")
    return np.asarray(scale, np.float64), np.asarray(zero, np.float64), int(attr(node, "axis", 1))


def _same_quantization(a: tuple, b: tuple, rank: int) -> bool:
    (scale_a, zero_a, axis_a), (scale_b, zero_b, axis_b) = a, b
    per_axis = scale_a.size > 1 or scale_b.size > 1
    return (np.array_equal(scale_a, scale_b) and np.array_equal(zero_a, zero_b)
            and (not per_axis or axis_a % rank == axis_b % rank))


@register("QuantizeLinear")
def quantize_linear(ctx: Context, node, dy):
    """dx = dy where qmin <= round(x / s) + z <= qmax, else 0 (in x: x / s within half a step
    outside the range's ends)."""
    x, q = node.input[0], node.output[0]
    others = sorted({n.op_type for n in ctx.consumers(q) if n.op_type != "DequantizeLinear"})
    if others:
        raise unsupported(node, f"its integer output feeds {', '.join(others)}; only QuantizeLinear -> "
                                "DequantizeLinear pairs are differentiated (straight through)")
    limits = QUANTIZED_RANGES.get(ctx.elem_type(q) or 0)
    if limits is None:
        raise unsupported(node, "only integer quantization (int4 to int16) has a straight-through "
                                "rule; float8 quantization has none")
    scale, zero, axis = _parameters(ctx, node)
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise unsupported(node, "its scale is not a positive finite number")
    shape = ctx.shape(x)
    rank = ctx.require_rank(x, node)
    if scale.size > 1:  # per-axis: the bounds broadcast along ``axis``
        if shape is None or shape[axis % rank] != scale.size:
            raise unsupported(node, "its per-axis scale does not match the input's axis")
        bounds_shape = [1] * rank
        bounds_shape[axis % rank] = scale.size
        scale, zero = scale.reshape(bounds_shape), zero.reshape(bounds_shape)
    qmin, qmax = limits
    g = ctx.g
    low = g.const(((qmin - zero - 0.5) * scale).astype(g.float_dtype))
    high = g.const(((qmax - zero + 0.5) * scale).astype(g.float_dtype))
    inside = g.op("And", g.op("GreaterOrEqual", x, low), g.op("LessOrEqual", x, high))
    return [g.op("Mul", dy[0], g.op("CastLike", inside, dy[0]))]


@register("DequantizeLinear")
def dequantize_linear(ctx: Context, node, dy):
    """The pair's second half: the gradient passes to the QuantizeLinear, in value units."""
    quantize = ctx.produced_by(node.input[0], "QuantizeLinear")
    if quantize is None:
        raise unsupported(node, "it dequantizes an image-dependent tensor that no QuantizeLinear "
                                "made; only QuantizeLinear -> DequantizeLinear pairs are differentiated")
    rank = ctx.require_rank(node.input[0], node)
    if not _same_quantization(_parameters(ctx, quantize), _parameters(ctx, node), rank):
        raise unsupported(node, "it dequantizes with another scale or zero point than its "
                                "QuantizeLinear used")
    return [dy[0]]
