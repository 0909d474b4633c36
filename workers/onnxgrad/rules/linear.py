"""MatMul, Gemm, Conv and ConvTranspose: the gradient of a linear map is its adjoint."""

from __future__ import annotations

import numpy as np
import onnx

from ..autodiff import Context, attr, register, unknown_shape, unsupported
from ..graph import all_static
from .broadcast import unbroadcast


def _swap_last_two(ctx: Context, name: str, rank: int) -> str:
    value = ctx.constant(name)
    if value is not None:
        return ctx.g.const(np.swapaxes(value, -1, -2), value.dtype)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return ctx.g.op("Transpose", name, perm=perm)


@register("MatMul", inputs=(0, 1))
def matmul(ctx, node, dy):
    g = ctx.g
    a, b = node.input
    y = node.output[0]
    ra, rb = ctx.require_rank(a, node), ctx.require_rank(b, node)
    if ra == 1:
        raise unsupported(node, "a 1-D left operand is not supported")
    grads: list[str | None] = [None, None]
    if rb == 1:  # y[..., m] = a[..., m, k] @ b[k]
        dy_col = g.unsqueeze(dy[0], [-1])
        if ctx.needs(a):
            grads[0] = g.op("Mul", dy_col, b)
        if ctx.needs(b):
            grads[1] = unbroadcast(ctx, g.op("Mul", dy_col, a), b, out_shape=ctx.shape(a))
        return grads
    y_shape = ctx.shape(y)
    if ctx.needs(a) and ra == rb == 2 and ctx.is_external(b):
        # a weight outside the model (over 2 GiB): a Transpose of it would be folded into a second
        # copy by ONNX Runtime; Gemm reads it transposed in place
        grads[0] = g.op("Gemm", dy[0], b, transB=1)
    elif ctx.needs(a):
        da = g.op("MatMul", dy[0], _swap_last_two(ctx, b, rb))
        a_shape = ctx.shape(a)
        out_shape = None if y_shape is None or a_shape is None else y_shape[:-2] + a_shape[-2:]
        grads[0] = unbroadcast(ctx, da, a, out_shape=out_shape)
    if ctx.needs(b):
        db = g.op("MatMul", _swap_last_two(ctx, a, ra), dy[0])
        b_shape = ctx.shape(b)
        out_shape = None if y_shape is None or b_shape is None else y_shape[:-2] + b_shape[-2:]
        grads[1] = unbroadcast(ctx, db, b, out_shape=out_shape)
    return grads


@register("Gemm", inputs=(0, 1, 2))
def gemm(ctx, node, dy):
    """Y = alpha op(A) op(B) + beta C."""
    g = ctx.g
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    grads: list[str | None] = [None, None, None]
    if ctx.needs(a):
        if trans_a:
            grads[0] = g.op("Gemm", b, dy[0], alpha=alpha, transA=trans_b, transB=1)
        else:
            grads[0] = g.op("Gemm", dy[0], b, alpha=alpha, transB=1 - trans_b)
    if ctx.needs(b):
        if trans_b:
            grads[1] = g.op("Gemm", dy[0], a, alpha=alpha, transA=1, transB=trans_a)
        else:
            grads[1] = g.op("Gemm", a, dy[0], alpha=alpha, transA=1 - trans_a)
    if c and ctx.needs(c):
        scaled = g.op("Mul", dy[0], g.const(beta)) if beta != 1.0 else dy[0]
        grads[2] = unbroadcast(ctx, scaled, c, node.output[0])
    return grads


def spatial_shapes(ctx: Context, node, x: str, y: str) -> tuple[list[int], list[int]]:
    """Static spatial sizes of the input and output of a windowed operator."""
    xs, ys = ctx.shape(x), ctx.shape(y)
    if xs is None or ys is None:
        raise unknown_shape(node, "input and output shapes must be known")
    spatial_in, spatial_out = xs[2:], ys[2:]
    if not (all_static(spatial_in) and all_static(spatial_out)):
        raise unknown_shape(
            node, f"needs static spatial sizes, got input {xs} and output {ys}; "
            "export the model with a fixed image size"
        )
    return list(spatial_in), list(spatial_out)


