"""The Classifier runtime: batching, providers, caching and input checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests import zoo
from tests.fixed_batch import expand_to_batch_of_two
from workers import runtime
from workers.onnxgrad import InvalidModelError
from workers.runtime import Classifier, RuntimeOptions


@pytest.fixture(scope="module")
def lenet():
    return Classifier(zoo.export("lenet"), RuntimeOptions(batch_size=4, intra_op_threads=1))


def test_batched_results_equal_one_call(lenet):
    x = np.random.default_rng(0).random((11, 1, 28, 28), dtype=np.float32)
    y = np.arange(11) % 10
    logits, loss, grad = lenet.loss_and_grad(x, y)
    whole = Classifier(zoo.export("lenet"), RuntimeOptions(batch_size=64))
    logits2, loss2, grad2 = whole.loss_and_grad(x, y)
    np.testing.assert_allclose(logits, logits2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, loss2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, grad2, rtol=1e-5, atol=1e-7)
    assert logits.shape == (11, 10) and grad.shape == x.shape


def test_logits_match_torch_and_predict_is_their_argmax(lenet):
    x = np.random.default_rng(1).random((6, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        want = zoo.make_model("lenet")(torch.tensor(x)).numpy()
    np.testing.assert_allclose(lenet.logits(x), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(lenet.predict(x), want.argmax(1))


def test_every_loss_is_available(lenet):
    x = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    y = np.array([1, 2, 3])
    z = lenet.logits(x)
    _, logit_loss, _ = lenet.loss_and_grad(x, y, loss="logit")
    np.testing.assert_allclose(logit_loss, z[np.arange(3), y], rtol=1e-5)
    _, margin, _ = lenet.loss_and_grad(x, y, loss="margin")
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z).max(1)
    np.testing.assert_allclose(margin, others - z[np.arange(3), y], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`loss` must be one of"):
        lenet.loss_and_grad(x, y, loss="hinge")


def test_gradient_graph_is_built_for_the_sessions_device(lenet, monkeypatch):
    built = []
    real = runtime.build_gradient_model

    def spy(*args, **kwargs):
        built.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "build_gradient_model", spy)
    runtime.clear_caches()
    x = np.zeros((2, 1, 28, 28), np.float32)
    lenet.loss_and_grad(x, np.array([0, 1]), loss="dlr")
    assert built == [lenet.device]


def test_device_is_what_the_session_got(lenet):
    got = lenet._forward.get_providers()[0]
    assert lenet.device == ("cuda" if got == runtime.CUDA else "cpu")
    if runtime.CUDA not in ort.get_available_providers():
        assert lenet.device == "cpu"
    pinned = Classifier(zoo.export("lenet"), RuntimeOptions(providers=(runtime.CPU,)))
    assert pinned.device == "cpu"
    assert runtime.choose_providers(None)[-1] == runtime.CPU
    with pytest.raises(ValueError, match="not available"):
        runtime.choose_providers(("NoSuchExecutionProvider",))


def test_sessions_are_shared_per_model_hash():
    runtime.clear_caches()
    first = Classifier(zoo.export("mlp"))
    second = Classifier(zoo.export("mlp"))
    assert first._forward is second._forward
    x = np.zeros((2, 1, 28, 28), np.float32)
    first.loss_and_grad(x, np.array([0, 1]))
    assert first._gradient_session("cross_entropy") is second._gradient_session("cross_entropy")


@pytest.mark.parametrize("spinning", [True, False])
def test_worker_threads_never_spin_after_a_call(spinning):
    """Spinning (the default) lasts while a call runs: between calls the Python loop of an
    attack, and the other sessions of the process, get the cores."""
    model = zoo.export("mlp").SerializeToString()
    session = runtime.new_session(model, RuntimeOptions(allow_spinning=spinning))
    entries = session.get_session_options().get_session_config_entry
    assert RuntimeOptions().allow_spinning
    assert entries("session.intra_op.allow_spinning") == ("1" if spinning else "0")
    assert entries("session.force_spinning_stop") == "1"


def test_bad_inputs_are_refused_with_the_expected_shape(lenet):
    with pytest.raises(InvalidModelError, match=r"expects \[N, 1, 28, 28\]"):
        lenet.logits(np.zeros((2, 3, 28, 28), np.float32))
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        lenet.loss_and_grad(x, np.array([0, 10]))
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        lenet.loss_and_grad(x, np.array([0.5, 1.0]))


def reshape_to_16_features() -> bytes:
    """A model with free image axes that runs only on images of 16 pixels (4 x 4)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["flat"], name="flatten"),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "reshape",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((16, 3), np.float32), "W"),
         numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def test_a_node_that_cannot_run_on_the_inputs_is_the_models_error():
    classifier = Classifier(reshape_to_16_features(), RuntimeOptions(intra_op_threads=1))
    assert classifier.logits(np.zeros((2, 1, 4, 4), np.float32)).shape == (2, 3)
    refusal = (r"cannot run on the inputs of shape \[2, 1, 5, 5\]: its Reshape node 'flatten' fails in ONNX "
               r"Runtime \(.*cannot be reshaped.*\); check that the model runs with onnxruntime")
    with pytest.raises(InvalidModelError, match=refusal):
        classifier.logits(np.zeros((2, 1, 5, 5), np.float32))


