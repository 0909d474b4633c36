"""Float64 gradient checking helpers for ONNX VJP graphs.

Gradients are checked JAX ``check_vjp`` style: a random cotangent ``u`` and a random
direction ``v`` reduce the comparison to two scalars,

    sum_w <vjp(u)_w, v_w>   vs   (<u, f(x + eps v)> - <u, f(x - eps v)>) / (2 eps),

both evaluated in float64 with :class:`onnx.reference.ReferenceEvaluator` (ONNX Runtime's
CPU provider lacks float64 kernels for many ops). Float32 finite differences are not
trustworthy on ReLU / max-pool networks, hence :func:`to_float64`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _RefConvTranspose
from onnx.reference.ops.op_grid_sample import GridSample as _RefGridSample
from onnx.reference.ops.op_max_pool import MaxPool as _RefMaxPool
from onnx.reference.ops.op_pad import Pad_18 as _RefPad18
from onnx.reference.ops.op_resize import Resize as _RefResize

__all__ = ["REFERENCE_FIXES", "check_vjp", "run_reference", "to_float64"]

# Element types widened to DOUBLE by to_float64.
_NARROW_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})

# Integer attributes holding an element type that decides an output's float type.
_DTYPE_ATTRS = {
    "Cast": ("to",),
    "RandomNormal": ("dtype",),
    "RandomUniform": ("dtype",),
    "RandomNormalLike": ("dtype",),
    "RandomUniformLike": ("dtype",),
    "EyeLike": ("dtype",),
    "Bernoulli": ("dtype",),
}

# Ops whose float output defaults to FLOAT when the dtype attribute is absent.
_DTYPE_DEFAULT_FLOAT = {"RandomNormal": "dtype", "RandomUniform": "dtype"}

# (op_type, input index) slots that the ONNX spec types as tensor(float) only; after
# widening, a Cast back to FLOAT is inserted in front of them.
_FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}

_FLOAT_NP = (np.float16, np.float32, np.float64)


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _widen_elem_type(elem_type: int) -> int:
    return TensorProto.DOUBLE if elem_type in _NARROW_FLOATS else elem_type


def _widen_type(tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        tp.tensor_type.elem_type = _widen_elem_type(tp.tensor_type.elem_type)
    elif kind == "sparse_tensor_type":
        tp.sparse_tensor_type.elem_type = _widen_elem_type(tp.sparse_tensor_type.elem_type)
    elif kind == "sequence_type":
        _widen_type(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        _widen_type(tp.optional_type.elem_type)
    elif kind == "map_type":
        _widen_type(tp.map_type.value_type)


def _widen_tensor(t: TensorProto) -> None:
    """Rewrites ``t`` in place as float64 if it holds a narrow float type."""
    if t.data_type not in _NARROW_FLOATS:
        return
    if t.data_location == TensorProto.EXTERNAL:
        raise ValueError(
            f"tensor {t.name!r} has external data; load it first (onnx.load(..., load_external_data=True))"
        )
    arr = numpy_helper.to_array(t).astype(np.float64)
    new = numpy_helper.from_array(arr, name=t.name)
    new.doc_string = t.doc_string
    t.CopyFrom(new)


def _widen_sparse(st: onnx.SparseTensorProto) -> None:
    _widen_tensor(st.values)


def _double_tensor_attr(name: str, values: list[float], scalar: bool) -> AttributeProto:
    arr = np.asarray(values[0] if scalar else values, dtype=np.float64)
    return helper.make_attribute(name, numpy_helper.from_array(arr))


def _widen_node(node: onnx.NodeProto) -> None:
    default_domain = _is_default_domain(node)
    op = node.op_type if default_domain else None

    new_attrs: list[AttributeProto] = []
    for attr in node.attribute:
        if attr.ref_attr_name:
            new_attrs.append(attr)
            continue
        if op == "Constant" and attr.name in ("value_float", "value_floats"):
            # value_float(s) always produce tensor(float): turn them into a DOUBLE tensor.
            if attr.name == "value_float":
                new_attrs.append(_double_tensor_attr("value", [attr.f], scalar=True))
            else:
                new_attrs.append(_double_tensor_attr("value", list(attr.floats), scalar=False))
            continue
        a = copy.deepcopy(attr)
        if a.type == AttributeProto.TENSOR:
            _widen_tensor(a.t)
        elif a.type == AttributeProto.TENSORS:
            for t in a.tensors:
                _widen_tensor(t)
        elif a.type == AttributeProto.SPARSE_TENSOR:
            _widen_sparse(a.sparse_tensor)
        elif a.type == AttributeProto.SPARSE_TENSORS:
            for st in a.sparse_tensors:
                _widen_sparse(st)
        elif a.type == AttributeProto.GRAPH:
            _widen_graph(a.g)
        elif a.type == AttributeProto.GRAPHS:
            for g in a.graphs:
                _widen_graph(g)
        elif a.type == AttributeProto.TYPE_PROTO:
            _widen_type(a.tp)
        elif a.type == AttributeProto.TYPE_PROTOS:
            for tp in a.type_protos:
                _widen_type(tp)
        elif a.type == AttributeProto.INT and op is not None and a.name in _DTYPE_ATTRS.get(op, ()):
            a.i = _widen_elem_type(a.i)
        new_attrs.append(a)

    present = {a.name for a in new_attrs}
    if op in _DTYPE_DEFAULT_FLOAT and _DTYPE_DEFAULT_FLOAT[op] not in present:
        new_attrs.append(helper.make_attribute(_DTYPE_DEFAULT_FLOAT[op], TensorProto.DOUBLE))
    if op == "ConstantOfShape" and "value" not in present:
        # The default fill value is a float32 zero.
        new_attrs.append(_double_tensor_attr("value", [0.0], scalar=False))

    del node.attribute[:]
    node.attribute.extend(new_attrs)


def _unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {v.name for v in graph.output}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


def _widen_graph(graph: onnx.GraphProto) -> None:
    for vi in (*graph.input, *graph.output, *graph.value_info):
        _widen_type(vi.type)
    for t in graph.initializer:
        _widen_tensor(t)
    for st in graph.sparse_initializer:
        _widen_sparse(st)

    taken: set[str] | None = None
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        _widen_node(node)
        if _is_default_domain(node):
            for idx, name in enumerate(node.input):
                if name and (node.op_type, idx) in _FLOAT32_ONLY_INPUTS:
                    if taken is None:
                        taken = _all_names(graph)
                    cast_out = _unique_name(f"{name}__as_float32", taken)
                    new_nodes.append(helper.make_node("Cast", [name], [cast_out], to=TensorProto.FLOAT))
                    node.input[idx] = cast_out
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """Returns a copy of ``model`` with every float32/float16/bfloat16 tensor made float64.

    Covers graph inputs, outputs and value_info, (sparse) initializers, tensor-valued
    attributes (Constant ``value``, ConstantOfShape ``value``, ...), Constant
    ``value_float(s)`` (rewritten as a DOUBLE ``value``), element-type attributes
    (``Cast.to``, ``RandomNormal.dtype``, ...), subgraphs of If/Loop/Scan and model-local
    functions. Integer tensors are untouched. ``Resize``/``Upsample`` ``scales``, which
    the spec types as float32 only, get a ``Cast(to=FLOAT)`` in front of them.
    ``LayerNormalization.stash_type`` is left alone (the reference evaluator only
    implements ``stash_type=1`` and computes in the input's precision anyway); its Mean and
    InvStdDev outputs, if declared, become DOUBLE, which the reference evaluator honours
    but ONNX Runtime rejects (it types them by ``stash_type``).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _widen_graph(out.graph)
    for fn in out.functions:
        for node in fn.node:
            _widen_node(node)
        for vi in fn.value_info:
            _widen_type(vi.type)
    return out


# --------------------------------------------------------------------------------------
# ReferenceEvaluator fixes (onnx 1.23), passed as ``new_ops`` by run_reference.


class Erf(OpRun):
    """The stock Erf rounds to float32 (``np.vectorize(erf, otypes=["f"])``), which turns
    float64 finite differences of Erf/Gelu into noise."""

    op_domain = ""

    def _run(self, x):
        if x.size == 0:
            return (x.copy(),)
        return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)


