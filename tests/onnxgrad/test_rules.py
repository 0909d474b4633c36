"""Operator-by-operator checks of the onnxgrad VJP rules.

Every row of ``CASES`` is a tiny float32 ONNX model (one node, or two) with random inputs.
For each, ``build_vjp_model`` builds the VJP w.r.t. every differentiable float graph input,
and two checks run:

(a) float64: ``to_float64`` of the float32 VJP graph against float64 central differences
    of ``to_float64(forward)`` (``check_vjp``, rtol 1e-5);
(b) float32 on ONNX Runtime (what production runs): if ORT loads the forward model it must
    load and run the VJP graph, its forward output must match the reference evaluator's,
    and its gradient projected on the same random direction must match the float64 VJP to
    1e-4 relative (scaled by ``sum |g * v|``, the size of the projection's terms).

Inputs are seeded per row (crc32 of the id) and kept away from kinks and poles; the
behaviour at kinks is pinned by the explicit tests further down.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.onnxgrad.gradcheck import check_vjp, run_reference, to_float64
from workers.onnxgrad import UnsupportedOperatorError, build_vjp_model
from workers.onnxgrad.autodiff import REGISTRY
from workers.onnxgrad.prepare import normalise_opset

OPSET = 17
F = TensorProto.FLOAT
RTOL = 1e-5  # float64 VJP vs float64 central differences
ORT_RTOL = 1e-4  # float32 ORT VJP vs float64 VJP (and ORT vs reference forward)
I64_MAX = np.iinfo(np.int64).max
IR_VERSION = 10  # ONNX Runtime 1.2x loads IR <= 10/11; onnx.helper defaults to a newer one

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


# --------------------------------------------------------------------------- input specs


@dataclass(frozen=True)
class In:
    """One input of a case.

    Float inputs are drawn uniformly from [lo, hi] and resampled while closer than
    ``margin`` to a point of ``avoid`` (kinks, poles, clip bounds). ``value`` fixes the
    data (ints, bools, shapes). ``const`` makes it an initializer; ``grad=False`` keeps a
    float graph input out of ``wrt``; ``sym`` gives symbolic names to some graph input
    dims (``None`` keeps a dim static).
    """

    shape: tuple = ()
    lo: float = -2.0
    hi: float = 2.0
    avoid: tuple = ()
    margin: float = 1e-2
    value: object = None
    const: bool = False
    grad: bool = True
    sym: tuple = ()
    kind: str = "float"  # float | bool

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        if self.value is not None:
            arr = np.asarray(self.value)
            return arr.astype(np.float32) if arr.dtype.kind == "f" else arr
        if self.kind == "bool":
            return rng.random(self.shape) < 0.5
        arr = rng.uniform(self.lo, self.hi, self.shape)
        for _ in range(100):
            bad = np.zeros(arr.shape, bool)
            for point in self.avoid:
                bad |= np.abs(arr - point) < self.margin
            if not bad.any():
                break
            arr = np.where(bad, rng.uniform(self.lo, self.hi, arr.shape), arr)
        else:  # pragma: no cover
            raise AssertionError("could not sample away from the kinks")
        return np.asarray(arr, np.float32)


def x(*shape, **kw) -> In:
    """Float graph input (differentiated where the rule allows)."""
    return In(tuple(shape), **kw)


def pos(*shape, **kw) -> In:
    """Strictly positive float graph input."""
    return In(tuple(shape), lo=kw.pop("lo", 0.5), hi=kw.pop("hi", 2.0), **kw)


def nz(*shape, **kw) -> In:
    """Float graph input kept at least 0.3 away from zero (divisors, reciprocals)."""
    return In(tuple(shape), avoid=(0.0,), margin=0.3, **kw)


def c(*shape, **kw) -> In:
    """Random float initializer."""
    return In(tuple(shape), const=True, **kw)


def cf(values) -> In:
    """Fixed float initializer."""
    return In(value=np.asarray(values, np.float32), const=True)


def ci(values) -> In:
    """Fixed int64 initializer."""
    return In(value=np.asarray(values, np.int64), const=True)


def nog(*shape, **kw) -> In:
    """Float graph input that is not differentiated."""
    return In(tuple(shape), grad=False, **kw)


def cond(*shape) -> In:
    """Random bool initializer."""
    return In(tuple(shape), kind="bool", const=True)


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    id: str
    nodes: tuple
    inputs: tuple  # ((name, In), ...); "" entries are skipped
    output: str
    opset: int = OPSET
    xfail: str | None = None
    # The reference evaluator gets this (old-opset) operator wrong: differentiate numerically
    # the opset-17 conversion instead, after checking that it matches ORT on the original.
    reference_is_wrong: str | None = None
    no_ort: str | None = None  # why ONNX Runtime cannot run this forward model (float64 check only)

    def __str__(self) -> str:  # pytest id
        return self.id


def one(id_: str, op: str, ins: list, *, opset: int = OPSET, n_out: int = 1, out: int = 0, **attrs) -> Case:
    """A single-node case: inputs x0, x1, ... ("" for an omitted optional input)."""
    rule = REGISTRY[op]
    names, inputs = [], []
    for i, spec in enumerate(ins):
        if spec == "":
            names.append("")
            continue
        name = f"x{i}"
        if not rule.differentiates(i):
            spec = replace(spec, grad=False)
        names.append(name)
        inputs.append((name, spec))
    outs = [f"y{k}" for k in range(n_out)] if n_out > 1 else ["y"]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **attrs)
    return Case(id_, (node,), tuple(inputs), outs[out], opset)


def graph(id_: str, nodes: list, ins: dict, output: str, opset: int = OPSET, **kw) -> Case:
    return Case(id_, tuple(nodes), tuple(ins.items()), output, opset, **kw)


def node(op: str, ins: list, outs: list, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, outs, name=f"{outs[0]}_node", **attrs)


X4 = (2, 3, 4, 5)
RELU_AVOID = {"avoid": (0.0,)}

_BINARY = []
for _op, _a, _b in [
    ("Add", x, x),
    ("Sub", x, x),
    ("Mul", x, x),
    ("Div", x, nz),
]:
    _n = _op.lower()
    _BINARY += [
        one(f"{_n}_same_shape", _op, [_a(3, 4), _b(3, 4)]),
        one(f"{_n}_4d_by_c11", _op, [_a(*X4), _b(3, 1, 1)]),
        one(f"{_n}_4d_by_scalar", _op, [_a(*X4), _b()]),
        one(f"{_n}_scalar_by_4d", _op, [_a(), _b(*X4)]),
        one(f"{_n}_both_broadcast", _op, [_a(4, 1, 5), _b(3, 1)]),
        one(f"{_n}_const_rhs", _op, [_a(2, 3), _b(3, const=True)]),
    ]

_UNARY = [
    one("relu", "Relu", [x(3, 4, **RELU_AVOID)]),
    one("leaky_relu", "LeakyRelu", [x(3, 4, **RELU_AVOID)], alpha=0.1),
    one("leaky_relu_default_alpha", "LeakyRelu", [x(3, 4, **RELU_AVOID)]),
    one("prelu_per_channel", "PRelu", [x(*X4, **RELU_AVOID), x(3, 1, 1)]),
    one("prelu_scalar_slope", "PRelu", [x(2, 3, 4, **RELU_AVOID), x(1)]),
    one("prelu_const_slope", "PRelu", [x(2, 3, 4, 5, **RELU_AVOID), c(3, 1, 1)]),
    one("thresholded_relu", "ThresholdedRelu", [x(3, 4, avoid=(0.5,))], alpha=0.5),
    one("elu", "Elu", [x(3, 4, **RELU_AVOID)], alpha=0.5),
    one("selu", "Selu", [x(3, 4, **RELU_AVOID)]),
    one("selu_custom", "Selu", [x(3, 4, **RELU_AVOID)], alpha=1.5, gamma=0.8),
    one("celu", "Celu", [x(3, 4, **RELU_AVOID)], alpha=2.0),
    one("sigmoid", "Sigmoid", [x(3, 4)]),
    one("hard_sigmoid", "HardSigmoid", [x(3, 4, lo=-4, hi=4, avoid=(-4 / 3, 2.0))], alpha=0.3, beta=0.4),
    one("hard_sigmoid_default", "HardSigmoid", [x(3, 4, lo=-4, hi=4, avoid=(-2.5, 2.5))]),
    one("hard_swish", "HardSwish", [x(4, 5, lo=-5, hi=5, avoid=(-3.0, 3.0))]),
    one("tanh", "Tanh", [x(3, 4)]),
    one("softplus", "Softplus", [x(3, 4)]),
    one("softsign", "Softsign", [x(3, 4)]),
    one("exp", "Exp", [x(3, 4)]),
    one("log", "Log", [pos(3, 4)]),
    one("sqrt", "Sqrt", [pos(3, 4)]),
    one("reciprocal", "Reciprocal", [nz(3, 4)]),
    one("abs", "Abs", [x(3, 4, **RELU_AVOID)]),
    one("sin", "Sin", [x(3, 4, lo=-4, hi=4)]),
    one("cos", "Cos", [x(3, 4, lo=-4, hi=4)]),
    one("erf", "Erf", [x(3, 4)]),
    one("gelu_none", "Gelu", [x(3, 4, lo=-3, hi=3)], opset=20),
    replace(
        one("gelu_tanh", "Gelu", [x(3, 4, lo=-3, hi=3)], opset=20, approximate="tanh"),
    ),
    one("clip_min_only", "Clip", [x(3, 4, avoid=(-0.5,)), cf(-0.5)]),
    one("clip_max_only", "Clip", [x(3, 4, avoid=(0.5,)), "", cf(0.5)]),
    one("clip_both", "Clip", [x(3, 4, avoid=(-0.5, 0.7)), cf(-0.5), cf(0.7)]),
    one("clip_no_bounds", "Clip", [x(3, 4)]),
    one("clip_bounds_graph_inputs", "Clip", [x(3, 4, avoid=(-0.5, 0.7)), nog(value=-0.5), nog(value=0.7)]),
    one("identity", "Identity", [x(3, 4)]),
    one("dropout_inference", "Dropout", [x(3, 4)]),
    one("dropout_ratio_given", "Dropout", [x(3, 4), cf(0.3)], n_out=2, out=0),
    one("neg", "Neg", [x(3, 4)]),
    one("cast_float_to_float", "Cast", [x(3, 4)], to=F),
    one("cast_float_to_double", "Cast", [x(3, 4)], to=TensorProto.DOUBLE),
    graph(
        "cast_double_roundtrip",
        [node("Cast", ["a"], ["d"], to=TensorProto.DOUBLE), node("Cast", ["d"], ["y"], to=F)],
        {"a": x(3, 4)},
        "y",
    ),
    one("castlike_float", "CastLike", [x(3, 4), cf([0.0])]),
]

_VARIADIC = [
    one("max_two", "Max", [x(3, 4), x(3, 4)]),
    one("max_three_broadcast", "Max", [x(2, 3, 4), x(3, 1), x(4)]),
    one("max_single", "Max", [x(3, 4)]),
    one("max_with_const", "Max", [x(2, 3), c(3)]),
    one("min_two", "Min", [x(3, 4), x(3, 4)]),
    one("min_three_broadcast", "Min", [x(2, 3, 4), x(3, 1), x(4)]),
    one("sum_three_broadcast", "Sum", [x(2, 3, 4), x(3, 1), x()]),
    one("sum_single", "Sum", [x(3, 4)]),
    one("mean_three_broadcast", "Mean", [x(2, 3, 4), x(3, 1), x(4)]),
    one("mean_two", "Mean", [x(3, 4), x(3, 4)]),
    one("where_same", "Where", [cond(3, 4), x(3, 4), x(3, 4)]),
    one("where_broadcast", "Where", [cond(3, 1), x(2, 3, 4), x(4)]),
    one("where_scalar_branch", "Where", [cond(2, 3, 4), x(2, 3, 4), x()]),
    one(
        "where_cond_graph_input",
        "Where",
        [In((3, 4), kind="bool", const=False, value=None), x(3, 4), x(3, 4)],
    ),
]

_POW = [
    one("pow_both_same_shape", "Pow", [pos(3, 4), x(3, 4)]),
    one("pow_4d_by_c11", "Pow", [pos(*X4), x(3, 1, 1)]),
    one("pow_scalar_exponent", "Pow", [pos(*X4), x()]),
    one("pow_scalar_base", "Pow", [pos(), x(3, 4)]),
    one("pow_const_exponent_2", "Pow", [x(3, 4), cf(2.0)]),
    one("pow_const_exponent_3_negative_base", "Pow", [nz(3, 4), cf(3.0)]),
    one("pow_const_exponent_half", "Pow", [pos(3, 4), cf(0.5)]),
    one("pow_int_exponent", "Pow", [nz(3, 4), ci(3)]),
    replace(
        one("pow_const_exponent_2_rank1", "Pow", [x(3, 4), cf([2.0])]),
    ),
    one("pow_exponent_graph_input_not_wrt", "Pow", [pos(3, 4), nog(4)]),
]

_MATMUL = [
    one("matmul_2d", "MatMul", [x(3, 4), x(4, 5)]),
    one("matmul_3d_by_2d", "MatMul", [x(2, 3, 4), x(4, 5)]),
    one("matmul_2d_by_3d", "MatMul", [x(3, 4), x(2, 4, 5)]),
    one("matmul_4d_batched_broadcast", "MatMul", [x(2, 1, 3, 4), x(1, 3, 4, 5)]),
    one("matmul_4d_by_3d", "MatMul", [x(2, 3, 3, 4), x(3, 4, 5)]),
    one("matmul_vector_rhs", "MatMul", [x(2, 3, 4), x(4)]),
    one("matmul_2d_vector_rhs", "MatMul", [x(3, 4), x(4)]),
    one("matmul_const_weight", "MatMul", [x(2, 4), c(4, 3)]),
    one("matmul_const_lhs", "MatMul", [c(3, 4), x(2, 4, 5)]),
]

_GEMM = [
    one("gemm_nn", "Gemm", [x(3, 4), x(4, 5), x(5)], alpha=0.5, beta=2.0),
    one("gemm_tn", "Gemm", [x(4, 3), x(4, 5), x(5)], alpha=0.5, beta=2.0, transA=1),
    one("gemm_nt", "Gemm", [x(3, 4), x(5, 4), x(5)], alpha=0.5, beta=2.0, transB=1),
    one("gemm_tt", "Gemm", [x(4, 3), x(5, 4), x(5)], alpha=0.5, beta=2.0, transA=1, transB=1),
    one("gemm_c_full", "Gemm", [x(3, 4), x(4, 5), x(3, 5)], beta=0.5),
    one("gemm_c_column", "Gemm", [x(3, 4), x(5, 4), x(3, 1)], transB=1),
    one("gemm_c_row", "Gemm", [x(4, 3), x(4, 5), x(1, 5)], transA=1, alpha=1.5),
    one("gemm_c_scalar", "Gemm", [x(3, 4), x(4, 5), x()], beta=-1.0),
    one("gemm_no_c", "Gemm", [x(3, 4), x(5, 4)], transB=1),
    one("gemm_const_weights", "Gemm", [x(2, 4), c(5, 4), c(5)], transB=1),
]


def conv(id_, x_shape, w_shape, *, bias=True, w_input=False, **attrs) -> Case:
    w = nog(*w_shape) if w_input else c(*w_shape)
    ins = [x(*x_shape), w] + ([x(w_shape[0])] if bias else [])
    return one(id_, "Conv", ins, **attrs)


_CONV = [
    conv("conv_group1", (1, 4, 7, 7), (3, 4, 3, 3), pads=[1, 1, 1, 1]),
    conv("conv_group1_weight_input", (2, 4, 6, 6), (3, 4, 3, 3), w_input=True, pads=[1, 1, 1, 1]),
    conv("conv_group2", (1, 4, 6, 6), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    conv("conv_group2_weight_input", (1, 4, 6, 6), (6, 2, 3, 3), w_input=True, group=2),
    conv("conv_depthwise", (1, 3, 6, 6), (3, 1, 3, 3), group=3, pads=[1, 1, 1, 1]),
    conv("conv_depthwise_multiplier2", (1, 3, 6, 6), (6, 1, 3, 3), group=3, pads=[1, 1, 1, 1]),
    conv("conv_strides2", (1, 2, 7, 7), (3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    conv("conv_strides2_even", (1, 2, 8, 8), (3, 2, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]),
    conv("conv_strides_2x1", (1, 2, 8, 7), (2, 2, 3, 2), strides=[2, 1]),
    conv("conv_stride3_kernel2", (1, 2, 8, 8), (2, 2, 2, 2), strides=[3, 3]),
    conv("conv_group2_strides2", (1, 4, 8, 8), (4, 2, 3, 3), group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
    conv("conv_depthwise_strides2", (1, 3, 7, 7), (3, 1, 3, 3), group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    conv("conv_dilations2", (1, 2, 8, 8), (2, 2, 3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    conv("conv_depthwise_dilations2", (1, 2, 8, 8), (2, 1, 3, 3), group=2, dilations=[2, 2]),
    conv("conv_asymmetric_pads", (1, 2, 6, 6), (3, 2, 3, 3), pads=[0, 1, 2, 1]),
    conv("conv_group2_asymmetric_pads", (1, 4, 6, 6), (4, 2, 3, 3), group=2, pads=[2, 0, 1, 1]),
    conv("conv_same_upper", (1, 2, 7, 7), (3, 2, 4, 4), auto_pad="SAME_UPPER", strides=[2, 2]),
    conv("conv_same_lower", (1, 2, 7, 7), (3, 2, 4, 4), auto_pad="SAME_LOWER", strides=[2, 2]),
    conv("conv_same_upper_stride1", (1, 2, 6, 6), (3, 2, 4, 4), auto_pad="SAME_UPPER"),
    conv(
        "conv_same_lower_depthwise",
        (1, 2, 7, 7),
        (2, 1, 4, 4),
        group=2,
        auto_pad="SAME_LOWER",
        strides=[2, 2],
    ),
    replace(
        conv(
            "conv_same_upper_dilations", (1, 2, 7, 8), (2, 2, 3, 2), auto_pad="SAME_UPPER", dilations=[2, 3]
        ),
        no_ort="ONNX Runtime: Dilation not supported for AutoPadType::SAME_UPPER",
    ),
    conv("conv_valid", (1, 2, 7, 7), (3, 2, 3, 3), auto_pad="VALID", strides=[2, 2]),
    conv("conv_1d", (2, 3, 10), (4, 3, 3), strides=[2], pads=[1, 0]),
    conv("conv_1d_group", (1, 4, 9), (4, 2, 3), group=2, pads=[1, 1]),
    conv("conv_3d", (1, 2, 4, 5, 4), (2, 2, 2, 3, 2), pads=[1, 0, 1, 0, 1, 0]),
    conv("conv_no_bias", (1, 2, 5, 5), (3, 2, 3, 3), bias=False),
    conv("conv_uncovered_tail", (1, 2, 8, 8), (3, 2, 3, 3), strides=[2, 2]),
    conv("conv_group2_uncovered_tail", (1, 4, 8, 8), (4, 2, 3, 3), group=2, strides=[2, 2]),
    conv(
        "conv_depthwise_stride3_kernel2",
        (1, 2, 8, 7),
        (2, 1, 2, 2),
        group=2,
        strides=[3, 3],
        pads=[1, 0, 0, 1],
    ),
    conv(
        "conv_group2_all_geometry",
        (1, 4, 9, 8),
        (6, 2, 3, 2),
        group=2,
        strides=[2, 3],
        dilations=[2, 1],
        pads=[2, 0, 1, 1],
    ),
    conv(
        "conv_group1_all_geometry",
        (1, 3, 9, 8),
        (2, 3, 3, 2),
        strides=[2, 3],
        dilations=[2, 1],
        pads=[2, 0, 1, 1],
    ),
    conv(
        "conv_group2_same_lower_even_kernel",
        (1, 2, 6, 7),
        (2, 1, 2, 4),
        group=2,
        auto_pad="SAME_LOWER",
        strides=[1, 2],
    ),
    conv("conv_1d_depthwise_strides2", (2, 3, 11), (3, 1, 4), group=3, strides=[2], pads=[2, 1]),
    conv(
        "conv_3d_group2_strides2",
        (1, 4, 5, 4, 5),
        (2, 2, 3, 2, 3),
        group=2,
        strides=[2, 1, 2],
        pads=[1, 0, 1, 1, 1, 0],
    ),
    conv("conv_large_pads", (1, 2, 4, 4), (2, 2, 3, 3), pads=[3, 2, 2, 3]),
    conv("conv_group2_large_pads", (1, 2, 4, 4), (2, 1, 3, 3), group=2, pads=[3, 2, 2, 3]),
    conv("conv_explicit_kernel_shape", (1, 2, 5, 5), (3, 2, 3, 3), kernel_shape=[3, 3]),
]

# Convs with fewer input channels than one blocked-layout block: at opset 18 (CPU graphs)
# their input gradient is MatMul + Col2Im; test_col2im_cases_take_the_col2im_form checks that.
_CONV_COL2IM = [
    conv("col2im_1ch_5x5", (2, 1, 8, 8), (3, 1, 5, 5), opset=18),
    conv("col2im_3ch_pads", (2, 3, 7, 7), (4, 3, 3, 3), opset=18, pads=[1, 1, 1, 1]),
    conv("col2im_strides2", (1, 2, 8, 8), (3, 2, 3, 3), opset=18, strides=[2, 2], pads=[1, 1, 1, 1]),
    conv("col2im_uncovered_tail", (1, 2, 8, 8), (3, 2, 3, 3), opset=18, strides=[2, 2]),
    conv("col2im_same_upper", (1, 2, 7, 7), (3, 2, 4, 4), opset=18, auto_pad="SAME_UPPER", strides=[2, 2]),
    conv("col2im_large_pads", (1, 2, 4, 4), (2, 2, 3, 3), opset=18, pads=[3, 2, 2, 3]),
    conv("col2im_no_bias", (1, 6, 6, 6), (4, 6, 3, 3), opset=18, bias=False),
    conv(
        "col2im_all_geometry",
        (1, 3, 9, 8),
        (2, 3, 3, 2),
        opset=18,
        strides=[2, 3],
        dilations=[2, 1],
        pads=[2, 0, 1, 1],
    ),
    one("col2im_dynamic_batch", "Conv", [x(2, 3, 5, 5, sym=("N",)), c(4, 3, 3, 3), x(4)], opset=18,
        pads=[1, 1, 1, 1]),
]

_CONV_TRANSPOSE = [
    one(
        "conv_transpose_strides2_output_padding",
        "ConvTranspose",
        [x(1, 3, 4, 4), c(3, 2, 3, 3), x(2)],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        output_padding=[1, 1],
    ),
    one("conv_transpose_group2", "ConvTranspose", [x(1, 4, 3, 3), c(4, 3, 3, 3), x(6)], group=2),
    one(
        "conv_transpose_group2_strides2",
        "ConvTranspose",
        [x(1, 4, 3, 3), c(4, 1, 3, 3)],
        group=2,
        strides=[2, 2],
        output_padding=[1, 0],
    ),
    one(
        "conv_transpose_dilations_pads",
        "ConvTranspose",
        [x(1, 2, 4, 4), c(2, 3, 2, 2)],
        dilations=[2, 2],
        pads=[1, 0, 0, 1],
    ),
    one("conv_transpose_weight_input", "ConvTranspose", [x(1, 2, 4, 4), nog(2, 3, 3, 3)], strides=[2, 2]),
    one("conv_transpose_1d", "ConvTranspose", [x(2, 3, 5), c(3, 2, 3), x(2)], strides=[2]),
    one(
        "conv_transpose_group2_all_geometry",
        "ConvTranspose",
        [x(1, 4, 3, 4), c(4, 2, 3, 2), x(4)],
        group=2,
        strides=[2, 3],
        dilations=[1, 2],
        pads=[1, 0, 0, 1],
        output_padding=[1, 2],
    ),
    one("conv_transpose_3d", "ConvTranspose", [x(1, 2, 2, 3, 2), c(2, 2, 2, 2, 2)], strides=[2, 1, 2]),
]

_MAXPOOL = [
    one("maxpool_3x3_stride1", "MaxPool", [x(1, 2, 6, 6)], kernel_shape=[3, 3]),
    one(
        "maxpool_3x3_stride2_pads",
        "MaxPool",
        [x(1, 2, 7, 7)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    ),
    one("maxpool_2x2_stride2", "MaxPool", [x(2, 2, 6, 6)], kernel_shape=[2, 2], strides=[2, 2]),
    one("maxpool_asymmetric_pads", "MaxPool", [x(1, 2, 5, 5)], kernel_shape=[2, 3], pads=[1, 0, 0, 2]),
    one("maxpool_ceil_mode", "MaxPool", [x(1, 2, 6, 6)], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    one(
        "maxpool_ceil_mode_pads",
        "MaxPool",
        [x(1, 1, 7, 7)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        ceil_mode=1,
    ),
    one("maxpool_dilations2", "MaxPool", [x(1, 2, 7, 7)], kernel_shape=[2, 2], dilations=[2, 2]),
    one(
        "maxpool_same_upper",
        "MaxPool",
        [x(1, 2, 7, 7)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        auto_pad="SAME_UPPER",
    ),
    one("maxpool_same_lower", "MaxPool", [x(1, 2, 6, 6)], kernel_shape=[2, 2], auto_pad="SAME_LOWER"),
    one(
        "maxpool_same_lower_strides2",
        "MaxPool",
        [x(1, 1, 7, 8)],
        kernel_shape=[4, 3],
        strides=[2, 2],
        auto_pad="SAME_LOWER",
    ),
    one("maxpool_1d", "MaxPool", [x(2, 3, 9)], kernel_shape=[3], strides=[2], pads=[1, 1]),
    one(
        "maxpool_3d",
        "MaxPool",
        [x(1, 2, 4, 5, 4)],
        kernel_shape=[2, 3, 2],
        strides=[2, 1, 2],
        pads=[0, 1, 0, 0, 1, 1],
    ),
    one("maxpool_strides_gt_kernel", "MaxPool", [x(1, 1, 8, 8)], kernel_shape=[2, 2], strides=[3, 3]),
    one(
        "maxpool_ceil_dilations",
        "MaxPool",
        [x(1, 1, 8, 8)],
        kernel_shape=[2, 2],
        strides=[2, 2],
        dilations=[2, 2],
        ceil_mode=1,
    ),
    one(
        "maxpool_indices_output_declared",
        "MaxPool",
        [x(1, 2, 6, 6)],
        n_out=2,
        kernel_shape=[3, 3],
        strides=[1, 1],
    ),
]

_AVGPOOL = [
    one("avgpool_exclude_pad", "AveragePool", [x(1, 2, 6, 6)], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    one(
        "avgpool_include_pad",
        "AveragePool",
        [x(1, 2, 6, 6)],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        count_include_pad=1,
    ),
    one("avgpool_asymmetric_pads", "AveragePool", [x(1, 2, 5, 6)], kernel_shape=[2, 3], pads=[0, 2, 1, 0]),
    one("avgpool_strides2", "AveragePool", [x(1, 2, 8, 8)], kernel_shape=[2, 2], strides=[2, 2]),
    one(
        "avgpool_3x3_strides2_pads",
        "AveragePool",
        [x(1, 2, 7, 7)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    ),
    one(
        "avgpool_ceil_overhang",
        "AveragePool",
        [x(1, 2, 6, 6)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        ceil_mode=1,
    ),
    one(
        "avgpool_ceil_overhang_include_pad",
        "AveragePool",
        [x(1, 2, 6, 6)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        ceil_mode=1,
        count_include_pad=1,
    ),
    one(
        "avgpool_ceil_overhang_exclude_pad",
        "AveragePool",
        [x(1, 2, 6, 6)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        ceil_mode=1,
    ),
    one(
        "avgpool_same_upper",
        "AveragePool",
        [x(1, 2, 7, 7)],
        kernel_shape=[3, 3],
        strides=[2, 2],
        auto_pad="SAME_UPPER",
    ),
    one("avgpool_1d", "AveragePool", [x(2, 3, 9)], kernel_shape=[3], strides=[2], pads=[1, 1]),
    one("avgpool_dilations", "AveragePool", [x(1, 2, 7, 7)], opset=19, kernel_shape=[2, 2], dilations=[2, 2]),
    one(
        "avgpool_same_lower",
        "AveragePool",
        [x(1, 2, 6, 7)],
        kernel_shape=[2, 4],
        strides=[1, 2],
        auto_pad="SAME_LOWER",
    ),
    one(
        "avgpool_same_upper_include_pad",
        "AveragePool",
        [x(1, 2, 7, 6)],
        kernel_shape=[3, 4],
        strides=[2, 1],
        auto_pad="SAME_UPPER",
        count_include_pad=1,
    ),
    one("avgpool_3d", "AveragePool", [x(1, 2, 4, 5, 4)], kernel_shape=[2, 3, 2], pads=[1, 1, 0, 0, 1, 1]),
    one("avgpool_strides_gt_kernel", "AveragePool", [x(1, 1, 8, 8)], kernel_shape=[2, 2], strides=[3, 3]),
    one(
        "avgpool_ceil_asym_pads_include_pad",
        "AveragePool",
        [x(1, 1, 7, 8)],
        kernel_shape=[3, 2],
        strides=[2, 3],
        pads=[0, 1, 2, 0],
        ceil_mode=1,
        count_include_pad=1,
    ),
    one(
        "avgpool_ceil_dilations",
        "AveragePool",
        [x(1, 1, 8, 8)],
        opset=19,
        kernel_shape=[2, 2],
        strides=[2, 2],
        dilations=[2, 2],
        ceil_mode=1,
    ),
    one(
        "avgpool_pads_kernel_minus_one_include_pad",
        "AveragePool",
        [x(1, 1, 4, 4)],
        kernel_shape=[3, 3],
        pads=[2, 2, 2, 2],
        count_include_pad=1,
    ),
    one("global_avgpool", "GlobalAveragePool", [x(*X4)]),
    one("global_maxpool", "GlobalMaxPool", [x(*X4)]),
    one("global_avgpool_1d", "GlobalAveragePool", [x(2, 3, 7)]),
]

_NORM = [
    one(
        "batchnorm_inference",
        "BatchNormalization",
        [x(*X4), c(3), c(3), c(3), pos(3, const=True)],
        epsilon=1e-3,
    ),
    one("batchnorm_2d_input", "BatchNormalization", [x(4, 3), c(3), c(3), c(3), pos(3, const=True)]),
    one(
        "batchnorm_stats_graph_inputs",
        "BatchNormalization",
        [x(*X4), nog(3), nog(3), nog(3), pos(3, grad=False)],
    ),
    one("layernorm_axis_last", "LayerNormalization", [x(2, 3, 4), c(4), c(4)]),
    one("layernorm_axis_1", "LayerNormalization", [x(2, 3, 4), c(3, 4), c(3, 4)], axis=1),
    one("layernorm_axis_neg2_no_bias", "LayerNormalization", [x(2, 3, 4), c(3, 4)], axis=-2),
    one("layernorm_scale_graph_input", "LayerNormalization", [x(2, 5), nog(5), nog(5)], epsilon=1e-3),
    one("layernorm_stats_outputs_declared", "LayerNormalization", [x(2, 3, 4), c(4), c(4)], n_out=3),
    one("softmax_last", "Softmax", [x(2, 3, 4)]),
    one("softmax_axis1", "Softmax", [x(2, 3, 4)], axis=1),
    one("logsoftmax_last", "LogSoftmax", [x(2, 3, 4)]),
    one("logsoftmax_axis1", "LogSoftmax", [x(2, 3, 4)], axis=1),
    one("softmax_axis0", "Softmax", [x(2, 3, 4)], axis=0),
    one("logsoftmax_axis_neg2", "LogSoftmax", [x(2, 3, 4)], axis=-2),
    one("layernorm_opset18", "LayerNormalization", [x(2, 3, 4), c(3, 4)], opset=18, axis=1),
    one("global_maxpool_opset18", "GlobalMaxPool", [x(2, 3, 4, 5)], opset=18),
    one("softmax_opset18", "Softmax", [x(2, 3, 4)], opset=18, axis=1),
    one("layernorm_axis0", "LayerNormalization", [x(2, 3, 4), c(2, 3, 4), c(2, 3, 4)], axis=0),
    one("layernorm_broadcast_scale", "LayerNormalization", [x(2, 3, 4), c(1, 4)], axis=1),
]

_REDUCE = []
for _op in (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
):
    _n = _op.lower()
    _x = x(2, 3, 4, **RELU_AVOID) if _op == "ReduceL1" else x(2, 3, 4)
    _axes_as_input = _op == "ReduceSum"  # ReduceSum took its axes as an input from opset 13

    def _red(id_, axes, keepdims, *, opset=OPSET, op=_op, x_=_x, as_input=_axes_as_input, **kw):
        if axes is None:
            return one(id_, op, [x_], opset=opset, keepdims=keepdims, **kw)
        if as_input or opset >= 18:
            return one(id_, op, [x_, ci(axes)], opset=opset, keepdims=keepdims, **kw)
        return one(id_, op, [x_], opset=opset, axes=axes, keepdims=keepdims, **kw)

    _REDUCE += [
        _red(f"{_n}_axis1_keepdims", [1], 1),
        _red(f"{_n}_axis1_nokeepdims", [1], 0),
        _red(f"{_n}_negative_axes_nokeepdims", [-1, 0], 0),
        _red(f"{_n}_negative_axis_keepdims", [-2], 1),
        _red(f"{_n}_all_nokeepdims", None, 0),
        _red(f"{_n}_all_keepdims", None, 1),
        _red(f"{_n}_opset18_axes_input", [-1], 0, opset=18),
        _red(f"{_n}_opset18_noop_empty_axes", None, 1, opset=18, noop_with_empty_axes=1),
    ]

_SHAPE = [
    one("reshape", "Reshape", [x(2, 3, 4), ci([4, -1])]),
    one("reshape_zero_dim", "Reshape", [x(2, 3, 4), ci([0, 12])]),
    one("flatten_axis2", "Flatten", [x(*X4)], axis=2),
    one("flatten_default", "Flatten", [x(*X4)]),
    one("squeeze_axes", "Squeeze", [x(2, 1, 4, 1), ci([1, -1])]),
    one("squeeze_all", "Squeeze", [x(2, 1, 4, 1)]),
    one("unsqueeze", "Unsqueeze", [x(2, 3), ci([0, -1])]),
    one("transpose_perm", "Transpose", [x(*X4)], perm=[2, 0, 3, 1]),
    one("transpose_default", "Transpose", [x(2, 3, 4)]),
    one("expand", "Expand", [x(3, 1), ci([2, 3, 4])]),
    one("expand_same_rank", "Expand", [x(1, 3, 1), ci([2, 1, 4])]),
    one("expand_smaller_shape", "Expand", [x(2, 3, 4), ci([3, 1])]),
    one("concat_axis1_three", "Concat", [x(2, 3, 4), c(2, 2, 4), x(2, 1, 4)], axis=1),
    one("concat_axis1_some_not_wrt", "Concat", [x(2, 3, 4), nog(2, 2, 4), x(2, 1, 4)], axis=1),
    one("concat_negative_axis", "Concat", [x(2, 3, 4), x(2, 3, 2)], axis=-1),
    one("split_sizes_all_used", "Split", [x(2, 6, 3), ci([2, 3, 1])], n_out=3, axis=1),
    one("split_sizes_one_used", "Split", [x(2, 6, 3), ci([2, 3, 1])], n_out=3, out=1, axis=1),
    one("split_equal_last_used", "Split", [x(6, 4)], n_out=3, out=2),
    one("split_num_outputs_opset18", "Split", [x(2, 7)], opset=18, n_out=3, out=1, axis=1, num_outputs=3),
    graph(
        "split_two_of_three_used",
        [
            node("Split", ["a", "sizes"], ["p", "q", "r"], axis=1),
            node("Mul", ["p", "r"], ["y"]),
        ],
        {"a": x(2, 6, 3), "sizes": ci([2, 2, 2])},
        "y",
    ),
    one("slice_step2", "Slice", [x(3, 8), ci([1]), ci([8]), ci([1]), ci([2])]),
    one("slice_negative_step", "Slice", [x(3, 8), ci([-2]), ci([-I64_MAX]), ci([1]), ci([-1])]),
    one("slice_negative_step2", "Slice", [x(3, 8), ci([6]), ci([0]), ci([1]), ci([-2])]),
    one("slice_negative_starts", "Slice", [x(3, 8), ci([-3]), ci([I64_MAX])]),
    one("slice_axes_subset", "Slice", [x(4, 5, 6), ci([1, 0]), ci([4, 3]), ci([2, 0])]),
    one(
        "slice_axes_negative_with_steps",
        "Slice",
        [x(4, 5, 6), ci([0, 1]), ci([5, 6]), ci([-1, -2]), ci([2, 3])],
    ),
    one("gather_axis0_repeated", "Gather", [x(4, 3), ci([[0, 2], [2, 1]])]),
    one("gather_axis1_negative", "Gather", [x(2, 4, 3), ci([-1, 0, 3, 3])], axis=1),
    one("gather_scalar_index", "Gather", [x(4, 3), ci(2)]),
    one("gather_scalar_index_axis1", "Gather", [x(4, 3, 2), ci(1)], axis=1),
    one("gather_elements_axis1", "GatherElements", [x(3, 4), ci([[0, 0, 3], [1, 2, 2], [3, 3, 3]])], axis=1),
    one("gather_elements_axis0", "GatherElements", [x(3, 4), ci([[0, 1, 2, 2], [2, 2, 0, -1]])]),
    one("gather_nd", "GatherND", [x(3, 4, 2), ci([[0, 1], [2, 3], [0, 1]])]),
    one("scatter_elements_axis1", "ScatterElements", [x(3, 4), ci([[0, 3], [2, 1], [-1, 0]]), x(3, 2)],
        axis=1),
    one("scatter_elements_axis0", "ScatterElements", [x(3, 4), ci([[2, 0, 1, 2]]), x(1, 4)]),
    one("scatter_elements_add_repeats", "ScatterElements",
        [x(2, 5), ci([[0, 0, 4, 1], [3, 3, 3, 2]]), x(2, 4)], axis=1, reduction="add", opset=18),
    one("gather_nd_batch_dims", "GatherND", [x(2, 3, 4), ci([[[1], [1]], [[2], [0]]])], batch_dims=1),
    one("tile", "Tile", [x(2, 3, 2), ci([2, 1, 3])]),
    one("pad_constant_value", "Pad", [x(2, 3, 4), ci([0, 1, 2, 0, 2, 1]), cf(1.5)]),
    one("pad_constant_default", "Pad", [x(3, 4), ci([1, 1, 1, 1])]),
    one("pad_reflect", "Pad", [x(1, 2, 4, 5), ci([0, 0, 2, 1, 0, 0, 1, 3])], mode="reflect"),
    one("pad_edge", "Pad", [x(1, 2, 4, 5), ci([0, 0, 2, 1, 0, 0, 3, 2])], mode="edge"),
    one("pad_negative_crop", "Pad", [x(2, 3, 6), ci([0, -1, -2, 0, 0, -1])]),
    one("pad_mixed_sign", "Pad", [x(2, 3, 6), ci([0, 2, -2, 0, -1, 1]), cf(-0.5)]),
    one("pad_negative_reflect", "Pad", [x(3, 6), ci([1, -2, 1, 1])], mode="reflect"),
    one("pad_axes_opset18", "Pad", [x(2, 3, 4), ci([1, 2, 0, 1]), cf(0.25), ci([-1, 1])], opset=18),
    one("flatten_axis0", "Flatten", [x(2, 3, 4)], axis=0),
    one("unsqueeze_scalar", "Unsqueeze", [x(), ci([0, 1])]),
    one("gather_2d_indices_axis_last", "Gather", [x(2, 3, 4), ci([[3, 0], [0, 0], [-1, 2]])], axis=-1),
    one("slice_ends_out_of_range", "Slice", [x(3, 8), ci([-100, 2]), ci([100, 100])]),
    one("pad_opset11", "Pad", [x(2, 5), ci([1, 2, 0, 1]), cf(0.5)], opset=11),
    one("pad_reflect_max", "Pad", [x(3, 4), ci([2, 3, 2, 3])], mode="reflect"),
    one("pad_edge_negative", "Pad", [x(3, 5), ci([2, -1, -1, 3])], mode="edge"),
    one("tile_ones", "Tile", [x(2, 3), ci([1, 1])]),
    one("reverse_sequence", "ReverseSequence", [x(4, 3, 2), ci([4, 1, 3])], batch_axis=1, time_axis=0),
]


def resize(id_, x_shape, *, scales=None, sizes=None, opset=OPSET, **attrs) -> Case:
    ins = [x(*x_shape), "" if opset >= 13 else cf(np.zeros(0))]  # roi was required before 13
    if scales is not None:
        ins.append(cf(scales))
    if sizes is not None:
        ins += ["", ci(sizes)] if scales is None else [ci(sizes)]
    return one(id_, "Resize", ins, opset=opset, **attrs)


_NEAREST_FLOOR = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
_RESIZE = [
    resize("resize_nearest_asymmetric_floor_x2", (1, 2, 3, 4), scales=[1, 1, 2, 2], **_NEAREST_FLOOR),
    resize("resize_nearest_default_sizes", (1, 2, 4, 5), sizes=[1, 2, 7, 9], mode="nearest"),
    resize("resize_linear_half_pixel_x2", (1, 2, 3, 4), scales=[1, 1, 2, 2], mode="linear"),
    resize("resize_linear_half_pixel_down_half", (1, 2, 8, 6), scales=[1, 1, 0.5, 0.5], mode="linear"),
    resize(
        "resize_linear_align_corners_sizes",
        (1, 2, 4, 5),
        sizes=[1, 2, 7, 9],
        mode="linear",
        coordinate_transformation_mode="align_corners",
    ),
    resize(
        "resize_linear_pytorch_half_pixel",
        (1, 1, 4, 5),
        sizes=[1, 1, 1, 9],
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
    ),
    resize("resize_cubic_x2", (1, 2, 4, 4), scales=[1, 1, 2, 2], mode="cubic"),
    resize(
        "resize_cubic_sizes_a_minus_half",
        (1, 1, 4, 5),
        sizes=[1, 1, 6, 3],
        mode="cubic",
        cubic_coeff_a=-0.5,
        exclude_outside=1,
    ),
    resize("resize_linear_channel_axis", (1, 2, 3, 4), scales=[1, 2, 1, 1], mode="linear"),
    resize(
        "resize_nearest_round_prefer_ceil",
        (1, 1, 3, 5),
        scales=[1, 1, 1.7, 2.4],
        mode="nearest",
        nearest_mode="round_prefer_ceil",
    ),
    resize("resize_nearest_ceil_down", (1, 1, 7, 8), sizes=[1, 1, 3, 5], mode="nearest", nearest_mode="ceil"),
    resize(
        "resize_linear_half_pixel_symmetric",
        (1, 1, 4, 5),
        sizes=[1, 1, 7, 3],
        opset=19,
        mode="linear",
        coordinate_transformation_mode="half_pixel_symmetric",
    ),
    resize("resize_linear_down_non_integer", (1, 1, 7, 9), scales=[1, 1, 0.6, 0.45], mode="linear"),
    resize("resize_linear_batch_axis", (2, 2, 3), scales=[1.5, 1, 2], mode="linear"),
    resize(
        "resize_cubic_antialias_down",
        (1, 1, 8, 9),
        scales=[1, 1, 0.5, 0.7],
        opset=18,
        mode="cubic",
        antialias=1,
    ),
    resize("resize_nearest_rank3", (2, 3, 4), scales=[1, 1, 2], **_NEAREST_FLOOR),
    resize("resize_linear_axes_opset18", (1, 2, 3, 4), scales=[2, 1.5], opset=18, axes=[2, 3], mode="linear"),
    resize(
        "resize_linear_antialias_down",
        (1, 1, 8, 8),
        scales=[1, 1, 0.5, 0.5],
        opset=18,
        mode="linear",
        antialias=1,
    ),
]

# Symbolic (unknown at build time) dims: rules must fall back to run-time shapes.
_DYNAMIC = [
    one("dyn_add_broadcast", "Add", [x(2, 3, 4, sym=("N",)), x(3, 1)]),
    one("dyn_mul_both_unknown", "Mul", [x(2, 3, sym=("N", "M")), x(1, 3, sym=("K",))]),
    one("dyn_matmul", "MatMul", [x(2, 3, 4, sym=("N",)), x(4, 5)]),
    one("dyn_reduce_mean", "ReduceMean", [x(2, 3, 4, sym=("N", "C"))], axes=[0, 1], keepdims=0),
    one("dyn_global_avgpool", "GlobalAveragePool", [x(2, 3, 4, 5, sym=("N", None, "H", "W"))]),
    one("dyn_concat", "Concat", [x(2, 3, sym=("N",)), x(2, 2, sym=("N",))], axis=1),
    one("dyn_conv_batch", "Conv", [x(2, 2, 5, 5, sym=("N",)), c(3, 2, 3, 3), x(3)], pads=[1, 1, 1, 1]),
    one("dyn_layernorm", "LayerNormalization", [x(2, 3, 4, sym=("N",)), c(4), c(4)]),
    one("dyn_maxpool_batch", "MaxPool", [x(2, 1, 5, 5, sym=("N",))], kernel_shape=[2, 2]),
    one(
        "dyn_avgpool_batch",
        "AveragePool",
        [x(2, 1, 5, 5, sym=("N",))],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
    ),
    one("dyn_expand", "Expand", [x(3, 1, sym=("N",)), ci([2, 1, 4])]),
    one("dyn_slice", "Slice", [x(3, 8, sym=("N",)), ci([1]), ci([7]), ci([1]), ci([3])]),
    one("dyn_gemm", "Gemm", [x(3, 4, sym=("N",)), c(5, 4), x(5)], transB=1),
    one("dyn_softmax", "Softmax", [x(2, 5, sym=("N",))]),
    one("dyn_resize_scales", "Resize", [x(2, 1, 3, 4, sym=("N",)), "", cf([1, 1, 2, 2])], mode="linear"),
    replace(
        one(
            "dyn_resize_sizes_axes",
            "Resize",
            [x(2, 1, 3, 4, sym=("N",)), "", "", ci([5, 7])],
            opset=18,
            axes=[2, 3],
            mode="linear",
        ),
    ),
]

_SAME_INPUT_TWICE = [
    graph("mul_x_by_x", [node("Mul", ["a", "a"], ["y"])], {"a": x(3, 4)}, "y"),
    graph("max_x_x", [node("Max", ["a", "a"], ["y"])], {"a": x(3, 4)}, "y"),
    graph("concat_x_x", [node("Concat", ["a", "a"], ["y"], axis=0)], {"a": x(2, 3)}, "y"),
    graph(
        "matmul_x_xt",
        [node("Transpose", ["a"], ["t"]), node("MatMul", ["a", "t"], ["y"])],
        {"a": x(3, 4)},
        "y",
    ),
    graph("pow_x_x", [node("Pow", ["a", "a"], ["y"])], {"a": pos(3, 4)}, "y"),
    # SiLU (x sigmoid(x)) has a fused rule in Mul; the Sigmoid may also feed another node
    graph("silu", [node("Sigmoid", ["a"], ["s"]), node("Mul", ["a", "s"], ["y"])],
          {"a": x(3, 4, lo=-6, hi=6)}, "y"),
    graph("silu_sigmoid_first", [node("Sigmoid", ["a"], ["s"]), node("Mul", ["s", "a"], ["y"])],
          {"a": x(2, 5)}, "y"),
    graph("silu_sigmoid_shared",
          [node("Sigmoid", ["a"], ["s"]), node("Mul", ["a", "s"], ["m"]), node("Mul", ["s", "b"], ["t"]),
           node("Add", ["m", "t"], ["y"])], {"a": x(3, 4), "b": x(3, 4)}, "y"),
    graph("swish_of_another_tensor", [node("Sigmoid", ["b"], ["s"]), node("Mul", ["a", "s"], ["y"])],
          {"a": x(3, 4), "b": x(3, 4)}, "y"),
    # exact GELU as the TorchScript exporter writes it, 0.5 * (x * (1 + erf(x / sqrt 2))), has a
    # fused rule in Mul; its 1 + erf may also feed another node
    graph("gelu_erf_div",
          [node("Div", ["a", "r2"], ["h"]), node("Erf", ["h"], ["e"]), node("Add", ["e", "one"], ["b"]),
           node("Mul", ["a", "b"], ["m"]), node("Mul", ["m", "half"], ["y"])],
          {"a": x(3, 4, lo=-4, hi=4), "r2": cf(math.sqrt(2)), "one": cf(1.0), "half": cf(0.5)}, "y"),
    graph("gelu_erf_mul_operands_swapped",
          [node("Mul", ["inv_r2", "a"], ["h"]), node("Erf", ["h"], ["e"]), node("Add", ["one", "e"], ["b"]),
           node("Mul", ["b", "a"], ["m"]), node("Mul", ["m", "half"], ["y"])],
          {"a": x(2, 5, lo=-4, hi=4), "inv_r2": cf(1 / math.sqrt(2)), "one": cf(1.0), "half": cf(0.5)}, "y"),
    graph("gelu_erf_shared",
          [node("Div", ["a", "r2"], ["h"]), node("Erf", ["h"], ["e"]), node("Add", ["e", "one"], ["b"]),
           node("Mul", ["a", "b"], ["m"]), node("Mul", ["b", "c"], ["t"]), node("Add", ["m", "t"], ["y"])],
          {"a": x(3, 4), "c": x(3, 4), "r2": cf(math.sqrt(2)), "one": cf(1.0)}, "y"),
    # a LayerNormalization of a channels-first tensor permuted channels-last is differentiated
    # channels-first (ConvNeXt); the permuted tensor may feed other nodes too
    graph("layernorm_channels_last_2d",
          [node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
           node("LayerNormalization", ["t", "s", "b"], ["y"], axis=-1, epsilon=1e-6)],
          {"a": x(2, 3, 4, 5), "s": c(3), "b": c(3)}, "y"),
    graph("layernorm2d_permuted_back",
          [node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
           node("LayerNormalization", ["t", "s", "b"], ["n"], axis=3),
           node("Transpose", ["n"], ["y"], perm=[0, 3, 1, 2])],
          {"a": x(2, 4, 3, 3), "s": c(4), "b": c(4)}, "y"),
    graph("layernorm_channels_last_1d_shared",
          [node("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
           node("LayerNormalization", ["t", "s"], ["n"], axis=-1), node("Mul", ["n", "t"], ["y"])],
          {"a": x(2, 3, 5), "s": c(3)}, "y"),
    graph("layernorm_of_other_permutation",  # channels moved elsewhere: the generic rule
          [node("Transpose", ["a"], ["t"], perm=[0, 3, 1, 2]),
           node("LayerNormalization", ["t", "s", "b"], ["y"], axis=-1)],
          {"a": x(2, 3, 4, 5), "s": c(4), "b": c(4)}, "y"),
    graph("erf_of_another_scale",  # x (1 + erf(x / 2)) is no GELU: the generic rules
          [node("Div", ["a", "two"], ["h"]), node("Erf", ["h"], ["e"]), node("Add", ["e", "one"], ["b"]),
           node("Mul", ["a", "b"], ["y"])],
          {"a": x(3, 4), "two": cf(2.0), "one": cf(1.0)}, "y"),
]

# Older opsets: build_vjp_model converts them to opset 17 first; the check runs the original.
_LEGACY = [
    replace(
        one("legacy_softmax_opset11_axis1_3d", "Softmax", [x(2, 3, 4)], opset=11, axis=1),
        reference_is_wrong="ReferenceEvaluator applies opset-13 Softmax semantics to opset 11",
    ),
    replace(
        one("legacy_logsoftmax_opset11_default_axis", "LogSoftmax", [x(2, 3, 4)], opset=11),
        reference_is_wrong="ReferenceEvaluator applies opset-13 LogSoftmax semantics to opset 11",
    ),
    one("legacy_reducesum_opset11_axes_attr", "ReduceSum", [x(2, 3, 4)], opset=11, axes=[-1], keepdims=0),
    one("legacy_reducemean_opset13", "ReduceMean", [x(2, 3, 4)], opset=13, axes=[0, 2]),
    one("legacy_split_opset11_attr", "Split", [x(2, 5)], opset=11, n_out=2, out=1, axis=1, split=[2, 3]),
    one("legacy_squeeze_opset11", "Squeeze", [x(2, 1, 3)], opset=11, axes=[1]),
    one("legacy_unsqueeze_opset11", "Unsqueeze", [x(2, 3)], opset=11, axes=[0, 3]),
    one("legacy_clip_opset6", "Clip", [x(3, 4, avoid=(-0.5, 0.5))], opset=6, min=-0.5, max=0.5),
    one("legacy_dropout_opset7", "Dropout", [x(3, 4)], opset=7, ratio=0.3),
    replace(
        one(
            "legacy_batchnorm_opset9",
            "BatchNormalization",
            [x(*X4), c(3), c(3), c(3), pos(3, const=True)],
            opset=9,
        ),
        reference_is_wrong="ReferenceEvaluator BatchNormalization_9 uses batch statistics (default momentum)",
    ),
    one("legacy_gemm_opset6_broadcast", "Gemm", [x(3, 4), x(4, 5), x(5)], opset=6, broadcast=1, beta=0.5),
    one("legacy_maxpool_opset8", "MaxPool", [x(1, 2, 5, 5)], opset=8, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    one(
        "legacy_avgpool_opset10_ceil",
        "AveragePool",
        [x(1, 2, 6, 6)],
        opset=10,
        kernel_shape=[3, 3],
        strides=[2, 2],
        ceil_mode=1,
    ),
    one("legacy_slice_opset9_attrs", "Slice", [x(3, 6)], opset=9, starts=[1, 0], ends=[3, 5], axes=[0, 1]),
    one("legacy_pad_opset2_attrs", "Pad", [x(2, 3)], opset=2, pads=[0, 1, 1, 0], mode="edge"),
    resize("legacy_resize_opset11_linear", (1, 1, 3, 4), scales=[1, 1, 2, 2], opset=11, mode="linear"),
    one("legacy_upsample_free_concat_opset4", "Concat", [x(2, 3), x(2, 1)], opset=4, axis=1),
    one("legacy_flatten_opset9", "Flatten", [x(2, 3, 4)], opset=9, axis=2),
    one("legacy_leaky_relu_opset6", "LeakyRelu", [x(3, 4, **RELU_AVOID)], opset=6, alpha=0.2),
    one("legacy_gather_opset11", "Gather", [x(4, 3), ci([3, -1, 0])], opset=11),
]

# Mixed precision: float32 model input, a DOUBLE (or FLOAT16) section, float32 output, as
# produced by e.g. float16 converters that keep float32 I/O. Rules emit float32 constants
# whatever the tensor type, which ORT rejects (the reference evaluator does not care).
_MIXED_OPS = {  # op -> (input shape, attributes, extra float initializers, ORT has a double kernel)
    "Relu": ((2, 3), {}, (), True),
    "Sigmoid": ((2, 3), {}, (), True),
    "Tanh": ((2, 3), {}, (), True),
    "LeakyRelu": ((2, 3), {"alpha": 0.1}, (), True),
    "Elu": ((2, 3), {}, (), False),
    "Erf": ((2, 3), {}, (), False),
    "HardSigmoid": ((2, 3), {}, (), False),
    "Sqrt": ((2, 3), {}, (), True),
    "Exp": ((2, 3), {}, (), True),
    "Softmax": ((2, 3), {}, (), True),
    "MaxPool": ((1, 1, 4, 4), {"kernel_shape": [2, 2]}, (), True),
    "AveragePool": ((1, 1, 4, 4), {"kernel_shape": [2, 2]}, (), False),
    "GlobalAveragePool": ((1, 2, 3, 3), {}, (), False),
    "ReduceMean": ((2, 3), {"axes": [1]}, (), True),
    "LayerNormalization": ((2, 4), {}, ((4,),), True),
    "MatMul": ((2, 3), {}, ((3, 4),), True),
}


def mixed(op: str, elem: int) -> Case:
    shape, attrs, extra, _ = _MIXED_OPS[op]
    avoid = {"avoid": (0.0,)} if op in ("Relu", "LeakyRelu", "Elu") else {}
    ins = {"a": pos(*shape) if op == "Sqrt" else x(*shape, **avoid)}
    names = ["h"]
    for i, extra_shape in enumerate(extra):
        ins[f"w{i}"] = c(*extra_shape)
        names.append(f"w{i}h")
    nodes = [node("Cast", ["a"], ["h"], to=elem)]
    nodes += [node("Cast", [f"w{i}"], [f"w{i}h"], to=elem) for i in range(len(extra))]
    nodes += [node(op, names, ["r"], **attrs), node("Cast", ["r"], ["y"], to=F)]
    type_name = TensorProto.DataType.Name(elem)
    return graph(f"mixed_{type_name.lower()}_{op.lower()}", nodes, ins, "y")


# ONNX Runtime's CPU provider has no float64 Elu, Erf, HardSigmoid or AveragePool kernels, so
# a double section of those cannot even run forward there.
_MIXED = [mixed(op, TensorProto.DOUBLE) for op, (*_, has_double) in _MIXED_OPS.items() if has_double]

_TWO_NODE = [
    graph(
        "fan_out_sum",
        [node("Relu", ["a"], ["r"]), node("Mul", ["r", "a"], ["y"])],
        {"a": x(3, 4, **RELU_AVOID)},
        "y",
    ),
    graph(
        "conv_relu",
        [node("Conv", ["a", "w"], ["h"], pads=[1, 1, 1, 1]), node("Relu", ["h"], ["y"])],
        {"a": x(1, 2, 5, 5), "w": c(3, 2, 3, 3)},
        "y",
    ),
    graph(
        "matmul_add",
        [node("MatMul", ["a", "w"], ["h"]), node("Add", ["h", "b"], ["y"])],
        {"a": x(2, 4), "w": x(4, 3), "b": x(3)},
        "y",
    ),
]

CASES: list[Case] = [
    *_BINARY,
    *_POW,
    *_UNARY,
    *_VARIADIC,
    *_MATMUL,
    *_GEMM,
    *_CONV,
    *_CONV_COL2IM,
    *_CONV_TRANSPOSE,
    *_MAXPOOL,
    *_AVGPOOL,
    *_NORM,
    *_REDUCE,
    *_SHAPE,
    *_RESIZE,
    *_DYNAMIC,
    *_SAME_INPUT_TWICE,
    *_LEGACY,
    *_MIXED,
    *_TWO_NODE,
]

# --------------------------------------------------------------------------- building


def _vi(name: str, arr: np.ndarray, sym: tuple = ()) -> onnx.ValueInfoProto:
    dims = list(arr.shape)
    for i, s in enumerate(sym):
        if s is not None:
            dims[i] = s
    return helper.make_tensor_value_info(name, _NP_TO_ONNX[arr.dtype], dims)


def _make_model(graph_: onnx.GraphProto, opset: int, extra_opsets=()) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph_, opset_imports=opsets, ir_version=IR_VERSION)


def build(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """The float32 forward model of ``case``, its feeds, and the names to differentiate."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    inputs, inits, feeds, wrt = [], [], {}, []
    dynamic = False
    for name, spec in case.inputs:
        value = spec.sample(rng)
        if spec.const:
            inits.append(numpy_helper.from_array(value, name))
            continue
        dynamic |= any(s is not None for s in spec.sym)
        inputs.append(_vi(name, value, spec.sym))
        feeds[name] = value
        if spec.grad and value.dtype.kind == "f":
            wrt.append(name)
    probe_outputs = [helper.make_empty_tensor_value_info(case.output)]
    probe = _make_model(
        helper.make_graph(list(case.nodes), case.id, inputs, probe_outputs, inits), case.opset
    )
    if dynamic:  # shape inference derives the symbolic output shapes
        outputs = list(onnx.shape_inference.infer_shapes(probe, strict_mode=True).graph.output)
    else:  # static: declare the shapes the reference evaluator computes
        values = run_reference(probe, feeds)
        outputs = [_vi(name, np.asarray(value)) for name, value in values.items()]
    model = _make_model(helper.make_graph(list(case.nodes), case.id, inputs, outputs, inits), case.opset)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.shape_inference.InferenceError:
        # Below opset 22 ONNX shape inference keeps a ceil_mode pooling window that starts in
        # the end padding; ONNX Runtime and the reference evaluator drop it (as declared here).
        assert any(a.name == "ceil_mode" and a.i for n in case.nodes for a in n.attribute)
        onnx.checker.check_model(model)
    return model, feeds, wrt


