"""Activation masks as steep ramps, in ops that ONNX Runtime's blocked CPU layout keeps.

A mask like ``y > 0`` built from Greater, Cast and Mul is three passes over the tensor,
and because comparisons are not in ONNX Runtime's NCHWc (channel-blocked) op set, each
mask also reorders the activation and the gradient out of that layout and back: about
seven passes per mask in all. ``Clip(B * (y - bound), 0, 1)`` is the same 0/1 mask for a
huge power of two ``B`` (B * (y - bound) >= 1 whenever y - bound >= 1/B), and written as a
depthwise 1x1 Conv with a fused Clip it stays blocked, as does the Mul that applies it.
On MobileNetV2 at batch 64 this cut the gradient's time by a fifth to a quarter.

ReLU6's two-sided mask takes two blocked passes instead of two steps and their product:
a capped ramp, then a Conv that adds it (as a fused Sum input) to a second ramp under a
fused Tanh (``window``); that took another tenth off MobileNetV2's gradient.

The ramp is exactly 0 or 1 except where 0 < |y - bound| < 1/B (below 2^-60, and about
2^-123 for ReLU6): a float32 activation that close to its bound gets a partial gradient.
"""

from __future__ import annotations

import math

import numpy as np

from ..autodiff import Context

# Channel counts must fill ONNX Runtime's channel block, 8 on AVX2 and 16 on AVX-512;
# a depthwise Conv outside the blocked layout is slower than the comparison it replaces.
BLOCK_MULTIPLE = 16
# Producers whose float32 output ONNX Runtime keeps blocked (their channels permitting).
BLOCKED_PRODUCERS = frozenset({"Conv", "BatchNormalization", "MaxPool", "AveragePool", "Add"})
MAX_EXPONENT = 126  # B * |bound| stays below 2^127, so the Conv's bias is finite
MIN_EXPONENT = 60  # bounds so large that B would fall below 2^60 keep the comparison
# ``window`` ramps at B and at B / 2^WINDOW_SHIFT; both stay steep (2^60 at least).
WINDOW_SHIFT = 50
WINDOW_MIN_EXPONENT = MIN_EXPONENT + WINDOW_SHIFT


def ramp_applies(ctx: Context, y: str, x: str) -> bool:
    """Whether ``y`` (the activation's output, computed from ``x``) is a float32 NCHW tensor
    in the CPU provider's blocked layout, so a ramp is cheaper there than a comparison."""
    shape = ctx.shape(y)
    producer = ctx.producer(x)
    return (ctx.g.device == "cpu" and ctx.g.float_dtype == np.float32
            and shape is not None and len(shape) == 4
            and isinstance(shape[1], int) and shape[1] % BLOCK_MULTIPLE == 0
            and producer is not None and producer.op_type in BLOCKED_PRODUCERS)


def ramp_scale(bounds: list[float]) -> float | None:
    """The largest power of two B with B * |bound| < 2^127 for every bound (None: too small)."""
    largest = max([abs(b) for b in bounds] + [1.0])
    if not math.isfinite(largest):
        return None
    exponent = min(MAX_EXPONENT, MAX_EXPONENT - math.ceil(math.log2(largest)))
    return math.ldexp(1.0, exponent) if exponent >= MIN_EXPONENT else None


def affine(ctx: Context, y: str, weight: float, bias: float) -> str:
    """weight * y + bias, as the depthwise 1x1 Conv that keeps y in the blocked layout."""
    g = ctx.g
    shape = ctx.shape(y)
    assert shape is not None
    channels = shape[1]
    return g.op("Conv", y, g.const(np.full((channels, 1, 1, 1), weight, np.float32)),
                g.const(np.full((channels,), bias, np.float32)), group=channels, kernel_shape=[1, 1])


def step(ctx: Context, y: str, bound: float, scale: float, above: bool) -> str:
    """1 where y > bound (``above``) or y < bound, else 0: Clip(±B * (y - bound), 0, 1).

    B * y and B * bound are exact (power-of-two scaling), so the one rounding of their
    difference cannot change its sign; where B * y overflows it does so away from the
    bound, which the Clip turns into 1.
    """
    sign = 1.0 if above else -1.0
    ramp = affine(ctx, y, sign * scale, -sign * scale * bound)
    return ctx.g.declare(ctx.g.op("Clip", ramp, ctx.g.const(0.0), ctx.g.const(1.0)), ctx.shape(y))


def window_applies(lower: float | None, upper: float | None, scale: float) -> bool:
    """Whether ``window`` gives this Clip's mask exactly: a lower bound of 0 (ReLU6), so
    that its level C * (upper - y) is one rounding of upper - y, which is exact near upper
    and large elsewhere. With a nonzero lower bound the level would round C * (lower - y)
    at the scale of upper - lower and lose the cells within an ulp of it below upper."""
    if lower != 0.0 or upper is None or not upper > 0.0:
        return False
    coarse = math.ldexp(scale, -WINDOW_SHIFT)
    return (scale >= math.ldexp(1.0, WINDOW_MIN_EXPONENT)
            and bool(np.isfinite(np.float32(coarse) * np.float32(upper))))


def window(ctx: Context, y: str, upper: float, scale: float) -> str:
    """1 where 0 < y < upper, 0 where y sits on either bound, for y in [0, upper]: two
    blocked passes where the product of two steps takes three.

    r = Clip(B * y, 0, C * upper) (C = B / 2^WINDOW_SHIFT) is 0 at y = 0 and its cap for
    every y above a sliver; Tanh(r - C * y), a Conv with r as its fused Sum input and a
    fused Tanh, is then Tanh(0) = 0 on both bounds and Tanh(C * (upper - y)) = 1 inside,
    where C * (upper - y) is far beyond the 9 at which ONNX Runtime's Tanh returns 1.
    Multiplying by powers of two is exact, so only upper - y is ever rounded.
    """
    g, shape = ctx.g, ctx.shape(y)
    coarse = math.ldexp(scale, -WINDOW_SHIFT)
    cap = float(np.float32(coarse) * np.float32(upper))
    rise = g.declare(g.op("Clip", affine(ctx, y, scale, 0.0), g.const(0.0), g.const(cap)), shape)
    level = g.declare(g.op("Add", affine(ctx, y, -coarse, 0.0), rise), shape)
    return g.declare(g.op("Tanh", level), shape)


def masked_by_steps(ctx: Context, y: str, dy: str, lower: float | None,
                    upper: float | None, scale: float) -> str:
    """dy where lower < y < upper (a missing bound imposes nothing), y in [lower, upper].

    Two steps are multiplied together before dy where ``window`` does not apply: ONNX
    Runtime may compute a mask as soon as y exists, and one mask per activation held until
    the backward pass reaches it costs less memory than two.
    """
    g = ctx.g
    if upper is not None and window_applies(lower, upper, scale):
        mask = window(ctx, y, upper, scale)
    else:
        steps = [step(ctx, y, bound, scale, above)
                 for bound, above in ((lower, True), (upper, False)) if bound is not None]
        mask = steps[0] if len(steps) == 1 else g.declare(g.op("Mul", *steps), ctx.shape(y))
    return g.declare(g.op("Mul", dy, mask), ctx.shape(y))
