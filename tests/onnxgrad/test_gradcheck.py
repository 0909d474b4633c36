"""Tests of the float64 gradient-check helpers, on hand-written forward and VJP graphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.onnxgrad.gradcheck import check_vjp, run_reference, to_float64

OPSET = 17
F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name=name)


def _elem(vi) -> int:
    return vi.type.tensor_type.elem_type


# --------------------------------------------------------------------------- models


def relu_models(grad_scale: float = 1.0):
    fwd = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [_vi("x", [2, 3])],
        [_vi("y", [2, 3])],
    )
    zero = helper.make_tensor("zero_t", F, [], [0.0])
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=zero),
        helper.make_node("Greater", ["x", "zero"], ["mask"]),
    ]
    if grad_scale == 1.0:
        nodes.append(helper.make_node("Where", ["mask", "cotangent", "zero"], ["grad_x"]))
    else:
        nodes += [
            helper.make_node("Constant", [], ["scale"], value_float=grad_scale),
            helper.make_node("Mul", ["cotangent", "scale"], ["scaled"]),
            helper.make_node("Where", ["mask", "scaled", "zero"], ["grad_x"]),
        ]
    vjp = _model(nodes, [_vi("x", [2, 3]), _vi("cotangent", [2, 3])], [_vi("grad_x", [2, 3])])
    return fwd, vjp


def square_models(correct: bool):
    """y = x * x; the VJP is 2 x u, the wrong one forgets the factor 2."""
    fwd = _model([helper.make_node("Mul", ["x", "x"], ["y"])], [_vi("x", [4])], [_vi("y", [4])])
    nodes = [helper.make_node("Mul", ["x", "cotangent"], ["xu"])]
    if correct:
        nodes.append(helper.make_node("Add", ["xu", "xu"], ["grad_x"]))
    else:
        nodes.append(helper.make_node("Identity", ["xu"], ["grad_x"]))
    vjp = _model(nodes, [_vi("x", [4]), _vi("cotangent", [4])], [_vi("grad_x", [4])])
    return fwd, vjp


def matmul_models(correct: bool, seed: int = 1):
    """y = x @ W with W a (square) initializer; the wrong VJP forgets to transpose W."""
    w = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)
    fwd = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_vi("x", [3, 4])],
        [_vi("y", [3, 4])],
        [_init("W", w)],
    )
    nodes = [
        helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0]),
        helper.make_node("MatMul", ["xT", "cotangent"], ["grad_W"]),
    ]
    if correct:
        nodes += [
            helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
            helper.make_node("MatMul", ["cotangent", "WT"], ["grad_x"]),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["cotangent", "W"], ["grad_x"]))
    vjp = _model(
        nodes,
        [_vi("x", [3, 4]), _vi("cotangent", [3, 4])],
        [_vi("grad_x", [3, 4]), _vi("grad_W", [4, 4])],
        [_init("W", w)],
    )
    return fwd, vjp


def conv_models(correct: bool, seed: int = 2):
    """Strided Conv; its input VJP is a ConvTranspose with output_padding.

    The wrong VJP pads asymmetrically, which shifts the gradient by one pixel.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    fwd = _model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])],
        [_vi("x", [1, 2, 6, 6])],
        [_vi("y", [1, 3, 3, 3])],
        [_init("W", w), _init("B", b)],
    )
    pads = [1, 1, 1, 1] if correct else [0, 0, 2, 2]
    vjp = _model(
        [
            helper.make_node(
                "ConvTranspose",
                ["cotangent", "W"],
                ["grad_x"],
                pads=pads,
                strides=[2, 2],
                output_padding=[1, 1],
            )
        ],
        [_vi("x", [1, 2, 6, 6]), _vi("cotangent", [1, 3, 3, 3])],
        [_vi("grad_x", [1, 2, 6, 6])],
        [_init("W", w)],
    )
    return fwd, vjp


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- to_float64


