"""Attack updates as ONNX nodes around a gradient model: one ONNX Runtime call per attack step.

The builders take a gradient model (workers/onnxgrad: inputs the image and ``labels``, outputs
``logits``, ``loss`` and ``grad``) and add an attack's own update to it, so that an attack's
state (iterates, best points, step sizes) can stay in ONNX Runtime's buffers between calls
(workers/bound_loop.py): on a GPU, on the device. Each node is one of the numpy
implementation's float32 operations, in its order (the norms of workers/attacks/base.py, PGD of
gradient.py, APGD of apgd.py), so the loop of calls gives the numpy loop's adversarial examples
to the bit. The L2 norm sums its squares in float64 on both sides (``Norm.size``): the sums'
different orders then agree to double rounding, and the float32 norm the update uses differs
only where the two sums straddle a float32 rounding boundary, about once in 10^8 norms.

A loop graph reads state tensors (its inputs) and writes new values of some of them: a
``LoopGraph`` says which output replaces which state. State names start with ``loop/`` except
the gradient model's own inputs (the image, ``labels``, ``targets``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from workers.onnxgrad.graph import GraphBuilder

P = "loop/"


@dataclass(frozen=True)
class LoopGraph:
    """A model whose outputs replace state tensors: ``writes`` maps output -> state name; after
    a call, each state of ``shifts`` (later -> earlier) takes the value that ``earlier`` had
    before the call (APGD's previous iterate), without a copy."""

    model: onnx.ModelProto
    writes: dict[str, str]
    shifts: dict[str, str] = field(default_factory=dict)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


class _Update:
    """Emits an attack update's nodes for images of rank ``rank`` (batch first)."""

    def __init__(self, model: onnx.ModelProto, rank: int):
        taken = {n for node in model.graph.node for n in [*node.input, *node.output]}
        taken |= {t.name for t in [*model.graph.input, *model.graph.output, *model.graph.initializer]}
        self.g = GraphBuilder(_opset(model), taken, prefix=P)
        self.axes = list(range(1, rank))
        self.column = [-1] + [1] * (rank - 1)

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.g.op(op_type, *inputs, **attrs)

    def col(self, per_sample: str) -> str:
        """A [N] tensor as [N, 1, ..., 1], to broadcast over images."""
        return self.op("Reshape", per_sample, self.g.ints(self.column))

    def size(self, t: str) -> str:
        """Norm.size of L2: the per-sample norm, its squares summed in float64, as float32 [N,1..1]."""
        wide = self.op("Cast", t, to=TensorProto.DOUBLE)
        total = self.g.reduce("ReduceSum", self.op("Mul", wide, wide), self.axes, keepdims=True)
        return self.op("Cast", self.op("Sqrt", total), to=TensorProto.FLOAT)

    def ascent(self, norm: str, grad: str) -> str:
        """Norm.ascent_direction."""
        if norm == "linf":
            return self.op("Sign", grad)
        peak = self.g.reduce("ReduceMax", self.op("Abs", grad), self.axes, keepdims=True)
        zero, one = self.g.const(np.float32(0)), self.g.const(np.float32(1))
        scaled = self.op("Div", grad, self.op("Where", self.op("Greater", peak, zero), peak, one))
        norms = self.op("Max", self.size(scaled), self.g.const(np.float32(1e-12)))
        return self.op("Div", scaled, norms)

    def project(self, norm: str, delta: str, eps: str) -> str:
        """Norm.project onto the ball of radius ``eps`` (a float32 scalar input)."""
        if norm == "linf":
            return self.op("Clip", delta, self.op("Neg", eps), eps)
        norms = self.op("Max", self.size(delta), self.g.const(np.float32(1e-12)))
        factor = self.op("Min", self.op("Div", eps, norms), self.g.const(np.float32(1)))
        return self.op("Mul", delta, factor)

    def into_box(self, norm: str, x: str, point: str, eps: str, low: str, high: str) -> str:
        """clip_to_box(x + project(point - x, eps), bounds): the attacks' projection."""
        delta = self.project(norm, self.op("Sub", point, x), eps)
        return self.op("Clip", self.op("Add", x, delta), low, high)

    def where_rows(self, rows: str, a: str, b: str) -> str:
        """a where ``rows`` (bool [N]) else b, for image-shaped a and b."""
        return self.op("Where", self.col(rows), a, b)

    def attach(self, model: onnx.ModelProto) -> None:
        model.graph.node.extend(self.g.nodes)
        model.graph.initializer.extend(self.g.initializers)


def _float_input(graph: onnx.GraphProto, name: str, shape) -> None:
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))