def resolve_pads(node, spatial_in, kernel, strides, dilations) -> list[int]:
    """Explicit [begin..., end...] pads, resolving auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    rank = len(spatial_in)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(attr(node, "pads", [0] * (2 * rank)))
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    begins, ends = [], []
    for length, k, s, d in zip(spatial_in, kernel, strides, dilations, strict=True):
        total = max(0, (-(-length // s) - 1) * s + d * (k - 1) + 1 - length)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(total - begins[-1])
    return begins + ends


def window_params(node, rank: int, kernel: list[int]):
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    return strides, dilations


def transpose_output_padding(spatial_in, spatial_out, kernel, strides, dilations, pads):
    rank = len(spatial_in)
    return [
        spatial_in[i]
        - (strides[i] * (spatial_out[i] - 1) + dilations[i] * (kernel[i] - 1) + 1
           - pads[i] - pads[rank + i])
        for i in range(rank)
    ]


def kernel_shape(ctx: Context, node, weight: str) -> list[int]:
    shape = attr(node, "kernel_shape")
    if shape:
        return list(shape)
    w = ctx.shape(weight)
    spatial = None if w is None else w[2:]
    if spatial is None or not all_static(spatial):
        raise unknown_shape(node, "the kernel shape is unknown")
    return list(spatial)


def adjoint_kernel(weight: np.ndarray, group: int) -> np.ndarray:
    """The kernel of the conv that computes a conv's input gradient.

    [M, C/g, k...] -> [C, M/g, k...]: in and out channels swapped within each group, and
    every spatial axis flipped.
    """
    m, c_per_group = weight.shape[:2]
    spatial = weight.shape[2:]
    blocks = weight.reshape((group, m // group, c_per_group) + spatial).swapaxes(1, 2)
    adjoint = blocks.reshape((group * c_per_group, m // group) + spatial)
    return np.ascontiguousarray(np.flip(adjoint, axis=tuple(range(2, adjoint.ndim))))


def _insert_zeros(ctx: Context, dy: str, dy_shape, spatial_out: list[int],
                  strides: list[int]) -> str:
    """dy with stride-1 zeros after every element along each spatial axis (length Lo*s).

    Nearest upsampling times a constant 0/1 lattice: both are fast same-shape kernels in
    ONNX Runtime, unlike a Pad over an interleaved 6-D view (measured 5x slower).
    """
    g = ctx.g
    rank = len(spatial_out)
    scales = g.const([1.0, 1.0] + [float(s) for s in strides])
    upsampled = g.op("Resize", dy, "", scales, mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    if dy_shape is not None:
        sizes = [lo * s for lo, s in zip(spatial_out, strides, strict=True)]
        g.declare(upsampled, (*dy_shape[:2], *sizes))
    lattice = np.ones([1, 1] + [lo * s for lo, s in zip(spatial_out, strides, strict=True)])
    for axis, s in enumerate(strides):
        keep = (np.arange(lattice.shape[2 + axis]) % s == 0).astype(np.float64)
        lattice *= keep.reshape([1] * (2 + axis) + [-1] + [1] * (rank - 1 - axis))
    return g.op("Mul", upsampled, g.const(lattice))


def conv_input_grad_as_conv(ctx: Context, dy: str, dy_shape, weight: np.ndarray, group: int,
                            spatial_in, spatial_out, kernel, strides, dilations, pads) -> str:
    """dx as a stride-1 Conv of (zero-upsampled) dy with the adjoint kernel; ``dy_shape``
    is the conv output's (None if unknown)."""
    g = ctx.g
    rank = len(kernel)
    if any(s > 1 for s in strides):
        dy = _insert_zeros(ctx, dy, dy_shape, spatial_out, strides)
        upsampled = [lo * s for lo, s in zip(spatial_out, strides, strict=True)]
    else:
        upsampled = list(spatial_out)
    begins, ends, crop_start, crop_end = [], [], [], []
    for i in range(rank):
        extent = dilations[i] * (kernel[i] - 1)
        begin = extent - pads[i]
        end = spatial_in[i] + extent - begin - upsampled[i]
        crop_start.append(max(0, -begin))
        crop_end.append(upsampled[i] - max(0, -end))
        begins.append(max(0, begin))
        ends.append(max(0, end))
    if any(crop_start) or crop_end != upsampled:
        axes = list(range(2, 2 + rank))
        dy = g.op("Slice", dy, g.ints(crop_start), g.ints(crop_end), g.ints(axes))
    return g.op("Conv", dy, g.const(adjoint_kernel(weight, group)),
                dilations=dilations, group=group, kernel_shape=kernel, pads=begins + ends)


