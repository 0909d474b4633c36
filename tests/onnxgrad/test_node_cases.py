"""ONNX's own operator test cases, swept through the onnxgrad VJP rules.

``onnx.backend.test.loader.load_model_tests(kind="node")`` builds every node test case in
memory (model + input/output arrays). Each single-node case whose operator has a gradient
rule (refused operators excluded) is checked at the case's own inputs:

* ``wrt``: the float graph inputs at the rule's differentiable positions;
* output: the first float graph output;
* (a) ``check_vjp`` in float64 (``to_float64`` of the forward and of the VJP), rtol 1e-5;
* (b) where ONNX Runtime can run the forward model (it lacks some opsets and types), the
  VJP graph as built must load and run on ORT and agree with the float64 VJP (see
  ``tests.onnxgrad.test_rules.ort_check``; float16/bfloat16 cases are not compared).

Two deviations from "the case as given", both recorded in the outcome:

* perturbed: piecewise operators are tested at kinks and ties on purpose (relu at 0,
  max-pool windows of equal values, ...), where finite differences do not give the
  derivative. If the check fails at the case's inputs and the operator is piecewise, it is
  repeated once with every differentiated input moved away from zero and from its
  neighbours: ``x + sign(x) * d`` with ``d`` uniform in [0.5e-3, 1e-3] per element
  (``sign(0) = +1``), which leaves no element at a kink or tie for steps of 1e-6. The
  behaviour at kinks is pinned separately by the exact-value tests in test_rules.py.
* frozen: node cases pass reduction axes, Resize scales/sizes etc. as graph inputs, which
  the rules refuse ("computed at run time"). Such cases are retried with every
  non-differentiated graph input turned into an initializer holding the case's value.

Every case ends checked, skipped with a precise reason, or failed; ``test_summary`` prints
a per-op table and asserts zero unexpected failures and a minimum number of checked cases.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from tests.onnxgrad.gradcheck import check_vjp, to_float64
from tests.onnxgrad.test_rules import _session, ort_check
from workers.onnxgrad import GradientBuildError, UnsupportedOperatorError, build_vjp_model
from workers.onnxgrad.autodiff import REGISTRY

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
RTOL = 1e-5
# Inputs of magnitude ~1e4: float64 rounding of x +- 1e-6 steps alone costs ~1e-5 relative.
RTOL_OVERRIDES = {"test_softmax_large_number": 1e-4, "test_logsoftmax_large_number": 1e-4}
ORT_RTOL = 1e-4

# The number of cases checked (415 when this file was written; 518 of 836 since the normalisation,
# Einsum, GridSample, AffineGrid, LpPool, DepthToSpace, TopK, CumSum and inverse-trigonometric
# rules), minus a margin.
MIN_CHECKED = 510

# Operators tested at kinks / ties / domain boundaries by their node cases.
PIECEWISE = {
    "Abs", "Celu", "Clip", "Elu", "GlobalMaxPool", "GridSample", "HardSigmoid", "HardSwish", "LeakyRelu",
    "LpNormalization", "Max", "MaxPool", "Min", "Pow", "PRelu", "ReduceL1", "ReduceMax", "ReduceMin",
    "Relu", "Selu", "Shrink", "ThresholdedRelu",
}  # fmt: skip

# Cases whose build is refused by a rule, on purpose: case name -> expected reason (substring).
EXPECTED_REFUSALS = {
    # alone, the scale is an output: its path is left out only where it rescales integer products
    "test_dynamicquantizelinear": "used otherwise than quantize_dynamic uses them",
    "test_dynamicquantizelinear_max_adjusted": "used otherwise than quantize_dynamic uses them",
    "test_dynamicquantizelinear_min_adjusted": "used otherwise than quantize_dynamic uses them",
    "test_batchnorm_example_training_mode": "training_mode=1",
    "test_batchnorm_epsilon_training_mode": "training_mode=1",
    "test_convtranspose_autopad_same": "auto_pad and output_shape are not supported",
    "test_convtranspose_output_shape": "auto_pad and output_shape are not supported",
    "test_convtranspose_kernel_shape": "auto_pad and output_shape are not supported",
    "test_matmul_1d_1d": "a 1-D left operand is not supported",
    "test_matmul_1d_3d": "a 1-D left operand is not supported",
    "test_maxpool_with_argmax_2d_precomputed_strides": "storage_order=1",
    "test_resize_tf_crop_and_resize": "tf_crop_and_resize",
    "test_resize_tf_crop_and_resize_extrapolation_value": "tf_crop_and_resize",
    "test_resize_tf_crop_and_resize_axes_2_3": "tf_crop_and_resize",
    "test_resize_tf_crop_and_resize_axes_3_2": "tf_crop_and_resize",
    "test_resize_upsample_sizes_nearest_not_larger": "keep_aspect_ratio_policy",
    "test_resize_upsample_sizes_nearest_not_smaller": "keep_aspect_ratio_policy",
    "test_resize_downsample_sizes_nearest_not_larger": "keep_aspect_ratio_policy",
    "test_resize_downsample_sizes_nearest_not_smaller": "keep_aspect_ratio_policy",
    "test_training_dropout": "training-mode Dropout",
    "test_training_dropout_default": "training-mode Dropout",
    "test_training_dropout_default_mask": "training-mode Dropout",
    "test_training_dropout_mask": "training-mode Dropout",
    "test_training_dropout_zero_ratio": "training-mode Dropout",
    "test_training_dropout_zero_ratio_mask": "training-mode Dropout",
    "test_scatter_elements_with_reduction_max": "reduction 'max' is not supported",
    "test_scatter_elements_with_reduction_min": "reduction 'min' is not supported",
    "test_scatter_elements_with_reduction_mul": "reduction 'mul' is not supported",
    "test_einsum_batch_diagonal": "repeats a letter",
    "test_gridsample_reflection_padding": "not supported (only linear and nearest",
    "test_gridsample_bicubic": "not supported (only linear and nearest",
    "test_gridsample_bicubic_align_corners_0_additional_1": "not supported (only linear and nearest",
    "test_gridsample_bicubic_align_corners_1_additional_1": "not supported (only linear and nearest",
    "test_gridsample_volumetric_nearest_align_corners_0": "only 2-D sampling (a 4-D input)",
    "test_gridsample_volumetric_nearest_align_corners_1": "only 2-D sampling (a 4-D input)",
    "test_gridsample_volumetric_bilinear_align_corners_0": "only 2-D sampling (a 4-D input)",
    "test_gridsample_volumetric_bilinear_align_corners_1": "only 2-D sampling (a 4-D input)",
}

# Cases the float64 harness cannot check: case name -> reason.
_ALIGN_CORNERS_DISAGREE = (
    "ONNX Runtime and the reference evaluator disagree on this forward (align_corners downsampling "
    "by a non-integer scale: ORT maps x_out * (in - 1) / (out - 1), the reference uses in * scale); "
    "the rule measures ORT's interpolation, so float64 finite differences of the reference cannot check it"
)
HARNESS_SKIPS = {
    "test_acosh_example": "x = 1 is acosh's branch point: the derivative is infinite there and central "
                          "differences leave the domain (test_acosh checks the rule inside it)",
    "test_averagepool_3d_default": "too slow: the reference evaluator takes ~13 s on its 1x3x32x32x32 input",
    "test_resize_downsample_scales_linear_align_corners": _ALIGN_CORNERS_DISAGREE,
    "test_resize_downsample_scales_cubic_align_corners": _ALIGN_CORNERS_DISAGREE,
}

# Genuine rule bugs (xfail, strict): case name -> bug. Empty: every known bug is fixed.
KNOWN_BUGS: dict[str, str] = {}


@dataclass(frozen=True)
class NodeCase:
    name: str
    op: str
    model: onnx.ModelProto
    inputs: tuple  # numpy arrays, in graph-input order


@functools.cache
def node_cases() -> tuple[NodeCase, ...]:
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        loaded = load_model_tests(kind="node")
    cases = []
    for case in loaded:
        graph = case.model.graph
        if len(graph.node) != 1 or graph.node[0].domain not in ("", "ai.onnx"):
            continue
        rule = REGISTRY.get(graph.node[0].op_type)
        if rule is None or rule.refusal:
            continue
        arrays = tuple(
            numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else np.asarray(a)
            for a in case.data_sets[0][0]
        )
        cases.append(NodeCase(case.name, graph.node[0].op_type, case.model, arrays))
    return tuple(cases)


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type


def _perturbed(feeds: dict, wrt: list[str], seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = dict(feeds)
    for name in wrt:
        value = feeds[name]
        step = rng.uniform(0.5e-3, 1e-3, value.shape)
        out[name] = (value + np.where(value >= 0, 1.0, -1.0) * step).astype(value.dtype)
    return out


def _frozen(model: onnx.ModelProto, feeds: dict, keep: list[str]) -> tuple[onnx.ModelProto, dict]:
    """``model`` with every graph input not in ``keep`` turned into an initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [vi for vi in out.graph.input if vi.name in keep]
    for vi in out.graph.input:
        if vi.name not in keep:
            value = feeds[vi.name]
            if _elem_type(vi) in FLOAT_TYPES:  # keep the declared float type
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(_elem_type(vi)))
            out.graph.initializer.append(numpy_helper.from_array(value, vi.name))
    del out.graph.input[:]
    out.graph.input.extend(kept)
    return out, {k: v for k, v in feeds.items() if k in keep}


