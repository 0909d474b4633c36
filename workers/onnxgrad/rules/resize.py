"""Resize is linear and separable: y = A_h . x . A_w^T, so dx = A_h^T . dy . A_w.

Each axis matrix is measured, not re-derived: the same Resize (same mode, coordinate
transform, rounding, cubic coefficient) is run by ONNX Runtime on an identity basis along
that one axis, so the gradient follows exactly the interpolation the forward pass used.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from ..autodiff import Context, attr, register, unknown_shape, unsupported
from ..graph import same_dim

_COPIED = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a",
           "exclude_outside", "antialias")


def _full_rank(values: np.ndarray | None, axes: list[int] | None, rank: int, fill) -> list | None:
    if values is None or values.size == 0:
        return None
    flat = values.reshape(-1).tolist()
    if axes is None:
        return flat
    full = [fill] * rank
    for axis, value in zip(axes, flat, strict=True):
        full[axis % rank] = value
    return full


def _axis_matrix(node, axis: int, rank: int, length: int, out_length: int,
                 scale: float | None) -> np.ndarray:
    """The [out_length, length] matrix of this Resize along ``axis``."""
    basis_axis = 0 if axis != 0 else 1
    in_shape = [1] * rank
    in_shape[axis] = length
    in_shape[basis_axis] = length
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)]
    initializers = [helper.make_tensor("roi", TensorProto.FLOAT, [0], [])]
    if scale is not None:
        scales = [1.0] * rank
        scales[axis] = scale
        initializers.append(helper.make_tensor("scales", TensorProto.FLOAT, [rank], scales))
        node_inputs = ["x", "roi", "scales"]
    else:
        sizes = list(in_shape)
        sizes[axis] = out_length
        initializers.append(helper.make_tensor("sizes", TensorProto.INT64, [rank], sizes))
        node_inputs = ["x", "roi", "", "sizes"]
    kept = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _COPIED}
    graph = helper.make_graph(
        [helper.make_node("Resize", node_inputs, ["y"], **kept)], "axis_matrix", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    basis = np.eye(length, dtype=np.float32).reshape(in_shape)
    (out,) = session.run(None, {"x": basis})
    if out.shape[axis] != out_length:
        raise ValueError(f"axis {axis}: expected {out_length} outputs, measured {out.shape[axis]}")
    # out indexed [basis k along basis_axis, output i along axis] -> A[i, k]
    return np.moveaxis(out, (axis, basis_axis), (0, 1)).reshape(out_length, length)


@register("Resize")
def resize(ctx: Context, node, dy):
    g = ctx.g
    x, y = node.input[0], node.output[0]
    x_shape, y_shape = ctx.shape(x), ctx.shape(y)
    if x_shape is None or y_shape is None:
        raise unknown_shape(node, "input and output shapes must be known")
    if attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise unsupported(node, "tf_crop_and_resize is not supported")
    if attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise unsupported(node, "only keep_aspect_ratio_policy=stretch is supported")
    rank = len(x_shape)
    axes = attr(node, "axes")
    scales_in = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    sizes_in = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    scales = _full_rank(ctx.constant(scales_in) if scales_in else None, axes, rank, 1.0)
    if scales_in and scales is None and not sizes_in:
        raise unsupported(node, "scales computed at run time are not supported")
    grad = dy[0]
    for axis in sorted(a % rank for a in axes) if axes else range(rank):
        length, out_length = x_shape[axis], y_shape[axis]
        scale = scales[axis] if scales is not None else None
        if scale == 1.0 or (scale is None and same_dim(length, out_length)):
            continue
        if not isinstance(length, int) or not isinstance(out_length, int):
            raise unknown_shape(node, f"axis {axis} is resized but its size is not static")
        matrix = _axis_matrix(node, axis, rank, length, out_length, scale)
        if axis == rank - 1:
            grad = g.op("MatMul", grad, g.const(matrix))
        elif axis == rank - 2:
            grad = g.op("MatMul", g.const(np.ascontiguousarray(matrix.T)), grad)
        else:
            perm = list(range(rank))
            perm[axis], perm[-1] = perm[-1], perm[axis]
            moved = g.op("Transpose", grad, perm=perm)
            grad = g.op("Transpose", g.op("MatMul", moved, g.const(matrix)), perm=perm)
    return [grad]