# --------------------------------------------------------------------------- checking


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _ort_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    out = {}
    for name, value in feeds.items():
        if name in types:
            out[name] = np.asarray(value).astype(helper.tensor_dtype_to_np_dtype(types[name]))
    return out


def check_rule(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    wrt: list[str],
    output: str,
    *,
    rtol: float = RTOL,
    ort_rtol: float = ORT_RTOL,
    ort_forward_tol: float | None = None,
    seed: int = 0,
    use_ort: bool = True,
    reference_forward: onnx.ModelProto | None = None,
) -> dict[str, float]:
    """Checks (a) the float64 VJP against central differences and (b) the float32 VJP on ORT.

    ``reference_forward`` replaces ``model`` as the function differentiated numerically
    (for operators the reference evaluator gets wrong). Returns ``{"fd": float64 relative
    error, "ort": ORT relative error or nan}``.
    """
    assert wrt, "nothing to differentiate"
    vjp = build_vjp_model(model, wrt, output)
    fwd64, vjp64 = to_float64(reference_forward or model), to_float64(vjp)
    rel_fd = check_vjp(fwd64, vjp64, feeds, wrt=wrt, output=output, rtol=rtol, atol=1e-9, seed=seed)
    rel_ort = float("nan")
    if use_ort:
        rel_ort = ort_check(
            vjp, fwd64, vjp64, feeds, wrt, output, rtol=ort_rtol, forward_tol=ort_forward_tol, seed=seed
        )
    return {"fd": rel_fd, "ort": rel_ort}