@pytest.mark.parametrize("make", [relu_models, lambda: matmul_models(True), lambda: conv_models(True)])
def test_to_float64_converts_and_runs(make):
    for model in make():
        m64 = to_float64(model)
        onnx.checker.check_model(m64, full_check=True)
        for vi in (*m64.graph.input, *m64.graph.output):
            assert _elem(vi) == TensorProto.DOUBLE, vi.name
        for t in m64.graph.initializer:
            assert t.data_type == TensorProto.DOUBLE, t.name
        shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in model.graph.input}
        feeds = {name: _x(shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
        out32 = run_reference(model, feeds)
        out64 = run_reference(m64, feeds)
        assert out32.keys() == out64.keys() == {o.name for o in model.graph.output}
        for name, value in out64.items():
            assert value.dtype == np.float64, name
            np.testing.assert_allclose(value, out32[name], rtol=1e-5, atol=1e-5)


def test_to_float64_does_not_mutate_input():
    fwd, vjp = relu_models(grad_scale=2.0)
    for model in (fwd, vjp, *conv_models(True)):
        before = model.SerializeToString()
        to_float64(model)
        assert model.SerializeToString() == before


def test_to_float64_constants_casts_and_ints():
    half = np.array([0.5, 1.5], dtype=np.float16)
    nodes = [
        helper.make_node("Constant", [], ["c_tensor"], value=_init("c", np.float32([1.25, 2.5]))),
        helper.make_node("Constant", [], ["c_scalar"], value_float=3.0),
        helper.make_node("Constant", [], ["c_list"], value_floats=[1.0, -1.0]),
        helper.make_node("Constant", [], ["c_int"], value=_init("ci", np.int64([2]))),
        helper.make_node("Cast", ["n"], ["n_float"], to=F),
        helper.make_node("Cast", ["x"], ["x_int"], to=TensorProto.INT64),
        helper.make_node("Cast", ["h"], ["h_float"], to=F),
        helper.make_node("Mul", ["x", "c_tensor"], ["a"]),
        helper.make_node("Mul", ["a", "c_scalar"], ["b"]),
        helper.make_node("Add", ["b", "c_list"], ["c"]),
        helper.make_node("Add", ["c", "n_float"], ["d"]),
        helper.make_node("Add", ["d", "h_float"], ["y"]),
        helper.make_node("ConstantOfShape", ["c_int"], ["zeros"]),
        helper.make_node("Add", ["y", "zeros"], ["y2"]),
        helper.make_node("Mul", ["c_int", "k"], ["k2"]),
    ]
    model = _model(
        nodes,
        [_vi("x", [2]), _vi("n", [2], TensorProto.INT64)],
        [_vi("y2", [2]), _vi("x_int", [2], TensorProto.INT64), _vi("k2", [1], TensorProto.INT64)],
        [_init("h", half), _init("k", np.int64([7]))],
    )
    m64 = to_float64(model)
    onnx.checker.check_model(m64, full_check=True)

    by_out = {n.output[0]: n for n in m64.graph.node}
    attr = {n: {a.name: a for a in by_out[n].attribute} for n in by_out}
    assert attr["c_tensor"]["value"].t.data_type == TensorProto.DOUBLE
    assert attr["c_int"]["value"].t.data_type == TensorProto.INT64
    for name in ("c_scalar", "c_list"):  # value_float(s) become DOUBLE tensors
        assert set(attr[name]) == {"value"}
        assert attr[name]["value"].t.data_type == TensorProto.DOUBLE
    assert attr["n_float"]["to"].i == TensorProto.DOUBLE
    assert attr["h_float"]["to"].i == TensorProto.DOUBLE
    assert attr["x_int"]["to"].i == TensorProto.INT64
    assert attr["zeros"]["value"].t.data_type == TensorProto.DOUBLE
    inits = {t.name: t for t in m64.graph.initializer}
    assert inits["h"].data_type == TensorProto.DOUBLE
    assert inits["k"].data_type == TensorProto.INT64
    assert _elem(m64.graph.input[1]) == TensorProto.INT64

    x = np.array([0.1, 0.2], dtype=np.float64)
    n = np.array([1, 2], dtype=np.int64)
    out = run_reference(m64, {"x": x, "n": n})
    expected = x * np.array([1.25, 2.5]) * 3.0 + np.array([1.0, -1.0]) + n + half
    assert out["y2"].dtype == np.float64
    np.testing.assert_allclose(out["y2"], expected, rtol=1e-15)
    np.testing.assert_array_equal(out["k2"], [14])
    assert out["x_int"].dtype == np.int64


def test_to_float64_recurses_into_subgraphs():
    def branch(name, value):
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{name}_c"], value_float=value),
                helper.make_node("Mul", ["x", f"{name}_c"], [f"{name}_out"]),
            ],
            name,
            [],
            [_vi(f"{name}_out", [2])],
        )

    model = _model(
        [
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=branch("then", 2.0),
                else_branch=branch("else", 3.0),
            )
        ],
        [_vi("cond", [], TensorProto.BOOL), _vi("x", [2])],
        [_vi("y", [2])],
    )
    m64 = to_float64(model)
    onnx.checker.check_model(m64, full_check=True)
    for a in m64.graph.node[0].attribute:
        assert _elem(a.g.output[0]) == TensorProto.DOUBLE
        assert a.g.node[0].attribute[0].t.data_type == TensorProto.DOUBLE
    x = np.array([1.0, 1.0 / 3.0])
    out = run_reference(m64, {"cond": np.array(False), "x": x})["y"]
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, x * 3.0)


