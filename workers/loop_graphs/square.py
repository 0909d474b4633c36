"""Square Attack's graphs: the L-inf and L2 proposals and the forward pass that judges them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .core import (
    LoopGraph,
    P,
    Update,
    bool_input,
    float_input,
    image_input,
    image_inputs,
    int_input,
    like,
    set_outputs,
    standalone,
)


def square_propose_model(image_shape: tuple, iterate: str) -> LoopGraph:
    """A Square Attack L-inf proposal (workers/attacks/square.py): the best point with one s x s
    window per sample (corners loop/rows, loop/cols, sent per call with loop/change, the
    window's +-2 eps per channel [N, C, 1, 1]) moved by loop/change, projected onto the eps ball
    and the box; it becomes the iterate (the forward model's input)."""
    model = standalone("square_propose")
    graph = model.graph
    image_inputs(graph, (P + "x", P + "best_x"), image_shape)
    for name in ("rows", "cols"):
        int_input(graph, P + name, [None])
    int_input(graph, P + "side", [])
    float_input(graph, P + "change", [None, image_shape[1], 1, 1])
    for name in ("eps", "low", "high"):
        float_input(graph, P + name, [])
    u = Update(model, 4)
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(projected)])
    return LoopGraph(model, {projected: iterate})


def square_judge_model(forward: onnx.ModelProto, input_name: str, *, targeted: bool) -> LoopGraph:
    """A Square Attack query: the forward model at the proposal (its input), the margin of
    ``labels`` (the targets when ``targeted``), and, for the active samples, the proposal kept
    where it was adversarial or lowered the margin; adversarial samples stop (the host reads
    loop/active after each query)."""
    graph = forward.graph
    logits = graph.output[0].name
    image = image_input(graph, input_name)
    graph.input.append(like(image, P + "best_x"))
    float_input(graph, P + "best", [None])
    bool_input(graph, P + "active", [None])
    int_input(graph, "labels", [None])
    u = Update(forward, 4)
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(name) for name in writes])
    return LoopGraph(forward, writes)


def square_l2_propose_model(image_shape: tuple, iterate: str) -> LoopGraph:
    """A Square Attack L2 proposal (Algorithm 3; workers/attacks/square.py): the mass of a second
    s x s window (corners loop/rows2, loop/cols2) moves into the first (loop/rows, loop/cols),
    whose new content is the sample's eta pattern (loop/patterns [N, s, s], flipped by the
    host) times a sign per channel (loop/signs [N, C, 1, 1]) plus the normalised old window,
    scaled to keep the perturbation's norm; in float64, then rescaled to eps and projected.
    The windows are masks over the image, so the window sums run over whole images with zeros
    outside: equal to the numpy sums up to float64 rounding."""
    model = standalone("square_l2_propose")
    graph = model.graph
    image_inputs(graph, (P + "x", P + "best_x"), image_shape)
    for name in ("rows", "cols", "rows2", "cols2"):
        int_input(graph, P + name, [None])
    int_input(graph, P + "side", [])
    doubles: tuple[tuple[str, list], ...] = (("patterns", [None, None, None]),
                                             ("signs", [None, image_shape[1], 1, 1]), ("eps64", []))
    for name, extent in doubles:
        graph.input.append(helper.make_tensor_value_info(P + name, TensorProto.DOUBLE, extent))
    for name in ("eps", "low", "high"):
        float_input(graph, P + name, [])
    u = Update(model, 4)
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
    set_outputs(graph, [helper.make_empty_tensor_value_info(projected)])
    return LoopGraph(model, {projected: iterate})
