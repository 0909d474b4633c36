"""Forward rewrites for cheaper gradients: exact values, and gradients still equal torch's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests import zoo
from tests.onnxgrad.test_models import relative_error, torch_loss
from workers.onnxgrad import build_gradient_model
from workers.onnxgrad.prepare import infer_shapes
from workers.onnxgrad.rewrite import pool_before_activation

F = TensorProto.FLOAT


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _model(nodes, outputs=("y",), initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info(name, F, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers],
    )
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _pool(inp, out, **attrs):
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2], **attrs}
    return helper.make_node("MaxPool", [inp], [out], **attrs)


ACTIVATIONS = {
    "relu": (lambda i, o: helper.make_node("Relu", [i], [o]), ()),
    "leaky": (lambda i, o: helper.make_node("LeakyRelu", [i], [o], alpha=0.2), ()),
    "clip": (lambda i, o: helper.make_node("Clip", [i, "lo", "hi"], [o]), (("lo", 0.0), ("hi", 0.5))),
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("pool_attrs", [{}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1}])
def test_rewrite_swaps_and_keeps_every_value(activation, pool_attrs):
    make, inits = ACTIVATIONS[activation]
    original = _model(
        [helper.make_node("Neg", ["x"], ["n"]), make("n", "a"), _pool("a", "y", **pool_attrs)],
        initializers=inits,
    )
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    assert pool_before_activation(rewritten.graph) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Neg", "MaxPool", make("n", "a").op_type]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    x[0, :, :2, :2] = 0.0  # ties and zeros at the kink
    (want,), (got,) = _run(original, x), _run(rewritten, x)
    np.testing.assert_array_equal(got, want)


def test_rewrite_leaves_shared_and_unsuitable_pairs_alone():
    relu = ACTIVATIONS["relu"][0]
    neg = helper.make_node("Neg", ["x"], ["n"])
    cases = [
        # the activation's output is also a graph output
        _model([neg, relu("n", "a"), _pool("a", "y")], outputs=("y", "a")),
        # ... or feeds another node
        _model(
            [neg, relu("n", "a"), _pool("a", "y"), helper.make_node("Neg", ["a"], ["z"])], outputs=("y", "z")
        ),
        # the pool also returns its indices
        _model(
            [relu("x", "a"), helper.make_node("MaxPool", ["a"], ["y", "i"], kernel_shape=[2, 2])],
            outputs=("y",),
        ),
        # a Clip whose bound is computed, not constant
        _model(
            [
                helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0),
                neg,
                helper.make_node("Clip", ["n", "", "hi"], ["a"]),
                _pool("a", "y"),
            ]
        ),
        # not monotone
        _model([neg, helper.make_node("Abs", ["n"], ["a"]), _pool("a", "y")]),
        # an average pool does not commute with the activation
        _model([neg, relu("n", "a"), helper.make_node("AveragePool", ["a"], ["y"], kernel_shape=[2, 2])]),
    ]
    for model in cases:
        before = model.SerializeToString()
        assert pool_before_activation(model.graph) == 0
        assert model.SerializeToString() == before


class PooledActivations(nn.Module):
    """Every activation the rewrite moves, in front of overlapping and tiled pools."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.ReLU6(),
            nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize("loss", ["cross_entropy", "margin", "logit"])
def test_gradients_through_rewritten_pools_match_torch(loss):
    torch.manual_seed(0)
    module = PooledActivations().eval()
    model = zoo.export_onnx(module, (3, 16, 16))
    grad_model = build_gradient_model(model, loss=loss)
    pooled = {o for n in grad_model.graph.node if n.op_type == "MaxPool" for o in n.output}
    moved = {n.op_type for n in grad_model.graph.node if n.input and n.input[0] in pooled}
    assert {"Clip", "LeakyRelu", "Relu"} <= moved

    rng = np.random.default_rng(1)
    x = rng.random((6, 3, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, per_sample, grad = session.run(["logits", "loss", "grad"], {"input": x, "labels": y})

    xt = torch.tensor(x, requires_grad=True)
    z = module(xt)
    want_loss = torch_loss(z, torch.tensor(y), loss)
    (want_grad,) = torch.autograd.grad(want_loss.sum(), xt)
    np.testing.assert_allclose(logits, z.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert relative_error(per_sample, want_loss.detach().numpy()) < 1e-5
    assert relative_error(grad, want_grad.numpy()) < 1e-4