def ort_check(
    vjp: onnx.ModelProto,
    fwd64: onnx.ModelProto,
    vjp64: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    wrt: list[str],
    output: str,
    *,
    rtol: float = ORT_RTOL,
    forward_tol: float | None = None,
    seed: int = 0,
) -> float:
    """Runs the VJP graph ``vjp`` on ONNX Runtime and compares it with the float64 VJP.

    Uses the cotangent and directions that ``check_vjp(..., seed=seed)`` draws. The ORT
    forward output must match the reference forward (``forward_tol``, default ``rtol``,
    relative to its largest magnitude); the projected gradient must match to ``rtol``
    relative to ``sum |g64 * v|``. Returns that relative error.
    """
    rng = np.random.default_rng(seed)
    y64 = run_reference(fwd64, feeds, [output])[output]
    u = rng.standard_normal(y64.shape)
    directions = {}
    for w in wrt:
        v = rng.standard_normal(np.shape(feeds[w]))
        directions[w] = v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v
    g64 = run_reference(vjp64, {**feeds, "cotangent": u}, [f"grad_{w}" for w in wrt])

    session = _session(vjp)  # must load: production runs the VJP graph on ORT
    names = [output] + [f"grad_{w}" for w in wrt]
    got = dict(zip(names, session.run(names, _ort_feeds(vjp, {**feeds, "cotangent": u})), strict=True))

    y_ort = np.asarray(got[output], np.float64)
    assert y_ort.shape == y64.shape, f"ORT output shape {y_ort.shape}, reference {y64.shape}"
    forward_tol = rtol if forward_tol is None else forward_tol
    fwd_err = np.max(np.abs(y_ort - y64), initial=0.0)
    assert fwd_err <= forward_tol * max(np.max(np.abs(y64), initial=0.0), 1e-6), (
        f"ONNX Runtime and the reference evaluator disagree on the forward output: max |diff| {fwd_err:.3e}"
    )

    p_ort = p64 = scale = 0.0
    for w in wrt:
        g_ort = np.asarray(got[f"grad_{w}"], np.float64)
        assert g_ort.shape == np.shape(feeds[w]), f"ORT grad_{w} has shape {g_ort.shape}"
        p_ort += float(np.vdot(g_ort, directions[w]))
        p64 += float(np.vdot(g64[f"grad_{w}"], directions[w]))
        scale += float(np.sum(np.abs(g64[f"grad_{w}"] * directions[w])))
    diff = abs(p_ort - p64)
    assert diff <= rtol * scale + 1e-7, (
        f"the VJP on ONNX Runtime disagrees with the float64 VJP: projected {p_ort!r} vs {p64!r} "
        f"(|diff| {diff:.3e}, scale {scale:.3e})"
    )
    return diff / scale if scale > 0 else 0.0


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