class Gelu(OpRun):
    """The stock Gelu runs the schema's function body, whose Erf (above) and constants
    are float32; this evaluates the spec formula in the input's precision."""

    op_domain = ""

    def _run(self, x, approximate=None):
        x64 = x.astype(np.float64)
        if approximate == "tanh":
            inner = math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)
            y = 0.5 * x64 * (1.0 + np.tanh(inner))
        else:
            erf = np.vectorize(math.erf, otypes=[np.float64])
            y = 0.5 * x64 * (1.0 + (erf(x64 / math.sqrt(2.0)) if x.size else x64))
        return (y.astype(x.dtype),)


class ConvTranspose(_RefConvTranspose):
    """The stock ConvTranspose is wrong for ``group > 1`` (crashes, or with a bias adds
    ``B[0]`` to every channel); this runs each group with ``group=1`` and concatenates."""

    op_domain = ""

    def _run(
        self,
        X,
        W,
        B=None,
        auto_pad=None,
        dilations=None,
        group=None,
        kernel_shape=None,
        output_padding=None,
        output_shape=None,
        pads=None,
        strides=None,
    ):
        kwargs = dict(
            auto_pad=auto_pad,
            dilations=dilations,
            kernel_shape=kernel_shape,
            output_padding=output_padding,
            output_shape=output_shape,
            pads=pads,
            strides=strides,
        )
        if not group or group == 1:
            return super()._run(X, W, B, group=1, **kwargs)
        xs = np.split(X, group, axis=1)
        ws = np.split(W, group, axis=0)
        bs = np.split(B, group) if B is not None else [None] * group
        outs = [
            super(ConvTranspose, self)._run(x, w, b, group=1, **kwargs)[0]
            for x, w, b in zip(xs, ws, bs, strict=True)
        ]
        return (np.concatenate(outs, axis=1),)


