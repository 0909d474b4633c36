"""Activation masks as blocked-layout ramps: the same 0/1 gradients as the comparisons they
replace, on the bounds and next to them, and only where ONNX Runtime keeps them blocked."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from workers.onnxgrad import build_gradient_model
from workers.onnxgrad.prepare import infer_shapes
from workers.onnxgrad.rules import ramps

CHANNELS = 16
SIDE = 4


def _classifier(activation: str, channels: int = CHANNELS, dtype=np.float32,
                producer: str = "Conv") -> onnx.ModelProto:
    """x -> identity depthwise 1x1 Conv (so the activation sees x exactly) -> activation ->
    GlobalAveragePool -> Flatten -> Gemm: d loss / dx is the activation's mask times dy.
    A float16 ``dtype`` casts the float32 input to float16 for the conv and activation."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(0)
    inits = {
        "w_id": np.ones((channels, 1, 1, 1), dtype),
        "fc_w": rng.standard_normal((10, channels)).astype(np.float32),
        "fc_b": np.zeros(10, np.float32),
        "lo": np.asarray(0.0, dtype), "hi": np.asarray(6.0, dtype),
        "neg_lo": np.asarray(-1.0, dtype), "neg_hi": np.asarray(1.0, dtype),
        "odd_lo": np.asarray(0.1, dtype), "odd_hi": np.asarray(0.7, dtype),
    }
    casts = dtype != np.float32
    source = "xc" if casts else "x"
    if producer == "Conv":
        first = helper.make_node("Conv", [source, "w_id"], ["z"], group=channels, kernel_shape=[1, 1])
    else:
        first = helper.make_node("Neg", [source], ["z"])
    act = {
        "relu": helper.make_node("Relu", ["z"], ["a"]),
        "relu6": helper.make_node("Clip", ["z", "lo", "hi"], ["a"]),
        "clip_pm1": helper.make_node("Clip", ["z", "neg_lo", "neg_hi"], ["a"]),
        "clip_max_only": helper.make_node("Clip", ["z", "", "hi"], ["a"]),
        "clip_odd": helper.make_node("Clip", ["z", "odd_lo", "odd_hi"], ["a"]),
    }[activation]
    nodes = [
        first, act,
        helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        helper.make_node("Flatten", ["p"], ["fc" if casts else "f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    if casts:
        nodes[:0] = [helper.make_node("Cast", ["x"], ["xc"], to=elem)]
        nodes[-1:-1] = [helper.make_node("Cast", ["fc"], ["f"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "ramp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", channels, SIDE, SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                          ir_version=8))


def _kink_inputs(dtype=np.float32) -> np.ndarray:
    """Values on, next to and far from the bounds 0, 6, -1, 1, 0.1 and 0.7."""
    f = np.dtype(dtype).type
    values = [0.0, -0.0, 6.0, -1.0, 1.0, 7.0, -3.0, 3.0, 1e-3, 2.0 ** -100,
              np.nextafter(f(6), f(0)), np.nextafter(f(1), f(0)), np.nextafter(f(-1), f(0)),
              np.nextafter(f(0), f(1)) * 2 ** 40, 1e30, -1e30,
              f(0.1), f(0.7), np.nextafter(f(0.1), f(1)), np.nextafter(f(0.7), f(0)), 0.4]
    cells = np.resize(np.asarray(values, dtype), CHANNELS * SIDE * SIDE)
    return np.stack([cells, cells[::-1]]).reshape(2, CHANNELS, SIDE, SIDE)


def _grad(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["grad"], {"x": x, "labels": np.array([1, 7], np.int64)})[0]


def _ramp_count(model: onnx.ModelProto) -> int:
    """Depthwise Convs with a bias that the builder added (adjoint convs have no bias)."""
    return sum(1 for n in model.graph.node
               if n.op_type == "Conv" and n.input[1] != "w_id" and len(n.input) == 3
               and any(a.name == "group" and a.i > 1 for a in n.attribute))


@pytest.mark.parametrize("activation, steps", [("relu", 1), ("relu6", 2), ("clip_pm1", 2),
                                               ("clip_max_only", 1), ("clip_odd", 2)])
def test_ramps_give_the_comparisons_mask_at_every_kink(activation, steps, monkeypatch):
    model = _classifier(activation)
    x = _kink_inputs()
    with_ramps = build_gradient_model(model, loss="cross_entropy")
    assert _ramp_count(with_ramps) == steps
    monkeypatch.setattr(ramps, "BLOCK_MULTIPLE", 10**9)  # channels never fill it: comparisons
    with_comparisons = build_gradient_model(model, loss="cross_entropy")
    assert _ramp_count(with_comparisons) == 0

    got, expected = _grad(with_ramps, x), _grad(with_comparisons, x)
    np.testing.assert_array_equal(got, expected)
    lo, hi = {"relu": (0.0, math.inf), "relu6": (0.0, 6.0), "clip_pm1": (-1.0, 1.0),
              "clip_max_only": (-math.inf, 6.0),
              "clip_odd": (np.float32(0.1), np.float32(0.7))}[activation]
    y = np.clip(x, lo, hi)
    inside = (y > lo) & (y < hi)
    assert np.all(got[~inside] == 0)
    assert np.all(got[inside] != 0)  # dy is nonzero everywhere in this model


def test_ramps_are_left_out_where_the_layout_would_not_keep_them():
    assert _ramp_count(build_gradient_model(_classifier("relu6", channels=24),
                                            loss="cross_entropy")) == 0  # 24 % 16
    # a float16 stage is differentiated in its float32 twin (workers/onnxgrad/dtypes.py), which keeps ramps
    assert _ramp_count(build_gradient_model(_classifier("relu6", dtype=np.float16), loss="cross_entropy")) \
        == _ramp_count(build_gradient_model(_classifier("relu6"), loss="cross_entropy")) > 0
    assert _ramp_count(build_gradient_model(_classifier("relu6", producer="Neg"),
                                            loss="cross_entropy")) == 0


def test_ramp_scale_keeps_the_bias_finite():
    assert ramps.ramp_scale([0.0, 6.0]) == 2.0 ** 123
    assert ramps.ramp_scale([0.0]) == 2.0 ** 126
    assert ramps.ramp_scale([-1e18, 1e18]) == 2.0 ** 66
    scale = ramps.ramp_scale([3.0e15])
    assert scale is not None and np.isfinite(np.float32(scale) * np.float32(3.0e15))
    assert ramps.ramp_scale([1e30]) is None
    assert ramps.ramp_scale([math.inf]) is None


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("activation, windowed", [("relu6", True), ("clip_pm1", False),
                                                  ("clip_odd", False)])
def test_two_sided_masks_take_the_tanh_window_only_for_relu6(activation, windowed):
    ops = _op_types(build_gradient_model(_classifier(activation), loss="cross_entropy"))
    relu_ops = _op_types(build_gradient_model(_classifier("relu"), loss="cross_entropy"))
    assert ("Tanh" in ops) == windowed
    # a Tanh window is applied with one Mul, as Relu's one step is; two steps need another
    assert ops.count("Mul") == relu_ops.count("Mul") + (0 if windowed else 1)


def test_window_applies_only_from_zero_to_a_positive_bound():
    scale = ramps.ramp_scale([0.0, 6.0])
    assert ramps.window_applies(0.0, 6.0, scale)
    assert not ramps.window_applies(-1.0, 1.0, ramps.ramp_scale([-1.0, 1.0]))  # rounds near 1
    assert not ramps.window_applies(0.0, None, scale)  # one step is one pass already
    assert not ramps.window_applies(0.0, 0.0, scale)  # empty window
    assert not ramps.window_applies(0.0, 6.0, 2.0 ** 100)  # too shallow after the shift
