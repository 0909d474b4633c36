"""End to end: gradient graphs of PyTorch-exported models against torch.autograd, per loss."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests import zoo
from workers.onnxgrad import LOSSES, build_gradient_model

TOLERANCE = 1e-4  # norm-wise relative error in float32; the worst seen is reported by the test ids
BATCH = 5
SHIFT_INVARIANT = ("auto", "cross_entropy", "margin", "dlr")  # unchanged by log-softmax, for Softmax models


def torch_loss(z: torch.Tensor, y: torch.Tensor, loss: str, targets=None, dlogits=None) -> torch.Tensor:
    at_label = z.gather(1, y[:, None])[:, 0]
    others = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf"))
    best_other = others.max(dim=1).values
    if loss == "auto":
        return torch.logsumexp(others, 1) - at_label
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(z, y, reduction="none")
    if loss == "margin":
        return best_other - at_label
    if loss == "dlr":
        ordered = z.sort(dim=1, descending=True).values
        return -(at_label - best_other) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    if loss == "logit":
        return at_label
    if loss == "dlr_targeted":
        ordered = z.sort(dim=1, descending=True).values
        at_target = z.gather(1, targets[:, None])[:, 0]
        return -(at_label - at_target) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)
    if loss == "cotangent":
        return (z * dlogits).sum(1)
    raise ValueError(loss)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def extra_inputs(loss: str, y: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if loss == "dlr_targeted":
        return {"labels": y, "targets": (y + 1 + rng.integers(0, 9, len(y))) % 10}
    if loss == "cotangent":
        return {"dlogits": rng.standard_normal((len(y), 10)).astype(np.float32)}
    return {"labels": y}


def reference(name: str, x: np.ndarray, y: np.ndarray, loss: str, extra: dict | None = None):
    model = zoo.make_model(name)
    xt = torch.tensor(x, requires_grad=True)
    z = model(xt)
    if name == "softmax_mlp":
        z = torch.log(z)  # shift of the pre-softmax scores; SHIFT_INVARIANT losses agree
    extra = extra or {}
    per_sample = torch_loss(z, torch.tensor(y), loss,
                            targets=torch.tensor(extra["targets"]) if "targets" in extra else None,
                            dlogits=torch.tensor(extra["dlogits"]) if "dlogits" in extra else None)
    (grad,) = torch.autograd.grad(per_sample.sum(), xt)
    return per_sample.detach().numpy(), grad.numpy()


def cases():
    for name in zoo.MODEL_NAMES:
        for loss in LOSSES:
            if name == "softmax_mlp" and loss not in SHIFT_INVARIANT:
                continue
            yield pytest.param(name, loss, id=f"{name}-{loss}")


@pytest.fixture(scope="module")
def gradient_sessions():
    cache = {}

    def get(name, loss):
        if (name, loss) not in cache:
            model = build_gradient_model(zoo.export(name), loss=loss)
            cache[(name, loss)] = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"])
        return cache[(name, loss)]

    return get


@pytest.mark.parametrize(("name", "loss"), list(cases()))
def test_gradient_matches_torch_autograd(name, loss, gradient_sessions):
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, *zoo.input_shape(name)), dtype=np.float32)
    y = rng.integers(0, 10, BATCH)
    session = gradient_sessions(name, loss)
    input_name = session.get_inputs()[0].name
    extra = extra_inputs(loss, y, rng)
    logits, per_sample, grad = session.run(["logits", "loss", "grad"], {input_name: x, **extra})

    want_loss, want_grad = reference(name, x, y, loss, extra)
    assert logits.shape == (BATCH, 10)
    assert per_sample.shape == (BATCH,)
    assert grad.shape == x.shape
    assert relative_error(per_sample, want_loss) < TOLERANCE
    assert relative_error(grad, want_grad) < TOLERANCE, relative_error(grad, want_grad)


def test_per_sample_gradients_are_independent_of_the_batch():
    """loss[i] depends on x[i] only: one batch of 6 equals six batches of 1."""
    session = ort.InferenceSession(build_gradient_model(zoo.export("resnet18")).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = rng.random((6, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    (whole,) = session.run(["grad"], {"input": x, "labels": y})
    singles = np.concatenate([session.run(["grad"], {"input": x[i:i + 1], "labels": y[i:i + 1]})[0]
                              for i in range(6)])
    np.testing.assert_allclose(whole, singles, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_other_opsets_are_converted_or_handled(opset):
    model = zoo.export("lenet", opset=opset)
    session = ort.InferenceSession(build_gradient_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    y = np.array([0, 4, 9])
    (grad,) = session.run(["grad"], {"input": x, "labels": y})
    _, want = reference("lenet", x, y, "cross_entropy")
    assert relative_error(grad, want) < TOLERANCE


def test_fixed_batch_export_gets_a_dynamic_batch():
    model = zoo.export("vgg", dynamic_batch=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    grad_model = build_gradient_model(model)
    session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).random((7, 3, 32, 32), dtype=np.float32)
    y = np.arange(7)
    (grad,) = session.run(["grad"], {"input": x, "labels": y})
    _, want = reference("vgg", x, y, "cross_entropy")
    assert relative_error(grad, want) < TOLERANCE


def test_gradient_model_uses_only_default_domain_operators():
    for name in zoo.MODEL_NAMES:
        model = build_gradient_model(zoo.export(name), loss="dlr")
        domains = {node.domain for node in model.graph.node}
        assert domains <= {"", "ai.onnx"}, (name, domains)
        assert [i.name for i in model.graph.input] == ["input", "labels"]
        assert [o.name for o in model.graph.output] == ["logits", "loss", "grad"]


def test_callers_model_is_not_mutated():
    model = zoo.export("mobilenet_v3_small")
    before = model.SerializeToString()
    build_gradient_model(model, loss="margin")
    assert model.SerializeToString() == before


@pytest.mark.parametrize("name", ["lenet", "resnet18", "mobilenet_v2"])
def test_backward_tensors_keep_the_batch_symbol(name):
    """ONNX Runtime only keeps its blocked (NCHWc) layout across elementwise ops whose input
    shapes it can prove equal; a backward pass whose batch dim became unknown pays a layout
    reorder around every mask (MobileNetV2: 4.9x the forward time instead of 3.7x)."""
    model = onnx.shape_inference.infer_shapes(build_gradient_model(zoo.export(name)))
    shapes = {vi.name: vi.type.tensor_type.shape for vi in model.graph.value_info}
    backward = [o for n in model.graph.node if n.name.startswith("grad/") for o in n.output]
    images = [shapes[o] for o in backward if o in shapes and len(shapes[o].dim) == 4]
    assert len(images) > 5
    lost = [o for o in backward if o in shapes and len(shapes[o].dim) == 4
            and shapes[o].dim[0].dim_param != "batch"]
    assert not lost, lost[:5]


def _flatten_classifier(classes: int) -> onnx.ModelProto:
    """logits = Flatten(x) for x [N, 1, 1, K]: the loss's own gradient, undistorted."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["x"], ["logits"])], "flat",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 1, classes])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_cross_entropy_keeps_its_precision_where_the_label_is_certain(offset):
    """Margins of 1 to 80: softmax(z)_y rounds to 1 from a margin of about 17 in float32,
    where -log softmax(z)_y and softmax(z) - onehot cancel to 0 and to noise; with every
    logit near 1000, only differences of logits may be rounded."""
    margins = np.array([1, 5, 10, 17, 20, 30, 45, 60, 80], np.float64)
    rng = np.random.default_rng(0)
    z = offset + rng.normal(0.0, 0.5, (len(margins), 10))
    y = rng.integers(0, 10, len(margins))
    z[np.arange(len(y)), y] = z.max(1) + margins
    z = z.astype(np.float32).astype(np.float64)
    shifted = np.exp(z - z.max(1, keepdims=True))
    probs = shifted / shifted.sum(1, keepdims=True)
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z)
    want_loss = np.log1p(np.exp(others - z[np.arange(len(y)), y, None]).sum(1))
    want_grad = probs - np.eye(10)[y]
    want_grad[np.arange(len(y)), y] = -np.where(np.eye(10, dtype=bool)[y], 0, probs).sum(1)

    model = build_gradient_model(_flatten_classifier(10), loss="cross_entropy")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    loss, grad = session.run(["loss", "grad"], {"x": z.astype(np.float32).reshape(-1, 1, 1, 10),
                                                "labels": y})
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    grad = grad.reshape(len(y), 10)
    for got, want in zip(grad, want_grad, strict=True):
        assert relative_error(got, want) < 1e-5, (got, want)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_auto_loss_keeps_moving_where_cross_entropy_underflows(offset):
    """Margins of 1 to 5,000 (a model fed 0..255 pixels has margins in the thousands): the
    cross-entropy's float32 gradient is exactly 0 past a margin of about 104, the auto loss's
    is the cross-entropy's direction at every margin, and its value is log-odds r, with
    softplus(r) the cross-entropy."""
    margins = np.array([1, 10, 80, 120, 500, 2000, 5000], np.float64)
    rng = np.random.default_rng(1)
    z = offset + rng.normal(0.0, 3.0, (len(margins), 10))
    y = rng.integers(0, 10, len(margins))
    z[np.arange(len(y)), y] = z.max(1) + margins
    z = z.astype(np.float32).astype(np.float64)
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z)
    top = others.max(1, keepdims=True)
    weights = np.exp(others - top)
    want_r = (top[:, 0] - z[np.arange(len(y)), y]) + np.log(weights.sum(1))
    want_direction = weights / weights.sum(1, keepdims=True) - np.eye(10)[y]

    feeds = {"x": z.astype(np.float32).reshape(-1, 1, 1, 10), "labels": y}
    run = {loss: ort.InferenceSession(build_gradient_model(_flatten_classifier(10), loss=loss)
                                      .SerializeToString(), providers=["CPUExecutionProvider"])
           .run(["loss", "grad"], feeds) for loss in ("auto", "cross_entropy")}
    r, direction = run["auto"][0], run["auto"][1].reshape(len(y), 10)
    np.testing.assert_allclose(r, want_r, rtol=1e-5)
    for got, want in zip(direction, want_direction, strict=True):
        assert relative_error(got, want) < 1e-5, (got, want)
    ce_grad = run["cross_entropy"][1].reshape(len(y), 10)
    assert np.all(ce_grad[margins > 110] == 0)  # what the auto loss exists for
    for got, ce in zip(direction[margins < 80], ce_grad[margins < 80], strict=True):
        np.testing.assert_allclose(got * np.abs(ce).max() / np.abs(got).max(), ce, rtol=1e-4, atol=1e-30)


