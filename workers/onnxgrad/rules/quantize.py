"""Quantized models: quantizers differentiated straight through (QDQ pairs, dynamic quantization).

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
has no rule and is named as blocking gradients). Dynamic quantization: below.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..autodiff import Context, attr, register, unsupported
from .linear import conv_input_grad

# Integer ranges of the quantized types whose pairs have a straight-through gradient.
QUANTIZED_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT4: (-8, 7),
}


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


# Dynamic quantization (onnxruntime's quantize_dynamic): DynamicQuantizeLinear(x) -> (q, s, z)
# with s and z from the tensor's own range, so nothing clamps; ConvInteger / MatMulInteger(q - z,
# Wq - wz) in int32, Cast, times s * ws. Straight through: q is x / s + z, so the product is
# Conv(x, (Wq - wz) * ws). The integers between carry the gradient in integer units; the path
# through s (and z) is left out, as it cancels: s * Conv(x / s) does not depend on s.


@register("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx: Context, node, dy):
    """dx = dq / s (dy[1]: the scale's path, left out, as it cancels where it only rescales the
    integer products of q; anything else is refused)."""
    q, scale, zero = (list(node.output) + ["", ""])[:3]
    others = sorted({n.op_type for n in ctx.consumers(q) if n.op_type not in INTEGER_LINEAR})
    if others:
        raise unsupported(node, f"its integer output feeds {', '.join(others)}; only ConvInteger and "
                                "MatMulInteger are differentiated straight through")
    if zero and (any(n.op_type not in INTEGER_LINEAR for n in ctx.consumers(zero))
                 or any(output.name == zero for output in ctx.graph.output)) or \
            scale and not _only_rescales(ctx, scale, q):
        raise unsupported(node, "its scale or zero point is used otherwise than quantize_dynamic uses "
                                "them (to rescale the integer products of its output); only that form "
                                "is differentiated straight through")
    if dy[0] is None:
        return [None]
    return [ctx.g.op("Div", dy[0], scale)]


def _only_rescales(ctx: Context, scale: str, q: str, constant_factors: int = 1) -> bool:
    """Whether every use of ``scale`` multiplies a Cast of a ConvInteger / MatMulInteger of ``q``,
    directly or after Muls by constants (the weights' scale)."""
    if any(output.name == scale for output in ctx.graph.output):
        return False
    for use in ctx.consumers(scale):
        if use.op_type != "Mul" or list(use.input).count(scale) != 1:
            return False
        other = use.input[1 - list(use.input).index(scale)]
        cast = ctx.produced_by(other, "Cast")
        product = cast and (ctx.produced_by(cast.input[0], "ConvInteger")
                            or ctx.produced_by(cast.input[0], "MatMulInteger"))
        if product and product.input[0] == q:
            continue
        if ctx.constant(other) is None or constant_factors == 0 \
                or not _only_rescales(ctx, use.output[0], q, constant_factors - 1):
            return False
    return True


def _integer_weight(ctx: Context, node, axis: int) -> np.ndarray:
    """An integer operator's constant weights minus their zero point, as float32 (per-channel
    zero points along ``axis``)."""
    weight = ctx.constant(node.input[1])
    zero = ctx.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else np.zeros((), np.int64)
    if weight is None or zero is None:
        raise unsupported(node, "its weights (or their zero point) are computed in the graph; a "
                                "straight-through gradient needs them constant")
    zero = np.asarray(zero, np.float64)
    if zero.size > 1:
        shape = [1] * weight.ndim
        shape[axis] = zero.size
        zero = zero.reshape(shape)
    return (weight.astype(np.float64) - zero).astype(np.float32)


def _from_dynamic_quantization(ctx: Context, node) -> None:
    source = ctx.produced_by(node.input[0], "DynamicQuantizeLinear")
    zero = node.input[2] if len(node.input) > 2 else ""
    if source is None or zero != source.output[2]:
        raise unsupported(node, "its image-dependent input is not a DynamicQuantizeLinear's output with "
                                "that node's zero point; only quantize_dynamic's form is differentiated")


@register("ConvInteger")
def conv_integer(ctx: Context, node, dy):
    _from_dynamic_quantization(ctx, node)
    weight = _integer_weight(ctx, node, axis=0)
    return [conv_input_grad(ctx, node, dy[0], ctx.g.const(weight, np.float32), weight)]


@register("MatMulInteger")
def matmul_integer(ctx: Context, node, dy):
    _from_dynamic_quantization(ctx, node)
    if ctx.rank(node.input[1]) != 2:
        raise unsupported(node, "only a 2-D weight matrix is differentiated")
    weight = _integer_weight(ctx, node, axis=1)
    return [ctx.g.op("MatMul", dy[0], ctx.g.const(np.ascontiguousarray(weight.T), np.float32))]


INTEGER_LINEAR = ("ConvInteger", "MatMulInteger")