def _mixed_float16_params():
    for op in _MIXED_OPS:
        case = mixed(op, TensorProto.FLOAT16)
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_mixed_float16_params()))
def test_mixed_float16_section(case: Case):
    """A float16 section (float32 I/O): the VJP must run on ORT (float16-accurate only)."""
    model, feeds, wrt = build(case)
    # float16 sections hold float16 constants, so even the float64 check is float16-accurate
    check_rule(model, feeds, wrt, case.output, rtol=1e-3, ort_rtol=2e-2, ort_forward_tol=2e-3)


def test_case_ids_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("case", list(_params()))
def test_rule(case: Case):
    model, feeds, wrt = build(case)
    reference_forward = None
    if case.reference_is_wrong:
        reference_forward = normalise_opset(model)
        expected = _session(model).run([case.output], _ort_feeds(model, feeds))[0]
        converted = run_reference(reference_forward, feeds, [case.output])[case.output]
        np.testing.assert_allclose(converted, expected, rtol=1e-5, atol=1e-6)
    check_rule(
        model,
        feeds,
        wrt,
        case.output,
        reference_forward=reference_forward,
        use_ort=case.no_ort is None,
    )


@pytest.mark.parametrize("case", _CONV_COL2IM, ids=str)
def test_col2im_cases_take_the_col2im_form(case: Case):
    model, _, wrt = build(case)
    ops = [n.op_type for n in build_vjp_model(model, wrt, case.output).graph.node]
    assert "Col2Im" in ops and "ConvTranspose" not in ops
    at_opset_17 = build_vjp_model(_make_model(model.graph, OPSET), wrt, case.output)
    assert "Col2Im" not in [n.op_type for n in at_opset_17.graph.node]


