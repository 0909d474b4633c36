"""Checking an uploaded classifier and putting it in the form the differentiator expects.

Refuses what cannot be used (not a protobuf, external data, no single float input, logits
that are not [N, K]) with a message that says how to fix it; reads a binary classifier's one
score ([N, 1] or [N]) as two-class logits; converts opsets below 17
(and to 18 where a faster gradient needs it); makes the batch dimension symbolic; runs
shape inference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from . import weights
from .autodiff import attr
from .dtypes import HALF, float32_twin, forward_model, half_dtype, half_inside
from .errors import InvalidModelError
from .fold import fold_constants, fold_static_shape_reads
from .graph import FLOAT_TYPES, Shape, opset_of, static_shape, tensor_types

MIN_OPSET = 17
BATCH_DIM = "N"


@dataclass
class PreparedClassifier:
    model: onnx.ModelProto  # opset >= 17, symbolic batch, shape-inferred; a private copy
    input_name: str
    input_shape: Shape  # (N, C, H, W) or (N, D) with N symbolic
    logits_name: str  # the tensor differentiated (before a final Softmax, if any)
    num_classes: int | None
    ends_in_softmax: bool
    opset: int
    fixed_batch: int | None = None  # the batch size the upload declared, if it was not symbolic
    dtype: str = "float32"  # the model's: float16 and bfloat16 run as they are (workers/onnxgrad/dtypes.py)
    # what predictions run when it is not ``model``: a half-precision model itself (dtypes.forward_model;
    # ``model`` is then its float32 twin, which gradients differentiate)
    forward: onnx.ModelProto | None = None
    squeezed_from: Shape | None = None  # the output's shape when it was [N, K, 1, 1] or [N, 1, K]
    # a binary classifier's one score: "sigmoid" (a probability, differentiated before its
    # Sigmoid) or "logit"; its logits are then the two classes' [-z/2, z/2]
    binary: str | None = None
    # a multi-label head: a Sigmoid per class at the end, differentiated before it, like a Softmax
    ends_in_sigmoid: bool = False
    # quantizers on the image's path (a QDQ model's QuantizeLinear -> DequantizeLinear pairs, a
    # dynamically quantized model's DynamicQuantizeLinear), differentiated straight through
    # (rules/quantize.py)
    straight_through: int = 0
    # a DynamicQuantizeLinear on the image's path takes its range from the whole batch, so one
    # image's logits depend on the others in its call: such a model runs one image per call
    couples_batch: bool = False


def load_model(model: onnx.ModelProto | bytes) -> onnx.ModelProto:
    """A private copy of ``model``; bytes are parsed, never a path (so no file is ever named)."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return legacy_ir_to_4(copy)
    if not isinstance(model, bytes | bytearray | memoryview):
        raise InvalidModelError(f"expected an onnx.ModelProto or bytes, got {type(model).__name__}")
    try:
        parsed = onnx.load_from_string(bytes(model))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidModelError(
            f"the file is not a valid ONNX protobuf ({exc}); upload the .onnx file itself"
        ) from None
    if not parsed.graph.node and not parsed.graph.output:
        raise InvalidModelError("the file parsed as ONNX but holds no graph; upload an .onnx model")
    return legacy_ir_to_4(parsed)


LEGACY_IR = 4  # below it, every initializer is also a graph input (CNTK, early zoo files)


