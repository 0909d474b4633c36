"""Our gradient graphs against an independent reverse-mode implementation, onnx-ad 0.3.0,
on the models it accepts (batch pinned, opset 17)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tests import zoo
from tests.onnx_ad_reference import build_onnx_ad_gradient
from workers.onnxgrad import build_gradient_model

BATCH = 4


def run(model, feeds, outputs):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


@pytest.mark.parametrize("name", ["mlp", "lenet", "vgg", "squeezenet", "resnet18"])
def test_gradients_match_onnx_ad(name):
    model = zoo.export(name)
    reference_model = build_onnx_ad_gradient(model, BATCH)
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, *zoo.input_shape(name)), dtype=np.float32)
    y = rng.integers(0, 10, BATCH)
    reference_inputs = [i.name for i in reference_model.graph.input]
    reference_outputs = [o.name for o in reference_model.graph.output]
    feeds = {reference_inputs[0]: x, "labels": y}
    feeds.update({name: np.ones((BATCH, 1), np.float32) for name in reference_inputs[2:]})
    reference_grad = run(reference_model, feeds, reference_outputs)[-1][..., 0]
    (grad,) = run(build_gradient_model(model), {"input": x, "labels": y}, ["grad"])
    error = np.linalg.norm(grad - reference_grad) / np.linalg.norm(reference_grad)
    assert error < 1e-4, error
