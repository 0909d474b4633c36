"""GridSample: images sampled at coordinates the model computes (spatial transformer networks),
and AffineGrid, which computes them from a predicted affine warp.

Each output pixel is a bilinear blend of the four input pixels around its coordinate (or the
nearest one), so the image's gradient scatters dy back to those pixels with the blend's weights,
and the coordinates' gradient is the blend's slope: the differences between neighbouring pixels.
Coordinates in [-1, 1] map to pixels as PyTorch maps them: ix = gx * s + (W - 1) / 2, with
s = (W - 1) / 2 where corners align and W / 2 where they do not.
"""

from __future__ import annotations

import numpy as np

from ..autodiff import Context, attr, register, unknown_shape, unsupported
from ..graph import all_static


@register("GridSample", inputs=(0, 1))
def grid_sample(ctx, node, dy):
    g = ctx.g
    x, grid = node.input[0], node.input[1]
    mode = attr(node, "mode", "linear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)  # opset 16's names
    padding = attr(node, "padding_mode", "zeros")
    shape = ctx.shape(x)
    if shape is not None and len(shape) != 4:
        raise unsupported(node, "only 2-D sampling (a 4-D input) is supported")
    if shape is None or not all_static(shape[2:]):
        raise unknown_shape(node, "the input's height and width must be known")
    if mode == "cubic" or padding == "reflection":
        raise unsupported(node, f"mode {mode!r} with padding {padding!r} is not supported (only linear and "
                                "nearest, with zeros or border padding)")
    height, width = int(shape[2]), int(shape[3])
    align = bool(attr(node, "align_corners", 0))
    sampler = _Sampler(ctx, x, height, width, dy[0])
    ix, dix = _pixel_coordinate(ctx, g.op("Gather", grid, g.const(0), axis=3), width, align, padding)
    iy, diy = _pixel_coordinate(ctx, g.op("Gather", grid, g.const(1), axis=3), height, align, padding)
    if mode == "nearest":
        sampler.add_corner(g.op("Round", iy), g.op("Round", ix), None)
        return [sampler.image_gradient() if ctx.needs(x) else None, None]
    x0, y0 = g.op("Floor", ix), g.op("Floor", iy)
    x1, y1 = (g.op("Add", t, g.const(1.0)) for t in (x0, y0))
    wx1, wy1 = g.op("Sub", ix, x0), g.op("Sub", iy, y0)
    wx0, wy0 = (g.op("Sub", g.const(1.0), t) for t in (wx1, wy1))
    v00 = sampler.add_corner(y0, x0, g.op("Mul", wy0, wx0))
    v01 = sampler.add_corner(y0, x1, g.op("Mul", wy0, wx1))
    v10 = sampler.add_corner(y1, x0, g.op("Mul", wy1, wx0))
    v11 = sampler.add_corner(y1, x1, g.op("Mul", wy1, wx1))
    grid_gradient = None
    if ctx.needs(grid):
        # d out / d ix = wy0 (v01 - v00) + wy1 (v11 - v10); d out / d iy likewise across rows
        slope_x = g.op("Add", g.op("Mul", sampler.per_sample(wy0), g.op("Sub", v01, v00)),
                       g.op("Mul", sampler.per_sample(wy1), g.op("Sub", v11, v10)))
        slope_y = g.op("Add", g.op("Mul", sampler.per_sample(wx0), g.op("Sub", v10, v00)),
                       g.op("Mul", sampler.per_sample(wx1), g.op("Sub", v11, v01)))
        parts = [g.op("Mul", sampler.channel_sum(slope, ix), dcoord)
                 for slope, dcoord in ((slope_x, dix), (slope_y, diy))]
        grid_gradient = g.op("Concat", *(g.unsqueeze(p, [3]) for p in parts), axis=3)
    return [sampler.image_gradient() if ctx.needs(x) else None, grid_gradient]


def _pixel_coordinate(ctx: Context, normalized: str, size: int, align: bool, padding: str) -> tuple[str, str]:
    """(the pixel coordinate, d coordinate / d normalized) of a [N, Ho, Wo] grid component; border
    padding clamps the coordinate to the image, where it stops moving."""
    g = ctx.g
    scale = (size - 1) / 2 if align else size / 2
    pixel = g.op("Add", g.op("Mul", normalized, g.const(scale)), g.const((size - 1) / 2))
    if padding != "border":
        return pixel, g.const(scale)
    inside = g.op("And", g.op("Greater", pixel, g.const(0.0)), g.op("Less", pixel, g.const(size - 1.0)))
    return (g.op("Clip", pixel, g.const(0.0), g.const(size - 1.0)),
            g.op("Mul", g.op("CastLike", inside, pixel), g.const(scale)))


class _Sampler:
    """Reads the image at integer pixel coordinates (zero outside it) and collects where the
    output's gradient goes back to, for one ScatterElements at the end."""

    def __init__(self, ctx: Context, x: str, height: int, width: int, dy: str):
        g = self.g = ctx.g
        self.x, self.height, self.width = x, height, width
        self.flat = g.op("Reshape", x, g.ints([0, 0, -1]))  # [N, C, H*W]
        self.dy = g.op("Reshape", dy, g.ints([0, 0, -1]))  # [N, C, P]
        self.channels = g.op("Gather", g.shape(x), g.ints([1]))
        self.indices: list[str] = []
        self.updates: list[str] = []

    def per_sample(self, t: str) -> str:
        """A [N, Ho, Wo] tensor as [N, 1, P], to broadcast over channels."""
        return self.g.op("Reshape", t, self.g.ints([0, 1, -1]))

    def channel_sum(self, t: str, like: str) -> str:
        """The sum over channels of dy * t ([N, C, P]), shaped like ``like`` ([N, Ho, Wo])."""
        g = self.g
        return g.reshape_like(g.reduce("ReduceSum", g.op("Mul", self.dy, t), [1], keepdims=False), like)

    def add_corner(self, row: str, col: str, weight: str | None) -> str:
        """The image's values at (row, col) ([N, C, P]; 0 outside), and dy * weight sent back there."""
        g = self.g
        valid = g.op("CastLike", g.op("And", g.op("And", g.op("GreaterOrEqual", col, g.const(0.0)),
                                                        g.op("LessOrEqual", col, g.const(self.width - 1.0))),
                                      g.op("And", g.op("GreaterOrEqual", row, g.const(0.0)),
                                           g.op("LessOrEqual", row, g.const(self.height - 1.0)))), row)
        clipped_row = g.op("Clip", row, g.const(0.0), g.const(self.height - 1.0))
        clipped_col = g.op("Clip", col, g.const(0.0), g.const(self.width - 1.0))
        index = g.op("Cast", g.op("Add", g.op("Mul", clipped_row, g.const(float(self.width))), clipped_col),
                     to=7)  # int64
        index = g.op("Expand", self.per_sample(index),
                     g.op("Concat", g.ints([1]), self.channels, g.ints([1]), axis=0))
        share = self.per_sample(valid if weight is None else g.op("Mul", weight, valid))
        self.indices.append(index)
        self.updates.append(g.op("Mul", self.dy, share))
        return g.op("Mul", g.op("GatherElements", self.flat, index, axis=2), self.per_sample(valid))

    def image_gradient(self) -> str:
        g = self.g
        index = g.op("Concat", *self.indices, axis=2) if len(self.indices) > 1 else self.indices[0]
        update = g.op("Concat", *self.updates, axis=2) if len(self.updates) > 1 else self.updates[0]
        scattered = g.op("ScatterElements", g.zeros_like(self.flat), index, update, axis=2, reduction="add")
        return g.reshape_like(scattered, self.x)


@register("AffineGrid")
def affine_grid(ctx, node, dy):
    """grid[n, ..., :] = theta[n] @ (x, y[, z], 1) at each output pixel's normalised position: linear
    in theta, so dtheta[n] = sum over pixels of dgrid (outer) position."""
    g = ctx.g
    spatial = _affine_grid_sizes(ctx, node)
    align = bool(attr(node, "align_corners", 0))
    axes = [np.linspace(-1.0, 1.0, d) if align else (2 * np.arange(d) + 1) / d - 1 for d in spatial]
    mesh = np.meshgrid(*axes, indexing="ij")  # one per spatial axis (D, H, W order)
    positions = np.stack([m.reshape(-1) for m in reversed(mesh)] + [np.ones(mesh[0].size)], axis=1)
    flat = g.op("Transpose", g.op("Reshape", dy[0], g.ints([0, -1, len(spatial)])), perm=[0, 2, 1])
    return [g.op("MatMul", flat, g.const(positions))]


def _affine_grid_sizes(ctx: Context, node) -> list[int]:
    """The grid's spatial sizes: from shape inference (a size computed from the input's Shape has
    a symbolic batch but known spatial sizes), or the constant size input."""
    shape = ctx.shape(node.output[0])
    sizes = shape[1:-1] if shape is not None else [None]
    if all_static(sizes):
        return list(sizes)
    size = ctx.constant(node.input[1])
    if size is None:
        raise unknown_shape(node, "the grid's height and width must be known before the model runs")
    return [int(d) for d in size.reshape(-1)[2:]]
