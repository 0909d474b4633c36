"""Upper bounds on the L2 Lipschitz constant of an ONNX classifier, layer by layer.

Szegedy et al. 2014, "Intriguing properties of neural networks", section 4.3 (Table 5):
bound each layer's operator norm, and the network's Lipschitz constant, from the image
input to the logits, by their product. Bias terms do not change a Lipschitz constant.

    report = lipschitz_bounds(model_bytes)
    print(format_report(report))

Per layer (``LayerBound.kind``):

- linear: Gemm / MatMul with a constant weight: its largest singular value times |alpha|
  (transposes do not change singular values); exact SVD, or Lanczos (scipy ``svds``) for
  large matrices. Conv / ConvTranspose: the norm of the whole convolution on the layer's
  actual input size (strides, pads, dilations and groups all count), by power iteration on
  AᵀA, with A and Aᵀ run by ONNX Runtime (Aᵀ is the project's own VJP of the layer).
  Power iteration gives a lower estimate that increases to the exact norm: it is an upper
  bound only once converged; the tests compare it with the SVD of the explicit matrix.
- pointwise: the largest slope of the activation (ReLU 1, sigmoid 1/4, ...); scaling by a
  constant: its largest magnitude.
- pooling: MaxPool sqrt(most windows covering one pixel) (each output moves by at most the
  largest change in its window); AveragePool its exact norm (separable: a product of 1-D
  matrix norms); GlobalAveragePool 1/sqrt(H·W).
- normalization: inference BatchNormalization, max |scale / sqrt(var + eps)|.
- identity: reshapes, transposes, dropout, slices and zero padding: 1.
- softmax: 1/2 (its Jacobian diag(p) - ppᵀ is symmetric with Gershgorin rows 2p_i(1-p_i)).
- add / concat: the graph rule. Each tensor t gets a bound L(t) of the map input -> t:
  L(a + b) <= L(a) + L(b), L(concat(a, b)) <= sqrt(L(a)² + L(b)²), L(h(a)) <= lip(h)·L(a).
  On a chain of layers the network bound is the product of the layer bounds.

Operators with no known bound (LRN, Exp, products of two inputs, ...) are listed in
``unsupported`` and then ``network_bound`` is None: never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from scipy.sparse.linalg import svds

from workers.onnxgrad import GradientBuildError, build_vjp_model, prepare_classifier, weights
from workers.onnxgrad.autodiff import ancestors, attr
from workers.onnxgrad.graph import same_dim, static_shape, tensor_types
from workers.onnxgrad.rules.linear import resolve_pads
from workers.onnxgrad.rules.pooling import pool_output_sizes

SVD_MAX_DIM = 512  # larger matrices use Lanczos (scipy svds): same precision, far faster

_GELU_MAX_SLOPE = 1.1290  # Φ(x) + xφ(x) peaks at x = √2 (1.12890...); the tanh form agrees

# Largest slope of each activation, from its attributes (ONNX defaults).
POINTWISE: dict[str, Callable[[onnx.NodeProto], float]] = {
    "Relu": lambda n: 1.0,
    "LeakyRelu": lambda n: max(1.0, abs(attr(n, "alpha", 0.01))),
    "Sigmoid": lambda n: 0.25,
    "Tanh": lambda n: 1.0,
    "Elu": lambda n: max(1.0, abs(attr(n, "alpha", 1.0))),
    "Selu": lambda n: attr(n, "gamma", 1.05070102214813232421875) * max(
        1.0, attr(n, "alpha", 1.67326319217681884765625)),
    "Celu": lambda n: 1.0,
    "Softplus": lambda n: 1.0,
    "Softsign": lambda n: 1.0,
    "HardSigmoid": lambda n: abs(attr(n, "alpha", 0.2)),
    "HardSwish": lambda n: 1.5,  # x/3 + 1/2 on [-3, 3]
    "Gelu": lambda n: _GELU_MAX_SLOPE,
    "Mish": lambda n: 1.0886,  # peaks at 1.08850 (numerically, near x = 1.2)
    "Clip": lambda n: 1.0,
    "Abs": lambda n: 1.0,
    "Neg": lambda n: 1.0,
    "Sin": lambda n: 1.0,
    "Cos": lambda n: 1.0,
    "Erf": lambda n: 2.0 / math.sqrt(math.pi),
}
IDENTITY = frozenset({"Reshape", "Flatten", "Transpose", "Identity", "Dropout", "Squeeze",
                      "Unsqueeze", "Slice", "Split"})
SUMS = frozenset({"Add", "Sub", "Sum"})
VALUE_FREE = frozenset({"Shape", "Size"})  # outputs do not depend on the input's values


@dataclass
class LayerBound:
    node: str  # node name, or "<op_type>#<index>" when unnamed
    op_type: str
    kind: str  # linear, pointwise, scale, pooling, normalization, identity, softmax, add, concat
    norm: float  # upper bound on this layer's L2 operator norm (per input branch for add)
    method: str  # "svd", "lanczos", "power_iteration(n iters)", "closed_form", "sum_rule", ...


@dataclass
class LipschitzReport:
    layers: list[LayerBound]  # the nodes on the path from the input to the logits, in order
    network_bound: float | None  # None when some layer is unsupported
    unsupported: list[str] = field(default_factory=list)  # "<node> (<op>): why"
    output: str = ""  # the tensor bounded: the logits (before a final Softmax)
    norm: str = "l2"


class _NoBound(Exception):
    """This node has no known bound; the message says why."""


def lipschitz_bounds(model: bytes | onnx.ModelProto, *, iterations: int = 300, tol: float = 1e-6,
                     seed: int = 0) -> LipschitzReport:
    """Per-layer L2 operator-norm bounds and the network's Lipschitz bound (input -> logits).

    ``iterations`` caps the power iterations per convolution, which stop earlier once the
    estimate changes by less than ``tol`` (relative); ``seed`` fixes their start vectors.
    Raises InvalidModelError for models that cannot be used at all (see prepare_classifier).
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"`iterations` must be a positive integer, got {iterations!r}")
    if not tol > 0:
        raise ValueError(f"`tol` must be positive, got {tol!r}")
    prepared = prepare_classifier(model)
    graph = prepared.model.graph
    ctx = _Context(prepared.model, iterations, tol, seed)
    needed = ancestors(graph, prepared.logits_name)

    lip: dict[str, float] = {prepared.input_name: 1.0}  # bound of the map input -> tensor
    layers: list[LayerBound] = []
    unsupported: list[str] = []
    for index, node in enumerate(graph.node):
        active = [name for name in node.input if name in lip]
        subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for a in node.attribute)
        if not (active or subgraph) or node.op_type in VALUE_FREE:
            continue
        if not any(o in needed for o in node.output):
            continue
        name = node.name or f"{node.op_type}#{index}"
        try:
            if subgraph:
                raise _NoBound("control flow has no bound")
            kind, norm, method, out = _layer(ctx, node, {n: lip[n] for n in active})
            outputs = node.output if node.op_type == "Split" else node.output[:1]
            extra = [o for o in node.output if o not in outputs and o in needed]
            if extra:
                raise _NoBound(f"output(s) {extra} are used and have no bound")
        except _NoBound as exc:
            unsupported.append(f"{name} ({node.op_type}): {exc}")
            kind, out, outputs = "", math.inf, node.output
        else:
            layers.append(LayerBound(name, node.op_type, kind, norm, method))
        for o in outputs:
            if o:
                lip[o] = out

    network = lip.get(prepared.logits_name, 0.0)
    return LipschitzReport(layers=layers, network_bound=None if unsupported else network,
                           unsupported=unsupported, output=prepared.logits_name)


