"""Assembling gradient models: the forward graph, a loss seed, and its reverse pass."""

from __future__ import annotations

from dataclasses import replace

import onnx
from onnx import TensorProto, helper

from . import (
    rules,  # noqa: F401  (fills the registry)
    weights,
)
from .autodiff import differentiate, integer_crossings
from .batch_probe import complete_batch_shapes
from .errors import InvalidModelError, UnsupportedOperatorError
from .graph import FLOAT_TYPES, GraphBuilder, opset_of, tensor_types
from .losses import LOSS_INPUTS, LOSSES, emit_loss
from .prepare import (
    BATCH_DIM,
    PreparedClassifier,
    infer_shapes,
    load_model,
    normalise_opset,
    prepare_classifier,
    upgrade_opset,
)
from .rewrite import pool_before_activation
from .rules.linear import COL2IM_OPSET, wants_col2im

RESERVED = ("labels", "targets", "dlogits", "logits", "loss", "grad")
DEVICES = ("cpu", "cuda")


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {i.name for i in graph.initializer} | {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new
    for seq in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in seq:
            if item.name == old:
                item.name = new


def _prune(nodes: list[onnx.NodeProto], initializers, outputs: list[str]):
    """Keep the nodes (and initializers) that the outputs need."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    return kept, [i for i in initializers if i.name in needed]


def _assemble(
    source: onnx.ModelProto,
    graph: onnx.GraphProto,
    builder: GraphBuilder,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[tuple[str, str, onnx.ValueInfoProto]],
    name: str,
) -> onnx.ModelProto:
    """``outputs``: (tensor, public name, value info); Identity nodes give the public names."""
    nodes = list(graph.node) + builder.nodes
    for tensor, public, _ in outputs:
        if tensor != public:
            nodes.append(helper.make_node("Identity", [tensor], [public], name=f"output/{public}"))
    nodes, initializers = _prune(
        nodes, list(graph.initializer) + builder.initializers, [p for _, p, _ in outputs]
    )
    new_graph = helper.make_graph(
        nodes, name, inputs, [vi for _, _, vi in outputs], initializers,
        value_info=_gradient_value_info(graph, builder, nodes, inputs, initializers),
    )
    model = helper.make_model(
        new_graph, opset_imports=list(source.opset_import), ir_version=source.ir_version,
        producer_name="robustness-service.onnxgrad",
    )
    weights.check_model(model)
    return model


def _gradient_value_info(graph, builder, nodes, inputs, initializers) -> list[onnx.ValueInfoProto]:
    """Each gradient tensor typed like its forward tensor.

    Shape inference loses the batch symbol through some operators (Resize by scales, Reshape
    to a run-time shape); ONNX Runtime keeps a declared dim where its own inference finds
    none, and its NCHWc layout only spans tensors whose shapes it can prove equal, so these
    declarations spare the backward pass a layout reorder around every elementwise op.
    """
    types = tensor_types(graph)
    produced = {o for node in nodes for o in node.output}
    declared = {i.name for i in inputs} | {i.name for i in initializers}
    infos = []
    for grad, forward in builder.gradient_of.items():
        # an integer tensor carried straight through (rules/quantize.py) has a float gradient
        if grad in produced and grad not in declared and forward in types \
                and types[forward].tensor_type.elem_type in FLOAT_TYPES:
            infos.append(_typed_like(grad, types[forward]))
            declared.add(grad)
    for name, (elem_type, shape) in builder.declared.items():
        if name in produced and name not in declared:
            infos.append(_value_info(name, elem_type, shape))
            declared.add(name)
    return infos


def _value_info(name: str, elem_type: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape) if shape is not None else None)


def _typed_like(name: str, tensor_type: onnx.TypeProto) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto(name=name)
    info.type.CopyFrom(tensor_type)
    return info


def build_gradient_model(
    model: onnx.ModelProto | bytes,
    loss: str = "cross_entropy",
    output_name: str | None = None,
    *,
    device: str = "cpu",
) -> onnx.ModelProto:
    """The gradient graph of a classifier, made only of default-domain ONNX operators.

    Inputs: the model's image input (same name) and ``labels`` (int64 [N]); the
    ``dlr_targeted`` loss also takes ``targets`` (int64 [N]), and ``cotangent`` takes
    ``dlogits`` (float32 [N, K]) instead of labels.
    Outputs: ``logits`` [N, K], ``loss`` [N] (per sample) and ``grad`` (shaped like the image
    input: d loss[i] / d x[i]). The batch axis is symbolic. For a model that ends in Softmax
    the pre-softmax scores are differentiated and returned as ``logits``.
    ``loss`` is one of ``LOSSES`` (see losses.py). The caller's model is not mutated.
    ``device`` is the ONNX Runtime provider the graph will run on ("cpu" or "cuda"): the
    gradient is the same, but some operators are written in forms that are faster there. A
    CPU graph of a model with a few-channel conv is upgraded to opset 18 (for Col2Im).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    try:
        return _gradient_model(prepare_classifier(model, output_name), loss, device)
    except UnsupportedOperatorError as exc:
        if not exc.needs_shapes:
            raise
        prepared = prepare_classifier(model, output_name)  # the failed build edited its graph
        completed = complete_batch_shapes(prepared.model, prepared.input_name)
        if completed is None:
            raise
        return _gradient_model(replace(prepared, model=completed), loss, device)


def _gradient_model(prepared: PreparedClassifier, loss: str, device: str) -> onnx.ModelProto:
    if device == "cpu" and prepared.opset < COL2IM_OPSET and wants_col2im(prepared.model.graph):
        prepared = upgrade_opset(prepared, COL2IM_OPSET)
    graph = prepared.model.graph
    x = prepared.input_name
    if x in RESERVED:
        raise InvalidModelError(
            f"the image input is named {x!r}, a name the gradient model needs for itself; "
            "rename the input"
        )
    logits = prepared.logits_name
    taken = _names(graph)
    for reserved in RESERVED:
        if reserved in taken and reserved != logits:
            replacement = f"model/{reserved}"
            while replacement in taken:
                replacement += "_"
            _rename(graph, reserved, replacement)
            taken.add(replacement)
    pool_before_activation(graph)
    builder = GraphBuilder(prepared.opset, _names(graph) | set(RESERVED), device=device)
    extra = {name: name for name in LOSS_INPUTS[loss]}
    loss_name, seed = emit_loss(builder, loss, logits, prepared.num_classes, extra)
    grads = differentiate(graph, builder, [x], logits, seed)
    grad = grads[x]
    if grad is None:
        crossings = integer_crossings(graph, [x], logits)
        if crossings:
            raise UnsupportedOperatorError(crossings)
        raise InvalidModelError("the logits do not depend on the image input")

    batch = prepared.input_shape[0] if prepared.input_shape else BATCH_DIM
    inputs = [_value_info(x, TensorProto.FLOAT, prepared.input_shape or None)]
    for name in LOSS_INPUTS[loss]:
        if name == "dlogits":
            inputs.append(_value_info(name, TensorProto.FLOAT, [batch, prepared.num_classes]))
        else:
            inputs.append(_value_info(name, TensorProto.INT64, [batch]))
    outputs = [
        (logits, "logits", _value_info("logits", TensorProto.FLOAT, [batch, prepared.num_classes])),
        (loss_name, "loss", _value_info("loss", TensorProto.FLOAT, [batch])),
        (grad, "grad", _value_info("grad", TensorProto.FLOAT, prepared.input_shape or None)),
    ]
    return _assemble(prepared.model, graph, builder, inputs, outputs, f"gradient_{loss}")


def build_vjp_model(model: onnx.ModelProto | bytes, wrt: list[str], output: str) -> onnx.ModelProto:
    """The vector-Jacobian product of any graph: d <cotangent, output> / d wrt.

    Inputs: the model's inputs plus ``cotangent`` (shaped like ``output``); outputs:
    ``output`` and ``grad_<name>`` for each name in ``wrt`` (zeros if it has no influence).
    Used to check rules operator by operator.
    """
    source = infer_shapes(normalise_opset(load_model(model)))
    graph = source.graph
    types = tensor_types(graph)
    builder = GraphBuilder(opset_of(source), _names(graph) | {"cotangent"})
    grads = differentiate(graph, builder, wrt, output, "cotangent")
    cotangent = _typed_like("cotangent", types[output])
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers] + [cotangent]
    outputs = [(output, output, next(o for o in graph.output if o.name == output))]
    for name in wrt:
        grad = grads[name]
        if grad is None:
            grad = builder.zeros_like(name)
        outputs.append((grad, f"grad_{name}", _typed_like(f"grad_{name}", types[name])))
    return _assemble(source, graph, builder, inputs, outputs, "vjp")