def _ort_runs_forward(model: onnx.ModelProto, feeds: dict) -> bool:
    try:
        session = _session(model)
        names = {vi.name for vi in model.graph.input}
        session.run(None, {k: v for k, v in feeds.items() if k in names})
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Outcome:
    status: str  # checked | skipped | failed
    detail: str = ""
    fd_error: float = float("nan")
    ort_error: float = float("nan")
    seconds: float = 0.0


def _run(case: NodeCase) -> Outcome:
    graph = case.model.graph
    node = graph.node[0]
    rule = REGISTRY[case.op]
    types = {vi.name: _elem_type(vi) for vi in graph.input}
    feeds = dict(zip([vi.name for vi in graph.input], case.inputs, strict=True))
    for name, value in feeds.items():  # NumPy has no bfloat16: widen (exactly) to float32
        if types[name] == TensorProto.BFLOAT16:
            feeds[name] = value.astype(np.float32)

    wrt: list[str] = []
    for position, name in enumerate(node.input):
        if name and types.get(name) in FLOAT_TYPES and rule.differentiates(position) and name not in wrt:
            wrt.append(name)
    if not wrt:
        return Outcome(
            "skipped", "no float graph input at a differentiable position (integer/string-only case)"
        )
    outputs = [o.name for o in graph.output if _elem_type(o) in FLOAT_TYPES and o.name in node.output]
    if not outputs:
        out_types = ", ".join(TensorProto.DataType.Name(_elem_type(o)) for o in graph.output)
        return Outcome("skipped", f"no float output (output types: {out_types})")
    output = outputs[0]
    if any(feeds[w].size == 0 for w in wrt):
        return Outcome("skipped", "empty differentiated input: nothing to check")
    if case.name in HARNESS_SKIPS:
        return Outcome("skipped", HARNESS_SKIPS[case.name])

    notes = []
    bad = [w for w in wrt if not np.all(np.isfinite(feeds[w].astype(np.float64)))]
    if bad:  # Cast cases carry NaN and +-inf on purpose
        feeds = dict(feeds)
        for w in bad:
            feeds[w] = np.where(np.isfinite(feeds[w]), feeds[w], 0.5).astype(feeds[w].dtype)
        notes.append("non-finite inputs set to 0.5")

    model = case.model
    try:
        vjp = build_vjp_model(model, wrt, output)
    except UnsupportedOperatorError as exc:
        if "computed at run time" not in str(exc):
            expected = EXPECTED_REFUSALS.get(case.name)
            if expected is not None and expected in str(exc):
                return Outcome("skipped", f"refused by the rule: {exc.nodes[0].reason}")
            return Outcome("failed", f"unexpected refusal: {exc}")
        model, feeds = _frozen(model, feeds, wrt)
        notes.append("non-wrt inputs frozen as initializers")
        try:
            vjp = build_vjp_model(model, wrt, output)
        except UnsupportedOperatorError as exc2:
            expected = EXPECTED_REFUSALS.get(case.name)
            if expected is not None and expected in str(exc2):
                return Outcome("skipped", f"refused by the rule: {exc2.nodes[0].reason}")
            return Outcome("failed", f"unexpected refusal: {exc2}")
    except GradientBuildError as exc:
        return Outcome("failed", f"build failed: {exc}")
    if case.name in EXPECTED_REFUSALS:
        return Outcome(
            "failed", f"expected a refusal ({EXPECTED_REFUSALS[case.name]}), but the VJP was built"
        )

    fwd64, vjp64 = to_float64(model), to_float64(vjp)
    point = feeds
    rtol = RTOL_OVERRIDES.get(case.name, RTOL)
    try:
        fd_error = check_vjp(fwd64, vjp64, point, wrt=wrt, output=output, rtol=rtol)
    except AssertionError as exc:
        if case.op not in PIECEWISE:
            return Outcome("failed", str(exc))
        point = _perturbed(feeds, wrt)
        notes.append("perturbed off kinks/ties")
        try:
            fd_error = check_vjp(fwd64, vjp64, point, wrt=wrt, output=output, rtol=rtol)
        except AssertionError as exc2:
            return Outcome("failed", f"{exc2} (also at the case's own inputs: {exc})")

    ort_error = float("nan")
    if any(
        t in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
        for t in [*types.values(), *(_elem_type(o) for o in graph.output)]
    ):
        notes.append("float16/bfloat16: ORT not compared")
    elif not _ort_runs_forward(model, point):
        notes.append("ORT cannot run the forward model")
    else:
        try:
            ort_error = ort_check(vjp, fwd64, vjp64, point, wrt, output, rtol=ORT_RTOL)
        except Exception as exc:  # AssertionError, or ORT refusing the VJP graph
            return Outcome("failed", f"ONNX Runtime check: {type(exc).__name__}: {exc}", fd_error)
    return Outcome("checked", "; ".join(notes), fd_error, ort_error)