def _image_input(graph: onnx.GraphProto, input_name: str) -> onnx.ValueInfoProto:
    return next(i for i in graph.input if i.name == input_name)


def _like(image: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    value = onnx.ValueInfoProto()
    value.CopyFrom(image)
    value.name = name
    return value


def _set_outputs(graph: onnx.GraphProto, outputs: list[onnx.ValueInfoProto]) -> None:
    del graph.output[:]
    graph.output.extend(outputs)


def _rank(image: onnx.ValueInfoProto) -> int:
    return len(image.type.tensor_type.shape.dim)


def pgd_step_model(gradient: onnx.ModelProto, input_name: str, norm: str) -> LoopGraph:
    """One PGD step after the gradient (workers/attacks/gradient.py): the iterate (the model's
    input) moves to clip(x + project(x_adv + step * ascent(grad) - x, eps), bounds). Scalars
    loop/step (negative: descend), loop/eps, loop/low, loop/high; state loop/x (clean images)."""
    graph = gradient.graph
    image = _image_input(graph, input_name)
    graph.input.append(_like(image, P + "x"))
    for name in ("step", "eps", "low", "high"):
        _float_input(graph, P + name, [])
    u = _Update(gradient, _rank(image))
    moved = u.op("Add", input_name, u.op("Mul", P + "step", u.ascent(norm, "grad")))
    following = u.op("Identity", u.into_box(norm, P + "x", moved, P + "eps", P + "low", P + "high"))
    u.attach(gradient)
    _set_outputs(graph, [_like(image, following)])
    return LoopGraph(gradient, {following: input_name})


def _standalone(name: str) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph([], name, [], []), opset_imports=[helper.make_opsetid("", 17)])


def _images(graph: onnx.GraphProto, names, image_shape: tuple) -> None:
    for name in names:
        _float_input(graph, name, [None, *image_shape[1:]])


def apgd_update_model(image_shape: tuple, iterate: str, norm: str, momentum: float) -> LoopGraph:
    """APGD's next iterate (workers/attacks/apgd.py, Croce and Hein 2020): a step from the
    iterate (state ``iterate``) along the ascent direction of loop/grad, projected, then, where
    the bool scalar loop/momentum is set, the momentum step between it and loop/x_prev. The
    previous iterate becomes loop/x_prev."""
    model = _standalone("apgd_update")
    graph = model.graph
    _images(graph, (iterate, P + "x", P + "x_prev", P + "grad"), image_shape)
    _float_input(graph, P + "step", [None])
    graph.input.append(helper.make_tensor_value_info(P + "momentum", TensorProto.BOOL, []))
    for name in ("eps", "low", "high"):
        _float_input(graph, P + name, [])
    u = _Update(model, len(image_shape))
    bounds, x = (P + "eps", P + "low", P + "high"), P + "x"
    move = u.op("Mul", u.col(P + "step"), u.ascent(norm, P + "grad"))
    first = u.into_box(norm, x, u.op("Add", iterate, move), *bounds)
    towards = u.op("Mul", u.g.const(np.float32(momentum)), u.op("Sub", first, iterate))
    back = u.op("Mul", u.g.const(np.float32(1 - momentum)), u.op("Sub", iterate, P + "x_prev"))
    later = u.into_box(norm, x, u.op("Add", u.op("Add", iterate, towards), back), *bounds)
    following = u.op("Where", P + "momentum", later, first)
    u.attach(model)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(following)])
    return LoopGraph(model, {following: iterate}, shifts={P + "x_prev": iterate})


