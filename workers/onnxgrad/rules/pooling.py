"""Pooling: MaxPool scatters through its own argmax indices, AveragePool is a transposed conv."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..autodiff import Context, attr, register, unknown_shape, unsupported
from .linear import resolve_pads, spatial_shapes, transpose_output_padding


def scatter_add_flat(ctx: Context, like: str, flat_indices: str, values: str, extra: int = 0) -> str:
    """zeros(numel(like) + extra), add ``values`` at ``flat_indices``; returns the flat sum."""
    g = ctx.g
    numel = g.op("Size", like)
    length = g.op("Add", numel, g.const(extra, np.int64)) if extra else numel
    zeros = g.op("ConstantOfShape", g.op("Reshape", length, g.ints([1])),
                 value=numpy_helper.from_array(np.zeros(1, g.float_dtype)))
    flat_values = g.op("Reshape", values, g.ints([-1]))
    if g.float_dtype == np.float16:  # ONNX Runtime has no float16 scatter-add: sum in float32
        summed = g.op("ScatterElements", g.op("Cast", zeros, to=1),
                      g.op("Reshape", flat_indices, g.ints([-1])), g.op("Cast", flat_values, to=1),
                      axis=0, reduction="add")
        return g.op("Cast", summed, to=10)
    return g.op("ScatterElements", zeros, g.op("Reshape", flat_indices, g.ints([-1])),
                flat_values, axis=0, reduction="add")


@register("MaxPool")
def max_pool(ctx, node, dy):
    """Route each output gradient to the input cell(s) holding the window's maximum.

    Windows that tile the input exactly (kernel = stride, no padding or dilation) compare
    the input with the broadcast maximum; tied maxima share the gradient equally (like
    ReduceMax). This keeps ONNX Runtime's fast pooling kernel in the forward pass. Other
    windows ask the forward node for its Indices (flat over N*C*H*W of the unpadded input,
    so pads, ceil_mode and dilations are accounted for; ties go to the first maximum) and
    scatter-add, which sums overlapping windows.
    """
    if attr(node, "storage_order", 0) != 0:
        raise unsupported(node, "storage_order=1 (column-major indices) is not supported")
    tiles = _tiling_blocks(ctx, node)
    if tiles is not None and not (len(node.output) > 1 and node.output[1]):
        return [_max_pool_tiled(ctx, node, dy[0], tiles)]
    if len(node.output) > 1 and node.output[1]:
        indices = node.output[1]
    else:
        indices = ctx.g.fresh("maxpool_indices")
        del node.output[1:]
        node.output.append(indices)
    flat = scatter_add_flat(ctx, node.input[0], indices, dy[0])
    return [ctx.g.reshape_like(flat, node.input[0])]


def _tiling_blocks(ctx: Context, node) -> list[tuple[int, int]] | None:
    """(output length, window) per spatial axis when the windows tile the input exactly."""
    shape = ctx.shape(node.input[0])
    if shape is None or not all(isinstance(d, int) for d in shape[2:]):
        return None
    spatial = list(shape[2:])
    rank = len(spatial)
    kernel = list(attr(node, "kernel_shape"))
    strides = list(attr(node, "strides", [1] * rank))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if (kernel != strides or any(attr(node, "pads", [0] * 2 * rank))
            or any(d != 1 for d in attr(node, "dilations", [1] * rank))
            or auto_pad not in ("NOTSET", "VALID")
            or any(length % k for length, k in zip(spatial, kernel, strict=True))):
        return None
    return [(length // k, k) for length, k in zip(spatial, kernel, strict=True)]


def _max_pool_tiled(ctx: Context, node, dy: str, tiles: list[tuple[int, int]]) -> str:
    """Nearest upsampling and equality with the input mark each window's maxima; among tied
    maxima the first cell (row-major) takes the whole gradient, as in the Indices path and
    in torch: each marked cell gets its window's priority (larger for earlier cells), and
    only the cell equal to its window's pooled priority is kept.

    Every op here keeps to ONNX Runtime's fast same-shape kernels (a MaxPool asked for
    Indices is about 15x slower than one that is not, and broadcasting over 6-D window
    views is slower still).
    """
    g = ctx.g
    x, y = node.input[0], node.output[0]
    window = [k for _, k in tiles]
    scales = g.const([1.0, 1.0] + [float(k) for k in window])

    def upsample(t: str) -> str:
        return g.declare(g.op("Resize", t, "", scales, mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                         ctx.shape(x))

    # Mul by a cast mask, not Where: ONNX Runtime's CPU Where is several times slower
    at_max = g.op("CastLike", g.op("Equal", x, upsample(y)), dy)
    ranked = g.op("Mul", at_max, g.const(_first_cell_priority(tiles)))
    pooled = g.op("MaxPool", ranked, kernel_shape=window, strides=window)
    first = g.op("CastLike", g.op("Equal", ranked, upsample(pooled)), dy)
    return g.op("Mul", upsample(dy), first)


def _first_cell_priority(tiles: list[tuple[int, int]]) -> np.ndarray:
    """[1, 1, *spatial]: prod(window) for each window's first cell (row-major), down to 1."""
    position = np.zeros([out * k for out, k in tiles], np.int64)
    for axis, (out, k) in enumerate(tiles):
        index = np.arange(out * k) % k
        position = position * k + index.reshape([-1 if a == axis else 1 for a in range(len(tiles))])
    return (np.prod([k for _, k in tiles]) - position)[None, None].astype(np.float64)