def test_to_float64_keeps_resize_scales_float32():
    model = _model(
        [
            helper.make_node("Constant", [], ["scales"], value_floats=[1.0, 1.0, 2.0, 2.0]),
            helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear"),
        ],
        [_vi("x", [1, 1, 2, 2])],
        [_vi("y", [1, 1, 4, 4])],
    )
    m64 = to_float64(model)
    onnx.checker.check_model(m64, full_check=True)  # scales must stay tensor(float)
    resize = m64.graph.node[-1]
    assert resize.op_type == "Resize"
    casts = [n for n in m64.graph.node if n.op_type == "Cast" and n.output[0] == resize.input[2]]
    assert len(casts) == 1 and casts[0].attribute[0].i == F
    out = run_reference(m64, {"x": _x([1, 1, 2, 2])})["y"]
    assert out.dtype == np.float64 and out.shape == (1, 1, 4, 4)


def test_run_reference_casts_float_feeds_to_declared_type():
    fwd, _ = relu_models()
    m64 = to_float64(fwd)
    out = run_reference(m64, {"x": _x([2, 3]), "unused": np.zeros(1)})
    assert out["y"].dtype == np.float64


# --------------------------------------------------------------------------- check_vjp


def _check(fwd, vjp, feeds, **kw):
    return check_vjp(to_float64(fwd), to_float64(vjp), feeds, **kw)


def test_check_vjp_relu_passes():
    fwd, vjp = relu_models()
    rel = _check(fwd, vjp, {"x": _x([2, 3])}, wrt=["x"], output="y")
    assert 0.0 <= rel < 1e-8


def test_check_vjp_relu_wrong_scale_fails():
    fwd, vjp = relu_models(grad_scale=2.0)
    with pytest.raises(AssertionError, match="relative error"):
        _check(fwd, vjp, {"x": _x([2, 3])}, wrt=["x"], output="y")


def test_check_vjp_square_missing_factor_two_fails():
    fwd, good = square_models(correct=True)
    _, bad = square_models(correct=False)
    feeds = {"x": _x([4], seed=3)}
    assert _check(fwd, good, feeds, wrt=["x"], output="y") < 1e-8
    with pytest.raises(AssertionError) as info:
        _check(fwd, bad, feeds, wrt=["x"], output="y")
    msg = str(info.value)
    assert "projected vjp" in msg and "central difference" in msg
    assert "relative error = 5.000e-01" in msg  # exactly half of the true gradient


@pytest.mark.parametrize("wrt", [["x"], ["W"], ["x", "W"]])
def test_check_vjp_matmul_passes_including_initializer(wrt):
    fwd, vjp = matmul_models(correct=True)
    rel = _check(fwd, vjp, {"x": _x([3, 4])}, wrt=wrt, output="y", seed=5)
    assert rel < 1e-8


def test_check_vjp_matmul_missing_transpose_fails():
    fwd, vjp = matmul_models(correct=False)
    with pytest.raises(AssertionError):
        _check(fwd, vjp, {"x": _x([3, 4])}, wrt=["x"], output="y")
    # The weight gradient in the same model is right.
    assert _check(fwd, vjp, {"x": _x([3, 4])}, wrt=["W"], output="y") < 1e-8


def test_check_vjp_conv_passes_and_shifted_vjp_fails():
    feeds = {"x": _x([1, 2, 6, 6])}
    fwd, good = conv_models(correct=True)
    assert _check(fwd, good, feeds, wrt=["x"], output="y") < 1e-8
    _, bad = conv_models(correct=False)
    with pytest.raises(AssertionError):
        _check(fwd, bad, feeds, wrt=["x"], output="y")


def test_check_vjp_custom_names_and_seeds():
    fwd, vjp = relu_models()
    vjp = to_float64(vjp)
    for node in vjp.graph.node:
        node.input[:] = ["u" if i == "cotangent" else i for i in node.input]
        node.output[:] = ["dx" if o == "grad_x" else o for o in node.output]
    vjp.graph.input[1].name = "u"
    vjp.graph.output[0].name = "dx"
    for seed in range(3):
        rel = check_vjp(
            to_float64(fwd),
            vjp,
            {"x": _x([2, 3], seed=seed)},
            wrt=["x"],
            output="y",
            cotangent_name="u",
            grad_names={"x": "dx"},
            seed=seed,
        )
        assert rel < 1e-8