_CONTIGUOUS_SLICES = [c for c in CASES if c.id in ("slice_negative_starts", "slice_axes_subset",
                                                     "slice_ends_out_of_range")]


@pytest.mark.parametrize("case", _CONTIGUOUS_SLICES, ids=str)
def test_a_contiguous_slice_takes_the_pad_form(case: Case):
    """Its adjoint pads dy with zeros; no scatter over every position of the input (which made
    the torch.export-based exports of attention models 1.2-1.3x slower to differentiate)."""
    model, _, wrt = build(case)
    ops = [n.op_type for n in build_vjp_model(model, wrt, case.output).graph.node]
    assert "Pad" in ops and "ScatterElements" not in ops and "Range" not in ops


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("silu", "silu_sigmoid_first")], ids=str)
def test_silu_takes_the_fused_form(case: Case):
    """x sigmoid(x)'s gradient in four passes: no second path through the Sigmoid, no Sum."""
    model, _, wrt = build(case)
    forward = len(model.graph.node)
    ops = [n.op_type for n in build_vjp_model(model, wrt, case.output).graph.node][forward:]
    assert "Sum" not in ops and ops.count("Mul") == 2 and ops.count("Sub") == 1, ops


_ERF_GELUS = ("gelu_erf_div", "gelu_erf_mul_operands_swapped")


