"""Elementwise operators: arithmetic with broadcasting, activations, casts.

Masks are taken from the forward *output* where that is equivalent (Relu, HardSigmoid),
so ONNX Runtime can still fuse the producing Conv with its activation; Relu and Clip masks
over channel-blocked activations are steep ramps that stay in that layout (ramps.py).
Kink conventions follow PyTorch: Relu'(0) = 0, LeakyRelu'(0) = alpha, Clip strict like
ReLU6 (inclusive where it clamps the model input, so pixels on the bounds keep a gradient).
"""

from __future__ import annotations

import math

import numpy as np

from ..autodiff import ALL_INPUTS, Context, attr, refuse, register, unsupported
from ..graph import FLOAT_TYPES
from .broadcast import unbroadcast
from .ramps import masked_by_steps, ramp_applies, ramp_scale

refuse(
    "its gradient is zero almost everywhere, so gradient attacks would be masked; "
    "use black-box attacks, or write the quantization as QuantizeLinear -> DequantizeLinear, "
    "which is differentiated straight through",
    "Sign", "Floor", "Ceil", "Round", "Hardmax",
)


def _where(ctx: Context, condition: str, if_true: str, if_false: str) -> str:
    return ctx.g.op("Where", condition, if_true, if_false)


def masked(ctx: Context, condition: str, grad: str) -> str:
    """grad where condition holds, else 0 (Mul by the cast mask: ONNX Runtime's Where is
    about 1.5x slower on large tensors)."""
    return ctx.g.op("Mul", grad, ctx.g.op("CastLike", condition, grad))


@register("Identity")
def identity(ctx, node, dy):
    return [dy[0]]


@register("Dropout")
def dropout(ctx, node, dy):
    """Inference Dropout is the identity; training-mode Dropout is random and refused."""
    training = node.input[2] if len(node.input) > 2 else ""
    if training:
        value = ctx.constant(training)
        if value is None or bool(np.asarray(value).reshape(-1)[0]):
            raise unsupported(node, "training-mode Dropout drops random units; export the model "
                                    "in eval mode")
    return [dy[0]]


@register("Neg")
def neg(ctx, node, dy):
    return [ctx.g.op("Neg", dy[0])]


@register("Add", inputs=(0, 1))
def add(ctx, node, dy):
    a, b = node.input
    y = node.output[0]
    return [
        unbroadcast(ctx, dy[0], a, y) if ctx.needs(a) else None,
        unbroadcast(ctx, dy[0], b, y) if ctx.needs(b) else None,
    ]


@register("Sub", inputs=(0, 1))
def sub(ctx, node, dy):
    a, b = node.input
    y = node.output[0]
    return [
        unbroadcast(ctx, dy[0], a, y) if ctx.needs(a) else None,
        unbroadcast(ctx, ctx.g.op("Neg", dy[0]), b, y) if ctx.needs(b) else None,
    ]


def _silu_operands(ctx: Context, a: str, b: str) -> tuple[str, str] | None:
    """(x, s) when the Mul's operands are x and s = Sigmoid(x): SiLU / Swish, y = x sigmoid(x)."""
    for x, s in ((a, b), (b, a)):
        producer = ctx.produced_by(s, "Sigmoid")
        if producer is not None and producer.input[0] == x and x != s:
            return x, s
    return None


def _is_scalar(ctx: Context, name: str, value: float) -> bool:
    constant = ctx.constant(name)
    return constant is not None and constant.size == 1 and math.isclose(
        float(constant.reshape(-1)[0]), value, rel_tol=1e-6)


def _erf_gelu_operands(ctx: Context, a: str, b: str) -> tuple[str, str, str] | None:
    """(x, b, h) when the Mul's operands are x and b = 1 + erf(h), h = x / sqrt(2): exact GELU
    as torch's TorchScript exporter writes it, 0.5 * (x * (1 + erf(x / sqrt(2))))."""
    for x, one_plus in ((a, b), (b, a)):
        add = ctx.produced_by(one_plus, "Add")
        if add is None or x == one_plus:
            continue
        for erf_out, one in (tuple(add.input), tuple(add.input)[::-1]):
            erf = ctx.produced_by(erf_out, "Erf")
            if erf is None or not _is_scalar(ctx, one, 1.0):
                continue
            h = erf.input[0]
            div, mul = ctx.produced_by(h, "Div"), ctx.produced_by(h, "Mul")
            if div is not None and div.input[0] == x and _is_scalar(ctx, div.input[1], math.sqrt(2)):
                return x, one_plus, h
            if mul is not None and x in mul.input and \
                    _is_scalar(ctx, mul.input[1 - list(mul.input).index(x)], 1 / math.sqrt(2)):
                return x, one_plus, h
    return None