@pytest.fixture(scope="module")
def trained_digits():
    from tests import digits

    _, _, x, y = digits.digits()
    x = (np.round(x * 255) / 255).astype(np.float32)  # as a uint8 dataset arrives
    exact = copy.deepcopy(digits.trained("cnn")).double()
    return digits.onnx_bytes("cnn"), exact, x, y


@pytest.mark.parametrize("loss", ["auto", "cross_entropy", "margin", "dlr"])
def test_trained_model_gradients_match_float64(trained_digits, loss):
    """A trained model is confident on most samples and its inputs hold tied maxima (blank
    background): float32 gradients must still match float64 torch's, sign for sign, so that
    FGSM and PGD steps are the true ones. One sample of the 597 sits within rounding of a
    kink (a ReLU or max-pool near-tie) and may take the other branch. A sample whose float64
    gradient is below float32's resolution of a typical sample's is compared absolutely: under
    dlr a label ranked third makes the loss 1 up to its 1e-12, and float64 leaves a gradient of
    about 1e-13 there (which model training gives such a sample depends on the CPU)."""
    model_bytes, exact, x, y = trained_digits
    session = ort.InferenceSession(
        build_gradient_model(onnx.load_from_string(model_bytes), loss=loss).SerializeToString(),
        providers=["CPUExecutionProvider"])
    per_sample, grad = session.run(["loss", "grad"], {"input": x, "labels": y})
    x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    want_loss = torch_loss(exact(x64), torch.tensor(y), loss)
    (want,) = torch.autograd.grad(want_loss.sum(), x64)
    want = want.numpy()
    np.testing.assert_allclose(per_sample, want_loss.detach().numpy(), rtol=1e-4, atol=1e-7)
    sample_scale = np.abs(want).reshape(len(want), -1).max(axis=1)
    negligible = sample_scale < 1e-6 * np.median(sample_scale)
    assert np.abs(grad[negligible]).max(initial=0.0) < 1e-6 * np.median(sample_scale)
    errors = [relative_error(g, w) for g, w in zip(grad[~negligible], want[~negligible], strict=True)]
    assert sum(e >= 1e-4 for e in errors) <= 1, sorted(errors)[-5:]
    assert np.mean(np.sign(grad[~negligible]) == np.sign(want[~negligible])) > 0.999
