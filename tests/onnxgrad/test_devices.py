"""Gradient graphs for a device: the same gradient, in forms that are fast on its provider.

A CPU graph computes few-channel conv gradients with Col2Im (opset 18, CPU-only in ONNX
Runtime) and activation masks with blocked-layout ramps; a CUDA graph uses neither. Both
run here on the CPU provider, which has every kernel either needs.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import version_converter

from tests import zoo
from workers.onnxgrad import build_gradient_model

MODELS = ("lenet", "mobilenet_v2")


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _ramps(model) -> int:
    """Convs emitted by the gradient rules that feed a Clip (the ramps' form)."""
    clipped = {n.input[0] for n in model.graph.node if n.op_type == "Clip"}
    return sum(n.op_type == "Conv" and n.name.startswith("grad/") and n.output[0] in clipped
               for n in model.graph.node)


def _gradient(model, name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.random((5, *zoo.input_shape(name)), dtype=np.float32)
    labels = rng.integers(0, zoo.NUM_CLASSES, 5)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["grad"], {model.graph.input[0].name: x, "labels": labels})[0]


@pytest.mark.parametrize("name", MODELS)
def test_cpu_and_cuda_graphs_give_the_same_gradient(name):
    model = zoo.export(name)
    cpu = build_gradient_model(model, "cross_entropy", device="cpu")
    cuda = build_gradient_model(model, "cross_entropy", device="cuda")
    assert "Col2Im" in _ops(cpu) and cpu.opset_import[0].version == 18
    assert "Col2Im" not in _ops(cuda) and cuda.opset_import[0].version == 17
    assert _ramps(cuda) == 0
    if name == "mobilenet_v2":
        assert _ramps(cpu) > 0
    a, b = _gradient(cpu, name), _gradient(cuda, name)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_default_device_is_cpu():
    model = zoo.export("lenet")
    assert _ops(build_gradient_model(model)) == _ops(build_gradient_model(model, device="cpu"))


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose one of cpu, cuda"):
        build_gradient_model(zoo.export("lenet"), device="tpu")


def test_a_model_the_converter_cannot_upgrade_keeps_its_opset(monkeypatch):
    def refuse(model, target):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    model = zoo.export("lenet")
    grad = build_gradient_model(model, "cross_entropy")
    assert grad.opset_import[0].version == 17 and "Col2Im" not in _ops(grad)
    reference = build_gradient_model(model, "cross_entropy", device="cuda")
    a, b = _gradient(grad, "lenet"), _gradient(reference, "lenet")
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_models_without_few_channel_convs_keep_their_opset():
    grad = build_gradient_model(zoo.export("mlp"), "cross_entropy")
    assert grad.opset_import[0].version == 17
