"""Composing input preprocessing into the model graph.

Attacks work in pixel space (the dataset's declared range and layout); the model may expect
normalised NCHW tensors. Putting the layout change and (x - mean) / std in front of the
model, as ONNX nodes, makes the gradient builder differentiate through them, so every
budget and every perturbation is measured in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.onnxgrad.prepare import image_input, load_model


def compose_preprocessing(
    model: onnx.ModelProto | bytes,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str = "NCHW",
) -> onnx.ModelProto:
    """A copy of ``model`` that takes pixels in ``layout`` and normalises them itself.

    ``mean`` and ``std`` have one value, or one per channel. The returned model's input
    keeps the original input's name.
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"`layout` must be NCHW or NHWC, got {layout!r}")
    model = load_model(model)
    if mean is None and std is None and layout == "NCHW":
        return model
    x = image_input(model)
    dims = x.type.tensor_type.shape.dim
    rank = len(dims)
    if rank != 4 and layout == "NHWC":
        raise ValueError(f"layout NHWC needs a 4-D image input; {x.name!r} has rank {rank}")
    channels = dims[1].dim_value if rank >= 2 and dims[1].HasField("dim_value") else None

    def per_channel(values, name):
        array = np.asarray(values, np.float32).reshape(-1)
        if array.size not in (1, channels or array.size):
            raise ValueError(f"`{name}` has {array.size} values; the model has {channels} channels")
        if name == "std" and np.any(array <= 0):
            raise ValueError("`std` values must be positive")
        shape = [1, -1] + [1] * (rank - 2) if array.size > 1 else []
        return array.reshape(shape) if shape else array.reshape(())

    graph = model.graph
    internal = f"{x.name}/normalised"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == x.name:
                node.input[i] = internal
    nodes, current = [], x.name
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [current], [f"{x.name}/nchw"], perm=[0, 3, 1, 2]))
        current = f"{x.name}/nchw"
        new_dims = [dims[0], dims[2], dims[3], dims[1]]
        stored = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
        for target, source in zip(stored, new_dims, strict=True):
            target.CopyFrom(source)
        del dims[:]
        dims.extend(stored)
    for name, values, op in (("mean", mean, "Sub"), ("std", std, "Div")):
        if values is None:
            continue
        constant = f"{x.name}/{name}"
        graph.initializer.append(numpy_helper.from_array(per_channel(values, name), constant))
        out = f"{x.name}/{op.lower()}"
        nodes.append(helper.make_node(op, [current, constant], [out]))
        current = out
    nodes.append(helper.make_node("Identity", [current], [internal]))
    new_nodes = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model