def apgd_objective_model(gradient: onnx.ModelProto, input_name: str, *, negate: bool,
                         hit_when: str) -> LoopGraph:
    """APGD's objective and its gradient at the iterate (the model's input; negated for a
    targeted cross-entropy), then the bookkeeping: found points, best points, the count of the
    loss's increases, the last loss.

    ``hit_when``: "differs" (an untargeted success: the prediction is not ``labels``) or
    "targets" / "labels" (the prediction equals that input)."""
    graph = gradient.graph
    image = _image_input(graph, input_name)
    for name in ("found", "x_best", "grad_best"):
        graph.input.append(_like(image, P + name))
    for name in ("loss_best", "last_loss"):
        _float_input(graph, P + name, [None])
    graph.input.append(helper.make_tensor_value_info(P + "success", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "increases", TensorProto.INT64, [None]))
    u = _Update(gradient, _rank(image))
    loss, grad = ("loss", "grad") if not negate else (u.op("Neg", "loss"), u.op("Neg", "grad"))
    predicted = u.op("ArgMax", "logits", axis=1, keepdims=0)
    if hit_when == "differs":
        hit = u.op("Not", u.op("Equal", predicted, "labels"))
    else:
        hit = u.op("Equal", predicted, hit_when)
    improved = u.op("Greater", loss, P + "loss_best")
    rises = u.op("Cast", u.op("Greater", loss, P + "last_loss"), to=TensorProto.INT64)
    writes = {
        grad: P + "grad",
        u.where_rows(hit, input_name, P + "found"): P + "found",
        u.op("Or", P + "success", hit): P + "success",
        u.where_rows(improved, input_name, P + "x_best"): P + "x_best",
        u.where_rows(improved, grad, P + "grad_best"): P + "grad_best",
        u.op("Where", improved, loss, P + "loss_best"): P + "loss_best",
        u.op("Add", P + "increases", rises): P + "increases",
        loss: P + "last_loss",
    }
    u.attach(gradient)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def apgd_checkpoint_model(image_shape: tuple, iterate: str) -> LoopGraph:
    """APGD's checkpoint: where the loss rose in at most loop/threshold of the period's steps
    (int64: floor(rho * period)), or the best loss did not improve since the last checkpoint
    that did not halve, halve the step and restart from the best point."""
    model = _standalone("apgd_checkpoint")
    graph = model.graph
    _images(graph, (iterate, P + "grad", P + "x_best", P + "grad_best"), image_shape)
    for name in ("step", "loss_best", "last_loss", "best_at_check"):
        _float_input(graph, P + name, [None])
    graph.input.append(helper.make_tensor_value_info(P + "halved", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "increases", TensorProto.INT64, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "threshold", TensorProto.INT64, []))
    u = _Update(model, len(image_shape))
    few_rises = u.op("LessOrEqual", P + "increases", P + "threshold")
    no_better = u.op("LessOrEqual", P + "loss_best", P + "best_at_check")
    stalled = u.op("And", u.op("Not", P + "halved"), no_better)
    halve = u.op("Or", few_rises, stalled)
    halved_step = u.op("Div", P + "step", u.g.const(np.float32(2)))
    writes = {
        u.op("Where", halve, halved_step, P + "step"): P + "step",
        u.where_rows(halve, P + "x_best", iterate): iterate,
        u.where_rows(halve, P + "grad_best", P + "grad"): P + "grad",
        u.op("Where", halve, P + "loss_best", P + "last_loss"): P + "last_loss",
        halve: P + "halved",
        u.op("Identity", P + "loss_best"): P + "best_at_check",
        u.op("Sub", P + "increases", P + "increases"): P + "increases",
    }
    u.attach(model)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(model, writes)


def _double(graph: onnx.GraphProto, name: str) -> None:
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, [None]))


def deepfool_check_model(forward: onnx.ModelProto, input_name: str) -> LoopGraph:
    """DeepFool's test after a step (workers/attacks/deepfool.py): the samples stay active
    where the forward model's prediction at the iterate is still ``labels`` (the host reads
    which stopped: those are fooled)."""
    graph = forward.graph
    logits = graph.output[0].name
    graph.input.append(helper.make_tensor_value_info(P + "active", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, [None]))
    u = _Update(forward, _rank(_image_input(graph, input_name)))
    kept = u.op("Equal", u.op("ArgMax", logits, axis=1, keepdims=0), "labels")
    writes = {u.op("And", P + "active", kept): P + "active"}
    u.attach(forward)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)


