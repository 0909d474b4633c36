"""PGD's step and APGD's three graphs (update, objective with bookkeeping, checkpoint)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .core import (
    LoopGraph,
    P,
    Update,
    bool_input,
    double_input,
    float_input,
    image_input,
    image_inputs,
    int_input,
    labels_input,
    like,
    rank_of,
    set_outputs,
    standalone,
)


def pgd_step_model(gradient: onnx.ModelProto, input_name: str, norm: str) -> LoopGraph:
    """One PGD step after the gradient (workers/attacks/gradient.py): the iterate (the model's
    input) moves to clip(x + project(x_adv + step * ascent(grad) - x, eps), bounds). Scalars
    loop/step (negative: descend), loop/eps, loop/low, loop/high; state loop/x (clean images)."""
    graph = gradient.graph
    image = image_input(graph, input_name)
    graph.input.append(like(image, P + "x"))
    for name in ("step", "eps", "low", "high"):
        float_input(graph, P + name, [])
    u = Update(gradient, rank_of(image))
    moved = u.op("Add", input_name, u.op("Mul", P + "step", u.ascent(norm, "grad")))
    following = u.op("Identity", u.into_box(norm, P + "x", moved, P + "eps", P + "low", P + "high"))
    u.attach(gradient)
    set_outputs(graph, [like(image, following)])
    return LoopGraph(gradient, {following: input_name})


def apgd_update_model(image_shape: tuple, iterate: str, norm: str, momentum: float) -> LoopGraph:
    """APGD's next iterate (workers/attacks/apgd.py, Croce and Hein 2020): a step from the
    iterate (state ``iterate``) along the ascent direction of loop/grad, projected, then, where
    the bool scalar loop/momentum is set, the momentum step between it and loop/x_prev. The
    previous iterate becomes loop/x_prev."""
    model = standalone("apgd_update")
    graph = model.graph
    image_inputs(graph, (iterate, P + "x", P + "x_prev", P + "grad"), image_shape)
    float_input(graph, P + "step", [None])
    bool_input(graph, P + "momentum", [])
    for name in ("eps", "low", "high"):
        float_input(graph, P + name, [])
    u = Update(model, len(image_shape))
    bounds, x = (P + "eps", P + "low", P + "high"), P + "x"
    move = u.op("Mul", u.col(P + "step"), u.ascent(norm, P + "grad"))
    first = u.into_box(norm, x, u.op("Add", iterate, move), *bounds)
    towards = u.op("Mul", u.g.const(np.float32(momentum)), u.op("Sub", first, iterate))
    back = u.op("Mul", u.g.const(np.float32(1 - momentum)), u.op("Sub", iterate, P + "x_prev"))
    later = u.into_box(norm, x, u.op("Add", u.op("Add", iterate, towards), back), *bounds)
    following = u.op("Where", P + "momentum", later, first)
    u.attach(model)
    set_outputs(graph, [helper.make_empty_tensor_value_info(following)])
    return LoopGraph(model, {following: iterate}, shifts={P + "x_prev": iterate})


def apgd_objective_model(gradient: onnx.ModelProto, input_name: str, *, negate: bool,
                         hit_when: str) -> LoopGraph:
    """APGD's objective and its gradient at the iterate (the model's input; negated for a
    targeted cross-entropy), then the bookkeeping: found points, best points, the count of the
    loss's increases, the last loss.

    ``hit_when``: "differs" (an untargeted success: the prediction is not ``labels``) or
    "targets" / "labels" (the prediction equals that input)."""
    graph = gradient.graph
    image = image_input(graph, input_name)
    for name in ("found", "x_best", "grad_best"):
        graph.input.append(like(image, P + name))
    for name in ("loss_best", "last_loss"):
        float_input(graph, P + name, [None])
    bool_input(graph, P + "success", [None])
    int_input(graph, P + "increases", [None])
    u = Update(gradient, rank_of(image))
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def apgd_checkpoint_model(image_shape: tuple, iterate: str) -> LoopGraph:
    """APGD's checkpoint: where the loss rose in at most loop/threshold of the period's steps
    (int64: floor(rho * period)), or the best loss did not improve since the last checkpoint
    that did not halve, halve the step and restart from the best point."""
    model = standalone("apgd_checkpoint")
    graph = model.graph
    image_inputs(graph, (iterate, P + "grad", P + "x_best", P + "grad_best"), image_shape)
    for name in ("step", "loss_best", "last_loss", "best_at_check"):
        float_input(graph, P + name, [None])
    bool_input(graph, P + "halved", [None])
    int_input(graph, P + "increases", [None])
    int_input(graph, P + "threshold", [])
    u = Update(model, len(image_shape))
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(model, writes)


def _fooling_scores(u: Update, logits: str, threshold: float, writes: dict[str, str]) -> str:
    """The fooling images' bookkeeping at the iterate (workers/attacks/fooling.py): the softmax
    (float64) probability of the target ``labels`` and the predicted class, recorded for the
    active samples, and whether they reach the target with at least ``threshold``; returns that."""
    g = u.g
    wide = u.op("Cast", logits, to=TensorProto.DOUBLE)
    shifted = u.op("Exp", u.op("Sub", wide, g.reduce("ReduceMax", wide, [1], keepdims=True)))
    probs = u.op("Div", shifted, g.reduce("ReduceSum", shifted, [1], keepdims=True))
    picked = u.op("GatherElements", probs, u.op("Reshape", "labels", g.ints([-1, 1])), axis=1)
    confidence = u.op("Reshape", picked, g.ints([-1]))
    predicted = u.op("ArgMax", probs, axis=1, keepdims=0)
    done = u.op("And", u.op("Equal", predicted, "labels"),
                u.op("GreaterOrEqual", confidence, g.const(float(threshold), np.float64)))
    for value, name in ((confidence, "confidences"), (predicted, "predicted")):
        writes[u.op("Where", P + "active", value, P + name)] = P + name
    kept = u.op("And", u.op("Not", P + "active"), P + "reached")  # (ONNX Runtime has no bool Where)
    writes[u.op("Or", u.op("And", P + "active", done), kept)] = P + "reached"
    return done


def _fooling_inputs(graph: onnx.GraphProto) -> None:
    for name in ("active", "reached"):
        bool_input(graph, P + name, [None])
    for name in ("predicted", "steps_used"):
        int_input(graph, P + name, [None])
    double_input(graph, P + "confidences")


def fooling_step_model(gradient: onnx.ModelProto, input_name: str, norm: str, *,
                       threshold: float) -> LoopGraph:
    """One step of the fooling images' gradient ascent: the scores at the iterate, then, for
    the active samples that have not reached their target, the iterate clip(x + loop/step *
    ascent(grad)) (a negative step descends: ascent(-g) is -ascent(g) to the bit, and the
    gradient stays the graph's last output, as in the plain gradient graph) and one more step
    counted; those that reached it stop (loop/active). Scalars loop/step, loop/low, loop/high."""
    graph = gradient.graph
    image = image_input(graph, input_name)
    _fooling_inputs(graph)
    for name in ("step", "low", "high"):
        float_input(graph, P + name, [])
    u = Update(gradient, rank_of(image))
    writes: dict[str, str] = {}
    done = _fooling_scores(u, "logits", threshold, writes)
    moving = u.op("And", P + "active", u.op("Not", done))
    direction = u.ascent(norm, "grad")
    moved = u.op("Clip", u.op("Add", input_name, u.op("Mul", P + "step", direction)), P + "low", P + "high")
    writes[u.where_rows(moving, moved, input_name)] = input_name
    writes[u.op("Add", P + "steps_used", u.op("Cast", moving, to=TensorProto.INT64))] = P + "steps_used"
    writes[moving] = P + "active"
    u.attach(gradient)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def fooling_final_model(forward: onnx.ModelProto, input_name: str, *, threshold: float) -> LoopGraph:
    """The fooling images' scores after the last step (the forward model; no gradient)."""
    graph = forward.graph
    logits = graph.output[0].name
    _fooling_inputs(graph)
    labels_input(graph)
    u = Update(forward, rank_of(image_input(graph, input_name)))
    writes: dict[str, str] = {}
    _fooling_scores(u, logits, threshold, writes)
    u.attach(forward)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)
