"""Layers beyond the zoo's, as both of PyTorch's exporters write them, differentiated and checked
against torch.autograd: GroupNorm and InstanceNorm2d (both exported as InstanceNormalization),
Mish, PixelUnshuffle/PixelShuffle (SpaceToDepth/DepthToSpace), einsum attention (Einsum),
top-k pooling (TopK), inverse trigonometric and cumulative ops, spatial transformers
(GridSample); and the ONNX model zoo's LRN
(AlexNet, CaffeNet, GoogLeNet), which no PyTorch exporter writes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from tests import zoo
from tests.onnxgrad.gradcheck import check_vjp, to_float64
from workers.onnxgrad import UnsupportedOperatorError, build_gradient_model, build_vjp_model

TOLERANCE = 1e-4  # norm-wise relative error of the float32 gradient
SHAPE = (3, 8, 8)


class Block(nn.Module):
    """A conv, the layer under test, a head: 10 classes."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Conv2d(32, 32, 1)
        self.group_norm = nn.GroupNorm(4, 8)
        self.instance_norm = nn.InstanceNorm2d(8, affine=True)
        self.query, self.key = nn.Parameter(torch.randn(8, 8) / 3), nn.Parameter(torch.randn(8, 8) / 3)
        self.head = nn.Linear(8 * 8 * 8 if kind != "top_k" else 64, 10)

    def forward(self, x):
        h = self.conv(x)
        if self.kind == "group_norm":
            h = self.group_norm(h)
        elif self.kind == "instance_norm":
            h = self.instance_norm(h)
        elif self.kind == "mish":
            h = F.mish(h)
        elif self.kind == "pixel_shuffle":
            h = F.pixel_shuffle(self.inner(F.pixel_unshuffle(h, 2)), 2)
        elif self.kind == "einsum_attention":
            tokens = h.flatten(2)  # [N, C, HW]
            q = torch.einsum("nct,cd->ntd", tokens, self.query)
            k = torch.einsum("nct,cd->ntd", tokens, self.key)
            weights = torch.softmax(torch.einsum("ntd,nsd->nts", q, k), dim=-1)
            h = torch.einsum("nts,ncs->nct", weights, tokens).reshape(h.shape) + h
        elif self.kind == "top_k":
            return self.head(torch.topk(h.flatten(1), 64).values)
        elif self.kind == "elementary":
            h = torch.atan(h) + 0.1 * torch.cumsum(h, 1) + torch.tril(h)
        return self.head(h.flatten(1))


KINDS = ["group_norm", "instance_norm", "mish", "pixel_shuffle", "einsum_attention", "top_k", "elementary"]


def _module(kind: str) -> nn.Module:
    return zoo.build_seeded(lambda: Block(kind), seed=3)


def _exported(module: nn.Module, exporter: str, tmp_path, opset: int = 17) -> onnx.ModelProto:
    if exporter == "torchscript":
        return zoo.export_onnx(module, SHAPE, opset=opset)
    zoo.export_default(module, SHAPE, tmp_path / "model.onnx")
    return onnx.load(str(tmp_path / "model.onnx"))