@pytest.mark.parametrize("message", [
    "Non-zero status code returned while running Expand node. Name:'e' Status Message: bfc_arena.cc:360 "
    "Failed to allocate memory for requested buffer of size 4398046511104",
    "Non-zero status code returned while running Conv node. Name:'c' Status Message: CUDA error "
    "cudaErrorLaunchFailure:unspecified launch failure",
    # a node of the gradient graph: this service's, whatever the message
    "Non-zero status code returned while running Reshape node. Name:'grad/Reshape_56' Status Message: "
    "The input tensor cannot be reshaped to the requested shape",
])
def test_a_node_out_of_memory_or_on_a_failed_device_stays_an_internal_error(message):
    failure = ort.capi.onnxruntime_pybind11_state.Fail(message)
    assert runtime._failed_run(failure, None) is failure


def test_empty_input_gives_empty_results(lenet):
    x = np.zeros((0, 1, 28, 28), np.float32)
    logits, loss, grad = lenet.loss_and_grad(x, np.zeros(0, np.int64))
    assert logits.shape == (0, 10) and loss.shape == (0,) and grad.shape == x.shape


def test_options_are_validated():
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        RuntimeOptions(batch_size=0)


def test_model_that_hard_codes_its_batch_runs_in_batches_of_that_size(capfd):
    """Expand to a constant batch of 2 cannot be made dynamic: the model runs two samples at a
    time (the last batch padded), with the results of a model that had a free batch axis, and
    finding that out prints nothing (ONNX Runtime logs a failed run as an error)."""
    rng = np.random.default_rng(0)
    model, w, bias = expand_to_batch_of_two(rng)
    onnx.checker.check_model(model)
    classifier = Classifier(model, RuntimeOptions(batch_size=64))
    assert classifier.fixed_batch == 2 and classifier.num_classes == 3
    x = rng.standard_normal((5, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0])
    want = x @ w + bias
    np.testing.assert_allclose(classifier.logits(x), want, rtol=1e-5, atol=1e-6)
    logits, loss, grad = classifier.loss_and_grad(x, labels, loss="margin")
    others = np.where(np.eye(3, dtype=bool)[labels], -np.inf, want)
    np.testing.assert_allclose(loss, others.max(1) - want[np.arange(5), labels], rtol=1e-5, atol=1e-5)
    weights = w
    np.testing.assert_allclose(grad, (weights[:, others.argmax(1)] - weights[:, labels]).T, rtol=1e-5)
    assert "onnxruntime" not in capfd.readouterr().err