def _erf_gelu_slope(ctx: Context, x: str, one_plus: str, h: str) -> str:
    """d/dx [x (1 + erf(h))] for h = x / sqrt(2): (1 + erf(h)) + x sqrt(2/pi) exp(-h^2), with
    sqrt(2/pi) in the exponent (no pass multiplies by it)."""
    g = ctx.g
    bell = g.op("Exp", g.op("Sub", g.const(0.5 * math.log(2 / math.pi)), g.op("Mul", h, h)))
    return g.op("Add", one_plus, g.op("Mul", x, bell))


@register("Mul", inputs=(0, 1))
def mul(ctx, node, dy):
    g = ctx.g
    a, b = node.input
    y = node.output[0]
    gelu = _erf_gelu_operands(ctx, a, b)
    if gelu is not None:
        # x (1 + erf(h)), h = x / sqrt(2): dy/dx = (1 + erf(h)) + x sqrt(2/pi) exp(-h^2), from the
        # forward's own h and 1 + erf(h) in six passes, where the rules of the Mul, Add, Erf and
        # Div took eight and a Sum of x's two gradients (ConvNeXt's and ViT's MLPs); sqrt(2/pi)
        # rides in the exponent, so no pass multiplies by it
        x, one_plus, h = gelu
        dx = g.op("Mul", dy[0], _erf_gelu_slope(ctx, x, one_plus, h)) if ctx.needs(x) else None
        return [dx, None] if x == a else [None, dx]
    silu = _silu_operands(ctx, a, b)
    if silu is not None:
        # SiLU: dy/dx = s + x s (1 - s) = s + y (1 - s), in four passes where the Mul's and the
        # Sigmoid's rules and the Sum of x's two gradients take six (EfficientNet's blocks);
        # s gets no gradient from here (other consumers of s still send theirs through Sigmoid)
        x, s = silu
        slope = g.op("Add", s, g.op("Mul", y, g.op("Sub", g.const(1.0), s)))
        dx = g.op("Mul", dy[0], slope) if ctx.needs(x) else None
        return [dx, None] if x == a else [None, dx]
    return [
        unbroadcast(ctx, g.op("Mul", dy[0], b), a, y) if ctx.needs(a) else None,
        unbroadcast(ctx, g.op("Mul", dy[0], a), b, y) if ctx.needs(b) else None,
    ]


@register("Div", inputs=(0, 1))
def div(ctx, node, dy):
    g = ctx.g
    a, b = node.input
    y = node.output[0]
    da = g.op("Div", dy[0], b)
    return [
        unbroadcast(ctx, da, a, y) if ctx.needs(a) else None,
        # d(a/b)/db = -a/b^2 = -y/b
        unbroadcast(ctx, g.op("Neg", g.op("Mul", da, y)), b, y) if ctx.needs(b) else None,
    ]


@register("Pow", inputs=(0, 1))
def pow_(ctx, node, dy):
    g = ctx.g
    a, b = node.input
    y = node.output[0]
    grads: list[str | None] = [None, None]
    if ctx.needs(a):
        exponent = g.op("CastLike", b, a)
        exponent_value = ctx.constant(b)
        if exponent_value is not None and exponent_value.size == 1 and \
                float(exponent_value.reshape(-1)[0]) == 2.0:
            local = g.op("Mul", a, g.const(2.0))
        else:
            local = g.op("Mul", exponent, g.op("Pow", a, g.op("Sub", exponent, g.const(1.0))))
        grads[0] = unbroadcast(ctx, g.op("Mul", dy[0], local), a, y)
    if ctx.needs(b):
        # d(a^b)/db = a^b log a, taken as 0 where a = 0 (PyTorch's convention; 0 * log 0)
        local = g.op("Where", g.op("Equal", a, g.const(0.0)), g.const(0.0),
                     g.op("Mul", y, g.op("Log", a)))
        grads[1] = unbroadcast(ctx, g.op("Mul", dy[0], local), b, y)
    return grads


