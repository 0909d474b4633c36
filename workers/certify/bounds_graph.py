"""The bounds graph of a classifier, assembled: interval propagation through the model
(workers/certify/ibp.py's rules), the relaxed operators' input bounds tightened by CROWN before
IBP reads them on (full CROWN), the last affine layer elided into the margins, and the margins
bounded backwards (workers/certify/crown.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.certify.crown import RELAXED, crown_margins, tighten
from workers.certify.ibp import (
    RULES,
    Interval,
    UnsupportedForBounds,
    _Builder,
    _centre_radius,
    _from_centre,
    supported_op_types,
)
from workers.onnxgrad import weights
from workers.onnxgrad.prepare import PreparedClassifier, prepare_classifier

CROWN_METHODS = ("crown_ibp", "crown", "alpha_crown")  # bound the margins backwards (crown.py)


def build_bounds_model(model: bytes | onnx.ModelProto, method: str = "ibp", norm: str = "linf"
                       ) -> tuple[onnx.ModelProto, PreparedClassifier]:
    """The bounds graph of a classifier: inputs ``x_low``, ``x_high`` (the box, in the model's
    input layout) and ``labels`` int64 [N]; outputs ``logits_low``, ``logits_high`` [N, K] and
    ``margin_low`` [N, K] (a lower bound of z_y - z_j; +inf at j = y). ``method`` "ibp", or
    "crown_ibp": the margins also bounded by linear relaxation backwards from the logits
    (workers/certify/crown.py), the larger of the two lower bounds kept; "crown": that, with
    the relaxed operators' input bounds also from CROWN (full CROWN, where small enough)."""
    prepared = prepare_classifier(model)
    if weights.has_external(prepared.model):  # |W| and the relaxations' constants would be copies
        raise UnsupportedForBounds(f"{method}: a model whose weights stay outside it (over 2 GiB) is not "
                                   "bounded yet")
    b = _Builder(prepared)
    graph = b.model.graph
    image = prepared.input_name
    b.bounds[image] = ("x_low", "x_high")
    if norm == "l2":
        b.balls[image] = ("x", 1.0)
    final = _final_affine(b, prepared.logits_name)
    for node in graph.node:
        if final is not None and node is final[0]:
            break
        if not any(b.interval(n) is not None for n in node.input if n):
            b.g.nodes.append(node)  # depends on constants only
            continue
        if node.op_type in ("Shape", "Size"):  # reads the image's shape, not its values
            b.g.nodes.append(helper.make_node(node.op_type, [b.bounds[node.input[0]][0]], list(node.output),
                                              name=b.g.fresh(node.op_type), **b.attrs(node)))
            continue
        if node.op_type not in RULES:
            raise UnsupportedForBounds(
                f"operator {node.op_type} ({node.name!r}) has no interval-bound rule; supported: "
                f"{', '.join(supported_op_types())}")
        if method == "crown" and node.op_type in RELAXED and node.input[0] in b.bounds:
            tighten(b, image, b.path, node.input[0], norm == "l2")  # before IBP reads them on
        for output, interval in zip(node.output, RULES[node.op_type](b, node), strict=False):
            if output:
                b.bounds[output] = interval
        b.path.append(node)
        if prepared.logits_name in b.bounds:
            break
    g = b.g
    if final is not None:
        _, hidden, weight, bias = final
        low, high = _elided_margins(b, b.bounds[hidden], weight, bias)
    else:
        logits_low, logits_high = b.bounds[prepared.logits_name]
        low = g.op("Identity", logits_low)
        high = g.op("Identity", logits_high)
    margin = _margins(b, low, high, final is not None)
    crownish = method in CROWN_METHODS
    b.alphas = [] if method == "alpha_crown" else None
    if crownish:
        producers = {o: n for n in graph.node for o in n.output}
        path = list(b.path)
        if final is not None:  # the final affine node(s), after the hidden layer
            tail = [final[0]]
            if final[0].output[0] != prepared.logits_name:
                tail.append(producers[prepared.logits_name])
            path += tail
        over_box, over_ball = crown_margins(b, prepared, path)
        ball_margin = g.op("Max", margin, g.op("Add", over_ball, _own_class(b, low)))
        ibp_margin = margin
        margin = g.op("Max", margin, over_box)
    ball = crownish or norm == "l2"
    names = ("x_low", "x_high", "x") if ball else ("x_low", "x_high")
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, _dims(prepared.input_shape))
              for name in names]
    inputs.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]))
    if ball:
        inputs.append(helper.make_tensor_value_info("l2_eps", TensorProto.FLOAT, []))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
               for name in ("logits_low", "logits_high", "margin_low")]
    g.nodes.extend([helper.make_node("Identity", [low], ["logits_low"]),
                    helper.make_node("Identity", [high], ["logits_high"]),
                    helper.make_node("Identity", [margin], ["margin_low"])])
    if crownish:
        outputs.append(helper.make_tensor_value_info("margin_l2", TensorProto.FLOAT, None))
        g.nodes.append(helper.make_node("Identity", [ball_margin], ["margin_l2"]))
    if method == "alpha_crown":  # what the slope optimisation reads (workers/certify/bounds.py)
        # the bound the slopes maximise: over the box, or under an L2 budget the better of the box
        # (which holds the ball) and the ball's dual norm, a subgradient flowing to the better one
        objective = over_box if norm == "linf" else g.op("Max", over_box, over_ball)
        outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                    for name in ("margin_ibp", "crown_objective")]
        g.nodes += [helper.make_node("Identity", [ibp_margin], ["margin_ibp"]),
                    helper.make_node("Identity", [objective], ["crown_objective"])]
        for index, (name, init, shape) in enumerate(b.alphas or []):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["NK", *shape]))
            outputs.append(helper.make_tensor_value_info(f"alpha_init/{index}", TensorProto.FLOAT, None))
            g.nodes.append(helper.make_node("Identity", [init], [f"alpha_init/{index}"]))
    bounds_graph = helper.make_graph(g.nodes, "interval_bounds", inputs, outputs,
                                     list(graph.initializer) + g.initializers)
    bounds = helper.make_model(bounds_graph, opset_imports=list(b.model.opset_import),
                               ir_version=b.model.ir_version)
    return bounds, prepared


