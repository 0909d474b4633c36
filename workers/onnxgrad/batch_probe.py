"""Sizes that shape inference misses because they are computed from the symbolic batch.

A TorchScript export with a dynamic batch computes reshape targets from ``Shape(x)`` in
arithmetic that ONNX's symbolic inference cannot follow (MobileViT's patch unfolding divides
and rounds the height; FocalNet's modulation likewise), so a Conv behind it has unknown spatial
sizes, though only the batch varies. With the batch pinned, those chains are constants that
folding evaluates. Shapes inferred at two batch sizes give each unknown dim: equal in both, a
constant; equal to the batch in each, the batch symbol; otherwise it stays unknown (a batch
folded into another axis). Only value_info changes: the graph still takes any batch.
"""

from __future__ import annotations

import onnx

from .graph import Dim, Shape, static_shape, tensor_types
from .prepare import fold_shape_arithmetic, infer_shapes

PROBE_BATCHES = (2, 3)


def complete_batch_shapes(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto | None:
    """A copy of the shape-inferred ``model`` with the unknown dims that the probes pin down
    filled in, or None when they find none."""
    image = next(i for i in model.graph.input if i.name == input_name)
    batch = image.type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        return None
    probes = [_shapes_at_batch(model, input_name, size) for size in PROBE_BATCHES]
    types = tensor_types(model.graph)
    filled: dict[str, tuple[int, Shape]] = {}
    for node in model.graph.node:
        for name in filter(None, node.output):
            known = static_shape(types.get(name))
            seen = [probe.get(name) for probe in probes]
            if seen[0] is None or seen[1] is None or len(seen[0][1]) != len(seen[1][1]):
                continue
            dims = _merged(known, seen[0][1], seen[1][1], batch.dim_param)
            if dims is not None:
                filled[name] = (seen[0][0], dims)
    if not filled:
        return None
    completed = onnx.ModelProto()
    completed.CopyFrom(model)
    infos = {vi.name: vi for vi in completed.graph.value_info}
    for name, (elem_type, dims) in filled.items():
        info = infos.get(name) or completed.graph.value_info.add()
        info.CopyFrom(onnx.helper.make_tensor_value_info(name, elem_type, list(dims)))
    return infer_shapes(completed)


def _merged(known: Shape | None, first: Shape, second: Shape, symbol: str) -> Shape | None:
    """``known`` with its unknown dims set from the two probes; None when nothing is learnt."""
    if known is not None and len(known) != len(first):
        return None
    dims: list[Dim] = []
    learnt = False
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        dim = known[i] if known is not None else None
        if isinstance(dim, int) or (isinstance(dim, str) and not dim.startswith("unk__")):
            dims.append(dim)
        elif isinstance(a, int) and a == b:
            dims.append(a)
            learnt = True
        elif (a, b) == PROBE_BATCHES:
            dims.append(symbol)
            learnt = True
        else:
            dims.append(dim)
    return tuple(dims) if learnt else None


def _shapes_at_batch(model: onnx.ModelProto, input_name: str, size: int) -> dict[str, tuple[int, Shape]]:
    """(element type, shape) of every tensor, inferred with the batch pinned to ``size`` and the
    shape arithmetic folded as prepare folds it."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    del pinned.graph.value_info[:]
    image = next(i for i in pinned.graph.input if i.name == input_name)
    image.type.tensor_type.shape.dim[0].Clear()
    image.type.tensor_type.shape.dim[0].dim_value = size
    pinned = fold_shape_arithmetic(infer_shapes(pinned))
    shapes = {}
    for name, tp in tensor_types(pinned.graph).items():
        shape = static_shape(tp)
        if shape is not None:
            shapes[name] = (tp.tensor_type.elem_type, shape)
    return shapes