def deepfool_candidate_model(gradient: onnx.ModelProto, input_name: str, norm: str,
                             num_classes: int) -> LoopGraph:
    """One candidate class of a DeepFool iteration: the gradient of z_k - z_y at the iterate
    (the cotangent gradient model, its ``dlogits`` made here from loop/others[:, loop/j] and
    ``labels``), the distance |f_k| / ||w_k||_dual to its linearised boundary in float64, and
    the nearest boundary so far (loop/best_dist, best_f, best_w; reset where the bool scalar
    loop/first is set)."""
    graph = gradient.graph
    image = _image_input(graph, input_name)
    dlogits = next(i for i in graph.input if i.name == "dlogits")
    graph.input.remove(dlogits)
    if not any(i.name == "labels" for i in graph.input):
        graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "others", TensorProto.INT64, [None, None]))
    graph.input.append(helper.make_tensor_value_info(P + "j", TensorProto.INT64, []))
    graph.input.append(helper.make_tensor_value_info(P + "first", TensorProto.BOOL, []))
    graph.input.append(_like(image, P + "best_w"))
    for name in ("best_dist", "best_f"):
        _double(graph, P + name)
    u = _Update(gradient, _rank(image))
    g = u.g
    candidate = u.op("Gather", P + "others", P + "j", axis=1)  # [N]
    depth = g.ints([num_classes])
    off_on = g.const(np.array([0, 1], np.float32))
    rising = u.op("OneHot", candidate, depth, off_on, axis=-1)
    falling = u.op("OneHot", "labels", depth, off_on, axis=-1)
    g.nodes.append(helper.make_node("Sub", [rising, falling], ["dlogits"], name=g.fresh("Sub")))

    def at(index: str) -> str:
        picked = u.op("GatherElements", "logits", u.op("Reshape", index, g.ints([-1, 1])), axis=1)
        return u.op("Reshape", picked, g.ints([-1]))

    f = u.op("Abs", u.op("Cast", u.op("Sub", at(candidate), at("labels")), to=TensorProto.DOUBLE))
    wide = u.op("Cast", "grad", to=TensorProto.DOUBLE)
    if norm == "linf":
        dual = g.reduce("ReduceSum", u.op("Abs", wide), u.axes, keepdims=False)
    else:
        dual = u.op("Sqrt", g.reduce("ReduceSum", u.op("Mul", wide, wide), u.axes, keepdims=False))
    dist = u.op("Div", f, u.op("Add", dual, g.const(1e-12, np.float64)))
    best_dist = u.op("Where", P + "first", g.const(np.inf, np.float64), P + "best_dist")
    best_f = u.op("Where", P + "first", g.const(0, np.float64), P + "best_f")
    best_w = u.op("Where", P + "first", g.const(np.float32(0)), P + "best_w")
    better = u.op("Less", dist, best_dist)
    writes = {
        u.op("Where", better, dist, best_dist): P + "best_dist",
        u.op("Where", better, f, best_f): P + "best_f",
        u.where_rows(better, "grad", best_w): P + "best_w",
    }
    u.attach(gradient)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def deepfool_step_model(image_shape: tuple, iterate: str, norm: str, overshoot: float) -> LoopGraph:
    """DeepFool's step to the nearest linearised boundary, for the active samples: r += (|f_l| +
    1e-4) / ||w_l||_dual^(1 or 2) * (sign(w_l) or w_l) in float64, the iterate clip(x + (1 +
    overshoot) r) in float32, and one more iteration counted."""
    model = _standalone("deepfool_step")
    graph = model.graph
    _images(graph, (iterate, P + "x", P + "best_w"), image_shape)
    graph.input.append(helper.make_tensor_value_info(P + "r", TensorProto.DOUBLE, [None, *image_shape[1:]]))
    _double(graph, P + "best_f")
    graph.input.append(helper.make_tensor_value_info(P + "active", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "iterations", TensorProto.INT64, [None]))
    for name in ("low", "high"):
        _float_input(graph, P + name, [])
    u = _Update(model, len(image_shape))
    g = u.g
    wide = u.op("Cast", P + "best_w", to=TensorProto.DOUBLE)
    if norm == "linf":
        dual = g.reduce("ReduceSum", u.op("Abs", wide), u.axes, keepdims=False)
        direction = u.op("Sign", P + "best_w")
    else:
        dual = g.reduce("ReduceSum", u.op("Mul", wide, wide), u.axes, keepdims=False)
        direction = P + "best_w"
    scale = u.op("Div", u.op("Add", P + "best_f", g.const(1e-4, np.float64)),
                 u.op("Add", dual, g.const(1e-12, np.float64)))
    r_step = u.op("Mul", u.col(scale), u.op("Cast", direction, to=TensorProto.DOUBLE))
    r = u.where_rows(P + "active", u.op("Add", P + "r", r_step), P + "r")
    overshot = u.op("Mul", g.const(1 + overshoot, np.float64), r)
    shifted = u.op("Add", u.op("Cast", P + "x", to=TensorProto.DOUBLE), overshot)
    landed = u.op("Clip", u.op("Cast", shifted, to=TensorProto.FLOAT), P + "low", P + "high")
    writes = {
        r: P + "r",
        u.where_rows(P + "active", landed, iterate): iterate,
        u.op("Add", P + "iterations", u.op("Cast", P + "active", to=TensorProto.INT64)): P + "iterations",
    }
    u.attach(model)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(model, writes)