class MaxPool(_RefMaxPool):
    """With all strides and dilations 1, the stock MaxPool takes a generic pooling path
    that reads 2-D pads as (top, bottom, left, right), gets ceil_mode output shapes wrong,
    and returns Indices unravelled with the output shape, without the N/C offset and
    ignoring storage_order. Its dedicated max-pool path has none of these problems, so
    always use it (with SAME_*/VALID auto_pad turned into explicit pads)."""

    op_domain = ""

    def _run(
        self,
        x,
        auto_pad=None,
        ceil_mode=None,
        dilations=None,
        kernel_shape=None,
        pads=None,
        storage_order=None,
        strides=None,
    ):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            # The dedicated path computes SAME_LOWER like SAME_UPPER with floor(in/stride)
            # outputs; make the padding explicit instead.
            spatial = x.shape[2:]
            strides = list(strides) if strides is not None else [1] * len(spatial)
            dils = list(dilations) if dilations is not None else [1] * len(spatial)
            begin, end = [], []
            for size, k, st, d in zip(spatial, kernel_shape, strides, dils, strict=True):
                if auto_pad == "VALID":
                    total = 0
                else:
                    out = -(-size // st)
                    total = max((out - 1) * st + (k - 1) * d + 1 - size, 0)
                small = total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else total - small)
                end.append(total - begin[-1])
            pads, auto_pad = begin + end, "NOTSET"
        return self._max_pool(
            x,
            auto_pad=auto_pad,
            ceil_mode=ceil_mode,
            dilations=dilations,
            kernel_shape=kernel_shape,
            pads=pads,
            storage_order=storage_order,
            strides=strides,
        )


