"""What the gradient builder must refuse, and the messages it refuses with."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import zoo
from workers.onnxgrad import (
    InvalidModelError,
    UnsupportedOperatorError,
    build_gradient_model,
)


def classifier(nodes, initializers=(), input_type=TensorProto.FLOAT, input_shape=("N", 4),
               output_shape=("N", 3), opset=17, extra_inputs=()):
    graph = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info("x", input_type, list(input_shape)), *extra_inputs],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, list(output_shape))],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


W = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "W")


def test_unsupported_operators_are_all_named():
    model = classifier(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Mystery", ["h"], ["a"], name="first", domain="acme"),
         helper.make_node("Hardmax", ["a"], ["b"], name="second"),
         helper.make_node("Sign", ["b"], ["z"], name="third")],
        [W],
    )
    model.opset_import.append(helper.make_opsetid("acme", 1))
    with pytest.raises(UnsupportedOperatorError) as info:
        build_gradient_model(model)
    error = info.value
    assert error.op_types == ["Hardmax", "Sign", "acme:Mystery"]
    assert [n.node_name for n in error.nodes] == ["first", "second", "third"]
    message = str(error)
    assert "'first'" in message and "'second'" in message and "'third'" in message
    assert "zero almost everywhere" in message
    assert "black-box" in message


def test_unsupported_op_off_the_gradient_path_is_fine():
    """An op that only feeds a discarded output does not block the gradient."""
    model = classifier(
        [helper.make_node("MatMul", ["x", "W"], ["z"]),
         helper.make_node("Hardmax", ["z"], ["unused"])],
        [W],
    )
    grad_model = build_gradient_model(model)
    assert "Hardmax" not in {n.op_type for n in grad_model.graph.node}


@pytest.mark.parametrize("payload", [
    b"",
    b"\x00\x01\x02 definitely not a protobuf \xff" * 10,
    np.random.default_rng(1).bytes(4096),
])
def test_bytes_that_are_not_onnx_are_refused(payload):
    with pytest.raises(InvalidModelError, match="ONNX"):
        build_gradient_model(payload)


def test_truncated_model_is_refused():
    data = zoo.export("lenet").SerializeToString()
    with pytest.raises(InvalidModelError):
        build_gradient_model(data[: len(data) // 2])


def test_integer_input_is_refused():
    model = classifier([helper.make_node("Cast", ["x"], ["xf"], to=1),
                        helper.make_node("MatMul", ["xf", "W"], ["z"])], [W],
                       input_type=TensorProto.INT64)
    with pytest.raises(InvalidModelError, match="a float32, float16 or bfloat16 image input is required$"):
        build_gradient_model(model)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    with pytest.raises(InvalidModelError, match=r"is required; export the model from its float input on "
                                                r"\(after the cast from uint8\)"):
        build_gradient_model(model)


def test_two_inputs_are_refused():
    extra = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 4])
    model = classifier([helper.make_node("Mul", ["x", "mask"], ["xm"]),
                        helper.make_node("MatMul", ["xm", "W"], ["z"])], [W], extra_inputs=[extra])
    with pytest.raises(InvalidModelError, match="exactly one image input, found 2"):
        build_gradient_model(model)


def test_output_that_is_not_n_by_k_is_refused():
    """[N, 3, 3] has two class-like axes: not logits. ([N, 1, 3] is squeezed: test_model_files.py)"""
    model = classifier([helper.make_node("MatMul", ["x", "W"], ["h"]),
                        helper.make_node("Unsqueeze", ["h", "axes"], ["h1"]),
                        helper.make_node("Concat", ["h1", "h1", "h1"], ["z"], axis=1)],
                       [W, numpy_helper.from_array(np.array([1], np.int64), "axes")],
                       output_shape=("N", 3, 3))
    with pytest.raises(InvalidModelError, match=r"expected logits of shape \[N, K\]"):
        build_gradient_model(model)


def test_a_label_output_before_the_scores_is_not_read_as_them(tmp_path, capsys):
    """sklearn-onnx and many Keras heads export [label, probabilities]: read as the scores, the
    int64 label was one class with no gradient. The first float output is read."""
    from workers.runtime import Classifier

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["probs"]),
             helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0)]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              outputs, [W])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    classifier_ = Classifier(model)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    label, probs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    assert (classifier_.num_classes, classifier_.binary) == (3, None)
    np.testing.assert_array_equal(classifier_.predict(x), label)
    _, _, grad = classifier_.loss_and_grad(x, label, loss="cross_entropy")
    assert np.abs(grad).max() > 0
    from client.cli import main

    (tmp_path / "two.onnx").write_bytes(model.SerializeToString())
    assert main(["inspect", str(tmp_path / "two.onnx")]) == 0
    assert "output     probs  (read as the scores: the first float output of label, probs)" in \
        capsys.readouterr().out
    del model.graph.output[1]
    with pytest.raises(InvalidModelError, match=r"no float tensor output to read as scores \(outputs: "
                                                r"'label'\); export its logits or probabilities"):
        build_gradient_model(model)


def test_a_zipmap_output_is_refused_with_the_converter_option_that_removes_it():
    """sklearn-onnx's classifiers output a label and a ZipMap of the probabilities (a list of
    dicts, no tensor)."""
    model = classifier([helper.make_node("MatMul", ["x", "W"], ["z"]),
                        helper.make_node("ZipMap", ["z"], ["probabilities"], domain="ai.onnx.ml",
                                         classlabels_int64s=[0, 1, 2])], [W])
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_value_info(
        "probabilities", helper.make_sequence_type_proto(helper.make_map_type_proto(
            onnx.TensorProto.INT64, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])))))
    with pytest.raises(InvalidModelError, match=r"ZipMap .* options=\{id\(model\): \{'zipmap': False\}\}"):
        build_gradient_model(model)


def test_external_data_is_refused_without_opening_the_path(tmp_path):
    model = classifier([helper.make_node("MatMul", ["x", "W"], ["z"])], [W])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    with pytest.raises(InvalidModelError, match="external data"):
        build_gradient_model(model.SerializeToString())


def test_softmax_output_is_differentiated_before_the_softmax():
    model = zoo.export("softmax_mlp")
    grad_model = build_gradient_model(model)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    forward = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(4).random((3, 1, 28, 28), dtype=np.float32)
    logits, loss = session.run(["logits", "loss"], {"input": x, "labels": np.array([1, 2, 3])})
    (probs,) = forward.run(None, {"input": x})
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), probs,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, -np.log(probs[np.arange(3), [1, 2, 3]]), rtol=1e-4)


def test_softmax_over_the_wrong_axis_is_refused():
    model = classifier([helper.make_node("MatMul", ["x", "W"], ["h"]),
                        helper.make_node("Softmax", ["h"], ["z"], axis=0)], [W])
    with pytest.raises(InvalidModelError, match="Softmax over axis 0"):
        build_gradient_model(model)


def test_dlr_needs_three_classes():
    w2 = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    model = classifier([helper.make_node("MatMul", ["x", "W"], ["z"])], [w2], output_shape=("N", 2))
    with pytest.raises(InvalidModelError, match="at least 3 classes"):
        build_gradient_model(model, loss="dlr")


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_gradient_model(zoo.export("mlp"), loss="hinge")


def test_reserved_tensor_names_in_the_model_are_renamed():
    model = classifier(
        [helper.make_node("MatMul", ["x", "W"], ["grad"]),
         helper.make_node("Relu", ["grad"], ["loss"]),
         helper.make_node("Identity", ["loss"], ["z"])],
        [W],
    )
    grad_model = build_gradient_model(model)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    z, grad = session.run(["logits", "grad"], {"x": x, "labels": np.array([0, 2])})
    np.testing.assert_allclose(z, np.maximum(x @ numpy_helper.to_array(W), 0), rtol=1e-6)
    assert grad.shape == (2, 4)


def test_model_whose_logits_ignore_the_input_is_refused():
    model = classifier([helper.make_node("Shape", ["x"], ["s"]),
                        helper.make_node("ConstantOfShape", ["s"], ["ones"],
                                         value=numpy_helper.from_array(np.ones(1, np.float32))),
                        helper.make_node("MatMul", ["ones", "W"], ["z"])], [W])
    with pytest.raises(InvalidModelError, match="do not depend on the image input"):
        build_gradient_model(model)


def test_invalid_graph_is_refused_with_the_checker_message():
    model = classifier([helper.make_node("MatMul", ["x", "missing"], ["z"])])
    with pytest.raises(InvalidModelError, match="not valid ONNX"):
        build_gradient_model(model)


def test_model_proto_and_bytes_give_the_same_graph():
    model = zoo.export("squeezenet")
    from_proto = build_gradient_model(model)
    from_bytes = build_gradient_model(model.SerializeToString())
    assert from_proto.SerializeToString() == from_bytes.SerializeToString()
    onnx.checker.check_model(from_proto)
