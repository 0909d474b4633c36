"""The boundary attacks' graphs: the nearest linearised boundary (DeepFool's and FAB's candidate
classes), FAB's boundary for a given class pair, its projections onto that boundary inside the
box, and the forward pass that judges and keeps its iterates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .core import (
    LoopGraph,
    P,
    Update,
    bool_input,
    double_input,
    image_input,
    image_inputs,
    int_input,
    labels_input,
    like,
    rank_of,
    set_outputs,
    standalone,
)


def _cotangent_between(u: Update, rising: str, falling: str, num_classes: int) -> str:
    """Makes the cotangent gradient model's ``dlogits`` input e_rising - e_falling (per row)."""
    g = u.g
    depth = g.ints([num_classes])
    off_on = g.const(np.array([0, 1], np.float32))
    up, down = (u.op("OneHot", c, depth, off_on, axis=-1) for c in (rising, falling))
    g.nodes.append(helper.make_node("Sub", [up, down], ["dlogits"], name=g.fresh("Sub")))
    return "dlogits"


def _logit_at(u: Update, index: str) -> str:
    picked = u.op("GatherElements", "logits", u.op("Reshape", index, u.g.ints([-1, 1])), axis=1)
    return u.op("Reshape", picked, u.g.ints([-1]))


def _without_dlogits(graph: onnx.GraphProto) -> None:
    graph.input.remove(next(i for i in graph.input if i.name == "dlogits"))


def nearest_boundary_model(gradient: onnx.ModelProto, input_name: str, norm: str, num_classes: int, *,
                           candidate: Callable[[Update], str], signed: bool, skip_labels: bool) -> LoopGraph:
    """One candidate class k (``candidate(u)``: an int64 [N] tensor) of a linearisation at the
    iterate: the gradient w of z_k - z_y (the cotangent gradient model, its ``dlogits`` made
    here), the distance |f| / ||w||_dual to the linearised boundary in float64 (inf where k is
    the label, with ``skip_labels``), and the nearest boundary so far (loop/best_dist, best_f
    (f itself with ``signed``, else |f|), best_w; reset where the bool scalar loop/first is set)."""
    graph = gradient.graph
    image = image_input(graph, input_name)
    _without_dlogits(graph)
    labels_input(graph)
    bool_input(graph, P + "first", [])
    graph.input.append(like(image, P + "best_w"))
    for name in ("best_dist", "best_f"):
        double_input(graph, P + name)
    u = Update(gradient, rank_of(image))
    g = u.g
    k = candidate(u)
    _cotangent_between(u, k, "labels", num_classes)
    value = u.op("Cast", u.op("Sub", _logit_at(u, k), _logit_at(u, "labels")), to=TensorProto.DOUBLE)
    size = u.op("Abs", value)
    wide = u.op("Cast", "grad", to=TensorProto.DOUBLE)
    if norm == "linf":
        dual = g.reduce("ReduceSum", u.op("Abs", wide), u.axes, keepdims=False)
    else:
        dual = u.op("Sqrt", g.reduce("ReduceSum", u.op("Mul", wide, wide), u.axes, keepdims=False))
    dist = u.op("Div", size, u.op("Add", dual, g.const(1e-12, np.float64)))
    if skip_labels:
        dist = u.op("Where", u.op("Equal", k, "labels"), g.const(np.inf, np.float64), dist)
    best_dist = u.op("Where", P + "first", g.const(np.inf, np.float64), P + "best_dist")
    best_f = u.op("Where", P + "first", g.const(0, np.float64), P + "best_f")
    best_w = u.op("Where", P + "first", g.const(np.float32(0)), P + "best_w")
    better = u.op("Less", dist, best_dist)
    writes = {
        u.op("Where", better, dist, best_dist): P + "best_dist",
        u.op("Where", better, value if signed else size, best_f): P + "best_f",
        u.where_rows(better, "grad", best_w): P + "best_w",
    }
    u.attach(gradient)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def fab_candidate_model(gradient: onnx.ModelProto, input_name: str, norm: str, num_classes: int) -> LoopGraph:
    """Untargeted FAB's candidate class: the int64 scalar loop/j (every class but the label)."""
    int_input(gradient.graph, P + "j", [])

    def every_row(u: Update) -> str:
        return u.op("Expand", P + "j", u.op("Shape", "labels"))

    return nearest_boundary_model(gradient, input_name, norm, num_classes, candidate=every_row, signed=True,
                                  skip_labels=True)