def test_check_vjp_rejects_float32_forward():
    fwd, vjp = relu_models()
    with pytest.raises(ValueError, match="float64"):
        check_vjp(fwd, to_float64(vjp), {"x": _x([2, 3])}, wrt=["x"], output="y")


def test_check_vjp_rejects_wrong_gradient_shape():
    fwd, _ = relu_models()
    vjp = _model(
        [helper.make_node("ReduceSum", ["cotangent"], ["grad_x"], keepdims=1)],
        [_vi("x", [2, 3]), _vi("cotangent", [2, 3])],
        [_vi("grad_x", [1, 1])],
    )
    with pytest.raises(AssertionError, match="shape"):
        _check(fwd, vjp, {"x": _x([2, 3])}, wrt=["x"], output="y")


def test_check_vjp_tolerances_are_used():
    fwd, vjp = relu_models(grad_scale=1.001)
    feeds = {"x": _x([2, 3])}
    with pytest.raises(AssertionError):
        _check(fwd, vjp, feeds, wrt=["x"], output="y")
    rel = _check(fwd, vjp, feeds, wrt=["x"], output="y", rtol=1e-2)
    assert 1e-4 < rel < 1e-2


# --------------------------------------------------------------------------- evaluator fixes


def _single(op, inputs, outputs, opset=20, **attrs):
    """One-node float64 model; ``inputs`` maps names to example arrays."""
    ins = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for n, v in inputs.items()
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in outputs]
    graph = helper.make_graph([helper.make_node(op, list(inputs), outputs, **attrs)], op, ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_reference_erf_and_gelu_are_float64_exact():
    x = np.linspace(-3.0, 3.0, 61) + 1e-3
    erf = np.array([math.erf(v) for v in x])
    out = run_reference(_single("Erf", {"x": x}, ["y"]), {"x": x})["y"]
    np.testing.assert_allclose(out, erf, rtol=1e-15, atol=1e-16)
    gelu = 0.5 * x * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in x]))
    out = run_reference(_single("Gelu", {"x": x}, ["y"]), {"x": x})["y"]
    np.testing.assert_allclose(out, gelu, rtol=1e-14, atol=1e-16)
    tanh = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    out = run_reference(_single("Gelu", {"x": x}, ["y"], approximate="tanh"), {"x": x})["y"]
    np.testing.assert_allclose(out, tanh, rtol=1e-14, atol=1e-16)