@pytest.mark.parametrize("case", [c for c in CASES if c.id in _ERF_GELUS], ids=str)
def test_erf_gelu_takes_the_fused_form(case: Case):
    """x (1 + erf(x / sqrt 2))'s gradient from the forward's own x / sqrt 2 and 1 + erf: no Erf
    recomputed, no second path through the Erf, no constant multiplied in a pass of its own."""
    model, _, wrt = build(case)
    forward = len(model.graph.node)
    ops = [n.op_type for n in build_vjp_model(model, wrt, case.output).graph.node][forward:]
    assert "Erf" not in ops and "Sum" not in ops and ops.count("Exp") == 1, ops
    assert ops.count("Mul") == 4, ops  # 0.5 dy, h h, x bell, dy slope


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith("layernorm") and "channels_last" in c.id
                                  or c.id == "layernorm2d_permuted_back"], ids=str)
def test_a_channels_last_layernorm_is_differentiated_channels_first(case: Case):
    """Its statistics broadcast over the channels-first tensor: the reductions run over axis 1."""
    model, _, wrt = build(case)
    forward = len(model.graph.node)
    vjp = build_vjp_model(model, wrt, case.output)
    initializers = {t.name: numpy_helper.to_array(t).tolist() for t in vjp.graph.initializer}
    reductions = [n for n in vjp.graph.node[forward:] if n.op_type == "ReduceMean"]
    axes = [initializers[n.input[1]] if len(n.input) > 1 else list(helper.get_attribute_value(
                next(a for a in n.attribute if a.name == "axes")))
            for n in reductions]
    assert axes == [[1], [1]], axes