def legacy_ir_to_4(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model of IR version 3 or older, in place, as IR 4: its initializer-backed inputs are
    constants (legacy exporters listed every weight as an input; no user feeds them), so they
    leave the inputs. From IR 4 on an initializer need not be an input, and every graph built
    from the model (gradients included) keeps that. IR 4 reads any opset these files use."""
    if model.ir_version >= LEGACY_IR:
        return model
    _constants_leave_inputs(model.graph)
    model.ir_version = LEGACY_IR
    return model


def _constants_leave_inputs(graph: onnx.GraphProto) -> None:
    """The main graph's only: a subgraph's inputs are positional (a Loop body's iteration
    count, condition and carried values), never weights."""
    constants = {tensor.name for tensor in graph.initializer}
    kept = [value for value in graph.input if value.name not in constants]
    del graph.input[:]
    graph.input.extend(kept)


def refuse_external_data(model: onnx.ModelProto) -> None:
    """External data only where it resolves inside the weights folder (weights.py): a model over
    protobuf's 2 GiB limit, whose data files were given with it."""
    weights.check_resolvable(model)
    for tensor in weights.graph_tensors(model.graph):
        if tensor.external_data and not weights.is_external(tensor):
            raise InvalidModelError(
                f"tensor {tensor.name!r} has external data entries but keeps its data inside the file; "
                "export the model again")


def normalise_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        opset = opset_of(model)
    except ValueError as exc:
        raise InvalidModelError(str(exc)) from None
    if opset >= MIN_OPSET:
        return model
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise InvalidModelError(
            f"the model uses opset {opset} and could not be converted to opset {MIN_OPSET} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"export it with opset >= {MIN_OPSET}"
        ) from None


def upgrade_opset(prepared: PreparedClassifier, opset: int) -> PreparedClassifier:
    """``prepared`` at ``opset`` (its private model converted), or unchanged where the
    converter cannot convert it: a newer opset is an optimisation, never a requirement."""
    try:
        model = infer_shapes(version_converter.convert_version(prepared.model, opset))
    except Exception:  # the converter raises bare RuntimeErrors from C++
        return prepared
    return replace(prepared, model=model, opset=opset_of(model))


def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise InvalidModelError(
            f"expected exactly one image input, found {len(inputs)} ({names}); "
            "export the classifier with a single image tensor as input"
        )
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT and half_dtype(inputs[0]) is None:
        got = TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "no"
        fix = ("; export the model from its float input on (after the cast from uint8), with the "
               "spec's input.range set to the pixel range it takes, [0, 255] for raw pixels"
               if tensor_type.elem_type == TensorProto.UINT8 else "")
        raise InvalidModelError(
            f"input {inputs[0].name!r} has {got} element type; a float32, float16 or bfloat16 image "
            f"input is required{fix}"
        )
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) < 2:
        raise InvalidModelError(
            f"input {inputs[0].name!r} has rank {len(tensor_type.shape.dim)}; expected a batch "
            "axis followed by the image axes, e.g. [N, C, H, W]"
        )
    return inputs[0]


def make_batch_dynamic(model: onnx.ModelProto, input_name: str) -> int | None:
    """Give the input a symbolic batch axis; Reshapes that hard-code it get -1 (or 0) there.

    Returns the fixed batch size it replaced, if any.
    """
    graph = model.graph
    value_info = next(i for i in graph.input if i.name == input_name)
    dims = value_info.type.tensor_type.shape.dim
    if not dims:
        return None
    fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
    if fixed is None:
        return None
    dims[0].Clear()
    dims[0].dim_param = BATCH_DIM
    for output in graph.output:
        out_dims = output.type.tensor_type.shape.dim
        if out_dims and out_dims[0].HasField("dim_value") and out_dims[0].dim_value == fixed:
            out_dims[0].Clear()
            out_dims[0].dim_param = BATCH_DIM
    del graph.value_info[:]
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in initializers:
            continue
        shape = weights.array(initializers[node.input[1]]).copy()
        if shape.size == 0 or shape[0] != fixed:
            continue
        shape[0] = -1 if -1 not in shape[1:] else 0
        if shape[0] == 0 and attr(node, "allowzero", 0):
            continue
        name = f"{node.input[1]}/dynamic_batch/{node.name or id(node)}"
        graph.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
        node.input[1] = name
    return fixed


# Operators whose output has their first input's type and shape, which ONNX's shape inference
# leaves unknown (function-defined operators without an inference function of their own).
_SHAPE_PRESERVING = frozenset({"GroupNormalization", "MeanVarianceNormalization"})


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        while _complete_shape_preserving(inferred.graph):  # each round types new outputs: it ends
            inferred = shape_inference.infer_shapes(inferred, strict_mode=False, data_prop=True)
        return inferred
    except Exception as exc:  # shape inference raises InferenceError and bare C++ errors
        raise InvalidModelError(f"shape inference failed: {str(exc).splitlines()[0]}") from None