def _window_counts(length, out_len, k, s, d, pad_begin, lo, hi) -> np.ndarray:
    """How many taps of each output window fall inside [lo, hi) along one axis."""
    counts = np.zeros(out_len)
    for o in range(out_len):
        taps = o * s - pad_begin + d * np.arange(k)
        counts[o] = np.count_nonzero((taps >= lo) & (taps < hi))
    return counts


def pool_output_sizes(node, spatial_in, kernel, strides, dilations, pads) -> list[int]:
    """Output sizes as ONNX Runtime computes them.

    ONNX shape inference below opset 22 keeps a ceil_mode window that would start inside
    the end padding; ONNX Runtime (and PyTorch) drop it, so the sizes are computed here.
    """
    rank = len(spatial_in)
    ceil_mode = attr(node, "ceil_mode", 0)
    sizes = []
    for i in range(rank):
        span = spatial_in[i] + pads[i] + pads[rank + i] - dilations[i] * (kernel[i] - 1) - 1
        out = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (out - 1) * strides[i] >= spatial_in[i] + pads[i]:
            out -= 1
        sizes.append(out)
    return sizes


@register("AveragePool")
def average_pool(ctx, node, dy):
    """dx = ConvTranspose(dy / D, ones, group=C) with the pool's geometry.

    D is the divisor ONNX Runtime used for each output cell: with count_include_pad=1 the
    taps inside [-pad_begin, L + pad_end), otherwise the taps inside [0, L). With
    ceil_mode the last window can overhang; the transposed conv's end padding grows by
    the overhang so its output is exactly the input size.
    """
    window = _Window(ctx, node)
    include_pad = attr(node, "count_include_pad", 0)
    divisor = np.ones([1] * (2 + window.rank))
    for i in range(window.rank):
        lo, hi = ((-window.pads[i], window.spatial_in[i] + window.pads[window.rank + i]) if include_pad
                  else (0, window.spatial_in[i]))
        counts = _window_counts(window.spatial_in[i], window.spatial_out[i], window.kernel[i],
                                window.strides[i], window.dilations[i], window.pads[i], lo, hi)
        divisor = divisor * counts.reshape([1] * (2 + i) + [-1] + [1] * (window.rank - 1 - i))
    return [window.spread(ctx.g.op("Mul", dy[0], ctx.g.const(1.0 / divisor)))]


@register("LpPool")
def lp_pool(ctx, node, dy):
    """y = (sum over the window of |x|^p)^(1/p): dx = sign(x) |x|^(p-1) * (the windows' adjoint
    sum of dy / y^(p-1)); 0 from windows whose y is 0."""
    g = ctx.g
    x, y = node.input[0], node.output[0]
    p = float(attr(node, "p", 2))
    return [g.op("Mul", _lp_slope(ctx, x, p), _Window(ctx, node).spread(_over_norm_power(ctx, dy[0], y, p)))]


@register("GlobalLpPool")
def global_lp_pool(ctx, node, dy):
    """y = (sum over the spatial axes of |x|^p)^(1/p): dx = sign(x) |x|^(p-1) dy / y^(p-1)."""
    x, y = node.input[0], node.output[0]
    p = float(attr(node, "p", 2))
    return [ctx.g.op("Mul", _lp_slope(ctx, x, p), _over_norm_power(ctx, dy[0], y, p))]