def cw_step_model(gradient: onnx.ModelProto, input_name: str, *, targeted: bool, confidence: float,
                  bounds: tuple[float, float]) -> LoopGraph:
    """One Adam step of Carlini-Wagner L2 (workers/attacks/cw.py) for the active samples, with
    the margin gradient in the middle: the iterate x' = low + (tanh(w0 + modifier) + 1) / 2 *
    span (in float64, then float32: the model's input), the objective ||x' - x||^2 + c f(x'),
    the best adversarial point so far, the Adam moments and the modifier (float64), and, where
    the bool scalar loop/check is set, the early abort of samples whose objective stalled.
    Scalars: loop/rate (learning rate x Adam's bias correction, float64). ONNX Runtime's
    float64 tanh differs from numpy's in the last bits, so this loop follows the numpy one to
    float64 rounding, not to the bit."""
    low, high = bounds
    span = high - low
    sign = 1.0 if targeted else -1.0
    graph = gradient.graph
    image = _image_input(graph, input_name)
    graph.input.remove(image)
    rank = _rank(image)
    dims = image.type.tensor_type.shape.dim[1:]
    wide_images = [None, *[d.dim_value or d.dim_param or None for d in dims]]
    for name in ("w0", "modifier", "m1", "m2"):
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.DOUBLE, wide_images))
    graph.input.append(_like(image, P + "x"))
    graph.input.append(_like(image, P + "best_x"))
    for name in ("const", "best_l2", "previous"):
        _double(graph, P + name)
    for name in ("active", "succeeded"):
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "check", TensorProto.BOOL, []))
    graph.input.append(helper.make_tensor_value_info(P + "rate", TensorProto.DOUBLE, []))
    u = _Update(gradient, rank)
    g = u.g

    def c(value: float) -> str:
        return g.const(value, np.float64)

    tanh = u.op("Tanh", u.op("Add", P + "w0", P + "modifier"))
    unit = u.op("Div", u.op("Add", tanh, c(1.0)), c(2.0))
    point = u.op("Add", c(low), u.op("Mul", unit, c(span)))
    g.nodes.append(helper.make_node("Cast", [point], [input_name], to=TensorProto.FLOAT,
                                    name=g.fresh("Cast")))
    clean = u.op("Cast", P + "x", to=TensorProto.DOUBLE)
    diff = u.op("Sub", u.op("Cast", input_name, to=TensorProto.DOUBLE), clean)
    l2sq = g.reduce("ReduceSum", u.op("Mul", diff, diff), u.axes, keepdims=False)
    f_raw = u.op("Mul", c(sign), u.op("Cast", "loss", to=TensorProto.DOUBLE))
    f = u.op("Max", f_raw, c(-confidence))
    objective = u.op("Add", l2sq, u.op("Mul", P + "const", f))
    depth = u.op("Gather", u.op("Shape", "logits"), g.ints([1]), axis=0)
    one_hot = u.op("Cast", u.op("OneHot", "labels", depth, g.const(np.array([0, 1], np.float32)), axis=-1),
                   to=TensorProto.DOUBLE)
    pushed = u.op("Mul", one_hot, c(-confidence if targeted else confidence))
    scores = u.op("Add", u.op("Cast", "logits", to=TensorProto.DOUBLE), pushed)
    predicted = u.op("ArgMax", scores, axis=1, keepdims=0)
    goal = u.op("Equal", predicted, "labels")
    if not targeted:
        goal = u.op("Not", goal)
    goal = u.op("And", goal, P + "active")
    better = u.op("And", goal, u.op("Less", l2sq, P + "best_l2"))
    c_grad = u.op("Mul", u.op("Mul", P + "const", c(sign)),
                  u.op("Cast", u.op("Greater", f_raw, c(-confidence)), to=TensorProto.DOUBLE))
    pull = u.op("Mul", u.col(c_grad), u.op("Cast", "grad", to=TensorProto.DOUBLE))
    grad_x = u.op("Add", u.op("Mul", c(2.0), diff), pull)
    slope = u.op("Sub", c(1.0), u.op("Mul", tanh, tanh))
    grad_w = u.op("Mul", u.op("Div", u.op("Mul", grad_x, slope), c(2.0)), c(span))
    m1 = u.op("Add", u.op("Mul", c(0.9), P + "m1"), u.op("Mul", c(1 - 0.9), grad_w))
    m2 = u.op("Add", u.op("Mul", c(0.999), P + "m2"), u.op("Mul", c(1 - 0.999), u.op("Mul", grad_w, grad_w)))
    moved = u.op("Div", u.op("Mul", P + "rate", m1), u.op("Add", u.op("Sqrt", m2), c(1e-8)))
    modifier = u.op("Sub", P + "modifier", moved)
    checked = u.op("And", P + "check", P + "active")
    stalled = u.op("Greater", objective, u.op("Mul", P + "previous", c(0.9999)))
    writes = {
        u.where_rows(P + "active", modifier, P + "modifier"): P + "modifier",
        u.where_rows(P + "active", m1, P + "m1"): P + "m1",
        u.where_rows(P + "active", m2, P + "m2"): P + "m2",
        u.op("Or", P + "succeeded", goal): P + "succeeded",
        u.op("Where", better, l2sq, P + "best_l2"): P + "best_l2",
        u.where_rows(better, input_name, P + "best_x"): P + "best_x",
        u.op("Where", checked, objective, P + "previous"): P + "previous",
        u.op("And", P + "active", u.op("Not", u.op("And", checked, stalled))): P + "active",
    }
    u.attach(gradient)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def square_propose_model(image_shape: tuple, iterate: str) -> LoopGraph:
    """A Square Attack L-inf proposal (workers/attacks/square.py): the best point with one s x s
    window per sample (corners loop/rows, loop/cols, sent per call with loop/change, the
    window's +-2 eps per channel [N, C, 1, 1]) moved by loop/change, projected onto the eps ball
    and the box; it becomes the iterate (the forward model's input)."""
    model = _standalone("square_propose")
    graph = model.graph
    _images(graph, (P + "x", P + "best_x"), image_shape)
    for name in ("rows", "cols"):
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.INT64, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "side", TensorProto.INT64, []))
    _float_input(graph, P + "change", [None, image_shape[1], 1, 1])
    for name in ("eps", "low", "high"):
        _float_input(graph, P + name, [])
    u = _Update(model, 4)
    g = u.g
    shape = u.op("Shape", P + "best_x")

    def inside(corner: str, axis: int, column: list[int]) -> str:
        """[N, 1, H, 1] or [N, 1, 1, W]: whether each row / column lies in the sample's window."""
        extent = u.op("Gather", shape, g.const(np.int64(axis)), axis=0)
        positions = u.op("Range", g.const(np.int64(0)), extent, g.const(np.int64(1)))
        start = u.op("Reshape", corner, g.ints([-1, 1]))
        after = u.op("GreaterOrEqual", positions, start)
        before = u.op("Less", positions, u.op("Add", start, P + "side"))
        return u.op("Reshape", u.op("And", after, before), g.ints(column))

    window = u.op("And", inside(P + "rows", 2, [0, 1, -1, 1]), inside(P + "cols", 3, [0, 1, 1, -1]))
    candidate = u.op("Where", window, u.op("Add", P + "best_x", P + "change"), P + "best_x")
    projected = u.into_box("linf", P + "x", candidate, P + "eps", P + "low", P + "high")
    u.attach(model)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(projected)])
    return LoopGraph(model, {projected: iterate})