@register("Sum", inputs=ALL_INPUTS)
def sum_(ctx, node, dy):
    y = node.output[0]
    return [unbroadcast(ctx, dy[0], x, y) if ctx.needs(x) else None for x in node.input]


@register("Mean", inputs=ALL_INPUTS)
def mean(ctx, node, dy):
    y = node.output[0]
    scaled = ctx.g.op("Mul", dy[0], ctx.g.const(1.0 / len(node.input)))
    return [unbroadcast(ctx, scaled, x, y) if ctx.needs(x) else None for x in node.input]


@register("Max", "Min", inputs=ALL_INPUTS)
def max_min(ctx, node, dy):
    """The gradient goes to the input(s) equal to the result, split evenly between ties."""
    g = ctx.g
    y = node.output[0]
    masks = [g.op("CastLike", g.op("Equal", x, y), dy[0]) for x in node.input]
    share = g.op("Div", dy[0], g.add_all(masks)) if len(masks) > 1 else dy[0]
    return [
        unbroadcast(ctx, g.op("Mul", share, m), x, y) if ctx.needs(x) else None
        for x, m in zip(node.input, masks, strict=True)
    ]


@register("Where", inputs=(1, 2))
def where(ctx, node, dy):
    g = ctx.g
    cond, a, b = node.input
    y = node.output[0]
    zero = g.const(0.0)
    return [
        None,
        unbroadcast(ctx, _where(ctx, cond, dy[0], zero), a, y) if ctx.needs(a) else None,
        unbroadcast(ctx, _where(ctx, cond, zero, dy[0]), b, y) if ctx.needs(b) else None,
    ]


@register("Relu")
def relu(ctx, node, dy):
    g = ctx.g
    if ramp_applies(ctx, node.output[0], node.input[0]):
        scale = ramp_scale([0.0])
        assert scale is not None
        return [masked_by_steps(ctx, node.output[0], dy[0], 0.0, None, scale)]
    return [masked(ctx, g.op("Greater", node.output[0], g.const(0.0)), dy[0])]


@register("LeakyRelu")
def leaky_relu(ctx, node, dy):
    g = ctx.g
    alpha = attr(node, "alpha", 0.01)
    positive = g.op("Greater", node.input[0], g.const(0.0))
    return [_where(ctx, positive, dy[0], g.op("Mul", dy[0], g.const(alpha)))]


@register("PRelu", inputs=(0, 1))
def prelu(ctx, node, dy):
    g = ctx.g
    x, slope = node.input
    y = node.output[0]
    positive = g.op("Greater", x, g.const(0.0))
    zero = g.const(0.0)
    return [
        _where(ctx, positive, dy[0], g.op("Mul", dy[0], slope)) if ctx.needs(x) else None,
        unbroadcast(ctx, _where(ctx, positive, zero, g.op("Mul", dy[0], x)), slope, y)
        if ctx.needs(slope) else None,
    ]


@register("Elu")
def elu(ctx, node, dy):
    g = ctx.g
    alpha = attr(node, "alpha", 1.0)
    positive = g.op("Greater", node.input[0], g.const(0.0))
    negative_slope = g.op("Add", node.output[0], g.const(alpha))  # d/dx alpha(e^x - 1) = y + alpha
    return [_where(ctx, positive, dy[0], g.op("Mul", dy[0], negative_slope))]


@register("Selu")
def selu(ctx, node, dy):
    g = ctx.g
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    positive = g.op("Greater", node.input[0], g.const(0.0))
    negative_slope = g.op("Add", node.output[0], g.const(alpha * gamma))
    return [_where(ctx, positive, g.op("Mul", dy[0], g.const(gamma)),
                   g.op("Mul", dy[0], negative_slope))]


@register("Celu")
def celu(ctx, node, dy):
    g = ctx.g
    alpha = attr(node, "alpha", 1.0)
    positive = g.op("Greater", node.input[0], g.const(0.0))
    # for x <= 0, y = alpha (e^(x/alpha) - 1), so dy/dx = y / alpha + 1
    negative_slope = g.op("Add", g.op("Mul", node.output[0], g.const(1.0 / alpha)), g.const(1.0))
    return [_where(ctx, positive, dy[0], g.op("Mul", dy[0], negative_slope))]


@register("ThresholdedRelu")
def thresholded_relu(ctx, node, dy):
    g = ctx.g
    above = g.op("Greater", node.input[0], g.const(attr(node, "alpha", 1.0)))
    return [masked(ctx, above, dy[0])]