def _complete_shape_preserving(graph: onnx.GraphProto) -> bool:
    """Type the outputs of _SHAPE_PRESERVING nodes like their inputs (inference then carries
    the shapes on past them); True when any was added."""
    typed = {vi.name: vi for vi in [*graph.input, *graph.value_info, *graph.output]
             if vi.type.tensor_type.HasField("shape")}
    added = False
    for node in graph.node:
        if node.op_type not in _SHAPE_PRESERVING or node.domain not in ("", "ai.onnx"):
            continue
        source, out = node.input[0], node.output[0]
        if source in typed and out not in typed:
            info = graph.value_info.add()
            info.CopyFrom(typed[source])
            info.name = out
            typed[out] = info
            added = True
    return added


def fold_shape_arithmetic(model: onnx.ModelProto, rounds: int = 8) -> onnx.ModelProto:
    """A shape-inferred ``model`` with its static shape reads and what they feed folded, round
    after round (each round can expose more static sizes to the next)."""
    for _ in range(rounds):
        if not fold_static_shape_reads(model):
            break
        model = infer_shapes(fold_constants(model))
    return model


def scores_output(graph: onnx.GraphProto) -> str:
    """The output read as the classifier's scores: the first float tensor output. Exporters of
    classifiers with a label output (an ArgMax: sklearn-onnx's and many Keras heads) may put it
    first; read as scores, an integer label is a wrong class count and no gradient."""
    if not graph.output:
        raise InvalidModelError("the model has no outputs")
    for output in graph.output:
        if output.type.HasField("tensor_type") and output.type.tensor_type.elem_type in FLOAT_TYPES:
            return output.name
    described = ", ".join(f"{o.name!r}" for o in graph.output)
    zipmap = ""
    if any(node.op_type == "ZipMap" for node in graph.node):
        zipmap = (" (a ZipMap makes them a list of dicts: convert the scikit-learn model with "
                  "options={id(model): {'zipmap': False}})")
    raise InvalidModelError(f"the model has no float tensor output to read as scores (outputs: {described}); "
                            f"export its logits or probabilities, [N, K]{zipmap}")


def prepare_classifier(
    model: onnx.ModelProto | bytes, output_name: str | None = None
) -> PreparedClassifier:
    model = load_model(model)
    refuse_external_data(model)
    model = normalise_opset(model)
    try:
        weights.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"the model is not valid ONNX: {str(exc).splitlines()[0]}") from None
    x = image_input(model)
    model = fold_constants(model)
    fixed_batch = make_batch_dynamic(model, x.name)
    model = fold_shape_arithmetic(infer_shapes(model))

    outputs = [o.name for o in model.graph.output]
    if output_name is None:
        output_name = scores_output(model.graph)
    elif output_name not in outputs:
        raise InvalidModelError(f"the model has no output {output_name!r}; outputs: {outputs}")
    types = tensor_types(model.graph)
    out_shape = static_shape(types.get(output_name))
    squeezed_from = None
    if out_shape is not None and _squeezable(out_shape):
        squeezed_from, output_name = out_shape, squeeze_logits(model, output_name, out_shape)
        model = infer_shapes(model)
        types = tensor_types(model.graph)
        out_shape = static_shape(types.get(output_name))
    binary = None
    if out_shape is not None and all(d == 1 for d in out_shape[1:]):
        output_name, binary = two_class_logits(model, output_name, len(out_shape))
        model = infer_shapes(model)
        types = tensor_types(model.graph)
        out_shape = static_shape(types.get(output_name))
    if out_shape is not None and len(out_shape) != 2:
        raise InvalidModelError(
            f"output {output_name!r} has shape {list(out_shape)}; expected logits of shape [N, K] "
            "(or [N, K, 1, 1], [N, 1, K], which are squeezed)"
        )
    num_classes = out_shape[1] if out_shape is not None and isinstance(out_shape[1], int) else None

    logits, ends_in = (output_name, None) if binary else scores_before_activation(
        model, output_name, types, num_classes)

    input_shape = static_shape(types.get(x.name)) or ()
    half = half_dtype(x) or half_inside(model.graph)
    forward = None
    if half is not None:
        forward = forward_model(model, x.name, logits, half)
        model = float32_twin(model)
    quantizers = _quantizers_on_path(model.graph, x.name)
    return PreparedClassifier(
        model=model, input_name=x.name, input_shape=input_shape, logits_name=logits,
        num_classes=num_classes, ends_in_softmax=ends_in == "Softmax", ends_in_sigmoid=ends_in == "Sigmoid",
        opset=opset_of(model),
        fixed_batch=fixed_batch, dtype=HALF[half] if half is not None else "float32", forward=forward,
        squeezed_from=squeezed_from, binary=binary, straight_through=sum(quantizers.values()),
        couples_batch=quantizers["DynamicQuantizeLinear"] > 0,
    )