# --------------------------------------------------------------------------- kinks (exact values)


def _single(op: str, shapes: list, attrs: dict | None = None, inits=(), opset=OPSET, n_out=1):
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(n, F, s) for n, s in zip(names, shapes, strict=True)]
    in_names = names + [t.name for t in inits]
    outs = ["y"] + [f"y{k}" for k in range(1, n_out)]
    nd = helper.make_node(op, in_names, outs, **(attrs or {}))
    model = _make_model(
        helper.make_graph([nd], op, inputs, [helper.make_empty_tensor_value_info("y")], list(inits)), opset
    )
    return onnx.shape_inference.infer_shapes(model), names


def _vjp_both(model, wrt, feeds, cot):
    """The float32 VJP evaluated by the reference evaluator and by ONNX Runtime."""
    vjp = build_vjp_model(model, wrt, "y")
    names = [f"grad_{w}" for w in wrt]
    all_feeds = {**feeds, "cotangent": cot}
    ref = run_reference(vjp, all_feeds, names)
    got = dict(zip(names, _session(vjp).run(names, _ort_feeds(vjp, all_feeds)), strict=True))
    return ref, got


def test_kink_relu_at_zero_has_zero_gradient():
    model, _ = _single("Relu", [[5]])
    xv = np.array([-1.0, 0.0, 2.0, -0.0, 3.0], np.float32)
    cot = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, cot):
        np.testing.assert_array_equal(grads["grad_x0"], [0.0, 0.0, 3.0, 0.0, 5.0])


def test_kink_leaky_relu_at_zero_has_alpha():
    model, _ = _single("LeakyRelu", [[4]], {"alpha": 0.25})
    xv = np.array([-1.0, 0.0, 2.0, -0.0], np.float32)
    cot = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, cot):
        np.testing.assert_array_equal(grads["grad_x0"], [0.25, 0.5, 3.0, 1.0])


def test_kink_prelu_at_zero_has_slope():
    model, _ = _single("PRelu", [[4], [1]])
    xv = np.array([-1.0, 0.0, 2.0, 0.0], np.float32)
    cot = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    feeds = {"x0": xv, "x1": np.array([0.5], np.float32)}
    for grads in _vjp_both(model, ["x0", "x1"], feeds, cot):
        np.testing.assert_array_equal(grads["grad_x0"], [0.5, 1.0, 3.0, 2.0])
        np.testing.assert_array_equal(grads["grad_x1"], [-1.0])  # x * dy summed over x <= 0


@pytest.mark.parametrize("opset", [11, 17])
def test_kink_clip_at_bounds_passes_gradient(opset):
    inits = [numpy_helper.from_array(np.float32(-1.0), "lo"), numpy_helper.from_array(np.float32(2.0), "hi")]
    model, _ = _single("Clip", [[6]], inits=inits, opset=opset)
    xv = np.array([-1.5, -1.0, 0.0, 2.0, 2.5, 1.0], np.float32)
    cot = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], np.float32)
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, cot):
        np.testing.assert_array_equal(grads["grad_x0"], [0.0, 2.0, 3.0, 4.0, 0.0, 6.0])


def test_kink_clip_at_equal_bounds():
    """min == max: every input equal to the bound gets the gradient, others none."""
    inits = [numpy_helper.from_array(np.float32(0.5), "lo"), numpy_helper.from_array(np.float32(0.5), "hi")]
    model, _ = _single("Clip", [[3]], inits=inits)
    xv = np.array([0.0, 0.5, 1.0], np.float32)
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, np.ones(3, np.float32)):
        np.testing.assert_array_equal(grads["grad_x0"], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kink_clip_of_an_activation_is_strict(dtype):
    """Inside a network (ReLU6) the gradient passes strictly between the bounds, like torch:
    zero on either bound, one on the nearest floats inside them (a denormal above 0)."""
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    lo, hi = np.asarray(0.0, dtype), np.asarray(6.0, dtype)
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x0"], ["n"]), helper.make_node("Clip", ["n", "lo", "hi"], ["y"])],
        "clip", [helper.make_tensor_value_info("x0", elem, [6])],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(lo, "lo"), numpy_helper.from_array(hi, "hi")],
    )
    model = onnx.shape_inference.infer_shapes(_make_model(graph, OPSET))
    tiny = np.nextafter(lo, np.asarray(1, dtype))
    below_hi = np.nextafter(hi, lo)
    y = np.array([0.0, tiny, 3.0, below_hi, 6.0, -1.0], dtype)
    cot = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype)
    vjp = build_vjp_model(model, ["x0"], "y")
    (got,) = _session(vjp).run(["grad_x0"], {"x0": -y, "cotangent": cot})
    np.testing.assert_array_equal(got, -np.array([0.0, 2.0, 3.0, 4.0, 0.0, 0.0], dtype))