@register("Sigmoid")
def sigmoid(ctx, node, dy):
    g = ctx.g
    y = node.output[0]
    return [g.op("Mul", dy[0], g.op("Mul", y, g.op("Sub", g.const(1.0), y)))]


@register("HardSigmoid")
def hard_sigmoid(ctx, node, dy):
    g = ctx.g
    y = node.output[0]
    alpha = attr(node, "alpha", 0.2)
    inside = g.op("And", g.op("Greater", y, g.const(0.0)), g.op("Less", y, g.const(1.0)))
    return [masked(ctx, inside, g.op("Mul", dy[0], g.const(alpha)))]


@register("HardSwish")
def hard_swish(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    ramp = g.op("Add", g.op("Mul", x, g.const(1.0 / 3.0)), g.const(0.5))
    inner = _where(ctx, g.op("Greater", x, g.const(3.0)), dy[0], g.op("Mul", dy[0], ramp))
    return [_where(ctx, g.op("Less", x, g.const(-3.0)), g.const(0.0), inner)]


@register("Tanh")
def tanh(ctx, node, dy):
    g = ctx.g
    y = node.output[0]
    return [g.op("Mul", dy[0], g.op("Sub", g.const(1.0), g.op("Mul", y, y)))]


@register("Softplus")
def softplus(ctx, node, dy):
    return [ctx.g.op("Mul", dy[0], ctx.g.op("Sigmoid", node.input[0]))]


@register("Mish")
def mish(ctx, node, dy):
    """y = x tanh(softplus(x)): dy/dx = t + x (1 - t^2) sigmoid(x), t = tanh(softplus(x))."""
    g = ctx.g
    x = node.input[0]
    t = g.op("Tanh", g.op("Softplus", x))
    slope = g.op("Mul", g.op("Mul", x, g.op("Sub", g.const(1.0), g.op("Mul", t, t))), g.op("Sigmoid", x))
    return [g.op("Mul", dy[0], g.op("Add", t, slope))]


@register("Swish")
def swish(ctx, node, dy):
    """y = x sigmoid(alpha x): dy/dx = s + alpha x s (1 - s), s = sigmoid(alpha x)."""
    g = ctx.g
    x = node.input[0]
    alpha = attr(node, "alpha", 1.0)
    s = g.op("Sigmoid", g.op("Mul", x, g.const(alpha)))
    slope = g.op("Mul", g.op("Mul", x, g.const(alpha)), g.op("Mul", s, g.op("Sub", g.const(1.0), s)))
    return [g.op("Mul", dy[0], g.op("Add", s, slope))]


@register("Shrink")
def shrink(ctx, node, dy):
    """Slope 1 where |x| > lambd (both shifted branches), 0 in the dead zone."""
    g = ctx.g
    lambd = attr(node, "lambd", 0.5)
    return [masked(ctx, g.op("Greater", g.op("Abs", node.input[0]), g.const(lambd)), dy[0])]


@register("Softsign")
def softsign(ctx, node, dy):
    g = ctx.g
    denominator = g.op("Add", g.const(1.0), g.op("Abs", node.input[0]))
    return [g.op("Div", dy[0], g.op("Mul", denominator, denominator))]


@register("Exp")
def exp(ctx, node, dy):
    return [ctx.g.op("Mul", dy[0], node.output[0])]


@register("Log")
def log(ctx, node, dy):
    return [ctx.g.op("Div", dy[0], node.input[0])]


@register("Sqrt")
def sqrt(ctx, node, dy):
    g = ctx.g
    return [g.op("Div", g.op("Mul", dy[0], g.const(0.5)), node.output[0])]


@register("Reciprocal")
def reciprocal(ctx, node, dy):
    g = ctx.g
    y = node.output[0]
    return [g.op("Neg", g.op("Mul", dy[0], g.op("Mul", y, y)))]


@register("Abs")
def abs_(ctx, node, dy):
    return [ctx.g.op("Mul", dy[0], ctx.g.op("Sign", node.input[0]))]


@register("Sin")
def sin(ctx, node, dy):
    return [ctx.g.op("Mul", dy[0], ctx.g.op("Cos", node.input[0]))]


@register("Cos")
def cos(ctx, node, dy):
    return [ctx.g.op("Neg", ctx.g.op("Mul", dy[0], ctx.g.op("Sin", node.input[0])))]


@register("Erf")
def erf(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    bell = g.op("Exp", g.op("Neg", g.op("Mul", x, x)))
    return [g.op("Mul", dy[0], g.op("Mul", bell, g.const(2.0 / math.sqrt(math.pi))))]


@register("Gelu")
def gelu(ctx, node, dy):
    g = ctx.g
    x = node.input[0]
    if attr(node, "approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = g.op("Mul", x, x)
        inner = g.op("Mul", g.op("Add", x, g.op("Mul", g.op("Mul", x2, x), g.const(0.044715))),
                     g.const(c))
        t = g.op("Tanh", inner)
        d_inner = g.op("Mul", g.op("Add", g.const(1.0), g.op("Mul", x2, g.const(3 * 0.044715))),
                       g.const(c))
        local = g.op("Add", g.op("Mul", g.const(0.5), g.op("Add", g.const(1.0), t)),
                     g.op("Mul", g.op("Mul", g.op("Mul", g.const(0.5), x),
                                      g.op("Sub", g.const(1.0), g.op("Mul", t, t))), d_inner))
        return [g.op("Mul", dy[0], local)]
    # 0.5 x (1 + erf(h)), h = x / sqrt(2); the 0.5 on dy (ONNX Runtime folds it into a MatMul
    # that produces dy)
    h = g.op("Mul", x, g.const(1 / math.sqrt(2)))
    one_plus = g.op("Add", g.op("Erf", h), g.const(1.0))
    return [g.op("Mul", g.op("Mul", dy[0], g.const(0.5)), _erf_gelu_slope(ctx, x, one_plus, h))]


@register("Clip")
def clip(ctx, node, dy):
    """Strictly inside the bounds, read from the output (torch's ReLU6/hardtanh convention),
    so ONNX Runtime keeps Conv+Clip fused. A Clip of the model's own input (a box clamp on
    pixels, which often sit exactly on the bounds) passes the gradient inclusively instead.
    """
    g = ctx.g
    x, y = node.input[0], node.output[0]
    if not (_input(node, 1) or _input(node, 2)):
        return [dy[0]]
    if ctx.is_graph_input(x):
        inside = g.op("Equal", x, y)
    elif all(ctx.constant(bound) is not None for bound in node.input[1:3] if bound):
        lower, upper = (float(ctx.constant(_input(node, p))) if _input(node, p) else None
                        for p in (1, 2))
        scale = ramp_scale([b for b in (lower, upper) if b is not None])
        if scale is not None and ramp_applies(ctx, y, x):
            return [masked_by_steps(ctx, y, dy[0], lower, upper, scale)]
        inside = g.op("Equal", y, _strictly_inside(ctx, node, y))
    else:
        bounds = [g.op(op, y, bound)
                  for op, bound in (("Greater", _input(node, 1)), ("Less", _input(node, 2))) if bound]
        inside = bounds[0] if len(bounds) == 1 else g.op("And", *bounds)
    return [masked(ctx, inside, dy[0])]


def _strictly_inside(ctx: Context, node, y: str) -> str:
    """y clipped to the floats strictly between constant bounds: equal to y exactly where
    lo < y < hi. One Clip and one Equal instead of two comparisons and an And."""
    g = ctx.g
    dtype = g.float_dtype
    limits = []
    for position, toward in ((1, np.inf), (2, -np.inf)):
        bound = _input(node, position)
        if not bound:
            limits.append("")
            continue
        value = np.asarray(ctx.constant(bound), dtype=dtype)
        limits.append(g.const(np.nextafter(value, np.asarray(toward, dtype=dtype)), dtype))
    return g.op("Clip", y, *limits)


@register("Cast", "CastLike")
def cast(ctx, node, dy):
    source_type = ctx.elem_type(node.input[0])
    if source_type is not None and source_type not in FLOAT_TYPES:
        return [dy[0]]  # an integer carried straight through (quantize.py): in value units, a float
    if source_type is None:
        return [ctx.g.op("CastLike", dy[0], node.input[0])]
    return [ctx.g.op("Cast", dy[0], to=int(source_type))]


@register("RandomNormalLike", "RandomUniformLike", "EyeLike")
def independent_of_values(ctx, node, dy):
    """The output depends on the input's shape only."""
    return [None]


def _input(node, position: int) -> str:
    return node.input[position] if len(node.input) > position else ""

