"""onnx-ad 0.3.0 as an independent reverse-mode reference (tests and benchmarks only).

onnx-ad needs declared shapes (it refuses a symbolic batch at the first Conv) and opset 17;
its gradient outputs carry a trailing seed axis. It raises for what it cannot differentiate
(ceil_mode pooling, SAME auto_pad, ...).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def pin_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """Every graph input and output gets a fixed leading (batch) dimension."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for value in list(pinned.graph.input) + list(pinned.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    pinned.graph.ClearField("value_info")
    return onnx.shape_inference.infer_shapes(pinned)


def append_cross_entropy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model plus an int64 ``labels`` input and a per-sample ``loss`` output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    logits = graph.output[0].name
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or None)
    graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, [batch_dim]))
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ce_axis_1"))
    graph.node.extend([
        helper.make_node("LogSoftmax", [logits], ["ce_logp"], axis=1),
        helper.make_node("Unsqueeze", ["labels", "ce_axis_1"], ["ce_labels"]),
        helper.make_node("GatherElements", ["ce_logp", "ce_labels"], ["ce_picked"], axis=1),
        helper.make_node("Squeeze", ["ce_picked", "ce_axis_1"], ["ce_nll"]),
        helper.make_node("Neg", ["ce_nll"], ["loss"]),
    ])
    graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, [batch_dim]))
    return out


def build_onnx_ad_gradient(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """onnx-ad's graph of cross-entropy(model(input), labels): inputs (input, labels,
    adj_loss [batch, 1]); outputs (logits, loss, adj_input [..., 1])."""
    import onnx_ad

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset != OPSET:
        model = onnx.version_converter.convert_version(model, OPSET)
    model = pin_batch(append_cross_entropy(model), batch)
    return onnx_ad.reverse(model, inputs=[model.graph.input[0].name], outputs=["loss"], layout="onnx")
