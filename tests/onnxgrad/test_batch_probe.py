"""Sizes that shape inference misses in TorchScript exports with a dynamic batch: static dims read
with x.size(i) (folded), and sizes computed from Shape(x) in arithmetic that inference cannot
follow, found by inferring at two pinned batches (workers/onnxgrad/batch_probe.py), as MobileViT's
interpolation to a multiple of its patch size needs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests import zoo
from workers.onnxgrad import UnsupportedOperatorError, build_gradient_model
from workers.onnxgrad.fold import fold_static_shape_reads
from workers.onnxgrad.prepare import infer_shapes, prepare_classifier


class PatchUnfolding(nn.Module):
    """MobileViT's unfold/fold around a per-patch mixing step, with its rounding of the sizes."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 7 * 7, 10)

    def forward(self, x):
        h = self.stem(x)
        batch, channels, height, width = h.shape
        rows = int(math.ceil(height / 2))
        cols = int(math.ceil(width / 2))
        h = nn.functional.interpolate(h, size=(rows * 2, cols * 2), mode="bilinear", align_corners=False)
        patches = h.reshape(batch * channels * rows, 2, cols, 2).transpose(1, 2)
        patches = patches.reshape(batch, channels, rows * cols, 4).transpose(1, 3)
        patches = self.mix(patches).transpose(1, 3)
        h = patches.reshape(batch * channels * rows, cols, 2, 2).transpose(1, 2)
        h = h.reshape(batch, channels, rows * 2, cols * 2)
        h = nn.functional.interpolate(h, size=(height, width), mode="bilinear", align_corners=False)
        return self.head(torch.relu(self.conv(h)).flatten(1))


SHAPE = (3, 7, 7)  # odd: the patches need the interpolation (a Resize to computed sizes)


@pytest.fixture(scope="module")
def exported():
    module = zoo.build_seeded(PatchUnfolding, seed=1)
    return module, zoo.export_onnx(module, SHAPE)


def test_the_export_hides_the_conv_sizes_from_shape_inference(exported):
    """The premise: without the probes, the Conv's rule cannot see its spatial sizes."""
    from workers.onnxgrad.build import _gradient_model

    with pytest.raises(UnsupportedOperatorError) as info:
        _gradient_model(prepare_classifier(exported[1]), "cross_entropy", "cpu")
    assert info.value.needs_shapes


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_gradient_matches_torch_at_any_batch(exported, batch):
    module, model = exported
    session = ort.InferenceSession(build_gradient_model(model, loss="cross_entropy").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(batch)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    logits, grad = session.run(["logits", "grad"], {session.get_inputs()[0].name: x, "labels": y})
    xt = torch.tensor(x, requires_grad=True)
    z = module(xt)
    (want,) = torch.autograd.grad(nn.functional.cross_entropy(z, torch.tensor(y), reduction="sum"), xt)
    np.testing.assert_allclose(logits, z.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(grad - want.numpy()) / np.linalg.norm(want.numpy()) < 1e-4


def _shape_read(index: np.ndarray) -> onnx.ModelProto:
    """Gather(Shape(x), index) of an x shaped [N, 3, 7, 9], shape-inferred."""
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Gather", ["shape", "index"], ["picked"], axis=0),
         helper.make_node("Identity", ["picked"], ["out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 7, 9])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, None)],
        initializer=[numpy_helper.from_array(index.astype(np.int64), "index")])
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("index", [np.array(2), np.array([2, 3])], ids=["scalar", "vector"])
def test_static_dims_read_by_a_gather_of_the_shape_are_folded(index):
    """x.size(2) exports as Gather(Shape(x), 2) with a scalar index: it is a constant wherever
    the dim is static, even with a symbolic batch in the same shape (the scalar pick was missed)."""
    model = _shape_read(index)
    assert fold_static_shape_reads(model)
    (folded,) = [n for n in model.graph.node if n.output[0] == "picked"]
    assert folded.op_type == "Constant"
    want = [7, 9] if index.ndim else 7
    np.testing.assert_array_equal(numpy_helper.to_array(folded.attribute[0].t), want)


def test_the_batch_read_is_not_folded():
    assert not fold_static_shape_reads(_shape_read(np.array(0)))