def square_judge_model(forward: onnx.ModelProto, input_name: str, *, targeted: bool) -> LoopGraph:
    """A Square Attack query: the forward model at the proposal (its input), the margin of
    ``labels`` (the targets when ``targeted``), and, for the active samples, the proposal kept
    where it was adversarial or lowered the margin; adversarial samples stop (the host reads
    loop/active after each query)."""
    graph = forward.graph
    logits = graph.output[0].name
    image = _image_input(graph, input_name)
    graph.input.append(_like(image, P + "best_x"))
    _float_input(graph, P + "best", [None])
    graph.input.append(helper.make_tensor_value_info(P + "active", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, [None]))
    u = _Update(forward, 4)
    g = u.g
    index = u.op("Reshape", "labels", g.ints([-1, 1]))
    at_label = u.op("Reshape", u.op("GatherElements", logits, index, axis=1), g.ints([-1]))
    depth = u.op("Gather", u.op("Shape", logits), g.ints([1]), axis=0)
    is_label = u.op("Cast", u.op("OneHot", "labels", depth, g.const(np.array([0, 1], np.float32)), axis=-1),
                    to=TensorProto.BOOL)
    others = u.op("Where", is_label, g.const(np.float32(-np.inf)), logits)
    best_other = g.reduce("ReduceMax", others, [1], keepdims=False)
    value = u.op("Sub", best_other, at_label) if targeted else u.op("Sub", at_label, best_other)
    predicted = u.op("ArgMax", logits, axis=1, keepdims=0)
    hit = u.op("Equal", predicted, "labels")
    if not targeted:
        hit = u.op("Not", hit)
    keep = u.op("And", P + "active", u.op("Or", hit, u.op("Less", value, P + "best")))
    writes = {
        u.where_rows(keep, input_name, P + "best_x"): P + "best_x",
        u.op("Where", keep, value, P + "best"): P + "best",
        u.op("And", P + "active", u.op("Not", hit)): P + "active",
    }
    u.attach(forward)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)