QUANTIZERS = ("QuantizeLinear", "DynamicQuantizeLinear")


def _quantizers_on_path(graph: onnx.GraphProto, x: str) -> Counter[str]:
    """How many default-domain QUANTIZERS of each type take a tensor that depends on ``x``."""
    depends, found = {x}, Counter[str]()
    for node in graph.node:
        if any(name in depends for name in node.input if name):
            depends.update(node.output)
            if node.op_type in QUANTIZERS and node.domain in ("", "ai.onnx"):
                found[node.op_type] += 1
    return found


SHAPE_ONLY = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _final_node(graph: onnx.GraphProto, output_name: str
                ) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The node that computes ``output_name`` up to shape-only nodes (an Identity that renames
    the output, a Flatten, a Reshape), and those nodes, last first."""
    producers = {name: node for node in graph.node for name in node.output}
    chain = []
    node = producers.get(output_name)
    while node is not None and node.op_type in SHAPE_ONLY and node.domain in ("", "ai.onnx"):
        chain.append(node)
        node = producers.get(node.input[0])
    return node, chain


def _replay(graph: onnx.GraphProto, chain: list[onnx.NodeProto], start: str, suffix: str) -> str:
    """The shape-only ``chain`` (last first) applied to ``start`` instead of its own input."""
    for op in reversed(chain):
        copy = helper.make_node(op.op_type, [start, *op.input[1:]], [f"{op.output[0]}/{suffix}"],
                                **{a.name: helper.get_attribute_value(a) for a in op.attribute})
        graph.node.append(copy)
        start = copy.output[0]
    return start


def scores_before_activation(model: onnx.ModelProto, output_name: str, types: dict,
                             num_classes: int | None) -> tuple[str, str | None]:
    """The scores before a final Softmax over the classes or a per-class Sigmoid (a multi-label
    head), through the shape-only nodes after it, and "Softmax" or "Sigmoid"; else the output
    and None. Both keep every decision (monotone per class) and saturate: differentiated after
    them, a confident sample's gradient rounds to nothing (a sigmoid head of probabilities read
    as logits left PGD at 0.375 robust accuracy where its logits give 0)."""
    final, chain = _final_node(model.graph, output_name)
    if final is None or final.domain not in ("", "ai.onnx") or final.op_type not in ("Softmax", "Sigmoid"):
        return output_name, None
    if final.op_type == "Sigmoid":
        if num_classes is None or num_classes < 2:
            return output_name, None
        return _replay(model.graph, chain, final.input[0], "logits"), "Sigmoid"
    if not chain:
        axis = attr(final, "axis", -1)
        if axis not in (-1, 1):
            raise InvalidModelError(f"the model ends in Softmax over axis {axis}; expected the class "
                                    "axis (1 or -1)")
        return final.input[0], "Softmax"
    shape = static_shape(types.get(final.input[0]))
    over_classes = (shape is not None and num_classes is not None and shape[-1] == num_classes
                    and _over_classes(final, len(shape), len(shape) - 1, opset_of(model)))
    if not over_classes:  # a softmax over something else, reshaped into the scores
        return output_name, None
    return _replay(model.graph, chain, final.input[0], "logits"), "Softmax"


def two_class_logits(model: onnx.ModelProto, output_name: str, rank: int) -> tuple[str, str]:
    """A binary classifier's one score per image (an output [N, 1], [N] or [N, 1, 1, 1]) as the
    logits of two classes, [-z/2, z/2], the first output: their softmax is [1 - sigmoid(z),
    sigmoid(z)], so the cross-entropy is the binary cross-entropy of z and class 1 is z > 0. z is
    the score before a final Sigmoid (reshaped as the model reshapes its probability), so a
    saturated probability keeps its gradient; before a final HardSigmoid, its affine input minus
    1/2 (the same decision: class 1 where the probability is > 1/2; its softmax is not the
    model's probability); without either the score is read as a logit. Returns (the logits'
    name, "sigmoid", "hard_sigmoid" or "logit")."""
    graph = model.graph
    node, chain = _final_node(graph, output_name)  # chain: between a final (Hard)Sigmoid and the output
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        raise InvalidModelError(
            f"the model ends in a {node.op_type} over one class, which is the same for every image; "
            "export the score before it (a logit), or end a binary classifier in a Sigmoid")
    score, binary = output_name, "logit"
    elem = next(o for o in graph.output if o.name == output_name).type.tensor_type.elem_type
    final = node if node is not None and node.domain in ("", "ai.onnx") else onnx.NodeProto()
    if final.op_type == "Sigmoid":
        score, binary = final.input[0], "sigmoid"
    elif final.op_type == "HardSigmoid":  # min(1, max(0, a z + b)) > 1/2 where a z + b - 1/2 > 0
        score, binary = f"{output_name}/hard_sigmoid_score", "hard_sigmoid"
        slope, offset = f"{output_name}/hard_sigmoid_slope", f"{output_name}/hard_sigmoid_offset"
        graph.initializer.extend([helper.make_tensor(slope, elem, [], [attr(final, "alpha", 0.2)]),
                                  helper.make_tensor(offset, elem, [], [attr(final, "beta", 0.5) - 0.5])])
        graph.node.extend([helper.make_node("Mul", [final.input[0], slope], [f"{score}/scaled"]),
                           helper.make_node("Add", [f"{score}/scaled", offset], [score])])
    if binary != "logit":
        score = _replay(graph, chain, score, "score")
    column = f"{output_name}/score_column"
    if rank == 1:
        axes = f"{output_name}/axis_1"
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
        graph.node.append(helper.make_node("Unsqueeze", [score, axes], [column]))
    else:
        graph.node.append(helper.make_node("Flatten", [score], [column], axis=1))
    half, minus, logits = (f"{output_name}/{part}" for part in ("half_score", "minus_half", "two_class"))
    graph.initializer.append(helper.make_tensor(f"{output_name}/one_half", elem, [], [0.5]))
    graph.node.extend([helper.make_node("Mul", [column, f"{output_name}/one_half"], [half]),
                       helper.make_node("Neg", [half], [minus]),
                       helper.make_node("Concat", [minus, half], [logits], axis=1)])
    outputs = [o for o in graph.output if o.name != output_name]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(logits, elem, None), *outputs])
    return logits, binary


def _squeezable(shape: Shape) -> bool:
    """[N, K, 1, 1], [N, 1, K] and the like: one class axis, every other axis but the batch 1."""
    rest = shape[1:]
    return len(shape) > 2 and all(isinstance(d, int) for d in rest) and sum(d != 1 for d in rest) == 1


def squeeze_logits(model: onnx.ModelProto, output_name: str, shape: Shape) -> str:
    """The output flattened to [N, K] (``output/squeezed``) as the model's first output; a final
    Softmax over the class axis moves after the flattening, so the logits are [N, K] too."""
    graph = model.graph
    squeezed = f"{output_name}/squeezed"
    producer = next((n for n in graph.node if output_name in n.output), None)
    class_axis = 1 + [d != 1 for d in shape[1:]].index(True)
    if producer is not None and producer.op_type == "Softmax":
        if not _over_classes(producer, len(shape), class_axis, opset_of(model)):
            raise InvalidModelError(
                f"the model ends in Softmax over axis {attr(producer, 'axis')} of its {list(shape)} output; "
                f"expected the class axis ({class_axis})"
            )
        flat = f"{producer.input[0]}/squeezed"
        graph.node.extend([helper.make_node("Flatten", [producer.input[0]], [flat], axis=1),
                           helper.make_node("Softmax", [flat], [squeezed], axis=-1)])
    else:
        graph.node.append(helper.make_node("Flatten", [output_name], [squeezed], axis=1))
    outputs = [o for o in graph.output if o.name != output_name]
    elem = next(o for o in graph.output if o.name == output_name).type.tensor_type.elem_type
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(squeezed, elem, None), *outputs])
    return squeezed


def _over_classes(softmax: onnx.NodeProto, rank: int, class_axis: int, opset: int) -> bool:
    axis = attr(softmax, "axis", -1 if opset >= 13 else 1)
    axis = axis + rank if axis < 0 else axis
    # before opset 13 Softmax flattens the axes from `axis` on: the class axis and 1s
    return axis == class_axis if opset >= 13 else 1 <= axis <= class_axis