NCHWC_BLOCK = 8  # ONNX Runtime's blocked-layout channel block on AVX2 (16 on AVX-512)
COL2IM_OPSET = 18


def col2im_applies(device: str, opset: int, weight: np.ndarray | None, group: int) -> bool:
    """Whether a conv's input gradient is best computed as MatMul + Col2Im.

    For convs whose input has fewer channels than one block of ONNX Runtime's blocked
    layout (an image's 1 or 3 channels, LeNet's 6), the adjoint Conv pads its output
    channels up to the block, and ConvTranspose, which is the same GEMM + Col2Im, runs its
    small GEMMs one image at a time. One batched MatMul then one Col2Im measured 1.5-3x
    faster than the better of the two at batch 64 on 2 threads (LeNet's 5x5 convs, the
    3x3 stems of ResNet-18 and MobileNetV2). Col2Im is CPU-only in ONNX Runtime (a CUDA
    session would copy to the host and back) and needs opset 18; 2-D only.
    """
    return (device == "cpu" and opset >= COL2IM_OPSET and weight is not None
            and _few_channel_dense_2d(weight.shape, group))


def _few_channel_dense_2d(weight_shape, group: int) -> bool:
    return group == 1 and len(weight_shape) == 4 and weight_shape[1] < NCHWC_BLOCK


def wants_col2im(graph: onnx.GraphProto) -> bool:
    """Whether any Conv of ``graph`` (with its weights stored as an initializer) would take
    the Col2Im form, so a CPU gradient graph gains from opset 18."""
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    return any(node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights
               and _few_channel_dense_2d(weights[node.input[1]], attr(node, "group", 1))
               for node in graph.node)


def conv_input_grad_as_col2im(ctx: Context, dy: str, weight: np.ndarray, spatial_in,
                              kernel, strides, dilations, pads) -> str:
    """dx = Col2Im(W^T @ dy): every output cell's window gets its tap-by-channel column.

    Col2Im sums overlapping windows into the input-sized image, with the conv's own
    strides, dilations and pads, so no zeros are inserted and nothing is cropped.
    """
    g = ctx.g
    out_channels = weight.shape[0]
    columns = g.op("MatMul", g.const(np.ascontiguousarray(weight.reshape(out_channels, -1).T)),
                   g.op("Reshape", dy, g.ints([0, out_channels, -1])))
    return g.op("Col2Im", columns, g.ints(spatial_in), g.ints(kernel),
                dilations=dilations, pads=pads, strides=strides)


