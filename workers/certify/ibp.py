"""Interval bound propagation (Gowal et al. 2018) as an ONNX graph built from the model.

Every tensor that depends on the image becomes a pair (lower, upper) with lower <= value <=
upper for every image in the input box [x_low, x_high]; tensors that do not depend on it
(weights, shapes) stay what they are. Each operator has one rule in ``RULES``, as each has
one gradient rule in the gradient builder:

- affine with constant weights (Conv, Gemm, MatMul, BatchNormalization): centre and radius,
  op(centre) +- op_|W|(radius);
- Add, Sub, and Mul or Div by a constant: interval arithmetic;
- every operator that is monotone non-decreasing in its image input (Relu, LeakyRelu with a
  non-negative slope, Sigmoid, Tanh, Clip, Softplus, MaxPool, AveragePool and the global
  pools, ReduceMean/Sum/Max, and the shape operators: Reshape, Flatten, Transpose, Concat,
  Squeeze, Unsqueeze, Slice, Gather, Pad, Identity): applied to the lower and upper bounds
  apart.

The graph's outputs are the bounds of the logits and, per sample and class j, a lower bound
of the margin z_y - z_j. When the logits come from a Gemm or MatMul (+ bias) with constant
weights, the margins are bounded through that layer (W_y - W_j applied to the bounds of its
input, the usual "elision" of the last layer), which is much tighter than the difference of
logit bounds. Float32 rounding can move a bound by a few units in the last place; a margin
certifies a sample only above ``MARGIN_TOLERANCE`` (certify.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.onnxgrad import weights
from workers.onnxgrad.autodiff import Context
from workers.onnxgrad.errors import InvalidModelError
from workers.onnxgrad.graph import GraphBuilder, static_shape, tensor_types
from workers.onnxgrad.prepare import PreparedClassifier


class UnsupportedForBounds(InvalidModelError):
    """The model has an operator without an interval rule; the message names it."""


Interval = tuple[str, str]
Rule = Callable[["_Builder", onnx.NodeProto], list[Interval]]
RULES: dict[str, Rule] = {}


def rule(*op_types: str):
    def register(function: Rule) -> Rule:
        for op_type in op_types:
            RULES[op_type] = function
        return function
    return register


def supported_op_types() -> list[str]:
    return sorted(RULES)


class _Builder:
    def __init__(self, prepared: PreparedClassifier):
        self.model = prepared.model
        graph = self.model.graph
        taken = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.initializer}
        self.g = GraphBuilder(prepared.opset, taken, prefix="ibp/")
        self.constants = weights.values(graph.initializer)
        for node in graph.node:  # Constant nodes that constant folding left in place
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if node.op_type == "Constant" and value is not None \
                    and value.data_location != onnx.TensorProto.EXTERNAL:
                self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.bounds: dict[str, Interval] = {}
        self.types = tensor_types(graph)
        # with an L2 budget: tensors that are the image under shifts, reshapes and scalings,
        # as (the same operators applied to the centre image "x", bound on how they stretch
        # an L2 ball): the first affine layer then bounds each output over the ball itself
        self.balls: dict[str, tuple[str, float]] = {}
        self.path: list[onnx.NodeProto] = []  # the image-dependent nodes, in order
        # alpha-CROWN: (graph input, its starting value, shape) per optimised slope tensor
        self.alphas: list[tuple[str, str, list[int]]] | None = None
        # the last layer's elision: (centre, radius of its input, W [D, K], bias [K])
        self.elision: tuple[str, str, np.ndarray, np.ndarray] | None = None
        # the gradient builder's view of the graph, for linear operators whose relaxation is their
        # adjoint (crown.py), made when first needed
        self.adjoints: Context | None = None

    def interval(self, name: str) -> Interval | None:
        return self.bounds.get(name)

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def attrs(self, node: onnx.NodeProto) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def copy(self, node: onnx.NodeProto, inputs: list[str], hint: str) -> list[str]:
        """``node`` again with other inputs (the bounds), fresh outputs."""
        outputs = [self.g.fresh(f"{hint}_{o}") if o else "" for o in node.output]
        self.g.nodes.append(helper.make_node(node.op_type, inputs, outputs, name=self.g.fresh(node.op_type),
                                             domain=node.domain, **self.attrs(node)))
        return outputs


def _centre_radius(b: _Builder, interval: Interval) -> tuple[str, str]:
    lo, hi = interval
    g = b.g
    return g.op("Mul", g.op("Add", lo, hi), g.const(0.5)), g.op("Mul", g.op("Sub", hi, lo), g.const(0.5))


def _from_centre(b: _Builder, centre: str, radius: str) -> Interval:
    return b.g.op("Sub", centre, radius), b.g.op("Add", centre, radius)


def _absolute(b: _Builder, name: str) -> str:
    value = b.constant(name)
    if value is None:
        raise UnsupportedForBounds(f"interval bounds need constant weights; {name!r} is computed")
    return b.g.const(np.abs(value).astype(value.dtype))


def _image_input(b: _Builder, node: onnx.NodeProto, position: int = 0) -> Interval:
    found = b.interval(node.input[position])
    others = [n for i, n in enumerate(node.input) if i != position and n]
    if found is None or any(b.interval(n) is not None for n in others):
        raise UnsupportedForBounds(f"{node.op_type} {node.name!r}: interval bounds support only its input "
                                   f"{position} depending on the image")
    return found


def _within_ball(b: _Builder, node: onnx.NodeProto, box: Interval, mid: str, norms: np.ndarray) -> Interval:
    """``box`` intersected with each output's bound over the L2 ball: mid +- eps * scale * ||w||_2,
    where ``mid`` is the operator on the ball's centre and ``norms`` the L2 norms of the weights
    that make each output (broadcast over it)."""
    _, scale = b.balls[node.input[0]]
    g = b.g
    radius = g.op("Mul", g.const((norms * scale).astype(np.float32)), "l2_eps")
    return (g.op("Max", box[0], g.op("Sub", mid, radius)), g.op("Min", box[1], g.op("Add", mid, radius)))


@rule("Conv")
def _conv(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    centre, radius = _centre_radius(b, _image_input(b, node))
    attrs = b.attrs(node)
    w = node.input[1]
    mid = b.g.op("Conv", centre, *node.input[1:], **attrs)
    rad = b.g.op("Conv", radius, _absolute(b, w), **attrs)
    box = _from_centre(b, mid, rad)
    weight = b.constant(w)
    if node.input[0] in b.balls and weight is not None:
        ball_mid = b.g.op("Conv", b.balls[node.input[0]][0], *node.input[1:], **attrs)
        norms = np.sqrt((weight.astype(np.float64) ** 2).reshape(len(weight), -1).sum(axis=1))
        return [_within_ball(b, node, box, ball_mid, norms.reshape(-1, *([1] * (weight.ndim - 2))))]
    return [box]


@rule("Gemm")
def _gemm(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    attrs = b.attrs(node)
    if attrs.get("transA", 0):
        raise UnsupportedForBounds(f"Gemm {node.name!r}: transA is not supported by interval bounds")
    centre, radius = _centre_radius(b, _image_input(b, node))
    mid = b.g.op("Gemm", centre, *node.input[1:], **attrs)
    rad_attrs = {k: v for k, v in attrs.items() if k not in ("beta", "alpha")}
    rad = b.g.op("Gemm", radius, _absolute(b, node.input[1]), alpha=abs(float(attrs.get("alpha", 1.0))),
                 **rad_attrs)
    box = _from_centre(b, mid, rad)
    weight = b.constant(node.input[1])
    if node.input[0] in b.balls and weight is not None:
        forward = weight.T if attrs.get("transB", 0) else weight  # [in, out]
        norms = abs(float(attrs.get("alpha", 1.0))) * np.sqrt((forward.astype(np.float64) ** 2).sum(axis=0))
        ball_mid = b.g.op("Gemm", b.balls[node.input[0]][0], *node.input[1:], **attrs)
        return [_within_ball(b, node, box, ball_mid, norms)]
    return [box]


@rule("MatMul")
def _matmul(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    if b.interval(node.input[0]) is not None:
        centre, radius = _centre_radius(b, _image_input(b, node, 0))
        mid = b.g.op("MatMul", centre, node.input[1])
        rad = b.g.op("MatMul", radius, _absolute(b, node.input[1]))
        weight = b.constant(node.input[1])
        if node.input[0] in b.balls and weight is not None and weight.ndim == 2:
            ball_mid = b.g.op("MatMul", b.balls[node.input[0]][0], node.input[1])
            norms = np.sqrt((weight.astype(np.float64) ** 2).sum(axis=0))
            return [_within_ball(b, node, _from_centre(b, mid, rad), ball_mid, norms)]
    else:
        centre, radius = _centre_radius(b, _image_input(b, node, 1))
        mid = b.g.op("MatMul", node.input[0], centre)
        rad = b.g.op("MatMul", _absolute(b, node.input[0]), radius)
    return [_from_centre(b, mid, rad)]


@rule("BatchNormalization")
def _batch_norm(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    centre, radius = _centre_radius(b, _image_input(b, node))
    scale, var = b.constant(node.input[1]), b.constant(node.input[4])
    if scale is None or var is None:
        raise UnsupportedForBounds(f"BatchNormalization {node.name!r}: its scale and variance must be "
                                   "constant")
    epsilon = float(b.attrs(node).get("epsilon", 1e-5))
    factor = np.abs(scale / np.sqrt(var + epsilon)).astype(np.float32)
    mid = b.g.op("BatchNormalization", centre, *node.input[1:5], epsilon=epsilon)
    shape = static_shape(b.types.get(node.input[0]))
    rank = len(shape) if shape is not None else 4
    rad = b.g.op("Mul", radius, b.g.const(factor.reshape(-1, *([1] * (rank - 2)))))
    return [_from_centre(b, mid, rad)]


@rule("Add", "Sub")
def _add_sub(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    left, right = (b.interval(n) for n in node.input[:2])
    g = b.g
    if left is not None and right is not None:
        if node.op_type == "Add":
            return [(g.op("Add", left[0], right[0]), g.op("Add", left[1], right[1]))]
        return [(g.op("Sub", left[0], right[1]), g.op("Sub", left[1], right[0]))]
    if left is not None:
        if node.input[0] in b.balls:
            centre, scale = b.balls[node.input[0]]
            b.balls[node.output[0]] = (g.op(node.op_type, centre, node.input[1]), scale)
        return [(g.op(node.op_type, left[0], node.input[1]), g.op(node.op_type, left[1], node.input[1]))]
    assert right is not None
    if node.input[1] in b.balls:
        centre, scale = b.balls[node.input[1]]
        b.balls[node.output[0]] = (g.op(node.op_type, node.input[0], centre), scale)
    if node.op_type == "Add":
        return [(g.op("Add", node.input[0], right[0]), g.op("Add", node.input[0], right[1]))]
    return [(g.op("Sub", node.input[0], right[1]), g.op("Sub", node.input[0], right[0]))]


@rule("Mul", "Div")
def _scale(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    g = b.g
    if node.op_type == "Div" or b.interval(node.input[0]) is not None:
        lo, hi = _image_input(b, node, 0)
        first, second = g.op(node.op_type, lo, node.input[1]), g.op(node.op_type, hi, node.input[1])
        image, factor = node.input[0], node.input[1]
    else:
        lo, hi = _image_input(b, node, 1)
        first, second = g.op("Mul", node.input[0], lo), g.op("Mul", node.input[0], hi)
        image, factor = node.input[1], node.input[0]
    constant = b.constant(factor)
    if image in b.balls and constant is not None and constant.size and np.all(constant != 0):
        centre, scale = b.balls[image]
        magnitudes = np.abs(constant)
        stretch = float(magnitudes.max()) if node.op_type == "Mul" else 1 / float(magnitudes.min())
        moved = g.op(node.op_type, centre, factor) if image == node.input[0] else g.op("Mul", factor, centre)
        b.balls[node.output[0]] = (moved, scale * stretch)
    return [(g.op("Min", first, second), g.op("Max", first, second))]


_MONOTONE = ("Relu", "Sigmoid", "Tanh", "Clip", "Softplus", "MaxPool", "AveragePool", "GlobalAveragePool",
             "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "Reshape", "Flatten", "Transpose",
             "Squeeze", "Unsqueeze", "Slice", "Gather", "Pad", "Identity", "Concat", "Dropout", "LeakyRelu")


@rule(*_MONOTONE)
def _monotone(b: _Builder, node: onnx.NodeProto) -> list[Interval]:
    if node.op_type == "LeakyRelu" and float(b.attrs(node).get("alpha", 0.01)) < 0:
        raise UnsupportedForBounds(f"LeakyRelu {node.name!r}: a negative slope is not monotone")
    if node.op_type in ("Clip", "Pad") and any(b.interval(n) is not None for n in node.input[1:] if n):
        raise UnsupportedForBounds(f"{node.op_type} {node.name!r}: its bounds must not depend on the image")
    if node.op_type == "Gather" and b.interval(node.input[1]) is not None:
        raise UnsupportedForBounds(f"Gather {node.name!r}: indices that depend on the image")
    sides = []
    for side in (0, 1):
        inputs = [b.interval(n)[side] if b.interval(n) is not None else n for n in node.input]  # type: ignore[index]
        sides.append(b.copy(node, inputs, ("lo", "hi")[side]))
    if node.op_type in _ISOMETRIES and node.input[0] in b.balls:  # moves entries, keeps L2 norms
        centre, scale = b.balls[node.input[0]]
        b.balls[node.output[0]] = (b.copy(node, [centre, *node.input[1:]], "ball")[0], scale)
    return [(sides[0][k], sides[1][k]) for k in range(len(node.output))]


_ISOMETRIES = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout")
