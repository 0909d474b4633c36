"""What every loop graph is built from: `LoopGraph` (which output replaces which state), the
`Update` node emitter with the norms' operations, and the declarations of state inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.onnxgrad.graph import GraphBuilder

P = "loop/"


@dataclass(frozen=True)
class LoopGraph:
    """A model whose outputs replace state tensors: ``writes`` maps output -> state name; after
    a call, each state of ``shifts`` (later -> earlier) takes the value that ``earlier`` had
    before the call (APGD's previous iterate), without a copy."""

    model: onnx.ModelProto
    writes: dict[str, str]
    shifts: dict[str, str] = field(default_factory=dict)


def model_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


class Update:
    """Emits an attack update's nodes for images of rank ``rank`` (batch first)."""

    def __init__(self, model: onnx.ModelProto, rank: int):
        taken = {n for node in model.graph.node for n in [*node.input, *node.output]}
        taken |= {t.name for t in [*model.graph.input, *model.graph.output, *model.graph.initializer]}
        self.g = GraphBuilder(model_opset(model), taken, prefix=P)
        self.axes = list(range(1, rank))
        self.column = [-1] + [1] * (rank - 1)

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.g.op(op_type, *inputs, **attrs)

    def col(self, per_sample: str) -> str:
        """A [N] tensor as [N, 1, ..., 1], to broadcast over images."""
        return self.op("Reshape", per_sample, self.g.ints(self.column))

    def size(self, t: str) -> str:
        """Norm.size of L2: the per-sample norm, its squares summed in float64, as float32 [N,1..1]."""
        wide = self.op("Cast", t, to=TensorProto.DOUBLE)
        total = self.g.reduce("ReduceSum", self.op("Mul", wide, wide), self.axes, keepdims=True)
        return self.op("Cast", self.op("Sqrt", total), to=TensorProto.FLOAT)

    def sign(self, t: str) -> str:
        """numpy's sign of a float32 tensor, to the bit (NaN, and +0 for -0 after adding +0).

        Not t * 2^126 * 2^126 clipped to +-1, a third of the time of ONNX Runtime's Sign kernel:
        where the gradient ends in a Conv (the adjoint Conv of a model's first layer), ONNX
        Runtime's ConvMulFusion folds both factors into that Conv's weights, which overflow to
        inf, and every iterate became NaN (measured: a PGD gate passed on NaN images)."""
        return self.op("Add", self.op("Sign", t), self.g.const(np.float32(0)))

    def ascent(self, norm: str, grad: str) -> str:
        """Norm.ascent_direction."""
        if norm == "linf":
            return self.sign(grad)
        peak = self.g.reduce("ReduceMax", self.op("Abs", grad), self.axes, keepdims=True)
        zero, one = self.g.const(np.float32(0)), self.g.const(np.float32(1))
        scaled = self.op("Div", grad, self.op("Where", self.op("Greater", peak, zero), peak, one))
        norms = self.op("Max", self.size(scaled), self.g.const(np.float32(1e-12)))
        return self.op("Div", scaled, norms)

    def project(self, norm: str, delta: str, eps: str) -> str:
        """Norm.project onto the ball of radius ``eps`` (a float32 scalar input)."""
        if norm == "linf":
            return self.op("Clip", delta, self.op("Neg", eps), eps)
        norms = self.op("Max", self.size(delta), self.g.const(np.float32(1e-12)))
        factor = self.op("Min", self.op("Div", eps, norms), self.g.const(np.float32(1)))
        return self.op("Mul", delta, factor)

    def into_box(self, norm: str, x: str, point: str, eps: str, low: str, high: str) -> str:
        """clip_to_box(x + project(point - x, eps), bounds): the attacks' projection."""
        delta = self.project(norm, self.op("Sub", point, x), eps)
        return self.op("Clip", self.op("Add", x, delta), low, high)

    def where_rows(self, rows: str, a: str, b: str) -> str:
        """a where ``rows`` (bool [N]) else b, for image-shaped a and b."""
        return self.op("Where", self.col(rows), a, b)

    def attach(self, model: onnx.ModelProto) -> None:
        model.graph.node.extend(self.g.nodes)
        model.graph.initializer.extend(self.g.initializers)


def float_input(graph: onnx.GraphProto, name: str, shape) -> None:
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))


def int_input(graph: onnx.GraphProto, name: str, shape) -> None:
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, shape))


def bool_input(graph: onnx.GraphProto, name: str, shape) -> None:
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.BOOL, shape))


def labels_input(graph: onnx.GraphProto) -> None:
    """The int64 [N] ``labels`` input, where the model (a forward one) lacks it."""
    if not any(i.name == "labels" for i in graph.input):
        int_input(graph, "labels", [None])


def image_input(graph: onnx.GraphProto, input_name: str) -> onnx.ValueInfoProto:
    return next(i for i in graph.input if i.name == input_name)


def like(image: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto()
    value.CopyFrom(image)
    value.name = name
    return value


def set_outputs(graph: onnx.GraphProto, outputs: list[onnx.ValueInfoProto]) -> None:
    """Make ``outputs`` the graph's outputs and drop the nodes none of them depends on (a
    gradient model's loss where a step reads only the gradient): ONNX Runtime runs every node of
    a graph, needed or not (PGD-10 on the MLP: 7 of 45 nodes, about 6% of a step)."""
    del graph.output[:]
    graph.output.extend(outputs)
    # nodes appended by `Update` may feed earlier ones (a cotangent made for the gradient's
    # nodes), so this follows producers, not the node order
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output}
    needed, pending, kept = set(), [output.name for output in outputs], set()
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        i = producer.get(name)
        if i is not None and i not in kept:
            kept.add(i)
            node = graph.node[i]
            pending.extend(n for n in node.input if n)
            pending.extend(_names_read_inside(node))
    nodes = [node for i, node in enumerate(graph.node) if i in kept]
    del graph.node[:]
    graph.node.extend(nodes)
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _names_read_inside(node: onnx.NodeProto) -> set[str]:
    """Every name a node's subgraphs (If, Loop, Scan) read, their own included: a superset of
    the outer tensors they use."""
    names: set[str] = set()
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in sub.node:
                names.update(name for name in inner.input if name)
                names |= _names_read_inside(inner)
    return names


def rank_of(image: onnx.ValueInfoProto) -> int:
    return len(image.type.tensor_type.shape.dim)


def standalone(name: str) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph([], name, [], []), opset_imports=[helper.make_opsetid("", 17)])


def image_inputs(graph: onnx.GraphProto, names, image_shape: tuple) -> None:
    for name in names:
        float_input(graph, name, [None, *image_shape[1:]])


def double_input(graph: onnx.GraphProto, name: str) -> None:
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, [None]))
