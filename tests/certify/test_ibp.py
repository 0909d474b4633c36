"""Interval bound propagation built from the ONNX file: sound (no sampled or attacked point
leaves the bounds), equal to an independent float64 implementation on the torch modules, and
never certifying a sample that an attack broke."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests import digits
from workers.attacks.gradient import PGD
from workers.certify import IntervalBounds, UnsupportedForBounds, supported_op_types
from workers.runtime import Classifier, RuntimeOptions

OPTIONS = RuntimeOptions(batch_size=64, intra_op_threads=1)
MODELS = ["fc100", "cnn"]
EPS = [0.0, 0.005, 0.01, 0.03]


@pytest.fixture(scope="module")
def data():
    _, _, x, y = digits.digits()
    return x[:120], y[:120]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    onnx_bytes = digits.onnx_bytes(request.param)
    return request.param, onnx_bytes, IntervalBounds(onnx_bytes, OPTIONS)


@torch.no_grad()
def reference_margins(module: nn.Module, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """IBP in float64 on the torch module, layer by layer, the last Linear elided into the
    margins z_y - z_j: written from the definitions, not from the ONNX graph."""
    low = torch.from_numpy(np.clip(x - eps, 0, 1)).double()
    high = torch.from_numpy(np.clip(x + eps, 0, 1)).double()
    layers = list(module)
    for layer in layers[:-1]:
        if isinstance(layer, nn.Linear | nn.Conv2d):
            centre, radius = (high + low) / 2, (high - low) / 2
            weight, bias = layer.weight.double(), layer.bias.double()
            if isinstance(layer, nn.Linear):
                mid, rad = F.linear(centre, weight, bias), F.linear(radius, weight.abs())
            else:
                mid = F.conv2d(centre, weight, bias, padding=layer.padding)
                rad = F.conv2d(radius, weight.abs(), padding=layer.padding)
            low, high = mid - rad, mid + rad
        else:  # ReLU, MaxPool2d, Flatten: monotone
            low, high = layer.double()(low), layer.double()(high)
    last = layers[-1]
    weight, bias = last.weight.double(), last.bias.double()  # [K, D], [K]
    labels = torch.from_numpy(y)
    difference = weight[labels][:, None, :] - weight[None, :, :]  # [N, K, D]
    centre, radius = (high + low) / 2, (high - low) / 2
    margins = (torch.einsum("nkd,nd->nk", difference, centre) + (bias[labels][:, None] - bias[None, :])
               - torch.einsum("nkd,nd->nk", difference.abs(), radius))
    margins[torch.arange(len(y)), labels] = np.inf
    return margins.min(dim=1).values.numpy()


@pytest.mark.parametrize("eps", EPS)
def test_margins_equal_an_independent_float64_implementation(model, data, eps):
    name, _, bounds = model
    x, y = data
    module = copy.deepcopy(digits.trained(name)).double().eval()
    want = reference_margins(module, x.astype(np.float64), y, eps)
    got = bounds.certify(x, y, eps).margin_low
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("eps", [0.005, 0.03])
def test_no_point_of_the_ball_leaves_the_bounds(model, data, eps):
    name, onnx_bytes, bounds = model
    x, y = data[0][:40], data[1][:40]
    classifier = Classifier(onnx_bytes, OPTIONS)
    certificate = bounds.certify(x, y, eps)
    rng = np.random.default_rng(0)
    points = [np.clip(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), 0, 1) for _ in range(20)]
    points += [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
               for _ in range(20)]
    points += [PGD(steps=10, loss=loss)(classifier, x, y, eps=[eps], seed=1)[0].x_adv
               for loss in ("cross_entropy", "margin")]
    slack = 1e-5 * (1 + np.abs(certificate.logits_high).max())
    for point in points:
        assert np.all(np.abs(point - x) <= eps + 1e-7)
        logits = classifier.logits(point)
        assert np.all(logits >= certificate.logits_low - slack)
        assert np.all(logits <= certificate.logits_high + slack)
        own = logits[np.arange(len(y)), y][:, None]
        margins = np.where(np.eye(10, dtype=bool)[y], np.inf, own - logits).min(axis=1)
        assert np.all(margins >= certificate.margin_low - slack)


def test_no_sample_an_attack_broke_is_certified_and_eps_zero_certifies_the_correct(model, data):
    name, onnx_bytes, bounds = model
    x, y = data
    classifier = Classifier(onnx_bytes, OPTIONS)
    correct = classifier.predict(x) == y
    np.testing.assert_array_equal(bounds.certify(x, y, 0.0).certified, correct)
    previous = correct
    for eps in (0.005, 0.01, 0.03, 0.1):
        certified = bounds.certify(x, y, eps).certified
        broken = PGD(steps=20)(classifier, x, y, eps=[eps], seed=0)[0].success
        assert not np.any(certified & broken)
        assert not np.any(certified & ~previous)  # a larger ball certifies no more samples
        previous = certified
    assert certified.sum() == 0 and bounds.certify(x, y, 0.005).certified.sum() > len(y) // 2


def test_an_operator_without_a_rule_is_named():
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1),
         helper.make_node("Cos", ["h"], ["logits"])],
        "cos", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((3, 4), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(UnsupportedForBounds,
                       match=r"operator Cos .* has no interval-bound rule; supported: "):
        IntervalBounds(model.SerializeToString())
    assert "Conv" in supported_op_types() and "Cos" not in supported_op_types()
    onnx.checker.check_model(model)
