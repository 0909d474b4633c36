"""Operators that only move, copy or select elements.

Reshapes and transposes invert directly. Selections (Slice, Gather, Tile, Pad, ...) use one
shared rule: replay the operator on a tensor of flat element numbers shaped like the input,
which says where every output element came from, then scatter-add the gradient there.
Repeated elements (Tile, reflect padding) add up; padding cells point at a discarded slot.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..autodiff import Context, attr, register, unknown_shape, unsupported
from ..graph import all_static
from .broadcast import unbroadcast
from .pooling import scatter_add_flat


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx, node, dy):
    return [ctx.reshape_to(dy[0], node.output[0], node.input[0])]


@register("Transpose")
def transpose(ctx, node, dy):
    perm = attr(node, "perm")
    if perm is None:
        rank = ctx.require_rank(node.input[0], node)
        perm = list(reversed(range(rank)))
    inverse = list(np.argsort(perm))
    return [ctx.g.op("Transpose", dy[0], perm=[int(p) for p in inverse])]


@register("Expand")
def expand(ctx, node, dy):
    return [unbroadcast(ctx, dy[0], node.input[0], node.output[0])]


def _axis_sizes(ctx: Context, names: list[str], axis: int) -> str:
    g = ctx.g
    static = []
    for name in names:
        shape = ctx.shape(name)
        static.append(shape[axis] if shape is not None and len(shape) > axis else None)
    if all_static(static):
        return g.ints(static)
    pieces = [g.op("Gather", g.shape(name), g.ints([axis])) for name in names]
    return g.op("Concat", *pieces, axis=0)


@register("Concat", inputs="all")
def concat(ctx, node, dy):
    g = ctx.g
    rank = ctx.require_rank(node.output[0], node)
    axis = attr(node, "axis")
    axis = axis + rank if axis < 0 else axis
    inputs = list(node.input)
    pieces = g.op("Split", dy[0], _axis_sizes(ctx, inputs, axis), axis=axis, outputs=len(inputs))
    pieces = pieces if isinstance(pieces, list) else [pieces]
    return [piece if ctx.needs(name) else None for name, piece in zip(inputs, pieces, strict=True)]


@register("Split")
def split(ctx, node, dy):
    g = ctx.g
    rank = ctx.require_rank(node.input[0], node)
    axis = attr(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    parts = [grad if grad is not None else g.zeros_like(out)
             for out, grad in zip(node.output, dy, strict=True)]
    return [g.op("Concat", *parts, axis=axis)]


def replay_on_positions(ctx: Context, node, dy: str, sink_value: bool = False) -> str:
    """Gradient of a pure selection: scatter-add dy to where each output element came from."""
    g = ctx.g
    x = node.input[0]
    numel = g.op("Size", x)
    positions = g.op("Reshape", g.op("Range", g.const(0, np.int64), numel, g.const(1, np.int64)),
                     g.shape(x))
    replay_inputs = [positions] + list(node.input[1:])
    if node.op_type == "Pad":  # padding cells read position `numel`, a slot cut off below
        rest = list(node.input[3:])
        replay_inputs = [positions, node.input[1], numel if sink_value else ""] + rest
        while replay_inputs[-1] == "":
            replay_inputs.pop()
    replayed = g.fresh("positions")
    g.nodes.append(helper.make_node(
        node.op_type, replay_inputs, [replayed], name=g.fresh(node.op_type),
        **{a.name: helper.get_attribute_value(a) for a in node.attribute},
    ))
    flat = scatter_add_flat(ctx, x, replayed, dy, extra=1 if sink_value else 0)
    if sink_value:
        flat = g.op("Slice", flat, g.ints([0]), g.op("Reshape", numel, g.ints([1])))
    return g.reshape_like(flat, x)


@register("Gather", "GatherElements", "GatherND", "Tile", "ReverseSequence")
def selection(ctx, node, dy):
    return [replay_on_positions(ctx, node, dy[0])]


@register("ScatterElements", inputs=(0, 2))
def scatter_elements(ctx, node, dy):
    """The updates' gradient is dy at the positions they were written to; the data's is dy,
    with those positions zeroed when the updates replaced the data there (reduction "none",
    whose indices ONNX requires to be unique) and whole when they were added."""
    reduction = attr(node, "reduction", "none")
    if reduction not in ("none", "add"):
        raise unsupported(node, f"reduction {reduction!r} is not supported (only none and add)")
    g = ctx.g
    axis = attr(node, "axis", 0)
    indices = node.input[1]
    grads: list[str | None] = [None, None, None]
    if ctx.needs(node.input[2]):
        grads[2] = g.op("GatherElements", dy[0], indices, axis=axis)
    if ctx.needs(node.input[0]):
        grads[0] = dy[0] if reduction == "add" else g.op(
            "ScatterElements", dy[0], indices, g.zeros_like(node.input[2]), axis=axis)
    return grads


@register("Slice")
def slice_(ctx, node, dy):
    """A contiguous slice (constant bounds, steps of 1, static sizes on the sliced axes, as
    exporters write them: a split of q, k and v, a class token) pads dy back with zeros; any
    other slice scatters dy to the positions it read."""
    padded = _slice_as_pad(ctx, node, dy[0])
    return [padded if padded is not None else replay_on_positions(ctx, node, dy[0])]


def _slice_as_pad(ctx: Context, node, dy: str) -> str | None:
    shape = ctx.shape(node.input[0])
    bounds = [ctx.constant(node.input[i]) if len(node.input) > i and node.input[i] else None
              for i in range(1, 5)]
    starts, ends, axes, steps = bounds
    if shape is None or starts is None or ends is None:
        return None
    rank = len(shape)
    axes = np.arange(len(starts)) if axes is None else axes
    if steps is not None and np.any(steps != 1):
        return None
    pads = [0] * (2 * rank)
    for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist(), strict=True):
        axis = axis + rank if axis < 0 else axis
        dim = shape[axis]
        if not isinstance(dim, int):
            return None
        first = min(max(start + dim if start < 0 else start, 0), dim)
        last = max(min(max(end + dim if end < 0 else end, 0), dim), first)
        pads[axis], pads[axis + rank] = first, dim - last
    return ctx.g.op("Pad", dy, ctx.g.ints(pads))


@register("Pad")
def pad(ctx, node, dy):
    mode = attr(node, "mode", "constant")
    if mode == "wrap":
        raise unsupported(node, "wrap padding is not supported")
    return [replay_on_positions(ctx, node, dy[0], sink_value=(mode == "constant"))]


@register("SpaceToDepth")
def space_to_depth(ctx, node, dy):
    """A permutation whose inverse is DepthToSpace in DCR mode (ONNX defines them so). CRD
    mode (opset 28) orders the output channels differently: undo that order first."""
    g = ctx.g
    block = attr(node, "blocksize")
    grad = dy[0]
    if attr(node, "mode", "DCR") == "CRD":
        grad = g.op("Gather", grad, g.ints(_crd_positions(ctx, node, node.output[0], block)), axis=1)
    return [g.op("DepthToSpace", grad, blocksize=block, mode="DCR")]


@register("DepthToSpace")
def depth_to_space(ctx, node, dy):
    """DCR mode inverts to SpaceToDepth. CRD mode (PyTorch's PixelShuffle) is DCR after a
    permutation of the input's channels, so its inverse ends with the reverse permutation."""
    g = ctx.g
    block = attr(node, "blocksize")
    dz = g.op("SpaceToDepth", dy[0], blocksize=block)
    if attr(node, "mode", "DCR") == "DCR":
        return [dz]
    crd = _crd_positions(ctx, node, node.input[0], block)
    inverse = np.empty_like(crd)
    inverse[crd] = np.arange(len(crd))
    return [g.op("Gather", dz, g.ints(inverse), axis=1)]


def _crd_positions(ctx: Context, node, deep: str, block: int) -> np.ndarray:
    """For each channel of the deep tensor (``deep``, C * block^2 channels) in DCR order, its
    position in CRD order: DCR numbers (i, j, c) as (i * block + j) * C + c, CRD as
    c * block^2 + i * block + j."""
    shape = ctx.shape(deep)
    channels = shape[1] if shape is not None and len(shape) == 4 else None
    if not isinstance(channels, int):
        raise unknown_shape(node, "CRD mode needs a known number of channels")
    i, j, c = np.meshgrid(np.arange(block), np.arange(block), np.arange(channels // (block * block)),
                          indexing="ij")
    return (c * block * block + i * block + j).reshape(-1).astype(np.int64)


@register("Trilu")
def trilu(ctx, node, dy):
    """A mask that keeps one triangle: the same mask on dy."""
    return [ctx.g.op("Trilu", dy[0], *node.input[1:], upper=attr(node, "upper", 1))]


@register("CumSum")
def cumsum(ctx, node, dy):
    """Each input adds into the outputs after it (or before it, reversed): the adjoint is the
    cumulative sum in the other direction, with the same exclusivity."""
    return [ctx.g.op("CumSum", dy[0], node.input[1], exclusive=attr(node, "exclusive", 0),
                     reverse=1 - attr(node, "reverse", 0))]


@register("TopK")
def top_k(ctx, node, dy):
    """The values' gradient goes back to where they were taken (the indices output, named
    here when the model leaves it unnamed)."""
    g = ctx.g
    if len(node.output) < 2 or not node.output[1]:
        outputs = [node.output[0], g.fresh("topk_indices")]
        del node.output[:]
        node.output.extend(outputs)
    x = node.input[0]
    return [g.op("ScatterElements", g.zeros_like(x), node.output[1], dy[0], axis=attr(node, "axis", -1))]