def _adjoint_conv_is_faster(weight: np.ndarray, group: int, strides: list[int],
                            spatial_in: list[int], spatial_out: list[int]) -> bool:
    """Adjoint Conv or ConvTranspose, by their cost on ONNX Runtime 1.31 CPU.

    Grouped ConvTranspose is several times slower than a depthwise Conv. ConvTranspose
    runs one image at a time on one thread, but it only does the conv's own work; the
    adjoint Conv is threaded and blocked (NCHWc), but computes every cell of the padded
    input-sized output for channel counts rounded up to the block. Measured at batch 64 on
    LeNet's 5x5 valid conv from 6 channels (waste 3x): ConvTranspose is faster on one
    thread, the adjoint Conv on two (and when idle threads spin), so waste up to 3x goes to
    the threaded one; a 1-channel image gradient (waste 8x and more) stays ConvTranspose.
    Dense strided convs would also waste the adjoint Conv on inserted zeros.
    """
    if group > 1:
        return True
    if any(s > 1 for s in strides):
        return False
    channels = weight.shape[1]
    padded = -(-channels // NCHWC_BLOCK) * NCHWC_BLOCK
    waste = padded / channels * float(np.prod(spatial_in)) / float(np.prod(spatial_out))
    return waste <= 3.0


@register("Conv", inputs=(0, 2))
def conv(ctx, node, dy):
    """The input gradient of a conv is the transposed conv with the same geometry.

    With constant weights, where it is faster, that is MatMul + Col2Im (few input
    channels, on CPU) or a stride-1 Conv with the adjoint kernel over (zero-upsampled) dy;
    otherwise ConvTranspose(dy, W), whose output_padding restores the input size.
    """
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 else ""
    grads: list[str | None] = [None, None, None]
    if ctx.needs(x):
        grads[0] = conv_input_grad(ctx, node, dy[0], w, ctx.constant(w))
    if bias and ctx.needs(bias):
        spatial_rank = ctx.require_rank(node.output[0], node) - 2
        grads[2] = ctx.g.reduce("ReduceSum", dy[0], [0] + list(range(2, 2 + spatial_rank)), False)
    return grads


def conv_input_grad(ctx: Context, node, dy: str, w: str, weight: np.ndarray | None) -> str:
    """d <dy, Conv(x, W)> / dx for the Conv-like ``node`` (its geometry attributes), whose
    weights are the tensor ``w`` (``weight``: their value, where constant)."""
    g = ctx.g
    spatial_in, spatial_out = spatial_shapes(ctx, node, node.input[0], node.output[0])
    kernel = (kernel_shape(ctx, node, w) if weight is None
              else list(attr(node, "kernel_shape", weight.shape[2:])))
    strides, dilations = window_params(node, len(kernel), kernel)
    pads = resolve_pads(node, spatial_in, kernel, strides, dilations)
    group = attr(node, "group", 1)
    if col2im_applies(g.device, g.opset, weight, group):
        assert weight is not None
        return conv_input_grad_as_col2im(ctx, dy, weight, spatial_in, kernel, strides, dilations, pads)
    if weight is not None and _adjoint_conv_is_faster(weight, group, strides, spatial_in, spatial_out):
        return conv_input_grad_as_conv(ctx, dy, ctx.shape(node.output[0]), weight, group,
                                       spatial_in, spatial_out, kernel, strides, dilations, pads)
    return g.op(
        "ConvTranspose", dy, w,
        strides=strides, dilations=dilations, pads=pads, group=group, kernel_shape=kernel,
        output_padding=transpose_output_padding(spatial_in, spatial_out, kernel, strides, dilations, pads),
    )


@register("ConvTranspose", inputs=(0, 2))
def conv_transpose(ctx, node, dy):
    """ConvTranspose is the adjoint of Conv with the same geometry: dx = Conv(dy, W)."""
    g = ctx.g
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 else ""
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "") or attr(node, "output_shape"):
        raise unsupported(node, "auto_pad and output_shape are not supported; give explicit pads")
    kernel = kernel_shape(ctx, node, w)
    strides, dilations = window_params(node, len(kernel), kernel)
    pads = list(attr(node, "pads", [0] * (2 * len(kernel))))
    grads: list[str | None] = [None, None, None]
    if ctx.needs(x):
        grads[0] = g.op(
            "Conv", dy[0], w, strides=strides, dilations=dilations, pads=pads,
            group=attr(node, "group", 1), kernel_shape=kernel,
        )
    if bias and ctx.needs(bias):
        grads[2] = g.reduce("ReduceSum", dy[0], [0] + list(range(2, 2 + len(kernel))), False)
    return grads