def fab_rival_model(forward: onnx.ModelProto, input_name: str, num_classes: int) -> LoopGraph:
    """Targeted FAB's rival at the iterate: the strongest class other than loop/plane."""
    graph = forward.graph
    logits = graph.output[0].name
    int_input(graph, P + "plane", [None])
    int_input(graph, P + "rival", [None])
    u = Update(forward, rank_of(image_input(graph, input_name)))
    g = u.g
    off_on = g.const(np.array([0, 1], np.float32))
    one_hot = u.op("OneHot", P + "plane", g.ints([num_classes]), off_on, axis=-1)
    mask = u.op("Cast", one_hot, to=TensorProto.BOOL)
    others = u.op("Where", mask, g.const(np.float32(-np.inf)), logits)
    writes = {u.op("ArgMax", others, axis=1, keepdims=0): P + "rival"}
    u.attach(forward)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)


def fab_plane_model(gradient: onnx.ModelProto, input_name: str, num_classes: int) -> LoopGraph:
    """FAB-T's boundary between loop/plane and loop/rival at the iterate: best_f = z_plane -
    z_rival (float64), best_w its gradient."""
    graph = gradient.graph
    image = image_input(graph, input_name)
    _without_dlogits(graph)
    for name in ("plane", "rival"):
        int_input(graph, P + name, [None])
    u = Update(gradient, rank_of(image))
    _cotangent_between(u, P + "plane", P + "rival", num_classes)
    value = u.op("Sub", _logit_at(u, P + "plane"), _logit_at(u, P + "rival"))
    writes = {u.op("Cast", value, to=TensorProto.DOUBLE): P + "best_f",
              u.op("Identity", "grad"): P + "best_w"}
    u.attach(gradient)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def _project(u: Update, t: str, w: str, b: str, norm: str, bounds: tuple[float, float]) -> str:
    """workers.attacks.fab.project_onto_hyperplane on float64 [n, D] rows: the per-row sort of
    the knots is TopK (ties in index order, as numpy's stable argsort), the sums CumSum (in
    numpy's order), so only the dot product's float64 rounding differs."""
    g = u.g

    def c(value: float) -> str:
        return g.const(value, np.float64)

    gap = u.op("Sub", b, g.reduce("ReduceSum", u.op("Mul", w, t), [1], keepdims=False))
    direction = u.op("Mul", u.op("Sign", w), g.unsqueeze(u.op("Sign", gap), [1]))
    toward = u.op("Where", u.op("Greater", direction, c(0)), u.op("Sub", c(bounds[1]), t),
                  u.op("Sub", t, c(bounds[0])))
    moving = u.op("Not", u.op("Equal", direction, c(0)))
    room = u.op("Mul", toward, u.op("Cast", moving, to=TensorProto.DOUBLE))
    size = u.op("Abs", w)
    moves = u.op("Greater", size, c(0))
    rate = c(1.0) if norm == "linf" else u.op("Where", moves, size, c(1.0))
    knots = u.op("Where", moves, u.op("Div", room, rate), c(np.inf))
    count = u.op("Gather", u.op("Shape", knots), g.ints([1]), axis=0)
    sorted_knots, order = g.op("TopK", knots, count, outputs=2, axis=1, largest=0, sorted=1)
    full = u.op("GatherElements", u.op("Mul", size, room), order, axis=1)
    rising = u.op("GatherElements", u.op("Mul", size, rate), order, axis=1)
    axis = g.const(np.int64(1))
    saturated = u.op("Sub", u.op("CumSum", full, axis), full)
    slope = u.op("CumSum", rising, axis, reverse=1)
    finite = u.op("Not", u.op("IsInf", sorted_knots))
    beyond = u.op("Where", u.op("Greater", slope, c(0)), c(np.inf), c(0))
    along = u.op("Mul", u.op("Where", finite, sorted_knots, c(0)), slope)
    reach = u.op("Add", saturated, u.op("Where", finite, along, beyond))
    need = g.unsqueeze(u.op("Abs", gap), [1])
    enough = u.op("Cast", u.op("GreaterOrEqual", reach, need), to=TensorProto.FLOAT)
    first = u.op("ArgMax", enough, axis=1, keepdims=1)
    reachable = u.op("Greater", g.reduce("ReduceMax", enough, [1], keepdims=True), g.const(np.float32(0)))
    lam = u.op("Div", u.op("Sub", need, u.op("GatherElements", saturated, first, axis=1)),
               u.op("GatherElements", slope, first, axis=1))
    # numpy's nan_to_num(lam, nan=0, posinf=0): -inf becomes the most negative float64
    lam = u.op("Where", u.op("IsNaN", lam), c(0), lam)
    lam = u.op("Where", u.op("IsInf", lam, detect_negative=0), c(0), lam)
    lam = u.op("Where", u.op("IsInf", lam, detect_positive=0), c(np.finfo(np.float64).min), lam)
    lam = u.op("Where", reachable, lam, c(np.inf))
    step = u.op("Where", moves, u.op("Min", u.op("Mul", lam, rate), room), c(0))
    return u.op("Cast", u.op("Mul", direction, step), to=TensorProto.FLOAT)


