"""Composing input preprocessing into the model graph.

Attacks work in pixel space: NCHW images in the dataset's declared range (workers/layout.py);
the model may expect normalised tensors, and NHWC ones. Putting (x - mean) / std and the
layout change in front of the model, as ONNX nodes, makes the gradient builder differentiate
through them, so every budget and every perturbation is measured in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.layout import LAYOUTS, model_layout
from workers.onnxgrad import weights
from workers.onnxgrad.dtypes import half_dtype
from workers.onnxgrad.errors import InvalidModelError
from workers.onnxgrad.prepare import image_input, load_model


def model_input_shape(model: onnx.ModelProto | bytes) -> list[int | None]:
    """The model's image input shape, None for a symbolic axis."""
    dims = image_input(load_model(model)).type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def compose_for_images(model: onnx.ModelProto | bytes, image: Sequence[int], *,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       layout: str = "auto") -> tuple[onnx.ModelProto, str]:
    """``model`` composed to take NCHW pixels of one image's shape ``image`` (compose_preprocessing),
    and the layout it takes: ``layout``, or with "auto" the one the images fit
    (workers.layout.model_layout, which raises LayoutError when none does)."""
    layout = model_layout(model_input_shape(model), image, layout)
    return compose_preprocessing(model, mean=mean, std=std, model_layout=layout, image=image), layout


def with_scores_output(model: onnx.ModelProto, name: str | None) -> onnx.ModelProto:
    """``model`` (changed in place) with its output ``name`` first, the output read as the
    classifier's scores; unchanged for None."""
    if name is None:
        return model
    outputs = list(model.graph.output)
    chosen = [o for o in outputs if o.name == name]
    if not chosen:
        raise InvalidModelError(f"input.model_output: the model has no output {name!r}; its outputs are "
                                f"{', '.join(repr(o.name) for o in outputs)}")
    del model.graph.output[:]
    model.graph.output.extend(chosen + [o for o in outputs if o.name != name])
    return model


def compose_preprocessing(
    model: onnx.ModelProto | bytes,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_layout: str = "NCHW",
    image: Sequence[int] | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` that takes NCHW pixels and normalises them itself.

    ``mean`` and ``std`` have one value, or one per channel (axis 1 of the pixels).
    ``model_layout`` is the layout the model itself takes: for "NHWC" a Transpose follows the
    normalisation. ``image`` (one NCHW image's shape) fixes the model's symbolic image axes
    (a Keras export's [N, ?, ?, 3]), so that shapes are known to the gradient builder. The
    returned model's input keeps the original input's name.
    """
    if model_layout not in LAYOUTS:
        raise ValueError(f"`model_layout` must be NCHW or NHWC, got {model_layout!r}")
    model = load_model(model)
    x = image_input(model)
    dims = x.type.tensor_type.shape.dim
    rank = len(dims)
    if image is not None and len(image) == rank - 1:
        sizes = [image[1], image[2], image[0]] if model_layout == "NHWC" and rank == 4 else list(image)
        for dim, size in zip(list(dims)[1:], sizes, strict=True):
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = int(size)
    if mean is None and std is None and model_layout == "NCHW":
        return model
    if rank != 4 and model_layout == "NHWC":
        raise ValueError(f"an NHWC model needs a 4-D image input; {x.name!r} has rank {rank}")
    channel_axis = 3 if model_layout == "NHWC" else 1
    channels = (dims[channel_axis].dim_value if rank >= 2 and dims[channel_axis].HasField("dim_value")
                else None)

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
    if model_layout == "NHWC":  # the composed model's input is NCHW: [N, C, H, W]
        stored = [onnx.TensorShapeProto.Dimension() for _ in range(4)]
        for target, source in zip(stored, [dims[0], dims[3], dims[1], dims[2]], strict=True):
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
    if model_layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [current], [f"{x.name}/nhwc"], perm=[0, 2, 3, 1]))
        current = f"{x.name}/nhwc"
    half = half_dtype(x)
    if half is not None:  # normalised in float32, then cast to the half model's own input type
        nodes.append(helper.make_node("Cast", [current], [internal], to=half))
        x.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    else:
        nodes.append(helper.make_node("Identity", [current], [internal]))
    new_nodes = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    weights.check_model(model)
    return model
