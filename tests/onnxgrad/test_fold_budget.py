"""Constant folding never allocates what a model merely declares."""

from __future__ import annotations

import tracemalloc

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from workers.onnxgrad.fold import fold_constants


def _model(nodes, initializers):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_declared_huge_constant_is_left_unfolded_without_allocating_it():
    shape = numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "s")  # 40 GB of floats
    model = _model(
        [helper.make_node("ConstantOfShape", ["s"], ["c"]), helper.make_node("Add", ["x", "c"], ["y"])],
        [shape],
    )
    tracemalloc.start()
    folded = fold_constants(model)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [n.op_type for n in folded.graph.node] == ["ConstantOfShape", "Add"]
    assert peak < 16 << 20


def test_small_shape_arithmetic_is_still_folded():
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "s")
    model = _model(
        [
            helper.make_node("ConstantOfShape", ["s"], ["c"]),
            helper.make_node("Reshape", ["c", "flat"], ["r"]),
            helper.make_node("Add", ["x", "r"], ["y"]),
        ],
        [shape, numpy_helper.from_array(np.array([1, 4], np.int64), "flat")],
    )
    folded = fold_constants(model)
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert numpy_helper.to_array(folded.graph.initializer[-1]).shape == (1, 4)