def _torch_gradient(module: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xt = torch.tensor(x, requires_grad=True)
    (grad,) = torch.autograd.grad(F.cross_entropy(module(xt), torch.tensor(y), reduction="sum"), xt)
    return grad.numpy()


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _assert_gradient_matches(model: onnx.ModelProto, module: nn.Module, seed: int) -> None:
    """The cross-entropy gradient of four random images against torch.autograd's."""
    session = ort.InferenceSession(build_gradient_model(model, loss="cross_entropy").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x = rng.random((4, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, 4)
    (grad,) = session.run(["grad"], {session.get_inputs()[0].name: x, "labels": y})
    assert _relative_error(grad, _torch_gradient(module, x, y)) < TOLERANCE


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_matches_torch_autograd(kind, exporter, tmp_path):
    module = _module(kind)
    _assert_gradient_matches(_exported(module, exporter, tmp_path), module, seed=1)


class SpatialTransformer(nn.Module):
    """PyTorch's spatial transformer tutorial network: a localisation net predicts an affine warp
    of the image (starting near the identity), which is sampled before the classifier."""

    def __init__(self, mode: str, padding: str, align: bool):
        super().__init__()
        self.mode, self.padding, self.align = mode, padding, align
        self.localisation = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(4 * 3 * 3, 6))
        self.head = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x):
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        theta = (identity + 0.3 * self.localisation(x)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=self.align)
        warped = F.grid_sample(x, grid, mode=self.mode, padding_mode=self.padding, align_corners=self.align)
        return self.head(warped.flatten(1))


SAMPLINGS = [("bilinear", "zeros", False), ("bilinear", "border", True), ("nearest", "zeros", True)]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize(("mode", "padding", "align"), SAMPLINGS)
def test_spatial_transformer_gradient_matches_torch_autograd(mode, padding, align, exporter, tmp_path):
    """GridSample's gradient reaches the image twice: through the sampled pixels and through the
    warp the localisation net computed from it (none through nearest sampling's coordinates)."""
    module = zoo.build_seeded(lambda: SpatialTransformer(mode, padding, align), seed=5)
    model = _exported(module, exporter, tmp_path, opset=20)  # TorchScript writes affine_grid from 20 on
    assert "GridSample" in {node.op_type for node in model.graph.node}
    _assert_gradient_matches(model, module, seed=4)


def _lrn_classifier(size: int, rng: np.random.Generator) -> tuple[onnx.ModelProto, dict]:
    """Conv -> LRN -> global pool -> Gemm, as the zoo's Caffe-era files write it (alpha raised
    from their 1e-4 so the normalisation shapes the gradient)."""
    weights = {"w": rng.standard_normal((6, 3, 3, 3)).astype(np.float32) / 3,
               "fc": rng.standard_normal((10, 6)).astype(np.float32)}
    lrn = {"size": size, "alpha": 0.5, "beta": 0.75, "bias": 2.0}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("LRN", ["h"], ["n"], **lrn),
         helper.make_node("GlobalAveragePool", ["n"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)],
        "lrn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {**weights, **lrn}


def test_lrn_gradient_matches_torch_local_response_norm():
    """Odd windows, where torch's window and ONNX's agree (the zoo's files use 5)."""
    rng = np.random.default_rng(2)
    model, p = _lrn_classifier(5, rng)
    x = rng.random((3, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, 3)
    session = ort.InferenceSession(build_gradient_model(model, loss="cross_entropy").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    logits, grad = session.run(["logits", "grad"], {"x": x, "labels": y})

    xt = torch.tensor(x, requires_grad=True)
    h = F.local_response_norm(F.conv2d(xt, torch.tensor(p["w"]), padding=1), p["size"], p["alpha"],
                              p["beta"], p["bias"])
    z = h.mean((2, 3)) @ torch.tensor(p["fc"]).T
    (want,) = torch.autograd.grad(F.cross_entropy(z, torch.tensor(y), reduction="sum"), xt)
    np.testing.assert_allclose(logits, z.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert _relative_error(grad, want.numpy()) < TOLERANCE


@pytest.mark.parametrize("size", [2, 4])
def test_lrn_even_windows_follow_onnx_in_float64(size):
    """Even windows reach one channel further after than before (ONNX's spec; ONNX Runtime runs
    odd sizes only). 5 samples and 6 channels, so the reference's batch/channel mix-up
    (gradcheck.LRN) would show."""
    rng = np.random.default_rng(size)
    model, _ = _lrn_classifier(size, rng)
    vjp = build_vjp_model(model, ["x"], "logits")
    check_vjp(to_float64(model), to_float64(vjp), {"x": rng.random((5, *SHAPE))}, wrt=["x"],
              output="logits", rtol=1e-6)


def test_einsum_broadcasting_is_refused_by_name():
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "w"], ["logits"], equation="...i,...ij->...j")],
        "e", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(np.ones((1, 8, 10), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOperatorError, match="broadcast"):
        build_vjp_model(model, ["x"], "logits")


@pytest.mark.parametrize("p", [1, 2, 3])
def test_global_lp_pool_matches_torch(p):
    """ONNX ships no node case (and its reference evaluator no kernel) for GlobalLpPool:
    y = (sum |x|^p)^(1/p) over the spatial axes, against torch.autograd in float64."""
    graph = helper.make_graph(
        [helper.make_node("GlobalLpPool", ["x"], ["pooled"], p=p),
         helper.make_node("Flatten", ["pooled"], ["logits"])],
        "lp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(build_vjp_model(model, ["x"], "logits").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(p)
    x = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    cotangent = rng.standard_normal((2, 3)).astype(np.float32)
    logits, grad = session.run(["logits", "grad_x"], {"x": x, "cotangent": cotangent})
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    pooled = (xt.abs() ** p).sum((2, 3)) ** (1 / p)
    (want,) = torch.autograd.grad((pooled * torch.tensor(cotangent, dtype=torch.float64)).sum(), xt)
    np.testing.assert_allclose(logits, pooled.detach().numpy(), rtol=1e-5)
    assert _relative_error(grad, want.numpy()) < TOLERANCE