def fab_step_model(image_shape: tuple, iterate: str, norm: str, *, eta: float, alpha_max: float,
                   bounds: tuple[float, float]) -> LoopGraph:
    """FAB's move (workers/attacks/fab.py): the boundary <w, z> = b through the iterate's
    linearisation (loop/best_w, best_f), both the iterate and the clean image projected onto it
    inside the box, and the iterate clip((1 - a)(x_k + eta d_k) + a (x + eta d_0)) with
    a = min(|d_k| / (|d_k| + |d_0|), alpha_max), in the numpy loop's float32 operations."""
    model = standalone("fab_step")
    graph = model.graph
    image_inputs(graph, (iterate, P + "x", P + "best_w"), image_shape)
    double_input(graph, P + "best_f")
    u = Update(model, 2)  # rows of D pixels
    g = u.g

    def f32(value: float) -> str:
        return g.const(np.float32(value))

    flat1, flat0 = (u.op("Flatten", t, axis=1) for t in (iterate, P + "x"))
    w = u.op("Cast", u.op("Flatten", P + "best_w", axis=1), to=TensorProto.DOUBLE)
    t1, t0 = (u.op("Cast", t, to=TensorProto.DOUBLE) for t in (flat1, flat0))
    b = u.op("Sub", g.reduce("ReduceSum", u.op("Mul", w, t1), [1], keepdims=False), P + "best_f")
    d1, d0 = (_project(u, t, w, b, norm, bounds) for t in (t1, t0))

    def size(d: str) -> str:
        measured = g.reduce("ReduceMax", u.op("Abs", d), [1], keepdims=True) if norm == "linf" else u.size(d)
        return u.op("Max", measured, f32(1e-8))

    a1, a0 = size(d1), size(d0)
    alpha = u.op("Clip", u.op("Div", a1, u.op("Add", a1, a0)), f32(0.0), f32(alpha_max))
    eta32 = f32(eta)
    moved = u.op("Add", u.op("Mul", u.op("Sub", f32(1.0), alpha), u.op("Add", flat1, u.op("Mul", eta32, d1))),
                 u.op("Mul", alpha, u.op("Add", flat0, u.op("Mul", eta32, d0))))
    landed = u.op("Clip", u.op("Reshape", moved, u.op("Shape", iterate)), f32(bounds[0]), f32(bounds[1]))
    writes = {landed: iterate}
    u.attach(model)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(model, writes)


def fab_judge_model(forward: onnx.ModelProto, input_name: str, norm: str, *, beta: float,
                    targeted: bool) -> LoopGraph:
    """FAB's test of the moved iterate: where it is adversarial (the label left, or loop/goal
    reached) and closer to the clean image than loop/best (float64), it becomes loop/best_x,
    and the iterate is pulled back to x + beta (x_k - x)."""
    graph = forward.graph
    logits = graph.output[0].name
    image = image_input(graph, input_name)
    labels_input(graph)
    if targeted:
        int_input(graph, P + "goal", [None])
    graph.input.append(like(image, P + "x"))
    graph.input.append(like(image, P + "best_x"))
    double_input(graph, P + "best")
    u = Update(forward, rank_of(image))
    g = u.g
    predicted = u.op("ArgMax", logits, axis=1, keepdims=0)
    if targeted:
        hit = u.op("Equal", predicted, P + "goal")
    else:
        hit = u.op("Not", u.op("Equal", predicted, "labels"))
    diff = u.op("Sub", input_name, P + "x")
    if norm == "linf":
        size = g.reduce("ReduceMax", u.op("Abs", diff), u.axes, keepdims=False)
    else:
        size = u.op("Reshape", u.size(diff), g.ints([-1]))
    wide = u.op("Cast", size, to=TensorProto.DOUBLE)
    closer = u.op("And", hit, u.op("Less", wide, P + "best"))
    pulled = u.op("Add", P + "x", u.op("Mul", g.const(np.float32(beta)), diff))
    writes = {
        u.where_rows(closer, input_name, P + "best_x"): P + "best_x",
        u.op("Where", closer, wide, P + "best"): P + "best",
        u.where_rows(hit, pulled, input_name): input_name,
    }
    u.attach(forward)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)
