"""The box-constrained L-BFGS of workers/attacks/lbfgs.py as three graphs: the quasi-Newton
direction, one line-search trial with its evaluation, and the stopping tests.

State, per sample, float64 and flat: loop/v [N, D] the variables, loop/f, loop/g the objective
and its gradient there, loop/S, loop/Y [N, H, D] and loop/rho [N, H] the history (newest
first; rho 0: an empty slot), loop/d and loop/step the direction and trial step, loop/f_old the
objective before the iteration; loop/searching, loop/trying (searching with evaluations left)
and loop/active (bool [N]); loop/spent the line-search evaluations of the run (int64 [N]);
loop/x the clean images (the model's shape) and loop/const; ``labels`` the targets of the
cross-entropy.
"""

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
    image_input,
    int_input,
    like,
    set_outputs,
    standalone,
)


def _state(graph: onnx.GraphProto, flat: tuple[str, ...] = (), history: tuple[str, ...] = (),
           rows: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> None:
    for name in flat:
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.DOUBLE, [None, None]))
    for name in history:
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.DOUBLE, [None, None, None]))
    for name in rows:
        double_input(graph, P + name)
    for name in flags:
        bool_input(graph, P + name, [None])


class _Ops:
    """Row-wise helpers on [N, D] and [N, H, D] float64 tensors."""

    def __init__(self, u: Update):
        self.u, self.g = u, u.g

    def c(self, value: float) -> str:
        return self.g.const(value, np.float64)

    def dot(self, a: str, b: str) -> str:
        return self.g.reduce("ReduceSum", self.u.op("Mul", a, b), [1], keepdims=False)

    def col(self, rows: str) -> str:
        return self.g.unsqueeze(rows, [1])

    def slot(self, history: str, i: int) -> str:
        return self.u.op("Gather", history, self.g.const(np.int64(i)), axis=1)

    def where(self, rows: str, a: str, b: str, rank: int = 2) -> str:
        return self.u.op("Where", self.g.unsqueeze(rows, list(range(1, rank))), a, b)

    def push(self, history: str, newest: str, keep: str, size: int, rank: int) -> str:
        """``history`` with ``newest`` in front and its oldest slot dropped, where ``keep``."""
        g = self.g
        older = self.u.op("Slice", history, g.ints([0]), g.ints([size - 1]), g.ints([1]))
        shifted = self.u.op("Concat", g.unsqueeze(newest, [1]), older, axis=1)
        return self.where(keep, shifted, history, rank)


def lbfgs_direction_model(history: int, bounds: tuple[float, float]) -> LoopGraph:
    """The direction of workers.attacks.lbfgs.direction for the active samples, their first
    trial step, their history emptied where the steepest descent replaced it, the line search
    started (loop/searching = loop/active) and the objective before it kept (loop/f_old)."""
    model = standalone("lbfgs_direction")
    graph = model.graph
    _state(graph, flat=("v", "g"), history=("S", "Y"), rows=("f",), flags=("active",))
    graph.input.append(helper.make_tensor_value_info(P + "rho", TensorProto.DOUBLE, [None, None]))
    u = Update(model, 2)
    o = _Ops(u)
    v, grad = P + "v", P + "g"
    at_low = u.op("And", u.op("LessOrEqual", v, o.c(bounds[0])), u.op("Greater", grad, o.c(0)))
    at_high = u.op("And", u.op("GreaterOrEqual", v, o.c(bounds[1])), u.op("Less", grad, o.c(0)))
    free = u.op("Not", u.op("Or", at_low, at_high))
    zero = o.c(0.0)
    q = u.op("Where", free, grad, zero)
    rho = [u.op("Gather", P + "rho", u.g.const(np.int64(i)), axis=1) for i in range(history)]
    alphas = []
    for i in range(history):
        a = u.op("Mul", rho[i], o.dot(o.slot(P + "S", i), q))
        q = u.op("Sub", q, u.op("Mul", o.col(a), o.slot(P + "Y", i)))
        alphas.append(a)
    known = u.op("Greater", rho[0], zero)
    newest_y = o.slot(P + "Y", 0)
    curvature = u.op("Where", known, u.op("Mul", rho[0], o.dot(newest_y, newest_y)), o.c(1.0))
    gamma = u.op("Where", known, u.op("Div", o.c(1.0), curvature), o.c(1.0))
    r = u.op("Mul", o.col(gamma), q)
    for i in reversed(range(history)):
        b = u.op("Mul", rho[i], o.dot(o.slot(P + "Y", i), r))
        r = u.op("Add", r, u.op("Mul", o.col(u.op("Sub", alphas[i], b)), o.slot(P + "S", i)))
    d = u.op("Where", free, u.op("Neg", r), zero)
    reset = u.op("Not", u.op("Less", o.dot(grad, d), zero))
    steepest = u.op("Where", free, u.op("Neg", grad), zero)
    d = o.where(reset, steepest, d)
    first = u.op("Or", reset, u.op("Not", known))
    norm = u.op("Sqrt", o.dot(d, d))
    step = u.op("Where", first, u.op("Div", o.c(1.0), u.op("Max", norm, o.c(1e-300))), o.c(1.0))
    writes = {
        d: P + "d",
        step: P + "step",
        o.where(u.op("And", P + "active", reset), o.c(0.0), P + "rho"): P + "rho",
        u.op("Identity", P + "active"): P + "searching",
        u.op("Identity", P + "f"): P + "f_old",
    }
    u.attach(model)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(model, writes)