def format_report(report: LipschitzReport) -> str:
    """A plain-text table: node, op, kind, method and bound per layer, then the network bound."""
    rows = [(layer.node, layer.op_type, layer.kind, layer.method, f"{layer.norm:.6g}")
            for layer in report.layers]
    header = ("node", "op", "kind", "method", "bound")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    target = f"{report.norm.upper()}, input -> {report.output!r}"
    if report.network_bound is None:
        lines.append(f"network bound ({target}): none, no bound is known for:")
        lines += [f"  {entry}" for entry in report.unsupported]
    else:
        lines.append(f"network bound ({target}): {report.network_bound:.6g}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The graph


class _Context:
    def __init__(self, model: onnx.ModelProto, iterations: int, tol: float, seed: int):
        self.model = model
        self.types = tensor_types(model.graph)
        self.iterations, self.tol, self.seed = iterations, tol, seed
        self.constants = weights.values(model.graph.initializer)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def shape(self, name: str):
        return static_shape(self.types.get(name))

    def constant(self, node: onnx.NodeProto, position: int) -> np.ndarray:
        value = self.constants.get(node.input[position]) if position < len(node.input) else None
        if value is None:
            raise _NoBound(f"input {position} must be a constant")
        return value.astype(np.float64)

    def static_image(self, node: onnx.NodeProto) -> list[int]:
        """The layer's input shape at batch 1 (spatial sizes must be known)."""
        shape = self.shape(node.input[0])
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            raise _NoBound(f"needs a static input shape, got {shape}; export a fixed image size")
        return [1, *shape[1:]]


def _layer(ctx: _Context, node: onnx.NodeProto, active: dict[str, float]):
    """(kind, norm, method, bound of the output) for one node; ``active``: its inputs' bounds."""
    op = node.op_type
    if op in SUMS:
        factors = [_replication(ctx, name, node.output[0]) for name in active]
        out = sum(f * bound for f, bound in zip(factors, active.values(), strict=True))
        if len(active) == 1:  # adding a constant (a bias)
            return "identity", factors[0], "closed_form", out
        return "add", max(factors), "sum_rule", out
    if op == "Concat":
        return "concat", 1.0, "closed_form", math.sqrt(sum(b * b for b in active.values()))
    if len(active) != 1:
        raise _NoBound(f"{len(active)} inputs depend on the image; no bound for products")
    (name, bound), = active.items()
    kind, norm, method = _single_input_layer(ctx, node, node_input=list(node.input).index(name))
    return kind, norm, method, norm * bound


def _single_input_layer(ctx: _Context, node: onnx.NodeProto, node_input: int):
    op = node.op_type
    if op in ("Gemm", "MatMul"):
        if op == "Gemm" and len(node.input) > 2 and node_input == 2:
            raise _NoBound("the image reaches the Gemm's C input")
        weight = ctx.constant(node, 1 - node_input)
        norm, method = _matrix_norm(weight, ctx.seed)
        return "linear", abs(attr(node, "alpha", 1.0)) * norm, method  # MatMul has no alpha
    if op == "Mul" or (op == "Div" and node_input == 0):
        c = np.abs(ctx.constant(node, 1 - node_input))
        if op == "Div" and not c.min() > 0:
            raise _NoBound("division by a constant that contains zero")
        norm = c.max() if op == "Mul" else 1.0 / c.min()
        return "scale", float(norm) * _replication(ctx, node.input[node_input], node.output[0]), \
            "closed_form"
    if node_input != 0:
        raise _NoBound(f"the image reaches input {node_input}, not the data input")
    if op in ("Conv", "ConvTranspose"):
        norm, steps, converged = _conv_norm(ctx, node)
        method = f"power_iteration({steps} iters{'' if converged else ', not converged'})"
        return "linear", norm, method
    if op in POINTWISE:
        return "pointwise", POINTWISE[op](node), "closed_form"
    if op == "PRelu":
        return "pointwise", max(1.0, float(np.abs(ctx.constant(node, 1)).max())), "closed_form"
    if op in IDENTITY or (op == "Pad" and attr(node, "mode", "constant") == "constant"):
        return "identity", 1.0, "closed_form"
    if op == "Softmax":
        return "softmax", 0.5, "closed_form"
    if op == "BatchNormalization":
        if attr(node, "training_mode", 0):
            raise _NoBound("training-mode BatchNormalization uses batch statistics")
        scale, var = ctx.constant(node, 1), ctx.constant(node, 4)
        return "normalization", float(np.abs(scale / np.sqrt(var + attr(node, "epsilon", 1e-5))).max()), \
            "closed_form"
    if op in ("MaxPool", "AveragePool"):
        return "pooling", _pool_norm(ctx, node), "closed_form"
    if op in ("GlobalMaxPool", "GlobalAveragePool"):
        shape = ctx.shape(node.input[0])
        spatial = shape[2:] if shape is not None else [None]
        if op == "GlobalMaxPool" or not all(isinstance(d, int) for d in spatial):
            return "pooling", 1.0, "closed_form"  # a mean over n cells has norm 1/sqrt(n) <= 1
        return "pooling", 1.0 / math.sqrt(math.prod(spatial)), "closed_form"
    raise _NoBound("no Lipschitz bound is known for this operator")


def _replication(ctx: _Context, name: str, out: str) -> float:
    """sqrt(how many times broadcasting repeats each element of ``name`` in ``out``)."""
    shape, out_shape = ctx.shape(name), ctx.shape(out)
    if shape is None or out_shape is None:
        raise _NoBound(f"the shapes of {name!r} and {out!r} are unknown")
    copies = 1
    padded = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    for d, o in zip(padded, out_shape, strict=True):
        if same_dim(d, o):
            continue
        if d == 1 and isinstance(o, int):
            copies *= o
        else:
            raise _NoBound(f"cannot tell how {name!r} {list(shape)} broadcasts to {list(out_shape)}")
    return math.sqrt(copies)


# --------------------------------------------------------------------------------------------
# Linear layers


def _matrix_norm(weight: np.ndarray, seed: int) -> tuple[float, str]:
    if weight.ndim > 2:
        raise _NoBound(f"a batched constant operand {list(weight.shape)} is not supported")
    matrix = np.atleast_2d(weight)
    if min(matrix.shape) <= SVD_MAX_DIM:
        return float(np.linalg.norm(matrix, 2)), "svd"
    top = svds(matrix, k=1, return_singular_vectors=False, random_state=seed)
    return float(top[0]), "lanczos"


def _gram_session(ctx: _Context, node: onnx.NodeProto, in_shape: list[int]) -> ort.InferenceSession:
    """A session computing AᵀA x, where A is the layer without its bias.

    The layer alone (x -> y) goes through the project's VJP builder, whose ``cotangent``
    input is then fed from y itself: grad_x = Aᵀ(A x).
    """
    weight = ctx.constant(node, 1).astype(np.float32)
    layer = helper.make_node(node.op_type, ["x", "w"], ["y"])
    layer.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [layer], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    single = helper.make_model(graph, opset_imports=list(ctx.model.opset_import),
                               ir_version=ctx.model.ir_version)
    try:
        vjp = build_vjp_model(single, ["x"], "y")
    except GradientBuildError as exc:
        raise _NoBound(f"no adjoint for this layer ({exc})") from None
    g = vjp.graph
    inputs = [i for i in g.input if i.name != "cotangent"]
    outputs = [o for o in g.output if o.name == "grad_x"]
    del g.input[:], g.output[:]
    g.input.extend(inputs)
    g.output.extend(outputs)
    after_forward = next(i for i, n in enumerate(g.node) if "y" in n.output) + 1
    g.node.insert(after_forward, helper.make_node("Identity", ["y"], ["cotangent"]))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    weights.configure_session(options)
    return ort.InferenceSession(vjp.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _conv_norm(ctx: _Context, node: onnx.NodeProto) -> tuple[float, int, bool]:
    """(estimate of ||A||₂, iterations run, converged) by power iteration on AᵀA.

    With v a unit vector, sqrt(||AᵀA v||) <= ||A||₂, and it rises to ||A||₂ as v turns
    towards the top right singular vector: the estimate converges from below.
    """
    in_shape = ctx.static_image(node)
    session = _gram_session(ctx, node, in_shape)
    v = np.random.default_rng(ctx.seed).standard_normal(in_shape)
    v /= np.linalg.norm(v)
    estimate = 0.0
    for step in range(1, ctx.iterations + 1):
        w = session.run(None, {"x": v.astype(np.float32)})[0].astype(np.float64)
        size = np.linalg.norm(w)
        if size == 0.0:
            return 0.0, step, True
        previous, estimate = estimate, math.sqrt(size)
        v = w / size
        if abs(estimate - previous) <= ctx.tol * estimate:
            return estimate, step, True
    return estimate, ctx.iterations, False


# --------------------------------------------------------------------------------------------
# Pooling


def _pool_norm(ctx: _Context, node: onnx.NodeProto) -> float:
    """MaxPool: sqrt(max windows per pixel); AveragePool: its exact operator norm.

    Both operators are separable over the spatial axes, so per axis: the 0/1 matrix of
    which taps each window reads (MaxPool: the largest column count; the counts multiply),
    or the averaging matrix with ONNX Runtime's divisors (AveragePool: the norms multiply).
    """
    spatial_in = ctx.static_image(node)[2:]
    rank = len(spatial_in)
    kernel = list(attr(node, "kernel_shape"))
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    pads = resolve_pads(node, spatial_in, kernel, strides, dilations)
    spatial_out = pool_output_sizes(node, spatial_in, kernel, strides, dilations, pads)
    include_pad = attr(node, "count_include_pad", 0)
    norm = 1.0
    for i, length in enumerate(spatial_in):
        taps = np.arange(spatial_out[i])[:, None] * strides[i] - pads[i] + dilations[i] * np.arange(kernel[i])
        reads = (taps[:, :, None] == np.arange(length)).any(axis=1).astype(np.float64)  # [out, in]
        if node.op_type == "MaxPool":
            norm *= math.sqrt(reads.sum(axis=0).max())
            continue
        lo, hi = (-pads[i], length + pads[rank + i]) if include_pad else (0, length)
        divisor = ((taps >= lo) & (taps < hi)).sum(axis=1)
        norm *= float(np.linalg.norm(reads / divisor[:, None], 2))
    return norm