def test_check_vjp_grouped_conv_with_grouped_conv_transpose():
    """The VJP of a grouped, dilated, asymmetrically padded, strided Conv is a grouped
    ConvTranspose, which the stock ReferenceEvaluator gets wrong."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 2, 3, 2))
    b = rng.standard_normal(6)
    conv = dict(group=2, dilations=[2, 1], pads=[1, 0, 2, 1], strides=[1, 2])
    fwd = _model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], **conv)],
        [_vi("x", [2, 4, 9, 8])],
        [_vi("y", [2, 6, 8, 4])],
        [_init("W", w.astype(np.float32)), _init("B", b.astype(np.float32))],
    )
    vjp = _model(
        [helper.make_node("ConvTranspose", ["cotangent", "W"], ["grad_x"], output_padding=[0, 1], **conv)],
        [_vi("x", [2, 4, 9, 8]), _vi("cotangent", [2, 6, 8, 4])],
        [_vi("grad_x", [2, 4, 9, 8])],
        [_init("W", w.astype(np.float32))],
    )
    # a float64 central difference over a 576-element direction: 1e-8 is at its noise floor
    # (numpy 2.4's summation order gives 1.02e-8); a wrong rule is off by far more
    assert _check(fwd, vjp, {"x": _x([2, 4, 9, 8])}, wrt=["x"], output="y") < 5e-8

    # Grouped ConvTranspose with a bias adds each channel's own bias.
    u = rng.standard_normal((1, 6, 3, 3))
    wt = rng.standard_normal((6, 2, 3, 3))
    model = _single("ConvTranspose", {"u": u, "W": wt, "B": b}, ["y"], group=3, strides=[2, 2])
    no_bias = _single("ConvTranspose", {"u": u, "W": wt}, ["y"], group=3, strides=[2, 2])
    with_b = run_reference(model, {"u": u, "W": wt, "B": b})["y"]
    without = run_reference(no_bias, {"u": u, "W": wt})["y"]
    assert with_b.shape == (1, 6, 7, 7)
    np.testing.assert_allclose(with_b - without, np.broadcast_to(b[:, None, None], (1, 6, 7, 7)))


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_reference_pad_negative_pads(mode):
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 5))
    pads = np.array([0, 0, -1, 2, 0, 0, 1, -2], dtype=np.int64)
    out = run_reference(_single("Pad", {"x": x, "pads": pads}, ["y"], mode=mode), {"x": x, "pads": pads})
    expected = np.pad(x[:, :, 1:, :-2], ((0, 0), (0, 0), (0, 1), (2, 0)), mode=mode)
    np.testing.assert_array_equal(out["y"], expected)


def test_reference_resize_cubic_coefficients_are_float64():
    x = np.random.default_rng(0).standard_normal((1, 1, 1, 5))
    sizes = np.array([1, 1, 1, 3], dtype=np.int64)
    model = _single(
        "Resize",
        {"x": x, "roi": np.zeros(0), "scales": np.zeros(0, np.float32), "sizes": sizes},
        ["y"],
        mode="cubic",
    )
    out = run_reference(
        model, {"x": x, "roi": np.zeros(0), "scales": np.zeros(0, np.float32), "sizes": sizes}
    )["y"][0, 0, 0]

    def weight(d, a=-0.75):
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0

    v, expected = x[0, 0, 0], []
    for i in range(3):
        pos = (i + 0.5) * 5 / 3 - 0.5
        lo = math.floor(pos)
        expected.append(sum(weight(pos - j) * v[min(max(j, 0), 4)] for j in range(lo - 1, lo + 3)))
    np.testing.assert_allclose(out, expected, rtol=1e-14)


def _maxpool_numpy(x, kernel, strides, pads, ceil_mode, storage_order):
    """Brute-force 2-D MaxPool with ONNX Indices (flat N*C*H*W, or column-major planes)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (t, l, b, r) = kernel, strides, pads
    rnd = math.ceil if ceil_mode else math.floor
    oh, ow = rnd((h + t + b - kh) / sh) + 1, rnd((w + l + r - kw) / sw) + 1
    if ceil_mode:  # windows starting in the end padding are dropped
        oh -= (oh - 1) * sh >= h + t
        ow -= (ow - 1) * sw >= w + l
    y = np.empty((n, c, oh, ow))
    idx = np.empty((n, c, oh, ow), dtype=np.int64)
    for ni, ci, i, j in np.ndindex(n, c, oh, ow):
        best = None
        for hh in range(i * sh - t, i * sh - t + kh):
            for ww in range(j * sw - l, j * sw - l + kw):
                if 0 <= hh < h and 0 <= ww < w and (best is None or x[ni, ci, hh, ww] > best):
                    best, at = x[ni, ci, hh, ww], (hh, ww)
        y[ni, ci, i, j] = best
        plane = at[0] * w + at[1] if storage_order == 0 else at[1] * h + at[0]
        idx[ni, ci, i, j] = (ni * c + ci) * h * w + plane
    return y, idx


@pytest.mark.parametrize(
    ("kernel", "strides", "pads", "ceil_mode", "storage_order"),
    [
        ((2, 2), (1, 1), (0, 0, 0, 0), 0, 0),
        ((3, 3), (1, 1), (1, 1, 1, 1), 0, 0),
        ((2, 2), (1, 1), (0, 0, 1, 1), 0, 0),
        ((3, 2), (1, 1), (1, 0, 2, 1), 1, 0),
        ((3, 3), (1, 1), (1, 1, 1, 1), 1, 1),
        ((3, 3), (2, 2), (1, 1, 1, 1), 1, 0),
        ((2, 2), (2, 2), (0, 0, 1, 1), 0, 1),
    ],
)
def test_reference_maxpool_values_and_indices(kernel, strides, pads, ceil_mode, storage_order):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    model = _single(
        "MaxPool",
        {"x": x},
        ["y", "i"],
        kernel_shape=list(kernel),
        strides=list(strides),
        pads=list(pads),
        ceil_mode=ceil_mode,
        storage_order=storage_order,
    )
    out = run_reference(model, {"x": x})
    y, idx = _maxpool_numpy(x, kernel, strides, pads, ceil_mode, storage_order)
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["i"], idx)


def test_reference_maxpool_same_lower():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 7))
    model = _single("MaxPool", {"x": x}, ["y"], kernel_shape=[2, 3], strides=[1, 2], auto_pad="SAME_LOWER")
    # out = ceil(in / stride); total padding 1 (H) and 2 (W), the larger half at the start.
    y, _ = _maxpool_numpy(x, (2, 3), (1, 2), (1, 1, 0, 1), 0, 0)
    np.testing.assert_array_equal(run_reference(model, {"x": x})["y"], y)
