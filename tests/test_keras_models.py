"""Keras models exported by tf2onnx (NHWC, a symbolic batch named by tf2onnx, Softmax heads):
committed fixtures made by tests/fixtures/keras/make_keras_models.py (versions.json records
TensorFlow's and tf2onnx's versions), checked against what TensorFlow itself computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from schemas.evaluation import EvaluationSpec
from service.model_admission import validate_model
from workers.datasets import Dataset
from workers.evaluate import evaluate
from workers.preprocess import compose_for_images
from workers.runtime import Classifier, RuntimeOptions

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "keras"
MODELS = ["keras_cnn", "keras_residual"]


def fixture(name: str) -> tuple[bytes, dict]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return (FIXTURES / f"{name}.onnx").read_bytes(), dict(data)


def test_the_versions_are_recorded():
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert {"tensorflow", "tf2onnx", "onnx", "opset"} <= set(versions)


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_gradients_equal_tensorflows(name):
    model, data = fixture(name)
    x_nchw = data["x"].transpose(0, 3, 1, 2)
    composed, layout = compose_for_images(model, x_nchw.shape[1:])
    assert layout == "NHWC"  # told from the shapes: the model takes [N, H, W, C]
    classifier = Classifier(composed, RuntimeOptions(intra_op_threads=1))
    logits, _, grad = classifier.loss_and_grad(x_nchw, data["y"], loss="cross_entropy")
    np.testing.assert_allclose(logits, data["logits"], rtol=1e-4, atol=1e-5)
    grad_nhwc = grad.transpose(0, 2, 3, 1)
    error = np.linalg.norm(grad_nhwc - data["grad"]) / np.linalg.norm(data["grad"])
    assert error < 1e-4, error


@pytest.mark.parametrize("name", MODELS)
def test_an_evaluation_of_nhwc_images_runs_as_the_upload_describes(name, tmp_path):
    model, data = fixture(name)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model)
    info = validate_model(path, max_bytes=1 << 20)
    assert info.gradients_available and info.input_shape[1:] == list(data["x"].shape[1:])
    spec = EvaluationSpec.model_validate({"input": {"layout": "NHWC"},
                                          "attacks": [{"name": "pgd", "eps": [0.03], "steps": 5}],
                                          "certify": {"eps": [0.001]}})
    result = evaluate(model, Dataset(x=data["x"], y=data["y"], source_dtype="float32"), spec).result
    assert result.model["layout"] == "NHWC" and result.clean_accuracy == 1.0  # y: the model's own labels
    assert result.attacks[0].details["gradient_stats"]["zero_fraction"] == 0.0  # gradients reach every image
    assert result.certify is not None and result.certify.available