def _dims(shape) -> list:
    return [d if isinstance(d, int) else "N" if i == 0 else f"d{i}" for i, d in enumerate(shape)]


def _final_affine(b: _Builder, logits: str) -> tuple[onnx.NodeProto, str, np.ndarray, np.ndarray] | None:
    """(node, its image input, W [D, K], bias [K]) when the logits are h @ W + bias with
    constant W: a Gemm (transA 0), or a MatMul optionally followed by Add of a constant."""
    producers = {o: n for n in b.model.graph.node for o in n.output}
    node = producers.get(logits)
    bias = None
    if node is not None and node.op_type == "Add":
        constant = [n for n in node.input if b.constant(n) is not None]
        other = [n for n in node.input if b.constant(n) is None]
        if len(constant) == 1 and len(other) == 1 and producers.get(other[0]) is not None \
                and producers[other[0]].op_type == "MatMul":
            bias = b.constant(constant[0])
            node = producers[other[0]]
        else:
            return None
    if node is None:
        return None
    if node.op_type == "MatMul" and b.constant(node.input[1]) is not None:
        weight = b.constant(node.input[1])
        assert weight is not None
        return node, node.input[0], weight, np.zeros(weight.shape[1], np.float32) if bias is None else bias
    if node.op_type == "Gemm" and bias is None:
        attrs = b.attrs(node)
        weight = b.constant(node.input[1])
        if weight is None or attrs.get("transA", 0):
            return None
        weight = (weight.T if attrs.get("transB", 0) else weight) * float(attrs.get("alpha", 1.0))
        c = b.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and c is None:
            return None
        bias = np.zeros(weight.shape[1]) if c is None else np.broadcast_to(c, (weight.shape[1],))
        return node, node.input[0], weight, bias * float(attrs.get("beta", 1.0))
    return None


def _elided_margins(b: _Builder, hidden: Interval, weight: np.ndarray, bias: np.ndarray) -> Interval:
    """Bounds of the logits [N, K] and, stored for _margins, the per-class margin terms:
    here the logits' own bounds; the margins are built from the hidden interval."""
    g = b.g
    centre, radius = _centre_radius(b, hidden)
    w, c = g.const(weight.astype(np.float32)), g.const(np.asarray(bias, np.float32))
    mid = g.op("Add", g.op("MatMul", centre, w), c)
    rad = g.op("MatMul", radius, g.const(np.abs(weight).astype(np.float32)))
    b.elision = (centre, radius, weight.astype(np.float32), np.asarray(bias, np.float32))
    return _from_centre(b, mid, rad)


def _margins(b: _Builder, low: str, high: str, elided: bool) -> str:
    """Lower bounds of z_y - z_j [N, K]; a large positive value at j = y."""
    g = b.g
    labels = "labels"
    if elided:
        assert b.elision is not None
        centre, radius, weight, bias = b.elision
        # W_y - W_j for every j: [N, D, K] from W [D, K] and the label's column
        w = g.const(weight)
        columns = g.const(np.ascontiguousarray(weight.T))
        w_y = g.op("Unsqueeze", g.op("Gather", columns, labels, axis=0), g.ints([2]))  # [N, D, 1]
        difference = g.op("Sub", w_y, w)  # [N, D, K]
        b_y = g.op("Unsqueeze", g.op("Gather", g.const(bias), labels, axis=0), g.ints([1]))  # [N, 1]
        centre_3 = g.op("Unsqueeze", centre, g.ints([1]))  # [N, 1, D]
        radius_3 = g.op("Unsqueeze", radius, g.ints([1]))
        mid = g.op("Squeeze", g.op("MatMul", centre_3, difference), g.ints([1]))  # [N, K]
        mid = g.op("Add", mid, g.op("Sub", b_y, g.const(bias)))
        rad = g.op("Squeeze", g.op("MatMul", radius_3, g.op("Abs", difference)), g.ints([1]))
        margin = g.op("Sub", mid, rad)
    else:
        low_y = g.op("GatherElements", low, g.op("Unsqueeze", labels, g.ints([1])), axis=1)  # [N, 1]
        margin = g.op("Sub", low_y, high)
    return g.op("Add", margin, _own_class(b, low))


def _own_class(b: _Builder, like: str) -> str:
    """[N, K]: 1e30 at j = y, 0 elsewhere (the margin of a class over itself is no constraint)."""
    g = b.g
    classes = g.op("Shape", like, start=1, end=2)
    return g.op("OneHot", "labels", classes, g.const(np.array([0.0, 1e30], np.float32)), axis=-1)