class Pad(_RefPad18):
    """The stock Pad (opset >= 11) fails on negative pads; crop first, then pad."""

    op_domain = ""

    def _run(self, data, pads, constant_value=None, axes=None, mode=None):
        pads = np.asarray(pads, dtype=np.int64)
        if (pads < 0).any():
            rank = data.ndim
            ax = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
            n = len(ax)
            slices = [slice(None)] * rank
            for i, a in enumerate(ax):
                begin, end = int(pads[i]), int(pads[n + i])
                slices[a] = slice(max(-begin, 0), data.shape[a] - max(-end, 0))
            data = data[tuple(slices)]
            pads = np.maximum(pads, 0)
        return super()._run(data, pads, constant_value=constant_value, axes=axes, mode=mode)


class Resize(_RefResize):
    """The stock Resize receives ``cubic_coeff_a`` as ``np.float32``; with NumPy 2 scalar
    promotion the cubic coefficients are then computed in float32 (~1e-7 relative error in
    float64 models). Passing a Python float keeps them float64."""

    op_domain = ""

    def _run(self, X, roi, scales=None, sizes=None, cubic_coeff_a=None, **kwargs):
        if cubic_coeff_a is not None:
            cubic_coeff_a = float(cubic_coeff_a)
        return super()._run(X, roi, scales, sizes, cubic_coeff_a=cubic_coeff_a, **kwargs)


class MeanVarianceNormalization(OpRun):
    """The stock operator runs the schema's function body, whose constants are float32 (a
    float64 input fails on the mixed Add); this is the body's formula in the input's precision."""

    op_domain = ""

    def _run(self, x, axes=None):
        axes = tuple(axes) if axes is not None else (0, 2, 3)
        mean = x.mean(axis=axes, keepdims=True)
        std = np.sqrt((x * x).mean(axis=axes, keepdims=True) - mean * mean)
        return ((x - mean) / (std + 1e-9),)


class GroupNormalization(OpRun):
    """The stock operator runs the schema's function body, which computes in stash_type
    (float32); this is the spec's formula in the input's precision (scale per channel, opset 21)."""

    op_domain = ""

    def _run(self, x, scale, bias, epsilon=None, num_groups=None, stash_type=None):
        grouped = x.reshape(x.shape[0], num_groups, -1)
        mean = grouped.mean(axis=2, keepdims=True)
        variance = ((grouped - mean) ** 2).mean(axis=2, keepdims=True)
        eps = 1e-5 if epsilon is None else epsilon
        normal = ((grouped - mean) / np.sqrt(variance + eps)).reshape(x.shape)
        per_channel = (-1,) + (1,) * (x.ndim - 2)
        return (normal * scale.reshape(per_channel) + bias.reshape(per_channel),)


class LRN(OpRun):
    """The stock LRN walks the batch axis where it means the channels (``range(x.shape[0])``),
    right only when N == C; this sums each channel's window."""

    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        before, after = (size - 1) // 2, size // 2
        squares = np.zeros_like(x)
        for c in range(x.shape[1]):
            window = x[:, max(0, c - before):min(x.shape[1], c + after + 1)]
            squares[:, c] = np.sum(window**2, axis=1)
        return (x / (bias + alpha / size * squares) ** beta,)


class GridSample(_RefGridSample):
    """The stock GridSample rounds the unnormalised coordinates to float32, which turns float64
    finite differences with respect to the grid into noise; this keeps them float64."""

    op_domain = ""

    def _gs_denormalize_coordinates(self, n, dims, align_corners: bool):
        return np.array([self._gs_denormalize(n=v, length=dim, align_corners=align_corners)
                         for v, dim in zip(n, dims, strict=False)], dtype=np.float64)


class AffineGrid(OpRun):
    """The stock AffineGrid returns float32 whatever theta's type; this keeps theta's precision."""

    op_domain = ""

    def _run(self, theta, size, align_corners=None):
        spatial = [int(d) for d in size[2:]]
        axes = [np.linspace(-1.0, 1.0, d) if align_corners else (2 * np.arange(d) + 1) / d - 1
                for d in spatial]
        mesh = np.meshgrid(*axes, indexing="ij")
        positions = np.stack([m for m in reversed(mesh)] + [np.ones_like(mesh[0])], axis=-1)
        grid = np.einsum("...k,njk->n...j", positions, theta)
        return (grid.astype(theta.dtype),)


