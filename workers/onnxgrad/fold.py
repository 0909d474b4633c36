"""Constant folding: evaluate the nodes that depend on no graph input, once, at build time.

Exporters compute pads, shapes and slice bounds with chains of small operators; until they
are folded, shape inference cannot see the spatial sizes that Conv, pooling and Resize
gradients need.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from . import weights
from .graph import all_static, static_shape, tensor_types

_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli", "If", "Loop", "Scan"}
_MAX_FOLDED_ELEMENTS = 1 << 24


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose input-independent nodes are replaced by initializers."""
    graph = model.graph
    known = {i.name for i in graph.initializer if not weights.is_external(i)}  # weights outside stay
    foldable: list[onnx.NodeProto] = []
    for node in graph.node:
        if (node.domain in ("", "ai.onnx") and node.op_type not in _NEVER_FOLD
                and all(not name or name in known for name in node.input)):
            foldable.append(node)
            known.update(o for o in node.output if o)
    if not foldable or all(n.op_type == "Constant" for n in foldable):
        return model
    folded_outputs = {o for n in foldable for o in n.output if o}
    folded_ids = {id(n) for n in foldable}
    remaining = [n for n in graph.node if id(n) not in folded_ids]
    consumed = {i for n in remaining for i in n.input} | {o.name for o in graph.output}
    wanted = sorted(folded_outputs & consumed)
    if not wanted:
        return model

    used_inits = {i for n in foldable for i in n.input}
    known_values = {i.name: weights.array(i) for i in graph.initializer if i.name in used_inits}
    evaluated = _evaluate_within_budget(foldable, known_values, model)
    if evaluated is None:  # too large, or something the reference cannot evaluate: left unfolded
        return model
    values = [evaluated[name] for name in wanted]

    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    del folded.graph.node[:]
    folded.graph.node.extend(remaining)
    for name, value in zip(wanted, values, strict=True):
        folded.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    still_used = {i for n in remaining for i in n.input} | {o.name for o in graph.output}
    dropped = {i.name for i in folded.graph.initializer if i.name not in still_used}
    kept = [i for i in folded.graph.initializer if i.name not in dropped]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(kept)
    inputs = [i for i in folded.graph.input if i.name not in dropped]
    del folded.graph.input[:]
    folded.graph.input.extend(inputs)
    return folded


def _evaluate_within_budget(nodes: list[onnx.NodeProto], values: dict[str, np.ndarray],
                            model: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """Evaluate ``nodes`` one by one, each only after shape inference on its known inputs has
    shown that its outputs fit the budget: a model can declare a ConstantOfShape or an Expand
    of 10^11 elements, and the reference evaluator would allocate it before any check."""
    values = dict(values)
    for node in nodes:
        inputs = [numpy_helper.from_array(np.asarray(values[name]), name) for name in node.input if name]
        single = helper.make_model(
            helper.make_graph([node], "node", [], [helper.make_empty_tensor_value_info(o) for o in node.output
                                                   if o], inputs),
            opset_imports=list(model.opset_import), ir_version=model.ir_version)
        try:
            inferred = onnx.shape_inference.infer_shapes(single, data_prop=True)
        except Exception:
            return None
        types = tensor_types(inferred.graph)
        for output in filter(None, node.output):
            dims = static_shape(types.get(output))
            if dims is None or not all_static(dims) or np.prod(dims, dtype=np.float64) > _MAX_FOLDED_ELEMENTS:
                return None
        try:
            results = ReferenceEvaluator(single).run(None, {})
        except Exception:
            return None
        assert isinstance(results, list)
        values.update(zip(filter(None, node.output), results, strict=False))
    return values


def _constant_node(output: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=f"folded/{output}",
                            value=numpy_helper.from_array(value, output))


def fold_static_shape_reads(model: onnx.ModelProto) -> bool:
    """Replace Shape(x) (or Gather(Shape(x), const)) by a Constant where the dims read are static.

    Works on a shape-inferred model, in place; returns whether anything changed. Reads of
    the symbolic batch dimension are left alone.
    """
    graph = model.graph
    types = tensor_types(graph)
    constants = weights.values(graph.initializer)
    shapes: dict[str, tuple] = {}
    changed = False
    for position, node in enumerate(graph.node):
        if node.op_type == "Shape":
            dims = static_shape(types.get(node.input[0]))
            if dims is None:
                continue
            start = _attr(node, "start", 0)
            end = _attr(node, "end", None)
            dims = dims[start:end]
            shapes[node.output[0]] = dims
            if all(isinstance(d, int) for d in dims):
                graph.node[position].CopyFrom(_constant_node(node.output[0], np.array(dims, np.int64)))
                changed = True
        elif node.op_type == "Gather" and node.input[0] in shapes and node.input[1] in constants:
            dims = shapes[node.input[0]]
            index = constants[node.input[1]]
            # an object array even for a scalar index, whose pick numpy would otherwise unwrap
            picked = np.asarray(np.array(dims, dtype=object)[index], dtype=object)
            if all(isinstance(d, int) for d in picked.reshape(-1)):
                value = np.array(picked.tolist(), np.int64).reshape(index.shape)
                graph.node[position].CopyFrom(_constant_node(node.output[0], value))
                changed = True
        elif node.op_type == "Constant":
            value = node.attribute[0]
            if value.name == "value":
                constants[node.output[0]] = numpy_helper.to_array(value.t)
    return changed


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
