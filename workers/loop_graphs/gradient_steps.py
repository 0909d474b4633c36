"""PGD's step and APGD's three graphs (update, objective with bookkeeping, checkpoint)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .core import (
    LoopGraph,
    P,
    Update,
    float_input,
    image_input,
    image_inputs,
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
    graph.input.append(helper.make_tensor_value_info(P + "momentum", TensorProto.BOOL, []))
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
    graph.input.append(helper.make_tensor_value_info(P + "success", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "increases", TensorProto.INT64, [None]))
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
    graph.input.append(helper.make_tensor_value_info(P + "halved", TensorProto.BOOL, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "increases", TensorProto.INT64, [None]))
    graph.input.append(helper.make_tensor_value_info(P + "threshold", TensorProto.INT64, []))
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
