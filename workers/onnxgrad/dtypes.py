"""Half-precision classifiers (float16, bfloat16): their own predictions, float32 gradients.

A half-precision model is run as it is for every prediction (clean accuracy, attack success):
a float16 model is fed float16 and read in float16, as its user runs it (natively on CUDA; on
the CPU, ONNX Runtime computes layers without float16 kernels in float32 between casts it
inserts, for the user as for us); a bfloat16 model gets Casts at its input and logits.

Gradients are not taken in half precision: fp16's 10-bit mantissa and 5-bit exponent
underflow in a backward pass (the reason mixed-precision training scales its losses). The
gradient graph is built from the model's float32 twin, the same graph and the same weights
(each half value is exactly a float32 value), with every half-precision type, Cast and
constant made float32. Its logits differ from the half model's by the half model's rounding;
its gradient is the exact gradient of the model evaluated without that rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF: dict[int, str] = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
_TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; RandomNormal, EyeLike and the like


def half_dtype(input_value: onnx.ValueInfoProto) -> int | None:
    """The input's half-precision element type, or None for float32."""
    elem = input_value.type.tensor_type.elem_type
    return elem if elem in HALF else None


def half_inside(graph: onnx.GraphProto) -> int | None:
    """The half-precision type a float32-input model computes in (half weights, or a Cast to
    half after its input, as a normalisation composed in front of a half model has), or None."""
    for tensor in graph.initializer:
        if tensor.data_type in HALF:
            return tensor.data_type
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in _TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
                    and attribute.i in HALF:
                return attribute.i
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in HALF:
                return attribute.t.data_type
    return None


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float32: half tensors, types, Casts and constants widened."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    _widen_graph(twin.graph)
    for function in twin.functions:
        for node in function.node:
            _widen_node(node)
    return twin


def _widen_tensor(tensor: TensorProto) -> None:
    if tensor.data_type in HALF:
        wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
        tensor.CopyFrom(wide)


def _widen_type(value: onnx.ValueInfoProto) -> None:
    if value.type.tensor_type.elem_type in HALF:
        value.type.tensor_type.elem_type = TensorProto.FLOAT


def _widen_node(node: onnx.NodeProto) -> None:
    for attribute in node.attribute:
        if attribute.name in _TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
                and attribute.i in HALF:
            attribute.i = TensorProto.FLOAT
        if attribute.type == onnx.AttributeProto.TENSOR:
            _widen_tensor(attribute.t)
        for tensor in attribute.tensors:
            _widen_tensor(tensor)
        if attribute.type == onnx.AttributeProto.GRAPH:
            _widen_graph(attribute.g)
        for graph in attribute.graphs:
            _widen_graph(graph)


def _widen_graph(graph: onnx.GraphProto) -> None:
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type in HALF and tensor.data_location == TensorProto.EXTERNAL:
            # a weight kept outside the model (weights.py) stays as it is; a Cast widens it in the graph
            half = f"{tensor.name}/{HALF[tensor.data_type]}"
            casts.append(helper.make_node("Cast", [half], [tensor.name], to=TensorProto.FLOAT,
                                          name=f"widen/{tensor.name}"))
            graph.value_info.append(helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT,
                                                                  list(tensor.dims)))
            tensor.name = half
        else:
            _widen_tensor(tensor)
    if casts:
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    for value in (*graph.input, *graph.output, *graph.value_info):
        _widen_type(value)
    for node in graph.node:
        _widen_node(node)


def forward_model(model: onnx.ModelProto, input_name: str, output: str, dtype: int) -> onnx.ModelProto:
    """``model`` (computing in ``dtype``) with ``output`` as its only output, for predictions.

    float16 keeps its own input and output types: the runtime feeds numpy float16 and reads
    float16, exactly as a user runs the file (ONNX Runtime's CPU provider may compute some
    layers in float32 between casts it inserts, for the user as for us). numpy has no
    bfloat16, so a bfloat16 model gets a float32 interface: Casts after the input and after
    ``output`` (both keeping the given names), every layer between still in bfloat16.
    """
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    graph = wrapped.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    elem = types.get(output, TensorProto.FLOAT)
    if dtype == TensorProto.BFLOAT16:
        half = HALF[dtype]
        inner_input = f"{input_name}/{half}" if types.get(input_name) in HALF else input_name
        inner_output = f"{output}/{half}" if elem in HALF else output
        for node in graph.node:  # the model's tensors get inner names; the interface keeps the given ones
            node.input[:] = [{input_name: inner_input, output: inner_output}.get(n, n) for n in node.input]
            node.output[:] = [inner_output if n == output else n for n in node.output]
        if inner_input != input_name:
            graph.node.insert(0, helper.make_node("Cast", [input_name], [inner_input], to=dtype))
            interface = next(v for v in graph.input if v.name == input_name)
            interface.type.tensor_type.elem_type = TensorProto.FLOAT
        if inner_output != output:
            graph.node.append(helper.make_node("Cast", [inner_output], [output], to=TensorProto.FLOAT))
        elem = TensorProto.FLOAT
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(output, elem, None))
    del graph.value_info[:]
    return wrapped


def feed_dtype(model: onnx.ModelProto, input_name: str) -> np.dtype:
    """The numpy type to feed ``model``'s input: float16 for a float16 input, else float32."""
    elem = next(v for v in model.graph.input if v.name == input_name).type.tensor_type.elem_type
    return np.dtype(np.float16 if elem == TensorProto.FLOAT16 else np.float32)
