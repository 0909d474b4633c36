"""Reverse-mode differentiation of an ONNX graph into standard ONNX operators.

One driver: mark the float tensors that depend on the inputs we differentiate with
respect to (activity), keep the nodes that also lie on a path to the target output,
name every node on that path that has no rule, then walk those nodes in reverse,
calling one rule per operator and summing gradients where a tensor fans out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import weights
from .errors import UnsupportedNode, UnsupportedOperatorError
from .graph import (
    FLOAT_TYPES,
    NUMPY_FLOATS,
    GraphBuilder,
    Shape,
    same_dim,
    static_shape,
    tensor_types,
)

# A rule takes the context, the node and one incoming gradient per output (None where
# no gradient flows) and returns one gradient per input (None where it has none).
RuleFn = Callable[["Context", onnx.NodeProto, list[str | None]], Sequence[str | None]]
ALL_INPUTS = "all"


@dataclass(frozen=True)
class Rule:
    fn: RuleFn | None
    inputs: tuple[int, ...] | str  # differentiable input positions, or ALL_INPUTS
    refusal: str | None = None  # set for operators that must not be differentiated silently

    def differentiates(self, position: int) -> bool:
        return self.inputs == ALL_INPUTS or position in self.inputs


REGISTRY: dict[str, Rule] = {}


def register(*op_types: str, inputs: tuple[int, ...] | str = (0,)):
    """Register ``fn`` as the VJP rule of ``op_types``; ``inputs`` are the differentiable positions."""

    def decorate(fn: RuleFn) -> RuleFn:
        for op_type in op_types:
            REGISTRY[op_type] = Rule(fn, inputs)
        return fn

    return decorate


def refuse(reason: str, *op_types: str) -> None:
    """Operators whose gradient exists but is useless (zero almost everywhere)."""
    for op_type in op_types:
        REGISTRY[op_type] = Rule(None, (), refusal=reason)


class Context:
    """What a rule may ask about the forward graph, plus the builder it emits into."""

    def __init__(self, graph: onnx.GraphProto, builder: GraphBuilder, active: set[str]):
        self.g = builder
        self.graph = graph
        self._types = tensor_types(graph)
        self._active = active
        self._constants = weights.values(graph.initializer)
        self._producers = {out: node for node in graph.node for out in node.output if out}
        self._consumers: dict[str, list[onnx.NodeProto]] | None = None
        for node in graph.node:
            if node.op_type == "Constant" and len(node.output) == 1:
                value = _constant_node_value(node)
                if value is not None:
                    self._constants[node.output[0]] = value

    def shape(self, name: str) -> Shape | None:
        return static_shape(self._types.get(name))

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def require_rank(self, name: str, node: onnx.NodeProto) -> int:
        rank = self.rank(name)
        if rank is None:
            raise unknown_shape(node, f"the rank of {name!r} is unknown")
        return rank

    def reshape_to(self, grad: str, grad_of: str, target: str) -> str:
        """Reshape ``grad`` (shaped like the forward tensor ``grad_of``) to ``target``'s shape.

        A constant shape where the dims are known (0 copies a symbolic dim that both share at
        the same position), so shape inference keeps the batch symbol: ONNX Runtime's NCHWc
        layout only stays on across the backward pass where shapes are provably equal.
        """
        source, shape = self.shape(grad_of), self.shape(target)
        if source is not None and shape is not None:
            dims = []
            for i, dim in enumerate(shape):
                if isinstance(dim, int) and dim > 0:
                    dims.append(dim)
                elif dim is not None and i < len(source) and same_dim(source[i], dim):
                    dims.append(0)
                else:
                    break
            else:
                return self.g.op("Reshape", grad, self.g.ints(dims))
        return self.g.reshape_like(grad, target)

    def elem_type(self, name: str) -> int | None:
        tp = self._types.get(name)
        return tp.tensor_type.elem_type if tp is not None else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None (also for a weight kept
        outside the model: weights.py; a rule then emits graph operators on it, not a copy)."""
        if self._constants.is_external(name):
            return None
        return self._constants.get(name)

    def is_external(self, name: str) -> bool:
        """Whether ``name`` is a weight kept outside the model (weights.py)."""
        return self._constants.is_external(name)

    def consumers(self, name: str) -> list[onnx.NodeProto]:
        """The forward nodes that read ``name``."""
        if self._consumers is None:
            self._consumers = {}
            for node in self.graph.node:
                for input_name in set(node.input):
                    self._consumers.setdefault(input_name, []).append(node)
        return self._consumers.get(name, [])

    def producer(self, name: str) -> onnx.NodeProto | None:
        """The forward node that outputs ``name`` (None for inputs and initializers)."""
        return self._producers.get(name)

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The forward node that outputs ``name`` when it is the default domain's ``op_type``
        (the operand patterns that fused rules recognise), else None."""
        node = self._producers.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node

    def is_graph_input(self, name: str) -> bool:
        return any(i.name == name for i in self.graph.input)

    def needs(self, name: str) -> bool:
        return bool(name) and name in self._active


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.asarray(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.asarray(list(attr.floats), np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), np.int64)
    return None


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's value; strings come back as str (ONNX stores them as bytes)."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def unsupported(node: onnx.NodeProto, reason: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError([UnsupportedNode(node.op_type, node.name or "?", reason)])


def unknown_shape(node: onnx.NodeProto, reason: str) -> UnsupportedOperatorError:
    """The rule needs a size that shape inference did not find."""
    found = UnsupportedNode(node.op_type, node.name or "?", reason, needs_shapes=True)
    return UnsupportedOperatorError([found])


def _is_float(types: dict[str, onnx.TypeProto], name: str) -> bool:
    tp = types.get(name)
    return tp is None or tp.tensor_type.elem_type in FLOAT_TYPES


# Integer outputs that carry a gradient, straight through (rules/quantize.py): a QuantizeLinear's
# to its DequantizeLinear, a DynamicQuantizeLinear's first to ConvInteger / MatMulInteger, theirs
STRAIGHT_THROUGH = {"QuantizeLinear": 0, "DynamicQuantizeLinear": 0, "ConvInteger": 0, "MatMulInteger": 0}


def _carries_gradient(types: dict[str, onnx.TypeProto], node: onnx.NodeProto, position: int) -> bool:
    name = node.output[position]
    return bool(name) and (_is_float(types, name) or (
        STRAIGHT_THROUGH.get(node.op_type) == position and node.domain in ("", "ai.onnx")))


def _active(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto], wrt: Sequence[str]) -> set[str]:
    """The tensors that depend on ``wrt`` and carry a gradient (floats, and the integers that
    quantizers pass straight through)."""
    active = set(wrt)
    for node in graph.node:
        if any(name in active for name in node.input if name):
            active.update(o for i, o in enumerate(node.output) if _carries_gradient(types, node, i))
    return active


def ancestors(graph: onnx.GraphProto, target: str) -> set[str]:
    """The tensors ``target`` depends on (itself included)."""
    relevant = {target}
    for node in reversed(graph.node):
        if any(o in relevant for o in node.output):
            relevant.update(i for i in node.input if i)
    return relevant


# Integer outputs that say nothing about the values they were computed from.
SHAPE_ONLY = frozenset({"Shape", "Size"})


def integer_crossings(graph: onnx.GraphProto, wrt: Sequence[str], target: str) -> list[UnsupportedNode]:
    """The nodes where the only dependence of ``target`` on ``wrt`` leaves float tensors (a Cast
    to an integer type, an ArgMax, a QOperator model's QLinearConv): each takes an input that
    depends on ``wrt`` through floats and outputs an integer tensor that ``target`` depends on.
    ``differentiate`` finds no gradient there; these name why."""
    types = tensor_types(graph)
    active, reaches = _active(graph, types, wrt), set(wrt)
    for node in graph.node:
        if node.op_type not in SHAPE_ONLY and any(name in reaches for name in node.input if name):
            reaches.update(o for o in node.output if o)
    if target not in reaches:
        return []
    relevant = ancestors(graph, target)
    found = []
    for node in graph.node:
        ends = [o for o in node.output if o in relevant and o in reaches and o not in active]
        if node.op_type in SHAPE_ONLY or not ends or not any(i in active for i in node.input if i):
            continue
        type_name = TensorProto.DataType.Name(types[ends[0]].tensor_type.elem_type).lower() \
            if ends[0] in types else "not a float"
        reason = f"its output {ends[0]!r} is {type_name}, which carries no gradient"
        if node.op_type.startswith("QLinear"):
            reason += ("; this is a QOperator-format quantized model: quantize it in the QDQ format "
                       "(onnxruntime.quantization's QuantFormat.QDQ) for straight-through gradients")
        domain = f"{node.domain}:" if node.domain not in ("", "ai.onnx") else ""
        found.append(UnsupportedNode(domain + node.op_type, node.name or node.output[0], reason))
    return found


def differentiate(
    graph: onnx.GraphProto,
    builder: GraphBuilder,
    wrt: Sequence[str],
    target: str,
    seed: str,
) -> dict[str, str | None]:
    """Emit into ``builder`` the gradient of <seed, target> with respect to each of ``wrt``.

    ``graph`` is shape-inferred and is modified in place only where a rule asks the forward
    node for an extra output (MaxPool indices, LayerNormalization statistics). Returns the
    gradient tensor name per ``wrt`` entry, or None where ``target`` does not depend on it.
    """
    types = tensor_types(graph)
    active = _active(graph, types, wrt)
    relevant = ancestors(graph, target)

    on_path = [
        node
        for node in graph.node
        if any(o in active and o in relevant for o in node.output)
        and any(i in active for i in node.input if i)
    ]
    problems: list[UnsupportedNode] = []
    for node in on_path:
        name = node.name or node.output[0]
        rule = REGISTRY.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            domain = f"{node.domain}:" if node.domain not in ("", "ai.onnx") else ""
            problems.append(UnsupportedNode(domain + node.op_type, name))
        elif rule.refusal:
            problems.append(UnsupportedNode(node.op_type, name, rule.refusal))
        else:
            for position, input_name in enumerate(node.input):
                if input_name in active and not rule.differentiates(position):
                    problems.append(UnsupportedNode(
                        node.op_type, name,
                        f"input {position} ({input_name!r}) depends on the image input, "
                        "but only the data inputs of this operator are differentiated",
                    ))
    if problems:
        raise UnsupportedOperatorError(problems)

    ctx = Context(graph, builder, active)
    grads: dict[str, list[str]] = {target: [seed]}

    def total(name: str) -> str | None:
        terms = grads.get(name)
        if not terms:
            return None
        if len(terms) > 1:
            grads[name] = [builder.add_all(terms)]
        builder.gradient_of.setdefault(grads[name][0], name)
        return grads[name][0]

    for node in reversed(on_path):
        incoming = [total(o) if o in active else None for o in node.output]
        if all(g is None for g in incoming):
            continue
        elem_type = ctx.elem_type(node.output[0])
        float_type = NUMPY_FLOATS.get(elem_type, np.float32) if elem_type is not None else np.float32
        builder.float_dtype = np.dtype(float_type)
        rule_fn = REGISTRY[node.op_type].fn
        assert rule_fn is not None
        outgoing = rule_fn(ctx, node, incoming)
        for input_name, grad in zip(node.input, outgoing, strict=False):
            if grad is not None and input_name in active:
                grads.setdefault(input_name, []).append(grad)
    builder.float_dtype = np.dtype(np.float32)
    return {name: total(name) for name in wrt}
