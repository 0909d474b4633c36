"""Downsampling: shrink the image by ``factor`` and stretch it back to its size.

Liang et al. ("Deep adversarial robustness", section 5, Table 3) downsample by 50% and 75%:
on Inception the clean accuracy fell from 75.85% to 62.95% and 70.45%, and the accuracy
under universal perturbations stayed about the same (54.30%, 53.70% against 55.25%).

x [N, C, H, W] -> Resize to (h, w) = (round(H factor), round(W factor)), at least 1 ->
Resize back to (H, W). ``mode`` "linear" (bilinear, half_pixel coordinates, no antialiasing:
PyTorch's interpolate(mode="bilinear", align_corners=False)) or "nearest" (asymmetric
coordinates, floor: PyTorch's mode="nearest"). Both are convex combinations of pixels, so
the output stays in the input's range.

Both Resizes are linear and separable: the stage is x -> B_h x B_w^T with B = up · down per
axis. The ONNX stage is two Resize nodes with constant scales (the gradient builder's Resize
rule needs static spatial sizes and constant scales or sizes; it measures each axis matrix on
ONNX Runtime, so its gradient follows the forward interpolation exactly). ``apply`` uses the
same matrices, measured the same way once per image size, so it equals the ONNX stage up to
float32 rounding.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from workers.attacks.base import check

from .base import (
    Defense,
    as_images,
    check_number,
    input_dims,
    node,
    prepend_stage,
    register_defense,
    stage_model,
    unique_prefix,
)

MODES = {
    "linear": {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
    "nearest": {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
}


def resize_scale(length: int, target: int) -> np.float32:
    """The float32 scale s with floor(length * s) == target, computed exactly (as ONNX shape
    inference does) and as ONNX Runtime does; float32(target / length) can fall one short."""
    scale = np.float32(target / length)
    while float(length) * float(scale) < target:
        scale = np.nextafter(scale, np.float32(np.inf))
    return scale


@functools.lru_cache(maxsize=64)
def _axis_matrix(mode: str, length: int, scale: np.float32) -> np.ndarray:
    """The [out, length] matrix of one Resize along one axis, measured on ONNX Runtime."""
    shape = [length, 1, length, 1]  # a batch of basis vectors along axis 2
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], **MODES[mode])], "axis_matrix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, scale, 1], np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.eye(length, dtype=np.float32).reshape(shape)})
    expected = int(np.floor(float(length) * float(scale)))
    if out.shape[2] != expected:
        raise RuntimeError(f"Resize of {length} by {scale!r} gave {out.shape[2]} values, expected {expected}")
    matrix = out[:, 0, :, 0].T  # out[k, 0, i, 0] = A[i, k]
    matrix.setflags(write=False)
    return matrix


@register_defense
class Downsample(Defense):
    """Resize down by ``factor`` and back up to the input size."""

    name = "downsample"
    differentiable = True

    def __init__(self, *, factor: float = 0.5, mode: str = "linear"):
        self.factor = check_number("factor", factor, low=0.0, high=1.0, low_open=True, high_open=True)
        check(mode in MODES, f"`mode` must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.params = {"factor": self.factor, "mode": mode}

    def small_size(self, length: int) -> int:
        return max(1, int(round(length * self.factor)))

    def scales(self, length: int) -> tuple[np.float32, np.float32]:
        """(down, up) scales along an axis of ``length`` pixels."""
        small = self.small_size(length)
        return resize_scale(length, small), resize_scale(small, length)

    def matrix(self, length: int) -> np.ndarray:
        """B = up · down, [length, length]: the stage along one axis."""
        small = self.small_size(length)
        down, up = self.scales(length)
        return _axis_matrix(self.mode, small, up) @ _axis_matrix(self.mode, length, down)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = as_images(x, self.name, rank=4)
        rows, cols = self.matrix(x.shape[2]), self.matrix(x.shape[3])
        return np.matmul(np.matmul(rows, x), cols.T).astype(np.float32, copy=False)

    def compose(self, model: onnx.ModelProto | bytes) -> onnx.ModelProto:
        """Resize(scales [1, 1, h/H, w/W]) -> Resize(scales [1, 1, H/h, W/w])."""
        model, x = stage_model(model)
        dims = input_dims(x)
        check(len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]),
              f"downsample: the model's input {x.name!r} has shape {dims}; it needs NCHW with a "
              "static height and width")
        height, width = dims[2], dims[3]
        assert isinstance(height, int) and isinstance(width, int)
        (down_h, up_h), (down_w, up_w) = self.scales(height), self.scales(width)
        p = unique_prefix(model.graph, "defense/downsample/")
        initializers = [
            numpy_helper.from_array(np.array([1, 1, down_h, down_w], np.float32), p + "down_scales"),
            numpy_helper.from_array(np.array([1, 1, up_h, up_w], np.float32), p + "up_scales"),
        ]
        nodes = [
            node("Resize", [x.name, "", p + "down_scales"], p + "small", p, **MODES[self.mode]),
            node("Resize", [p + "small", "", p + "up_scales"], p + "output", p, **MODES[self.mode]),
        ]
        return prepend_stage(model, x, nodes, initializers, p + "output")