def _lp_slope(ctx: Context, x: str, p: float) -> str:
    """d |x|^p / dx divided by p: sign(x) |x|^(p-1) (x itself for p = 2)."""
    g = ctx.g
    if p == 2.0:
        return x
    return g.op("Mul", g.op("Sign", x), g.op("Pow", g.op("Abs", x), g.const(p - 1.0)))


def _over_norm_power(ctx: Context, dy: str, y: str, p: float) -> str:
    """dy / y^(p-1), 0 where y is 0 (a window of zeros, whose norm has no slope to follow)."""
    g = ctx.g
    zero = g.op("Equal", y, g.const(0.0))
    power = y if p == 2.0 else g.op("Pow", y, g.const(p - 1.0))
    ratio = g.op("Div", dy, g.op("Where", zero, g.const(1.0), power))
    return g.op("Where", zero, g.const(0.0), ratio)


class _Window:
    """A pooling node's geometry, and the adjoint of summing over its windows."""

    def __init__(self, ctx: Context, node):
        self.ctx, self.node = ctx, node
        x = node.input[0]
        self.spatial_in, _ = spatial_shapes(ctx, node, x, node.output[0])
        self.rank = rank = len(self.spatial_in)
        self.kernel = list(attr(node, "kernel_shape"))
        self.strides = list(attr(node, "strides", [1] * rank))
        self.dilations = list(attr(node, "dilations", [1] * rank))
        self.pads = resolve_pads(node, self.spatial_in, self.kernel, self.strides, self.dilations)
        self.spatial_out = pool_output_sizes(node, self.spatial_in, self.kernel, self.strides,
                                             self.dilations, self.pads)
        channels = (ctx.shape(x) or (None, None))[1]
        if not isinstance(channels, int):
            raise unknown_shape(node, "the channel count must be static")
        self.channels = channels

    def spread(self, grad: str) -> str:
        """Each output cell's ``grad`` added to every input cell of its window: ConvTranspose of
        ones, its end padding grown by a ceil_mode window's overhang."""
        rank, pads = self.rank, self.pads
        transposed_pads = list(pads)
        for i in range(rank):
            reach = (self.strides[i] * (self.spatial_out[i] - 1) + self.dilations[i] * (self.kernel[i] - 1)
                     + 1 - pads[i])
            transposed_pads[rank + i] = max(pads[rank + i], reach - self.spatial_in[i])
        ones = self.ctx.g.const(np.ones([self.channels, 1] + self.kernel))
        return self.ctx.g.op(
            "ConvTranspose", grad, ones, group=self.channels, kernel_shape=self.kernel,
            strides=self.strides, dilations=self.dilations, pads=transposed_pads,
            output_padding=transpose_output_padding(
                self.spatial_in, self.spatial_out, self.kernel, self.strides, self.dilations,
                transposed_pads),
        )


@register("GlobalAveragePool")
def global_average_pool(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    spatial = (ctx.shape(x) or (None,))[2:]
    if spatial and all(isinstance(d, int) for d in spatial):
        # One broadcasting Mul by a constant plane: about 2x faster than Expand in ONNX
        # Runtime, and shape inference keeps every dim.
        plane = np.full([1, 1, *spatial], 1.0 / float(np.prod(spatial)))
        return [g.op("Mul", dy[0], g.const(plane))]
    count = g.op("Div", g.op("Size", x), g.op("Size", node.output[0]))
    scale = g.op("CastLike", g.op("Reciprocal", g.op("Cast", count, to=1)), dy[0])
    return [g.op("Mul", g.op("Expand", dy[0], g.shape(x)), scale)]


@register("GlobalMaxPool")
def global_max_pool(ctx, node, dy):
    """The gradient is split evenly between the cells equal to the maximum."""
    g = ctx.g
    x = node.input[0]
    rank = ctx.require_rank(x, node)
    mask = g.op("CastLike", g.op("Equal", x, node.output[0]), dy[0])
    ties = g.reduce("ReduceSum", mask, list(range(2, rank)), keepdims=True)
    return [g.op("Mul", mask, g.op("Div", dy[0], ties))]
