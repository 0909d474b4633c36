"""A model that hard-codes its batch size: Expand of a bias to a constant [2, 3] cannot be made
dynamic, so the runtime runs it two samples at a time (the last batch padded)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def expand_to_batch_of_two(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """(model: z = x @ W + Expand(bias, [2, 3]) for x [2, 4], W, bias)."""
    w = rng.standard_normal((4, 3)).astype(np.float32)
    bias = rng.standard_normal((1, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Expand", ["bias", "shape"], ["b2"]),
         helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Add", ["h", "b2"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([2, 3], np.int64), "shape"),
         numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model, w, bias
