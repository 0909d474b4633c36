"""Linear relaxation backwards from the margins (CROWN, Zhang et al. 2018), with the
pre-activation bounds of every ReLU taken from interval propagation: CROWN-IBP (Zhang et al.
2020), as an ONNX graph.

The margins m_j = z_y - z_j are linear in the logits, m = C z with one row per class j. Going
backwards through the graph, each operator turns a lower bound ``m >= L_out . out + beta`` into
one on its input: an affine operator by its adjoint (the same transposed operators as the
gradient builder's: Gemm and MatMul by the transposed weight, Conv by ConvTranspose, reshapes
by reshaping back) plus its offset; a ReLU with input bounds [l, u] by its linear relaxation,
``alpha x <= relu(x) <= s (x - l)`` (s = u / (u - l) where l < 0 < u; alpha = 1 where u >= -l),
the lower line taken for positive coefficients and the upper line for negative ones. At the
image, the minimum of ``L . x + beta`` over the box is ``L . centre - |L| . radius + beta``.

Coefficients L are tensors [N * K, *shape of the tensor]: the K rows of each sample batched,
so every adjoint is an ordinary ONNX operator. Supported (the registry at the end): Gemm,
MatMul (2-D, constant weight), Conv, BatchNormalization, Add / Sub (constant or two
image-dependent tensors), Mul / Div by a constant, Concat, AveragePool (any padding, ceil_mode) and
GlobalAveragePool, Flatten, Reshape, Identity, Dropout, Relu, LeakyRelu, Sigmoid, Tanh,
Softplus, Clip and MaxPool (at least the cell with the largest lower bound, at most the largest upper bound);
anything else is named as unsupported.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from workers.certify.ibp import UnsupportedForBounds, _Builder
from workers.onnxgrad.autodiff import REGISTRY, Context
from workers.onnxgrad.graph import static_shape
from workers.onnxgrad.prepare import PreparedClassifier
from workers.onnxgrad.rules.linear import resolve_pads, transpose_output_padding, window_params

SUPPORTED = ("Gemm", "MatMul", "Conv", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Flatten", "Reshape",
             "Identity", "Dropout", "Relu", "GlobalAveragePool", "MaxPool", "LeakyRelu", "Sigmoid", "Tanh",
             "Clip", "Concat", "AveragePool", "Softplus")


class _Backward:
    """One backward pass: ``k`` rows of coefficients per sample (the margins, or an intermediate
    tensor's neurons for full CROWN)."""

    def __init__(self, b: _Builder, rows: int | None):
        self.b, self.g = b, b.g
        self.k = rows
        if self.k is None:
            raise UnsupportedForBounds("crown_ibp: the number of classes is not known from the model's "
                                       "shapes")
        self.coefficients: dict[str, str] = {}
        self.offsets: list[str] = []  # [N * K] each

    def shape(self, name: str) -> list[int]:
        shape = static_shape(self.b.types.get(name))
        dims = [] if shape is None else list(shape[1:])
        if shape is None or not all(isinstance(d, int) for d in dims):
            raise UnsupportedForBounds(f"crown_ibp: the shape of {name!r} is not static")
        return [d for d in dims if isinstance(d, int)]  # without the batch axis

    def per_row(self, bound: str, shape: list[int]) -> str:
        """A tensor [N, *shape] repeated for each of a sample's K rows: [N * K, *shape]."""
        assert self.k is not None
        expanded = self.g.op("Expand", self.g.op("Unsqueeze", bound, self.g.ints([1])),
                             self.g.ints([1, self.k, *shape]))
        return self.g.op("Reshape", expanded, self.g.ints([-1, *shape]))

    def times(self, rows: str, bound: str, shape: list[int]) -> str:
        """``rows`` [N * K, *shape] times a tensor [N, *shape] of each row's sample, broadcast over
        the K rows (never materialised K times: in a deep network every layer's slopes would be
        alive at once, K times over)."""
        assert self.k is not None
        by_sample = self.g.op("Reshape", rows, self.g.ints([-1, self.k, *shape]))
        product = self.g.op("Mul", by_sample, self.g.op("Unsqueeze", bound, self.g.ints([1])))
        return self.g.op("Reshape", product, self.g.ints([-1, *shape]))

    def add(self, name: str, coefficient: str) -> None:
        if name in self.b.bounds:  # only image-dependent tensors carry coefficients
            existing = self.coefficients.get(name)
            self.coefficients[name] = (coefficient if existing is None
                                       else self.g.op("Add", existing, coefficient))

    def offset(self, coefficient: str, constant: str) -> None:
        """beta += sum over the tensor's axes of coefficient * constant (broadcast)."""
        self._sum(self.g.op("Mul", coefficient, constant))

    def offset_per_sample(self, coefficient: str, constant: str, shape: list[int]) -> None:
        """beta += sum over the tensor's axes of coefficient * constant, ``constant`` [N, *shape]."""
        self._sum(self.times(coefficient, constant, shape))

    def _sum(self, product: str) -> None:
        self.offsets.append(self.g.reduce("ReduceSum", self.g.op("Flatten", product, axis=1), [1], False))


def crown_margins(b: _Builder, prepared: PreparedClassifier, path: list[onnx.NodeProto]) -> tuple[str, str]:
    """Lower bounds [N, K] of z_y - z_j by CROWN-IBP, for the graph's nodes ``path`` (image to
    logits, in order), 0 at j = y: over the box [x_low, x_high], and over the L2 ball of radius
    ``l2_eps`` around ``x`` (graph inputs; the box must contain that ball, as the intermediate
    bounds come from it): L . x - l2_eps ||L||_2 + beta, the box ignored, which only lowers it."""
    g = b.g
    k = prepared.num_classes
    if k is None:
        raise UnsupportedForBounds("crown_ibp: the number of classes is not known from the model's shapes")
    eye = g.const(np.eye(k, dtype=np.float32))
    one_hot = g.op("OneHot", "labels", g.const(np.array([k], np.int64)),
                   g.const(np.array([0.0, 1.0], np.float32)), axis=-1)
    own = g.op("Unsqueeze", one_hot, g.ints([1]))  # [N, 1, K]
    spec = g.op("Sub", own, eye)  # [N, K, K]: row j is e_y - e_j
    return _linear_bounds(b, prepared.input_name, path, prepared.logits_name,
                          g.op("Reshape", spec, g.ints([-1, k])), k)


def _linear_bounds(b: _Builder, image: str, path: list[onnx.NodeProto], target: str, spec: str,
                   rows: int) -> tuple[str, str]:
    """Lower bounds [N, rows] of spec . target (``spec`` [N * rows, *target's shape]) over the box
    and over the L2 ball, by the relaxations backwards through ``path``."""
    back = _Backward(b, rows)
    g = b.g
    back.coefficients[target] = spec
    for node in reversed(path):
        out = node.output[0]
        coefficient = back.coefficients.pop(out, None)
        if coefficient is None:
            continue
        if node.op_type not in SUPPORTED:
            raise UnsupportedForBounds(f"crown_ibp: operator {node.op_type} ({node.name!r}) has no linear "
                                       f"relaxation; supported: {', '.join(SUPPORTED)}")
        _RULES[node.op_type](back, node, coefficient)
    final = back.coefficients.get(image)
    if final is None:
        raise UnsupportedForBounds("crown_ibp: the logits do not depend on the image through supported "
                                   "operators")
    size = int(np.prod(back.shape(image)))
    lam = g.op("Reshape", final, g.ints([-1, rows, size]))  # [N, rows, D]
    low, high = b.bounds[image]
    centre = g.op("Reshape", g.op("Mul", g.op("Add", low, high), g.const(0.5)), g.ints([-1, size, 1]))
    radius = g.op("Reshape", g.op("Mul", g.op("Sub", high, low), g.const(0.5)), g.ints([-1, size, 1]))
    bound = g.op("Sub", g.op("MatMul", lam, centre), g.op("MatMul", g.op("Abs", lam), radius))  # [N, rows, 1]
    bound = g.op("Squeeze", bound, g.ints([2]))
    image_column = g.op("Reshape", "x", g.ints([-1, size, 1]))
    norms = g.op("Sqrt", g.reduce("ReduceSum", g.op("Mul", lam, lam), [2], False))  # [N, rows]
    ball = g.op("Sub", g.op("Squeeze", g.op("MatMul", lam, image_column), g.ints([2])),
                g.op("Mul", norms, "l2_eps"))
    if back.offsets:
        offset = g.op("Reshape", back.offsets[0] if len(back.offsets) == 1 else g.op("Sum", *back.offsets),
                      g.ints([-1, rows]))
        bound, ball = g.op("Add", bound, offset), g.op("Add", ball, offset)
    return bound, ball


# full CROWN: an intermediate tensor is bounded backwards only while its coefficients stay within
# this many elements per sample (2 x its neurons x the largest tensor before it); past it the
# interval bounds stand (sound, looser): a conv layer's neurons times its input would need gigabytes
FULL_CROWN_ELEMENTS = 1 << 21
RELAXED = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Softplus", "Clip", "MaxPool")


def tighten(b: _Builder, image: str, path: list[onnx.NodeProto], target: str, l2: bool) -> bool:
    """Full CROWN (Zhang et al. 2018) for one relaxed operator's input ``target``: its bounds
    replaced by their intersection with CROWN's, backwards through ``path`` (the nodes before
    it, whose relaxations use the bounds tightened before). False where its coefficients would
    pass FULL_CROWN_ELEMENTS per sample (the interval bounds stand)."""
    g = b.g
    back = _Backward(b, 1)
    shape = back.shape(target)
    neurons = int(np.prod(shape))
    sizes = [int(np.prod(back.shape(n.input[0]))) for n in path if n.input and n.input[0] in b.bounds]
    if not path or 2 * neurons * max(sizes + [neurons]) > FULL_CROWN_ELEMENTS:
        return False
    eye = np.eye(neurons, dtype=np.float32).reshape(neurons, *shape)
    both = np.concatenate([eye, -eye])[None]  # [1, 2M, *shape]: each neuron, and its negation
    batch = g.op("Shape", "labels")
    spec = g.op("Expand", g.const(both), g.op("Concat", batch, g.ints([2 * neurons, *shape]), axis=0))
    box, ball = _linear_bounds(b, image, path, target, g.op("Reshape", spec, g.ints([-1, *shape])),
                               2 * neurons)
    lows = g.op("Max", box, ball) if l2 else box  # the box holds an L2 ball, never an L-inf one
    low = g.op("Reshape", g.op("Slice", lows, g.ints([0]), g.ints([neurons]), g.ints([1])),
               g.ints([-1, *shape]))
    high = g.op("Neg", g.op("Reshape", g.op("Slice", lows, g.ints([neurons]), g.ints([2 * neurons]),
                                            g.ints([1])), g.ints([-1, *shape])))
    ibp_low, ibp_high = b.bounds[target]
    b.bounds[target] = (g.op("Max", ibp_low, low), g.op("Min", ibp_high, high))
    return True


def _constant(back: _Backward, name: str, what: str) -> np.ndarray:
    value = back.b.constant(name)
    if value is None:
        raise UnsupportedForBounds(f"crown_ibp: {what} {name!r} must be a constant")
    return value


def _gemm(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    attrs = back.b.attrs(node)
    if attrs.get("transA", 0):
        raise UnsupportedForBounds(f"crown_ibp: Gemm {node.name!r} with transA")
    weight = _constant(back, node.input[1], "the Gemm weight")
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    forward = weight.T if attrs.get("transB", 0) else weight  # y = alpha x @ forward + beta c
    g = back.g
    back.add(node.input[0], g.op("MatMul", lam, g.const((alpha * forward.T).astype(np.float32))))
    if len(node.input) > 2 and node.input[2]:
        c = np.broadcast_to(_constant(back, node.input[2], "the Gemm bias"), (forward.shape[1],))
        back.offsets.append(g.op("MatMul", lam, g.const((beta * c).astype(np.float32))))


def _matmul(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    weight = back.b.constant(node.input[1])
    if weight is None or weight.ndim != 2 or len(back.shape(node.input[0])) != 1:
        raise UnsupportedForBounds(f"crown_ibp: MatMul {node.name!r} needs a 2-D input and a constant weight")
    back.add(node.input[0], back.g.op("MatMul", lam, back.g.const(np.ascontiguousarray(weight.T))))


def _conv(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    weight = _constant(back, node.input[1], "the Conv weight")
    attrs = back.b.attrs(node)
    kernel = list(weight.shape[2:])
    spatial_in = back.shape(node.input[0])[1:]
    spatial_out = back.shape(node.output[0])[1:]
    strides, dilations = window_params(node, len(kernel), kernel)
    pads = resolve_pads(node, spatial_in, kernel, strides, dilations)
    g = back.g
    back.add(node.input[0], g.op(
        "ConvTranspose", lam, node.input[1], strides=strides, dilations=dilations, pads=pads,
        group=int(attrs.get("group", 1)), kernel_shape=kernel,
        output_padding=transpose_output_padding(spatial_in, spatial_out, kernel, strides, dilations, pads)))
    if len(node.input) > 2 and node.input[2]:
        bias = _constant(back, node.input[2], "the Conv bias")
        back.offset(lam, g.const(bias.reshape(-1, *([1] * len(kernel))).astype(np.float32)))


def _batch_norm(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    scale, bias, mean, var = (_constant(back, n, "a BatchNormalization parameter") for n in node.input[1:5])
    epsilon = float(back.b.attrs(node).get("epsilon", 1e-5))
    factor = scale / np.sqrt(var + epsilon)
    rank = len(back.shape(node.input[0]))
    per_channel = (-1, *([1] * (rank - 1)))
    g = back.g
    back.add(node.input[0], g.op("Mul", lam, g.const(factor.reshape(per_channel).astype(np.float32))))
    back.offset(lam, g.const((bias - mean * factor).reshape(per_channel).astype(np.float32)))


def _add_sub(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    g = back.g
    left, right = node.input[0], node.input[1]
    sign = -1.0 if node.op_type == "Sub" else 1.0
    for name, factor in ((left, 1.0), (right, sign)):
        if name in back.b.bounds:
            if back.shape(name) != back.shape(node.output[0]):
                raise UnsupportedForBounds(f"crown_ibp: {node.op_type} {node.name!r} broadcasts an "
                                           "image-dependent input")
            back.add(name, lam if factor > 0 else g.op("Neg", lam))
        else:
            back.offset(lam, name if factor > 0 else g.op("Neg", name))


def _scale(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    g = back.g
    image, constant = (node.input[0], node.input[1]) if node.input[0] in back.b.bounds else (
        node.input[1], node.input[0])
    if node.op_type == "Div" and image != node.input[0]:
        raise UnsupportedForBounds(f"crown_ibp: Div {node.name!r} divides by the image")
    if constant in back.b.bounds:
        raise UnsupportedForBounds(f"crown_ibp: {node.op_type} {node.name!r} of two image-dependent tensors")
    if back.shape(image) != back.shape(node.output[0]):
        raise UnsupportedForBounds(f"crown_ibp: {node.op_type} {node.name!r} broadcasts its image input")
    back.add(image, g.op(node.op_type, lam, constant))


def _reshape(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    back.add(node.input[0], back.g.op("Reshape", lam, back.g.ints([-1, *back.shape(node.input[0])])))


def _global_average_pool(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    shape = back.shape(node.input[0])
    area = float(np.prod(shape[1:]))
    share = back.g.op("Div", lam, back.g.const(np.float32(area)))
    spread = back.g.op("Expand", share, back.g.ints([1, *shape]))
    back.add(node.input[0], spread)


def _identity(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    back.add(node.input[0], lam)


def _relaxed(back: _Backward, node: onnx.NodeProto, lam: str, lower: tuple[str, str | None],
             upper: tuple[str, str | None], lower_rows: str | None = None) -> None:
    """An elementwise function between two lines over its input's bounds, each (slope,
    intercept or None) [N, *shape]: positive coefficients take the lower line, negative ones
    the upper. ``lower_rows`` [N * K, *shape]: a lower slope per row instead (alpha-CROWN)."""
    g = back.g
    shape = back.shape(node.input[0])
    positive = g.op("Relu", lam)
    negative = g.op("Sub", lam, positive)
    below = (g.op("Mul", positive, lower_rows) if lower_rows is not None
             else back.times(positive, lower[0], shape))
    back.add(node.input[0], g.op("Add", below, back.times(negative, upper[0], shape)))
    for part, (_, intercept) in ((positive, lower), (negative, upper)):
        if intercept is not None:
            back.offset_per_sample(part, intercept, shape)


def _float(g, condition: str) -> str:
    return g.op("Cast", condition, to=onnx.TensorProto.FLOAT)


def _relu(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """alpha x <= relu(x) <= s (x - l): s = u / (u - l) where l < 0 < u, alpha = 1 where u >= -l."""
    g = back.g
    low, high = back.b.bounds[node.input[0]]
    up = g.op("Relu", high)
    down = g.op("Min", low, g.const(np.float32(0.0)))
    slope = g.op("Div", up, g.op("Max", g.op("Sub", up, down), g.const(np.float32(1e-12))))
    lower_slope = _float(g, g.op("GreaterOrEqual", g.op("Add", up, down), g.const(np.float32(0.0))))
    intercept = g.op("Neg", g.op("Mul", slope, down))  # the upper line: slope * (x - down)
    alphas = back.b.alphas
    if alphas is None:
        _relaxed(back, node, lam, (lower_slope, None), (slope, intercept))
        return
    # alpha-CROWN: any lower slope in [0, 1] is sound where l < 0 < u; it is a graph input per
    # row, optimised by workers/certify/bounds.py, and the heuristic one is its start
    shape = back.shape(node.input[0])
    name = f"alpha/{len(alphas)}"
    unstable = _float(g, g.op("And", g.op("Less", low, g.const(np.float32(0.0))),
                              g.op("Greater", high, g.const(np.float32(0.0)))))
    unstable_rows = back.per_row(unstable, shape)
    stable = g.op("Sub", g.const(np.float32(1.0)), unstable)
    fixed_rows = back.per_row(g.op("Mul", lower_slope, stable), shape)
    chosen = g.op("Clip", name, g.const(np.float32(0.0)), g.const(np.float32(1.0)))
    rows = g.op("Add", fixed_rows, g.op("Mul", unstable_rows, chosen))
    alphas.append((name, back.per_row(lower_slope, shape), shape))
    _relaxed(back, node, lam, (lower_slope, None), (slope, intercept), lower_rows=rows)


def _leaky_relu(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """max(x, a x) with 0 <= a <= 1 is convex: below it either line through 0 (x where
    u >= -l, else a x), above it the chord from (l, f(l)) to (u, f(u))."""
    a = float(back.b.attrs(node).get("alpha", 0.01))
    if not 0 <= a <= 1:
        raise UnsupportedForBounds(f"crown_ibp: LeakyRelu {node.name!r} with a slope outside [0, 1]")
    g = back.g
    low, high = back.b.bounds[node.input[0]]
    f_low, f_high = g.op("LeakyRelu", low, alpha=a), g.op("LeakyRelu", high, alpha=a)
    width = g.op("Sub", high, low)
    chord = g.op("Div", g.op("Sub", f_high, f_low), g.op("Max", width, g.const(np.float32(1e-12))))
    flat = _float(g, g.op("LessOrEqual", width, g.const(np.float32(0.0))))  # l = u: the slope there
    chord = g.op("Add", g.op("Mul", chord, g.op("Sub", g.const(np.float32(1.0)), flat)),
                 g.op("Mul", flat, g.op("Where", g.op("GreaterOrEqual", low, g.const(np.float32(0.0))),
                                        g.const(np.float32(1.0)), g.const(np.float32(a)))))
    intercept = g.op("Sub", f_low, g.op("Mul", chord, low))
    steep = _float(g, g.op("GreaterOrEqual", g.op("Add", high, low), g.const(np.float32(0.0))))
    lower_slope = g.op("Add", steep, g.op("Mul", g.op("Sub", g.const(np.float32(1.0)), steep),
                                           g.const(np.float32(a))))
    _relaxed(back, node, lam, (lower_slope, None), (chord, intercept))


def _clip(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """clip(x, a, b) with constant a, b (ReLU6, hardtanh): exact where the bounds lie in one
    piece; where they cross only a (convex there, like a ReLU shifted to a) a line through
    (a, a) below and the chord above; where they cross only b (concave) the chord below and a
    line through (b, b) above; across both, the constants clip(l) and clip(u)."""
    g = back.g
    limits = []
    for position, default in ((1, -1e30), (2, 1e30)):  # finite stand-ins: 0 * inf would be NaN
        name = node.input[position] if len(node.input) > position else ""
        value = back.b.constant(name) if name else np.float32(default)
        if value is None or np.size(value) != 1:
            raise UnsupportedForBounds(f"crown_ibp: Clip {node.name!r} needs constant scalar bounds")
        limits.append(np.float32(np.asarray(value).reshape(())))
    a, b = limits
    low, high = back.b.bounds[node.input[0]]
    zero, one = g.const(np.float32(0.0)), g.const(np.float32(1.0))
    const_a, const_b = g.const(a), g.const(b)
    f_low, f_high = g.op("Clip", low, const_a, const_b), g.op("Clip", high, const_a, const_b)
    width = g.op("Sub", high, low)
    chord = g.op("Div", g.op("Sub", f_high, f_low), g.op("Max", width, g.const(np.float32(1e-12))))
    chord_cut = g.op("Sub", f_low, g.op("Mul", chord, low))
    crosses_a = _float(g, g.op("And", g.op("Less", low, const_a), g.op("Greater", high, const_a)))
    crosses_b = _float(g, g.op("And", g.op("Less", low, const_b), g.op("Greater", high, const_b)))
    only_a = g.op("Mul", crosses_a, g.op("Sub", one, crosses_b))
    only_b = g.op("Mul", crosses_b, g.op("Sub", one, crosses_a))
    both = g.op("Mul", crosses_a, crosses_b)
    inside = _float(g, g.op("And", g.op("GreaterOrEqual", low, const_a), g.op("LessOrEqual", high, const_b)))
    in_piece = g.op("Sub", g.op("Sub", g.op("Sub", one, only_a), only_b), both)  # one piece: exact
    # within one piece the function is x (inside [a, b]) or a constant: slope 1 or 0, cut f(l) - slope l
    piece_slope = inside
    piece_cut = g.op("Sub", f_low, g.op("Mul", piece_slope, low))
    # crossing only a: below, the line through (a, a) with slope 1 where u - a >= a - l, else the constant a
    steep = _float(g, g.op("GreaterOrEqual", g.op("Sub", high, const_a), g.op("Sub", const_a, low)))
    a_slope, a_cut = steep, g.op("Mul", g.op("Sub", one, steep), const_a)
    # crossing only b: above, the line through (b, b) with slope 1 where b - l >= u - b, else the constant b
    flat = _float(g, g.op("GreaterOrEqual", g.op("Sub", const_b, low), g.op("Sub", high, const_b)))
    b_slope, b_cut = flat, g.op("Mul", g.op("Sub", one, flat), const_b)

    def mix(piece: str, on_a: str, on_b: str, on_both: str) -> str:
        return g.op("Sum", g.op("Mul", in_piece, piece), g.op("Mul", only_a, on_a), g.op("Mul", only_b, on_b),
                    g.op("Mul", both, on_both))

    lower = (mix(piece_slope, a_slope, chord, zero), mix(piece_cut, a_cut, chord_cut, f_low))
    upper = (mix(piece_slope, chord, b_slope, zero), mix(piece_cut, chord_cut, b_cut, f_high))
    _relaxed(back, node, lam, lower, upper)


def _concat(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    axis = int(back.b.attrs(node)["axis"])
    rank = len(back.shape(node.output[0])) + 1
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        raise UnsupportedForBounds(f"crown_ibp: Concat {node.name!r} along the batch axis")
    g = back.g
    start = 0
    for name in node.input:
        constant = back.b.constant(name)
        if name in back.b.bounds:
            length = back.shape(name)[axis - 1]
        elif constant is not None:
            length = int(constant.shape[axis])
        else:
            raise UnsupportedForBounds(f"crown_ibp: Concat {node.name!r} of a computed tensor")
        if name in back.b.bounds:
            back.add(name, g.op("Slice", lam, g.ints([start]), g.ints([start + length]), g.ints([axis])))
        else:  # a constant piece adds its own term
            back.offset(g.op("Slice", lam, g.ints([start]), g.ints([start + length]), g.ints([axis])), name)
        start += length


def _average_pool(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """An average pool is linear, so its relaxation is its adjoint: the gradient builder's own
    AveragePool rule (a transposed conv of ones over each output's divisor, as ONNX Runtime
    counts it: padding, count_include_pad, ceil_mode's overhanging windows, SAME padding,
    dilations), applied to the coefficients, whose batch axis it never reads."""
    if back.b.adjoints is None:
        back.b.adjoints = Context(back.b.model.graph, back.g, set())
    adjoint = REGISTRY["AveragePool"].fn
    assert adjoint is not None
    (grad,) = adjoint(back.b.adjoints, node, [lam])
    assert grad is not None
    back.add(node.input[0], grad)


def _s_shaped(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """Sigmoid and Tanh, convex below 0 and concave above. Where the bounds lie on one side the
    chord and the tangent at the midpoint bound it (chord above and tangent below where convex,
    the other way where concave); where they straddle 0, the constants f(l) and f(u)."""
    g = back.g
    op = node.op_type
    low, high = back.b.bounds[node.input[0]]
    zero, one = g.const(np.float32(0.0)), g.const(np.float32(1.0))
    f_low, f_high = g.op(op, low), g.op(op, high)
    width = g.op("Sub", high, low)
    chord = g.op("Div", g.op("Sub", f_high, f_low), g.op("Max", width, g.const(np.float32(1e-12))))
    middle = g.op("Mul", g.op("Add", low, high), g.const(np.float32(0.5)))
    f_middle = g.op(op, middle)
    if op == "Sigmoid":
        derivative = g.op("Mul", f_middle, g.op("Sub", one, f_middle))
    else:
        derivative = g.op("Sub", one, g.op("Mul", f_middle, f_middle))
    chord_cut = g.op("Sub", f_low, g.op("Mul", chord, low))
    tangent_cut = g.op("Sub", f_middle, g.op("Mul", derivative, middle))
    convex = _float(g, g.op("LessOrEqual", high, zero))
    concave = _float(g, g.op("GreaterOrEqual", low, zero))
    straddles = g.op("Sub", one, g.op("Add", convex, concave))  # l = u = 0 counts as convex and concave

    def mix(on_convex: str, on_concave: str, on_straddle: str) -> str:
        straddle_only = g.op("Relu", straddles)
        concave_only = g.op("Sub", concave, g.op("Mul", convex, concave))
        return g.op("Sum", g.op("Mul", convex, on_convex), g.op("Mul", concave_only, on_concave),
                    g.op("Mul", straddle_only, on_straddle))

    lower = (mix(derivative, chord, zero), mix(tangent_cut, chord_cut, f_low))
    upper = (mix(chord, derivative, zero), mix(chord_cut, tangent_cut, f_high))
    _relaxed(back, node, lam, lower, upper)


def _softplus(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """Softplus is convex: above it the chord from l to u, below it the tangent at the midpoint
    (slope sigmoid(m))."""
    g = back.g
    low, high = back.b.bounds[node.input[0]]
    f_low, f_high = g.op("Softplus", low), g.op("Softplus", high)
    width = g.op("Sub", high, low)
    chord = g.op("Div", g.op("Sub", f_high, f_low), g.op("Max", width, g.const(np.float32(1e-12))))
    middle = g.op("Mul", g.op("Add", low, high), g.const(np.float32(0.5)))
    slope = g.op("Sigmoid", middle)
    tangent_cut = g.op("Sub", g.op("Softplus", middle), g.op("Mul", slope, middle))
    chord_cut = g.op("Sub", f_low, g.op("Mul", chord, low))
    _relaxed(back, node, lam, (slope, tangent_cut), (chord, chord_cut))


def _max_pool(back: _Backward, node: onnx.NodeProto, lam: str) -> None:
    """max over a window >= the cell with the largest lower bound (its coefficient goes there,
    as a gradient goes to an argmax), and <= the largest upper bound (a constant); where that
    cell's lower bound reaches every other cell's upper bound the max is that cell, above too
    (windows that do not overlap: masking a cell for one window must not touch another)."""
    attrs = {k: v for k, v in back.b.attrs(node).items() if k != "storage_order"}
    if back.b.attrs(node).get("storage_order", 0):
        raise UnsupportedForBounds(f"crown_ibp: MaxPool {node.name!r} with storage_order 1")
    g = back.g
    shape_in, shape_out = back.shape(node.input[0]), back.shape(node.output[0])
    size_in, size_out = int(np.prod(shape_in)), int(np.prod(shape_out))
    low, high = back.b.bounds[node.input[0]]
    best_low, indices = g.op("MaxPool", low, outputs=2, **attrs)  # flat over N * C * H * W
    local = g.op("Mod", indices, g.const(np.array(size_in, np.int64)))  # within the sample
    rows = g.op("Reshape", back.per_row(local, shape_out), g.ints([-1, size_out]))
    positive = g.op("Relu", lam)
    negative = g.op("Sub", lam, positive)
    best_high = g.op("MaxPool", high, **attrs)
    if _disjoint_windows(attrs, len(shape_in) - 1):
        flat_high = g.op("Reshape", high, g.ints([1, -1]))
        flat_indices = g.op("Reshape", indices, g.ints([1, -1]))
        lowest = g.op("Expand", g.const(np.full((1, 1), -3e38, np.float32)), g.op("Shape", flat_indices))
        others = g.op("Reshape", g.op("ScatterElements", flat_high, flat_indices, lowest, axis=1),
                      g.op("Shape", high))
        exact = _float(g, g.op("GreaterOrEqual", best_low, g.op("MaxPool", others, **attrs)))
        to_cells = g.op("Add", positive, back.times(negative, exact, shape_out))
        best_high = g.op("Mul", best_high, g.op("Sub", g.const(np.float32(1.0)), exact))
    else:
        to_cells = positive
    flat = g.op("Reshape", to_cells, g.ints([-1, size_out]))
    count = g.op("Shape", flat, start=0, end=1)
    zeros = g.op("ConstantOfShape", g.op("Concat", count, g.ints([size_in]), axis=0),
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    spread = g.op("ScatterElements", zeros, rows, flat, axis=1, reduction="add")
    back.add(node.input[0], g.op("Reshape", spread, g.ints([-1, *shape_in])))
    back.offset_per_sample(negative, best_high, shape_out)


def _disjoint_windows(attrs: dict, rank: int) -> bool:
    kernel = list(attrs["kernel_shape"])
    return (list(attrs.get("strides", [1] * rank)) == kernel and not any(attrs.get("pads", []))
            and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not attrs.get("ceil_mode", 0)
            and all(d == 1 for d in attrs.get("dilations", [1] * rank)))


_RULES = {
    "Gemm": _gemm, "MatMul": _matmul, "Conv": _conv, "BatchNormalization": _batch_norm, "Add": _add_sub,
    "Sub": _add_sub, "Mul": _scale, "Div": _scale, "Flatten": _reshape, "Reshape": _reshape,
    "Identity": _identity, "Dropout": _identity, "Relu": _relu, "GlobalAveragePool": _global_average_pool,
    "MaxPool": _max_pool, "LeakyRelu": _leaky_relu, "Sigmoid": _s_shaped, "Tanh": _s_shaped,
    "Clip": _clip, "Concat": _concat, "AveragePool": _average_pool, "Softplus": _softplus,
}