def test_kink_maxpool_tied_window_sends_gradient_to_first_cell():
    model, _ = _single("MaxPool", [[1, 1, 2, 3]], {"kernel_shape": [2, 3]})
    xv = np.full((1, 1, 2, 3), 1.5, np.float32)
    cot = np.full((1, 1, 1, 1), 3.0, np.float32)
    expected = np.zeros((1, 1, 2, 3), np.float32)
    expected[0, 0, 0, 0] = 3.0
    ref, got = _vjp_both(model, ["x0"], {"x0": xv}, cot)
    np.testing.assert_array_equal(got["grad_x0"], expected)  # ONNX Runtime
    np.testing.assert_array_equal(ref["grad_x0"], expected)  # reference evaluator (fixed MaxPool)


def test_kink_maxpool_tiling_windows_send_ties_to_their_first_cell():
    """Windows that tile the input (kernel = stride) take the Resize/Equal path, which must
    break ties like the Indices path and torch: the whole gradient to the first maximum."""
    model, _ = _single("MaxPool", [[1, 2, 4, 6]], {"kernel_shape": [2, 3], "strides": [2, 3]})
    xv = np.zeros((1, 2, 4, 6), np.float32)  # channel 0: every window is all ties
    xv[0, 1, 0] = [0, 5, 5, 1, 1, 1]  # window (0, 0): tie after the first cell
    xv[0, 1, 1] = [5, 0, 0, 1, 1, 2]  # window (0, 1): one maximum, in its last cell
    xv[0, 1, 2:] = -1.0
    xv[0, 1, 3, 5] = -0.5  # window (1, 1): one maximum
    cot = np.arange(1, 9, dtype=np.float32).reshape(1, 2, 2, 2)
    expected = np.zeros_like(xv)
    expected[0, 0, ::2, ::3] = cot[0, 0]
    expected[0, 1, 0, 1], expected[0, 1, 1, 5] = cot[0, 1, 0, 0], cot[0, 1, 0, 1]
    expected[0, 1, 2, 0], expected[0, 1, 3, 5] = cot[0, 1, 1, 0], cot[0, 1, 1, 1]
    ref, got = _vjp_both(model, ["x0"], {"x0": xv}, cot)
    assert "Resize" in [n.op_type for n in build_vjp_model(model, ["x0"], "y").graph.node]
    np.testing.assert_array_equal(got["grad_x0"], expected)  # ONNX Runtime
    np.testing.assert_array_equal(ref["grad_x0"], expected)  # reference evaluator


def test_kink_maxpool_overlapping_tied_windows_conserve_total():
    """Overlapping 3x3 windows over constant planes: each window sends its whole gradient to
    its own first (top-left) cell; overlapping contributions add up, the total is conserved."""
    model, _ = _single("MaxPool", [[1, 2, 4, 4]], {"kernel_shape": [3, 3], "strides": [1, 1]})
    xv = np.zeros((1, 2, 4, 4), np.float32)
    xv[0, 1] = 1.0  # both channels are constant: every window is all ties
    cot = np.arange(1, 9, dtype=np.float32).reshape(1, 2, 2, 2)
    expected = np.zeros((1, 2, 4, 4), np.float32)
    expected[0, :, :2, :2] = cot[0]
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, cot):
        np.testing.assert_array_equal(grads["grad_x0"], expected)
        assert grads["grad_x0"].sum() == cot.sum()


def test_kink_maxpool_tie_between_windows_overlap():
    """A single maximum shared by several overlapping windows collects all their gradients."""
    model, _ = _single("MaxPool", [[1, 1, 3, 3]], {"kernel_shape": [2, 2], "strides": [1, 1]})
    xv = np.zeros((1, 1, 3, 3), np.float32)
    xv[0, 0, 1, 1] = 5.0
    cot = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 1, 2, 2)
    expected = np.zeros((1, 1, 3, 3), np.float32)
    expected[0, 0, 1, 1] = 10.0
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, cot):
        np.testing.assert_array_equal(grads["grad_x0"], expected)


def test_kink_max_of_equal_inputs_splits_half_half():
    model, _ = _single("Max", [[3], [3]])
    a = np.array([1.0, 2.0, 3.0], np.float32)
    b = np.array([1.0, 5.0, 3.0], np.float32)
    cot = np.array([2.0, 4.0, 6.0], np.float32)
    for grads in _vjp_both(model, ["x0", "x1"], {"x0": a, "x1": b}, cot):
        np.testing.assert_array_equal(grads["grad_x0"], [1.0, 0.0, 3.0])
        np.testing.assert_array_equal(grads["grad_x1"], [1.0, 4.0, 3.0])


def test_kink_min_of_three_equal_inputs_splits_in_thirds():
    model, _ = _single("Min", [[2], [2], [2]])
    a = np.array([1.0, 0.0], np.float32)
    cot = np.array([3.0, 6.0], np.float32)
    feeds = {"x0": a, "x1": a.copy(), "x2": np.array([1.0, 1.0], np.float32)}
    for grads in _vjp_both(model, ["x0", "x1", "x2"], feeds, cot):
        np.testing.assert_allclose(grads["grad_x0"], [1.0, 3.0], rtol=1e-6)
        np.testing.assert_allclose(grads["grad_x1"], [1.0, 3.0], rtol=1e-6)
        np.testing.assert_allclose(grads["grad_x2"], [1.0, 0.0], rtol=1e-6)


def test_dropout_training_mode_is_refused_or_masked():
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
    ]
    model, _ = _single("Dropout", [[64]], {"seed": 0}, inits=inits)
    try:
        vjp = build_vjp_model(model, ["x0"], "y")
    except UnsupportedOperatorError:
        return  # refusing is fine
    xv = np.arange(1, 65, dtype=np.float32)
    cot = np.ones(64, np.float32)
    y, grad = _session(vjp).run(["y", "grad_x0"], {"x0": xv, "cotangent": cot})
    kept = y != 0
    assert 0 < kept.sum() < 64
    np.testing.assert_allclose(grad, np.where(kept, 2.0, 0.0))


def test_kink_pow_exponent_gradient_at_zero_base_is_zero():
    model, _ = _single("Pow", [[3], [3]])
    a = np.array([0.0, 2.0, 0.0], np.float32)
    b = np.array([2.5, 1.5, 1.0], np.float32)
    cot = np.ones(3, np.float32)
    for grads in _vjp_both(model, ["x0", "x1"], {"x0": a, "x1": b}, cot):
        np.testing.assert_allclose(grads["grad_x1"], [0.0, 2.0**1.5 * np.log(2.0), 0.0], rtol=1e-6)


def test_kink_reduce_max_ties_split_evenly():
    model, _ = _single("ReduceMax", [[2, 3]], {"axes": [1], "keepdims": 0})
    xv = np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]], np.float32)
    cot = np.array([4.0, 3.0], np.float32)
    for grads in _vjp_both(model, ["x0"], {"x0": xv}, cot):
        np.testing.assert_allclose(grads["grad_x0"], [[2.0, 2.0, 0.0], [1.0, 1.0, 1.0]], rtol=1e-6)


# --------------------------------------------------------------------------- refusals


def _chain(ops: list[tuple[str, str]], shape=(2, 3)) -> onnx.ModelProto:
    """x -> op1 -> op2 -> ... -> Add(., x) = y; ops are (domain, op_type)."""
    nodes, prev = [], "x"
    domains = {""}
    for i, (domain, op) in enumerate(ops):
        nodes.append(helper.make_node(op, [prev], [f"h{i}"], name=f"n{i}_{op}", domain=domain))
        domains.add(domain)
        prev = f"h{i}"
    nodes.append(helper.make_node("Add", [prev, "x"], ["y"], name="add"))
    extra = [helper.make_opsetid(d, 1) for d in sorted(domains - {""})]
    return _make_model(
        helper.make_graph(
            nodes,
            "chain",
            [helper.make_tensor_value_info("x", F, list(shape))],
            [helper.make_tensor_value_info("y", F, list(shape))],
        ),
        OPSET,
        extra,
    )


@pytest.mark.parametrize("op", ["Sign", "Floor", "Round", "Ceil"])
def test_refused_ops_raise_zero_almost_everywhere(op):
    assert REGISTRY[op].refusal
    with pytest.raises(UnsupportedOperatorError, match="zero almost everywhere") as info:
        build_vjp_model(_chain([("", op)]), ["x"], "y")
    assert [(n.op_type, n.node_name) for n in info.value.nodes] == [(op, f"n0_{op}")]
    assert "zero almost everywhere" in info.value.nodes[0].reason


def test_custom_domain_op_raises_naming_it():
    with pytest.raises(UnsupportedOperatorError) as info:
        build_vjp_model(_chain([("com.example", "FancyActivation")]), ["x"], "y")
    assert "FancyActivation" in str(info.value)
    assert "com.example" in str(info.value)
    assert "n0_FancyActivation" in str(info.value)
    (bad,) = info.value.nodes
    assert bad.node_name == "n0_FancyActivation"


def test_several_unsupported_nodes_named_in_one_error():
    model = _chain([("", "Floor"), ("com.example", "Mystery"), ("", "Sign"), ("", "Relu"), ("", "Round")])
    with pytest.raises(UnsupportedOperatorError) as info:
        build_vjp_model(model, ["x"], "y")
    names = [n.node_name for n in info.value.nodes]
    assert names == ["n0_Floor", "n1_Mystery", "n2_Sign", "n4_Round"]
    message = str(info.value)
    for name in names:
        assert name in message
    assert "zero almost everywhere" in message


def test_refused_op_off_the_path_is_ignored():
    """A Sign that does not depend on the differentiated input does not block the build."""
    model = _make_model(
        helper.make_graph(
            [
                helper.make_node("Sign", ["k"], ["s"], name="sign"),
                helper.make_node("Mul", ["x", "s"], ["y"], name="mul"),
            ],
            "g",
            [helper.make_tensor_value_info("x", F, [2, 3])],
            [helper.make_tensor_value_info("y", F, [2, 3])],
            [numpy_helper.from_array(np.array([-1.0, 0.5, 2.0], np.float32), "k")],
        ),
        OPSET,
    )
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    check_rule(model, feeds, ["x"], "y")


def test_wrap_pad_raises():
    model, _ = _single(
        "Pad",
        [[2, 3]],
        {"mode": "wrap"},
        inits=[numpy_helper.from_array(np.array([0, 1, 0, 1]), "p")],
        opset=19,
    )
    with pytest.raises(UnsupportedOperatorError, match="wrap"):
        build_vjp_model(model, ["x0"], "y")
