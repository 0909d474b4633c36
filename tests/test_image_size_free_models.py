"""Models exported with symbolic image axes (dynamic H and W, a fully convolutional classifier):
Conv and pool gradient rules need static sizes, which every evaluation has (the dataset's
image size is pinned into the model). Admission checks the gradient graph with the axes pinned
to a probe size, so the model is not refused as black-box only."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from service.model_admission import inspect_classifier
from tests.service.conftest import gateway, make_settings
from workers.preprocess import compose_for_images
from workers.runtime import Classifier


@pytest.fixture(scope="module")
def any_size_model() -> tuple[nn.Module, bytes]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(8, 5)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, 32, 32),), buffer, dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    return module, buffer.getvalue()


def test_admission_builds_the_gradient_graph_at_a_probe_size(any_size_model, tmp_path):
    _, model = any_size_model
    found = inspect_classifier(model)
    assert found.gradients_available and found.probed_side == 224
    with gateway(make_settings(tmp_path / "data")) as api:
        answer = api.post("/v1/models", files={"file": ("any-size.onnx", model)}).json()
        x = np.random.default_rng(0).random((6, 3, 40, 48), dtype=np.float32)
        data = io.BytesIO()
        np.savez(data, x=x, y=np.arange(6) % 5)
        dataset = api.post("/v1/datasets", files={"file": ("images.npz", data.getvalue())}).json()
        job = api.post("/v1/evaluations", json={"model_id": answer["id"], "dataset_id": dataset["id"],
                                                "attacks": [{"name": "pgd", "eps": 0.03}]})
    assert answer["attacks"] == "all" and answer["gradients"] == {"available": True, "unsupported": [],
                                                                  "probed_side": 224, "straight_through": 0}
    assert job.status_code == 202, job.text  # black-box only, it would be a 422


def test_the_gradient_at_the_dataset_s_size_is_torch_s(any_size_model):
    module, model = any_size_model
    x = np.random.default_rng(1).random((4, 3, 40, 48), dtype=np.float32)
    y = np.array([0, 1, 2, 3])
    composed, _ = compose_for_images(model, (3, 40, 48))
    logits, _, grad = Classifier(composed).loss_and_grad(x, y, loss="cross_entropy")
    x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    reference = copy.deepcopy(module).double()(x64)
    loss = nn.functional.cross_entropy(reference, torch.tensor(y), reduction="sum")
    (expected,) = torch.autograd.grad(loss, x64)
    np.testing.assert_allclose(logits, reference.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-3, atol=1e-6)