@functools.cache
def outcome(name: str) -> Outcome:
    case = next(c for c in node_cases() if c.name == name)
    start = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            result = _run(case)
        except Exception as exc:  # a crash in the rules or the harness is a failure
            result = Outcome("failed", f"{type(exc).__name__}: {exc}")
    return Outcome(
        result.status, result.detail, result.fd_error, result.ort_error, time.perf_counter() - start
    )


def _params():
    for case in node_cases():
        marks = (
            [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case.name])] if case.name in KNOWN_BUGS else []
        )
        yield pytest.param(case.name, id=case.name, marks=marks)


@pytest.mark.parametrize("name", list(_params()))
def test_node_case(name: str):
    result = outcome(name)
    if result.status == "skipped":
        pytest.skip(result.detail)
    assert result.status == "checked", result.detail


def test_summary(capsys):
    """Per-op coverage table; zero unexpected failures; at least MIN_CHECKED checked cases."""
    per_op: dict[str, Counter] = defaultdict(Counter)
    failures, skips, notes = [], Counter(), Counter()
    worst_fd: list[tuple[float, str]] = []
    worst_ort: list[tuple[float, str]] = []
    for case in node_cases():
        result = outcome(case.name)
        per_op[case.op][result.status] += 1
        if result.status == "failed":
            failures.append(case.name)
        elif result.status == "skipped":
            skips[result.detail] += 1
        else:
            for note in filter(None, result.detail.split("; ")):
                notes[note] += 1
            worst_fd.append((result.fd_error, case.name))
            if not np.isnan(result.ort_error):
                worst_ort.append((result.ort_error, case.name))
    checked = sum(c["checked"] for c in per_op.values())
    lines = [f"onnx node cases: {checked} checked, {sum(skips.values())} skipped, {len(failures)} failed"]
    lines += [
        f"  {op:<20} checked {c['checked']:>3}  skipped {c['skipped']:>3}  failed {c['failed']:>2}"
        for op, c in sorted(per_op.items())
    ]
    lines.append("skip reasons:")
    lines += [f"  {n:>3}  {reason}" for reason, n in skips.most_common()]
    lines.append("checked with notes:")
    lines += [f"  {n:>3}  {note}" for note, n in notes.most_common()]
    lines.append(f"worst relative errors, float64 VJP vs central differences ({len(worst_fd)} cases):")
    lines += [f"  {err:.2e}  {name}" for err, name in sorted(worst_fd, reverse=True)[:5]]
    lines.append(f"worst relative errors, ORT VJP vs float64 VJP ({len(worst_ort)} cases):")
    lines += [f"  {err:.2e}  {name}" for err, name in sorted(worst_ort, reverse=True)[:5]]
    slow = sorted(node_cases(), key=lambda c: -outcome(c.name).seconds)[:3]
    lines.append("slowest: " + ", ".join(f"{c.name} {outcome(c.name).seconds:.1f}s" for c in slow))
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    unexpected = sorted(set(failures) - set(KNOWN_BUGS))
    assert not unexpected, "unexpected failures: " + ", ".join(unexpected)
    assert checked >= MIN_CHECKED, f"only {checked} node cases checked (expected >= {MIN_CHECKED})"