def lbfgs_trial_model(gradient: onnx.ModelProto, input_name: str, history: int, armijo: float,
                      bounds: tuple[float, float]) -> LoopGraph:
    """One trial of the line search for the samples still searching with fewer than the int64
    scalar loop/budget evaluations spent: the point clip(v + step d), the objective const
    ||v' - x||^2 + CE(v', labels) and its gradient (the cross-entropy gradient model, its input
    made here), and where the Armijo condition holds the point, its objective and gradient
    accepted and the pair (s, y) remembered (workers.attacks.lbfgs.remember); elsewhere the
    step halved."""
    graph = gradient.graph
    image = image_input(graph, input_name)
    graph.input.remove(image)
    graph.input.append(like(image, P + "x"))
    _state(graph, flat=("v", "g", "d"), history=("S", "Y"), rows=("f", "step", "const"),
           flags=("searching",))
    graph.input.append(helper.make_tensor_value_info(P + "rho", TensorProto.DOUBLE, [None, None]))
    int_input(graph, P + "spent", [None])
    int_input(graph, P + "budget", [])
    u = Update(gradient, 2)
    o = _Ops(u)
    g = u.g
    v = P + "v"
    moved = u.op("Add", v, u.op("Mul", o.col(P + "step"), P + "d"))
    trial = u.op("Clip", moved, o.c(bounds[0]), o.c(bounds[1]))
    narrow = u.op("Cast", trial, to=TensorProto.FLOAT)
    g.nodes.append(helper.make_node("Reshape", [narrow, u.op("Shape", P + "x")], [input_name],
                                    name=g.fresh("Reshape")))
    clean = u.op("Cast", u.op("Flatten", P + "x", axis=1), to=TensorProto.DOUBLE)
    r = u.op("Sub", trial, clean)
    f_t = u.op("Add", u.op("Mul", P + "const", o.dot(r, r)), u.op("Cast", "loss", to=TensorProto.DOUBLE))
    model_grad = u.op("Cast", u.op("Flatten", "grad", axis=1), to=TensorProto.DOUBLE)
    g_t = u.op("Add", u.op("Mul", u.op("Mul", o.c(2.0), o.col(P + "const")), r), model_grad)
    s = u.op("Sub", trial, v)
    decrease = u.op("Add", P + "f", u.op("Mul", o.c(armijo), o.dot(P + "g", s)))
    trying = u.op("And", P + "searching", u.op("Less", P + "spent", P + "budget"))
    spent = u.op("Add", P + "spent", u.op("Cast", trying, to=TensorProto.INT64))
    ok = u.op("And", trying, u.op("LessOrEqual", f_t, decrease))
    y = u.op("Sub", g_t, P + "g")
    sy = o.dot(s, y)
    eps = o.c(float(np.finfo(np.float64).eps))
    keep = u.op("And", ok, u.op("Greater", sy, u.op("Mul", eps, o.dot(y, y))))
    still = u.op("And", P + "searching", u.op("Not", ok))
    writes = {
        o.where(ok, trial, v): P + "v",
        u.op("Where", ok, f_t, P + "f"): P + "f",
        o.where(ok, g_t, P + "g"): P + "g",
        o.push(P + "S", s, keep, history, 3): P + "S",
        o.push(P + "Y", y, keep, history, 3): P + "Y",
        o.push(P + "rho", u.op("Div", o.c(1.0), sy), keep, history, 2): P + "rho",
        u.op("Where", u.op("And", trying, u.op("Not", ok)), u.op("Mul", P + "step", o.c(0.5)), P + "step"):
            P + "step",
        still: P + "searching",
        u.op("And", still, u.op("Less", spent, P + "budget")): P + "trying",
        spent: P + "spent",
    }
    u.attach(gradient)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(gradient, writes)


def lbfgs_check_model(pgtol: float, ftol: float, bounds: tuple[float, float]) -> LoopGraph:
    """The stopping tests after an iteration (workers.attacks.lbfgs.converged): a sample stays
    active unless its line search failed, its projected gradient is at most ``pgtol`` or its
    objective fell by at most ``ftol`` relative."""
    model = standalone("lbfgs_check")
    graph = model.graph
    _state(graph, flat=("v", "g"), rows=("f", "f_old"), flags=("active", "searching"))
    u = Update(model, 2)
    o = _Ops(u)
    v = P + "v"
    projected = u.op("Clip", u.op("Sub", v, P + "g"), o.c(bounds[0]), o.c(bounds[1]))
    largest = u.g.reduce("ReduceMax", u.op("Abs", u.op("Sub", projected, v)), [1], keepdims=False)
    scale = u.op("Max", u.op("Max", u.op("Abs", P + "f_old"), u.op("Abs", P + "f")), o.c(1.0))
    small = u.op("LessOrEqual", u.op("Sub", P + "f_old", P + "f"), u.op("Mul", o.c(ftol), scale))
    done = u.op("Or", P + "searching", u.op("Or", u.op("LessOrEqual", largest, o.c(pgtol)), small))
    writes = {u.op("And", P + "active", u.op("Not", done)): P + "active"}
    u.attach(model)
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(model, writes)