#: Overrides for :class:`ReferenceEvaluator` used by :func:`run_reference`.
REFERENCE_FIXES: tuple[type[OpRun], ...] = (
    Erf, Gelu, ConvTranspose, MaxPool, Pad, Resize, MeanVarianceNormalization, GroupNormalization, LRN,
    GridSample, AffineGrid)

# Overrides implementing only the signature of recent opsets: (op, first supported opset).
_FIX_MIN_OPSET = {"Pad": 11, "Resize": 11, "GroupNormalization": 21}


def _fixes_for(model: onnx.ModelProto) -> list[type[OpRun]]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return [cl for cl in REFERENCE_FIXES if opset >= _FIX_MIN_OPSET.get(cl.__name__, 0)]


def _declared_np_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    dtypes: dict[str, np.dtype] = {}
    for vi in model.graph.input:
        if vi.type.WhichOneof("value") == "tensor_type" and vi.type.tensor_type.elem_type:
            with contextlib.suppress(KeyError):
                dtypes[vi.name] = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return dtypes


def run_reference(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    outputs: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Runs ``model`` with :class:`ReferenceEvaluator`; returns ``{output name: value}``.

    The evaluator gets :data:`REFERENCE_FIXES` (float64-exact Erf and Gelu, grouped
    ConvTranspose, stride-1 MaxPool, Pad with negative pads, float64 cubic Resize
    coefficients).

    Only feeds naming a graph input are passed. A floating-point feed is cast to the
    float type the graph declares for that input (so float32 arrays can feed a float64
    model); other feeds are passed as they are.
    """
    input_names = [vi.name for vi in model.graph.input]
    dtypes = _declared_np_dtypes(model)
    run_feeds: dict[str, np.ndarray] = {}
    for name in input_names:
        if name not in feeds:
            continue
        value = np.asarray(feeds[name])
        want = dtypes.get(name)
        if (
            want is not None
            and np.issubdtype(want, np.floating)
            and np.issubdtype(value.dtype, np.floating)
            and value.dtype != want
        ):
            value = value.astype(want)
        run_feeds[name] = value
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    sess = ReferenceEvaluator(model, new_ops=_fixes_for(model))
    results = sess.run(names, run_feeds)
    return dict(zip(names, results, strict=True))


def _promote_initializers(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Copy of ``model`` where the initializers ``names`` are also graph inputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = {vi.name for vi in out.graph.input}
    inits = {t.name: t for t in out.graph.initializer}
    for name in names:
        if name in inputs:
            continue
        t = inits[name]
        out.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return out


def check_vjp(
    forward: onnx.ModelProto,
    vjp: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    wrt: list[str],
    output: str,
    cotangent_name: str = "cotangent",
    grad_names: Mapping[str, str] | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    seed: int = 0,
) -> float:
    """Checks a VJP graph against central finite differences of ``forward`` in float64.

    Args:
        forward: float64 model (see :func:`to_float64`) computing ``output``.
        vjp: float64 model whose inputs are the forward inputs plus ``cotangent_name``
            (shaped like ``output``) and whose outputs include the gradient of
            ``<cotangent, output>`` with respect to each name in ``wrt``.
        feeds: values of the forward inputs (the evaluation point); float arrays are
            converted to float64.
        wrt: names to differentiate with respect to: forward graph inputs, or forward
            initializers (perturbed by feeding them as inputs; the VJP is evaluated at
            the initializer's stored value).
        output: name of the forward output whose VJP is checked.
        cotangent_name: name of the cotangent input of ``vjp``.
        grad_names: ``{wrt name: vjp output name}``; defaults to ``grad_<name>``.
        eps: finite-difference step along the unit direction of each ``wrt`` input.
        rtol, atol: pass iff ``|vjp - fd| <= atol + rtol * max(|vjp|, |fd|)``.
        seed: seeds the cotangent and the directions.

    Returns:
        The relative error ``|vjp - fd| / max(|vjp|, |fd|)`` (0.0 when both are 0).

    Raises:
        AssertionError: if the projected VJP and the finite difference disagree, or a
            gradient has the wrong shape.
        ValueError: if the forward output or a gradient is not float64.
    """
    if not wrt:
        raise ValueError("wrt must name at least one input")
    grad_names = dict(grad_names or {})
    rng = np.random.default_rng(seed)

    point: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        arr = np.asarray(value)
        point[name] = arr.astype(np.float64) if arr.dtype in _FLOAT_NP else arr

    # wrt names missing from feeds must be forward initializers: perturb them as inputs.
    forward_inits = {t.name: t for t in forward.graph.initializer}
    forward_inputs = {vi.name for vi in forward.graph.input}
    promoted = []
    for name in wrt:
        if name in point:
            continue
        if name not in forward_inits:
            raise ValueError(f"wrt name {name!r} is neither in feeds nor a forward initializer")
        point[name] = numpy_helper.to_array(forward_inits[name]).astype(np.float64)
        if name not in forward_inputs:
            promoted.append(name)
    fwd = _promote_initializers(forward, promoted) if promoted else forward
    for name in wrt:
        if point[name].dtype != np.float64:
            raise ValueError(f"wrt input {name!r} must be floating point, got {point[name].dtype}")

    def f(values: Mapping[str, np.ndarray]) -> np.ndarray:
        y = run_reference(fwd, values, outputs=[output])[output]
        if y.dtype != np.float64:
            raise ValueError(f"forward output {output!r} is {y.dtype}, expected float64; use to_float64()")
        return y

    y0 = f(point)
    u = rng.standard_normal(y0.shape)
    directions: dict[str, np.ndarray] = {}
    for name in wrt:
        v = rng.standard_normal(point[name].shape)
        norm = np.linalg.norm(v)
        directions[name] = v / norm if norm > 0 else v

    # Projected VJP.
    vjp_feeds = {k: v for k, v in point.items() if k not in promoted}
    vjp_feeds[cotangent_name] = u
    vjp_inputs = {vi.name for vi in vjp.graph.input}
    if cotangent_name not in vjp_inputs:
        raise ValueError(f"vjp model has no input named {cotangent_name!r}")
    out_names = [grad_names.get(w, f"grad_{w}") for w in wrt]
    grads = run_reference(vjp, vjp_feeds, outputs=out_names)
    projected = 0.0
    for w, g_name in zip(wrt, out_names, strict=True):
        g = np.asarray(grads[g_name])
        if g.dtype != np.float64:
            raise ValueError(f"gradient {g_name!r} is {g.dtype}, expected float64")
        assert g.shape == point[w].shape, (
            f"gradient {g_name!r} has shape {g.shape}, input {w!r} has shape {point[w].shape}"
        )
        projected += float(np.vdot(g, directions[w]))

    # Central finite difference of <u, f> along v.
    plus = dict(point)
    minus = dict(point)
    for w in wrt:
        plus[w] = point[w] + eps * directions[w]
        minus[w] = point[w] - eps * directions[w]
    fd = (float(np.vdot(u, f(plus))) - float(np.vdot(u, f(minus)))) / (2.0 * eps)

    diff = abs(projected - fd)
    scale = max(abs(projected), abs(fd))
    rel = diff / scale if scale > 0 else 0.0
    assert diff <= atol + rtol * scale, (
        f"VJP check failed for output {output!r} wrt {wrt}: projected vjp = {projected!r}, "
        f"central difference = {fd!r}, abs error = {diff:.3e}, relative error = {rel:.3e} "
        f"(rtol={rtol:g}, atol={atol:g}, eps={eps:g}, seed={seed})"
    )
    return rel
