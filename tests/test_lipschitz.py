"""Lipschitz bounds: layer norms against the SVD of the explicit operator, the graph rules,
and the network bound against empirical ratios ||f(x) - f(y)|| / ||x - y||."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests import zoo
from workers.lipschitz import POINTWISE, format_report, lipschitz_bounds


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _model(nodes, in_shape, initializers=(), opset=17, k=None) -> onnx.ModelProto:
    """x [N, *in_shape] -> nodes -> logits [N, K]."""
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(np.asarray(v, np.float32), name) for name, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _layer_model(op, in_shape, weight=None, **attrs) -> onnx.ModelProto:
    """One layer (weight "w", no bias) followed by Flatten, an isometry."""
    inputs = ["x", "w"] if weight is not None else ["x"]
    nodes = [helper.make_node(op, inputs, ["y"], name="layer", **attrs),
             helper.make_node("Flatten", ["y"], ["logits"], name="flatten")]
    return _model(nodes, in_shape, [("w", weight)] if weight is not None else ())


def _explicit_norm(model: onnx.ModelProto, in_shape) -> float:
    """The largest singular value of the explicit matrix of a linear model (one basis vector a row)."""
    n = int(np.prod(in_shape))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    basis = np.eye(n, dtype=np.float32).reshape(n, *in_shape)
    columns = session.run(None, {"x": basis})[0] - session.run(None, {"x": basis[:1] * 0})[0]
    return float(np.linalg.norm(columns.astype(np.float64), 2))


def _only(report, op):
    (layer,) = [layer for layer in report.layers if layer.op_type == op]
    return layer


CONVS = {  # op, input [C, H, W], weight, attributes
    "stride1_pad1": ("Conv", (2, 6, 6), (3, 2, 3, 3), dict(pads=[1, 1, 1, 1])),
    "stride2": ("Conv", (2, 7, 7), (4, 2, 3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "dilation2_asymmetric_pads": ("Conv", (2, 8, 8), (3, 2, 3, 3), dict(dilations=[2, 2], pads=[2, 1, 0, 2])),
    "groups2": ("Conv", (4, 6, 6), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    "1x1": ("Conv", (3, 5, 5), (5, 3, 1, 1), {}),
    "same_upper_stride2": ("Conv", (2, 7, 6), (3, 2, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "uneven_strides_5x3": ("Conv", (2, 9, 7), (3, 2, 5, 3), dict(strides=[3, 2], pads=[2, 1, 1, 0])),
    "transpose_stride2": ("ConvTranspose", (3, 4, 4), (3, 2, 3, 3),
                          dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "transpose_groups2": ("ConvTranspose", (4, 3, 3), (4, 1, 3, 3), dict(group=2)),
}


@pytest.mark.parametrize("case", CONVS)
def test_conv_power_iteration_matches_svd_of_the_explicit_operator(case, rng):
    op, in_shape, w_shape, attrs = CONVS[case]
    model = _layer_model(op, in_shape, rng.standard_normal(w_shape), **attrs)
    exact = _explicit_norm(model, in_shape)
    report = lipschitz_bounds(model, iterations=3000, tol=1e-9)
    layer = _only(report, op)
    assert layer.kind == "linear" and layer.method.startswith("power_iteration(")
    assert layer.norm == pytest.approx(exact, rel=1e-5)
    assert layer.norm <= exact * (1 + 1e-5)  # power iteration approaches from below
    assert report.network_bound == pytest.approx(layer.norm)  # Flatten is an isometry


def test_conv_norm_is_not_the_reshaped_kernel_norm(rng):
    weight = rng.standard_normal((3, 2, 3, 3))
    model = _layer_model("Conv", (2, 6, 6), weight, strides=[2, 2])
    exact = _explicit_norm(model, (2, 6, 6))
    assert lipschitz_bounds(model).network_bound == pytest.approx(exact, rel=1e-4)
    assert abs(np.linalg.norm(weight.reshape(3, -1), 2) - exact) > 1e-2 * exact


@pytest.mark.parametrize("alpha", [0.7, -1.3])
def test_gemm_bound_is_alpha_times_the_weights_largest_singular_value(alpha, rng):
    b = rng.standard_normal((7, 5))
    nodes = [helper.make_node("Gemm", ["x", "b", "c"], ["logits"], name="fc", alpha=alpha, transB=1)]
    model = _model(nodes, (5,), [("b", b), ("c", rng.standard_normal(7))])
    report = lipschitz_bounds(model)
    assert _only(report, "Gemm").method == "svd"
    assert report.network_bound == pytest.approx(abs(alpha) * np.linalg.norm(b, 2), rel=1e-6)
    assert report.network_bound == pytest.approx(_explicit_norm(model, (5,)), rel=1e-5)


def test_matmul_with_a_constant_on_either_side(rng):
    w = rng.standard_normal((4, 6))
    right = _model([helper.make_node("MatMul", ["x", "w"], ["logits"])], (4,), [("w", w)])
    assert lipschitz_bounds(right).network_bound == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)
    left = _model([helper.make_node("MatMul", ["w", "x"], ["y"]),
                   helper.make_node("Flatten", ["y"], ["logits"])], (6, 2), [("w", w)])
    assert lipschitz_bounds(left).network_bound == pytest.approx(_explicit_norm(left, (6, 2)), rel=1e-5)


def test_batchnorm_bound_is_the_largest_scale_over_std(rng):
    scale, var = np.array([0.5, -2.0, 1.0]), np.array([1.0, 3.0, 0.1])
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3),
             helper.make_node("Flatten", ["y"], ["logits"])]
    model = _model(nodes, (3, 2, 2), [("s", scale), ("b", rng.standard_normal(3)),
                                      ("m", rng.standard_normal(3)), ("v", var)])
    layer = _only(lipschitz_bounds(model), "BatchNormalization")
    assert layer.kind == "normalization"
    assert layer.norm == pytest.approx(np.max(np.abs(scale / np.sqrt(var + 1e-3))), rel=1e-6)
    assert layer.norm == pytest.approx(_explicit_norm(model, (3, 2, 2)), rel=1e-5)


@pytest.mark.parametrize(("attrs", "bound"), [
    (dict(kernel_shape=[2, 2], strides=[2, 2]), 1.0),  # non-overlapping
    (dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), 3.0),  # 9 windows per pixel
    (dict(kernel_shape=[3, 3], strides=[2, 2]), 2.0),  # 2 x 2 windows at most
    (dict(kernel_shape=[3, 2], strides=[1, 2]), math.sqrt(3.0)),
])
def test_max_pool_bound_counts_the_windows_covering_a_pixel(attrs, bound):
    model = _layer_model("MaxPool", (1, 6, 6), **attrs)
    layer = _only(lipschitz_bounds(model), "MaxPool")
    assert (layer.kind, layer.norm) == ("pooling", pytest.approx(bound))


def test_overlapping_max_pool_bound_is_attained():
    """Raising one pixel above a flat background moves all nine windows that read it."""
    model = _layer_model("MaxPool", (1, 6, 6), kernel_shape=[3, 3], strides=[1, 1])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = -np.ones((1, 1, 6, 6), np.float32)
    y = x.copy()
    y[0, 0, 2, 2] = 1.0
    fx, fy = session.run(None, {"x": x})[0], session.run(None, {"x": y})[0]
    ratio = np.linalg.norm(fx - fy) / np.linalg.norm(x - y)
    assert ratio == pytest.approx(lipschitz_bounds(model).network_bound)


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 2, 1], ceil_mode=1, count_include_pad=1),
])
def test_average_pool_bound_is_its_exact_operator_norm(attrs):
    model = _layer_model("AveragePool", (2, 6, 5), **attrs)
    layer = _only(lipschitz_bounds(model), "AveragePool")
    assert layer.norm == pytest.approx(_explicit_norm(model, (2, 6, 5)), rel=1e-5)


def test_global_average_pool_and_concat_are_exact():
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Mul", ["two", "p"], ["q"]),
             helper.make_node("Concat", ["p", "q"], ["c"], axis=1),
             helper.make_node("Flatten", ["c"], ["logits"])]
    model = _model(nodes, (3, 4, 4), [("two", 2.0)])
    report = lipschitz_bounds(model)
    assert [layer.kind for layer in report.layers] == ["pooling", "scale", "concat", "identity"]
    assert report.network_bound == pytest.approx(math.sqrt(1 + 4) / 4)  # (p, 2p), mean of 16
    assert report.network_bound == pytest.approx(_explicit_norm(model, (3, 4, 4)), rel=1e-5)


@pytest.mark.parametrize("op", sorted(POINTWISE))
def test_pointwise_bound_is_the_largest_slope(op):
    """Secant slopes of the operator on a fine grid never exceed the bound, and reach it. A unit
    scale follows the operator: a final Sigmoid is a multi-label head, bounded before it."""
    nodes = [helper.make_node(op, ["x"], ["y"]), helper.make_node("Mul", ["y", "one"], ["logits"])]
    model = _model(nodes, (2,), [("one", 1.0)], opset=20, k=2)
    bound = lipschitz_bounds(model).network_bound
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.repeat(np.arange(-6 * 128, 6 * 128 + 1, dtype=np.float32)[:, None] / 128, 2, axis=1)
    slopes = np.diff(session.run(None, {"x": x})[0][:, 0].astype(np.float64)) / (1 / 128)
    assert np.abs(slopes).max() <= bound * (1 + 1e-3)
    assert np.abs(slopes).max() >= bound * 0.98


def _empirical_ratio(module: nn.Module, shape, pairs: int = 64) -> float:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(pairs, *shape, generator=gen)
    near = x + 1e-2 * torch.randn(pairs, *shape, generator=gen)
    far = torch.rand(pairs, *shape, generator=gen)
    ratios = []
    with torch.no_grad():
        for y in (near, far):
            diff = (module(x) - module(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
            ratios.append(diff.max().item())
    return max(ratios)


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_chain_network_bound_is_the_product_of_layer_bounds(name):
    report = lipschitz_bounds(zoo.export(name))
    assert not report.unsupported and report.output == "logits"
    assert report.network_bound == pytest.approx(math.prod(layer.norm for layer in report.layers))
    module = zoo.make_model(name)
    linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    gemms = [layer.norm for layer in report.layers if layer.op_type == "Gemm"]
    want = [torch.linalg.matrix_norm(m.weight.double(), ord=2).item() for m in linear]
    assert gemms == pytest.approx(want, rel=1e-6)
    assert _empirical_ratio(module, zoo.input_shape(name)) <= report.network_bound


def test_softmax_ended_model_is_bounded_up_to_its_logits():
    report = lipschitz_bounds(zoo.export("softmax_mlp"))
    assert "Softmax" not in [layer.op_type for layer in report.layers]
    assert report.network_bound == pytest.approx(lipschitz_bounds(zoo.export("mlp")).network_bound)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(torch.relu(y + x).flatten(1))


def test_residual_block_uses_the_sum_rule():
    module = _Residual().eval()
    report = lipschitz_bounds(zoo.export_onnx(module, (2, 6, 6)))
    conv1, conv2 = (layer.norm for layer in report.layers if layer.op_type == "Conv")
    assert _only(report, "Add").kind == "add"
    fc = _only(report, "Gemm").norm
    assert report.network_bound == pytest.approx((conv1 * conv2 + 1.0) * fc, rel=1e-6)
    assert _empirical_ratio(module, (2, 6, 6)) <= report.network_bound


def test_an_operator_without_a_bound_is_reported_and_no_network_bound_is_given(rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("LRN", ["c"], ["n"], name="lrn", size=3),
             helper.make_node("Mul", ["n", "n"], ["sq"], name="square"),
             helper.make_node("Flatten", ["sq"], ["logits"], name="flatten")]
    model = _model(nodes, (2, 5, 5), [("w", rng.standard_normal((3, 2, 3, 3)))])
    report = lipschitz_bounds(model)
    assert report.network_bound is None
    assert [entry.split(":")[0] for entry in report.unsupported] == ["lrn (LRN)", "square (Mul)"]
    assert [layer.node for layer in report.layers] == ["conv", "flatten"]
    text = format_report(report)
    assert "none, no bound is known for" in text and "lrn (LRN)" in text


def test_format_report_lists_every_layer_and_the_network_bound():
    report = lipschitz_bounds(zoo.export("lenet"))
    text = format_report(report)
    for layer in report.layers:
        assert layer.node in text
    assert text.splitlines()[0].split() == ["node", "op", "kind", "method", "bound"]
    assert text.splitlines()[-1] == f"network bound (L2, input -> 'logits'): {report.network_bound:.6g}"


@pytest.mark.parametrize(("kw", "message"), [
    (dict(iterations=0), "`iterations` must be a positive integer"),
    (dict(tol=0.0), "`tol` must be positive"),
])
def test_parameters_are_checked(kw, message):
    with pytest.raises(ValueError, match=message):
        lipschitz_bounds(zoo.export("mlp"), **kw)
