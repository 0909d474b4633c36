"""Inverse trigonometric and hyperbolic functions (Sin and Cos are in pointwise.py)."""

from __future__ import annotations

from ..autodiff import register


def _one_minus_square(ctx, x: str) -> str:
    return ctx.g.op("Sub", ctx.g.const(1.0), ctx.g.op("Mul", x, x))


@register("Tan")
def tan(ctx, node, dy):
    g = ctx.g
    y = node.output[0]
    return [g.op("Mul", dy[0], g.op("Add", g.const(1.0), g.op("Mul", y, y)))]


@register("Asin")
def asin(ctx, node, dy):
    return [ctx.g.op("Div", dy[0], ctx.g.op("Sqrt", _one_minus_square(ctx, node.input[0])))]


@register("Acos")
def acos(ctx, node, dy):
    g = ctx.g
    return [g.op("Neg", g.op("Div", dy[0], g.op("Sqrt", _one_minus_square(ctx, node.input[0]))))]


@register("Atan")
def atan(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    return [g.op("Div", dy[0], g.op("Add", g.const(1.0), g.op("Mul", x, x)))]


@register("Sinh")
def sinh(ctx, node, dy):
    return [ctx.g.op("Mul", dy[0], ctx.g.op("Cosh", node.input[0]))]


@register("Cosh")
def cosh(ctx, node, dy):
    return [ctx.g.op("Mul", dy[0], ctx.g.op("Sinh", node.input[0]))]


@register("Asinh")
def asinh(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    return [g.op("Div", dy[0], g.op("Sqrt", g.op("Add", g.op("Mul", x, x), g.const(1.0))))]


@register("Acosh")
def acosh(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    return [g.op("Div", dy[0], g.op("Sqrt", g.op("Sub", g.op("Mul", x, x), g.const(1.0))))]


@register("Atanh")
def atanh(ctx, node, dy):
    return [ctx.g.op("Div", dy[0], _one_minus_square(ctx, node.input[0]))]
