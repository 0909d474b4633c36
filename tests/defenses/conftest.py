"""Fixtures shared by the defense tests: the demo digits CNN, its held-out images, the training
images (PCA is fit on them), and small autoencoders built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import digits
from workers.datasets import load_npz
from workers.runtime import Classifier, RuntimeOptions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OPTIONS = RuntimeOptions(intra_op_threads=1)


@pytest.fixture(scope="session")
def model_bytes() -> bytes:
    return (EXAMPLES / "digits-cnn.onnx").read_bytes()


@pytest.fixture(scope="session")
def classifier(model_bytes) -> Classifier:
    return Classifier(model_bytes, OPTIONS)


@pytest.fixture(scope="session")
def test_data() -> tuple[np.ndarray, np.ndarray]:
    """The 597 held-out digits, float32 [N, 1, 28, 28] in [0, 1]."""
    data = load_npz((EXAMPLES / "digits-test.npz").read_bytes())
    return data.x, data.y


@pytest.fixture(scope="session")
def x_fit() -> np.ndarray:
    """The 1,200 training digits: what PCA is fit on (held out from the test images)."""
    return digits.digits()[0]


def make_autoencoder(*, shape=(1, 28, 28), hidden: int = 4, out_shape=None, op: str = "Tanh",
                     opset: int = 17, batch: int | str = "N", names: dict | None = None,
                     seed: int = 0) -> bytes:
    """y = x + 0.1 * conv(op(conv(x))): smooth and close to the identity.

    ``out_shape`` other than ``shape`` makes the second Conv strided (a shape mismatch);
    ``names`` renames tensors (to collide with the classifier's on purpose).
    """
    names = {"x": "x", "y": "y", "w1": "w1", "w2": "w2", "h": "h", "a": "a", "r": "r", "s": "s",
             **(names or {})}
    rng = np.random.default_rng(seed)
    c = shape[0]
    w1 = (rng.standard_normal((hidden, c, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((c, hidden, 3, 3)) * 0.3).astype(np.float32)
    scale = numpy_helper.from_array(np.array(0.1, np.float32), names["s"])
    strides = [1, 1] if out_shape is None else [shape[1] // out_shape[1], shape[2] // out_shape[2]]
    nodes = [
        helper.make_node("Conv", [names["x"], names["w1"]], [names["h"]], pads=[1, 1, 1, 1]),
        helper.make_node(op, [names["h"]], [names["a"]]),
        helper.make_node("Conv", [names["a"], names["w2"]], [names["r"]], pads=[1, 1, 1, 1],
                         strides=strides),
        helper.make_node("Mul", [names["r"], names["s"]], [names["r"] + "_scaled"]),
    ]
    if out_shape is None:
        nodes.append(helper.make_node("Add", [names["x"], names["r"] + "_scaled"], [names["y"]]))
    else:
        nodes.append(helper.make_node("Identity", [names["r"] + "_scaled"], [names["y"]]))
    out_dims = [batch, *(out_shape or shape)]
    graph = helper.make_graph(
        nodes, "autoencoder",
        [helper.make_tensor_value_info(names["x"], TensorProto.FLOAT, [batch, *shape])],
        [helper.make_tensor_value_info(names["y"], TensorProto.FLOAT, out_dims)],
        [numpy_helper.from_array(w1, names["w1"]), numpy_helper.from_array(w2, names["w2"]), scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()