def square_l2_propose_model(image_shape: tuple, iterate: str) -> LoopGraph:
    """A Square Attack L2 proposal (Algorithm 3; workers/attacks/square.py): the mass of a second
    s x s window (corners loop/rows2, loop/cols2) moves into the first (loop/rows, loop/cols),
    whose new content is the sample's eta pattern (loop/patterns [N, s, s], flipped by the
    host) times a sign per channel (loop/signs [N, C, 1, 1]) plus the normalised old window,
    scaled to keep the perturbation's norm; in float64, then rescaled to eps and projected.
    The windows are masks over the image, so the window sums run over whole images with zeros
    outside: equal to the numpy sums up to float64 rounding."""
    model = _standalone("square_l2_propose")
    graph = model.graph
    _images(graph, (P + "x", P + "best_x"), image_shape)
    for name in ("rows", "cols", "rows2", "cols2"):
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.INT64, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "side", TensorProto.INT64, []))
    doubles: tuple[tuple[str, list], ...] = (("patterns", [None, None, None]),
                                             ("signs", [None, image_shape[1], 1, 1]), ("eps64", []))
    for name, extent in doubles:
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.DOUBLE, extent))
    for name in ("eps", "low", "high"):
        _float_input(graph, P + name, [])
    u = _Update(model, 4)
    g = u.g

    def c(value: float) -> str:
        return g.const(value, np.float64)

    shape = u.op("Shape", P + "best_x")
    extents = {axis: u.op("Gather", shape, g.const(np.int64(axis)), axis=0) for axis in (1, 2, 3)}
    positions = {axis: u.op("Range", g.const(np.int64(0)), extents[axis], g.const(np.int64(1)))
                 for axis in (2, 3)}

    def offsets(corner: str, axis: int) -> str:
        """[N, H] (or [N, W]): each row's (column's) offset from the sample's window corner."""
        return u.op("Sub", positions[axis], u.op("Reshape", corner, g.ints([-1, 1])))

    def window(rows: str, cols: str) -> str:
        """[N, 1, H, W] bool: the s x s window at each sample's corner."""
        def along(corner: str, axis: int, column: list[int]) -> str:
            offset = offsets(corner, axis)
            inside = u.op("And", u.op("GreaterOrEqual", offset, g.const(np.int64(0))),
                          u.op("Less", offset, P + "side"))
            return u.op("Reshape", inside, g.ints(column))

        return u.op("And", along(rows, 2, [0, 1, -1, 1]), along(cols, 3, [0, 1, 1, -1]))

    first, second = window(P + "rows", P + "cols"), window(P + "rows2", P + "cols2")
    delta = u.op("Cast", u.op("Sub", P + "best_x", P + "x"), to=TensorProto.DOUBLE)
    zero = c(0.0)

    def norm(t: str, axes: list[int]) -> str:
        return u.op("Sqrt", g.reduce("ReduceSum", u.op("Mul", t, t), axes, keepdims=True))

    old = u.op("Where", first, delta, zero)
    window_norms = norm(old, [2, 3])
    image_norms = norm(delta, [1, 2, 3])
    touched_norms = norm(u.op("Where", u.op("Or", first, second), delta, zero), [1, 2, 3])
    # the eta patterns placed at the first window: rows then columns gathered from [N, s, s]
    last = u.op("Sub", P + "side", g.const(np.int64(1)))
    row_index = u.op("Clip", offsets(P + "rows", 2), g.const(np.int64(0)), last)  # [N, H]
    col_index = u.op("Clip", offsets(P + "cols", 3), g.const(np.int64(0)), last)  # [N, W]
    n = u.op("Gather", shape, g.const(np.int64(0)), axis=0)
    unsq = g.ints([-1])

    def dims(*names: str) -> str:
        return u.op("Concat", *[u.op("Reshape", name, unsq) for name in names], axis=0)

    rows_wide = u.op("Expand", u.op("Unsqueeze", row_index, g.ints([2])), dims(n, extents[2], P + "side"))
    by_rows = u.op("GatherElements", P + "patterns", rows_wide, axis=1)  # [N, H, s]
    cols_wide = u.op("Expand", u.op("Unsqueeze", col_index, g.ints([1])), dims(n, extents[2], extents[3]))
    placed = u.op("GatherElements", by_rows, cols_wide, axis=2)  # [N, H, W]
    pattern = u.op("Where", first, u.op("Mul", u.op("Unsqueeze", placed, g.ints([1])), P + "signs"), zero)
    new = u.op("Add", pattern, u.op("Div", old, u.op("Add", window_norms, c(1e-12))))
    new = u.op("Where", first, new, zero)
    channels = u.op("Cast", extents[1], to=TensorProto.DOUBLE)
    eps = P + "eps64"  # eps as given (a float32 eps would round it)
    spare = u.op("Max", u.op("Sub", u.op("Mul", eps, eps), u.op("Mul", image_norms, image_norms)), zero)
    touched = u.op("Mul", touched_norms, touched_norms)
    budget = u.op("Sqrt", u.op("Add", u.op("Div", spare, channels), touched))
    new = u.op("Mul", u.op("Div", new, u.op("Add", norm(new, [2, 3]), c(1e-12))), budget)
    moved = u.op("Where", first, new, u.op("Where", second, zero, delta))
    unit = u.op("Div", moved, u.op("Add", norm(moved, [1, 2, 3]), c(1e-12)))
    rescaled = u.op("Cast", u.op("Mul", unit, eps), to=TensorProto.FLOAT)
    candidate = u.op("Add", P + "x", rescaled)
    projected = u.into_box("l2", P + "x", candidate, P + "eps", P + "low", P + "high")
    u.attach(model)
    _set_outputs(graph, [helper.make_empty_tensor_value_info(projected)])
    return LoopGraph(model, {projected: iterate})
