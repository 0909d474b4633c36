"""The minimal-perturbation attacks' graphs: DeepFool's test, candidate and step; C&W's Adam step."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .boundary import nearest_boundary_model
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
    like,
    rank_of,
    set_outputs,
    standalone,
)


def deepfool_check_model(forward: onnx.ModelProto, input_name: str) -> LoopGraph:
    """DeepFool's test after a step (workers/attacks/deepfool.py): the samples stay active
    where the forward model's prediction at the iterate is still ``labels`` (the host reads
    which stopped: those are fooled)."""
    graph = forward.graph
    logits = graph.output[0].name
    bool_input(graph, P + "active", [None])
    int_input(graph, "labels", [None])
    u = Update(forward, rank_of(image_input(graph, input_name)))
    kept = u.op("Equal", u.op("ArgMax", logits, axis=1, keepdims=0), "labels")
    writes = {u.op("And", P + "active", kept): P + "active"}
    u.attach(forward)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)


def deepfool_candidate_model(gradient: onnx.ModelProto, input_name: str, norm: str,
                             num_classes: int) -> LoopGraph:
    """One candidate class of a DeepFool iteration, loop/others[:, loop/j] (an int64 scalar):
    the nearest linearised boundary so far, with |f| (workers/loop_graphs/boundary.py)."""
    graph = gradient.graph
    int_input(graph, P + "others", [None, None])
    int_input(graph, P + "j", [])

    def ranked(u: Update) -> str:
        return u.op("Gather", P + "others", P + "j", axis=1)

    return nearest_boundary_model(gradient, input_name, norm, num_classes, candidate=ranked, signed=False,
                                  skip_labels=False)


def deepfool_step_model(image_shape: tuple, iterate: str, norm: str, overshoot: float) -> LoopGraph:
    """DeepFool's step to the nearest linearised boundary, for the active samples: r += (|f_l| +
    1e-4) / ||w_l||_dual^(1 or 2) * (sign(w_l) or w_l) in float64, the iterate clip(x + (1 +
    overshoot) r) in float32, and one more iteration counted."""
    model = standalone("deepfool_step")
    graph = model.graph
    image_inputs(graph, (iterate, P + "x", P + "best_w"), image_shape)
    graph.input.append(helper.make_tensor_value_info(P + "r", TensorProto.DOUBLE, [None, *image_shape[1:]]))
    double_input(graph, P + "best_f")
    bool_input(graph, P + "active", [None])
    int_input(graph, P + "iterations", [None])
    for name in ("low", "high"):
        float_input(graph, P + name, [])
    u = Update(model, len(image_shape))
    g = u.g
    wide = u.op("Cast", P + "best_w", to=TensorProto.DOUBLE)
    if norm == "linf":
        dual = g.reduce("ReduceSum", u.op("Abs", wide), u.axes, keepdims=False)
        direction = u.sign(P + "best_w")
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
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
    image = image_input(graph, input_name)
    graph.input.remove(image)
    rank = rank_of(image)
    dims = image.type.tensor_type.shape.dim[1:]
    wide_images = [None, *[d.dim_value or d.dim_param or None for d in dims]]
    for name in ("w0", "modifier", "m1", "m2"):
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.DOUBLE, wide_images))
    graph.input.append(like(image, P + "x"))
    graph.input.append(like(image, P + "best_x"))
    for name in ("const", "best_l2", "previous"):
        double_input(graph, P + name)
    for name in ("active", "succeeded"):
        bool_input(graph, P + name, [None])
    bool_input(graph, P + "check", [])
    graph.input.append(helper.make_tensor_value_info(P + "rate", TensorProto.DOUBLE, []))
    u = Update(gradient, rank)
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)
