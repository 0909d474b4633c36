"""Quantized models. A QDQ model (QuantizeLinear -> DequantizeLinear pairs around float operators:
ONNX Runtime's quantize_static, PyTorch's fake_quantize exports) is differentiated straight
through each pair, exactly as PyTorch's fake_quantize backward does it, and says so; so is a
dynamically quantized one (quantize_dynamic), run one image per call; a QOperator model
(QLinearConv: integers between operators) is black-box only, with the reason and the way out
named. Before, all were refused at upload with "the logits do not depend on the image input",
which was false, or black-box only."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from schemas.evaluation import EvaluationSpec
from tests import digits
from workers.datasets import Dataset
from workers.evaluate import evaluate
from workers.onnxgrad import UnsupportedOperatorError, build_gradient_model
from workers.onnxgrad.errors import InvalidModelError
from workers.runtime import Classifier


class FakeQuantized(nn.Module):
    """A CNN whose activations and first weights pass through fake quantization: uint8 with zero
    point 0 (a ReLU folded into the clamp), uint8 with zero point 128, int8 per output channel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 7 * 7, 5)
        self.register_buffer("w_scale", self.c1.weight.detach().abs().amax((1, 2, 3)) / 127)
        self.register_buffer("w_zero", torch.zeros(8, dtype=torch.int32))

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 1 / 255, 0, 0, 255)
        w = torch.fake_quantize_per_channel_affine(self.c1.weight, self.w_scale, self.w_zero, 0, -128, 127)
        h = nn.functional.conv2d(x, w, self.c1.bias, padding=1)
        h = torch.fake_quantize_per_tensor_affine(h, 0.02, 0, 0, 255)
        h = torch.fake_quantize_per_tensor_affine(self.c2(h), 0.05, 128, 0, 255)
        return torch.fake_quantize_per_tensor_affine(self.fc(torch.relu(h).flatten(1)), 0.1, 128, 0, 255)


def _fake_quantized_export(default_exporter: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    module = FakeQuantized().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the default exporter traces fake_quantize at a fixed batch only (no symbolic-shape kernel);
        # the service makes the batch axis symbolic
        torch.onnx.export(module, (torch.rand(16, 3, 16, 16),), buffer, dynamo=default_exporter,
                          opset_version=18 if default_exporter else 17, verbose=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes=None if default_exporter else {"input": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("default_exporter", [False, True], ids=["torchscript", "default"])
def test_the_gradient_through_qdq_pairs_is_pytorch_s_fake_quantize_gradient(default_exporter):
    model = _fake_quantized_export(default_exporter)
    classifier = Classifier(model)
    assert classifier.straight_through == 4  # the input, two activations, the logits (not c1's weights)
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 5
    torch.manual_seed(0)
    module = FakeQuantized().eval()
    xr = x.clone().requires_grad_(True)
    logits = module(xr)
    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    assert xr.grad is not None
    ours, _, grad = classifier.loss_and_grad(x.numpy(), y.numpy(), loss="cross_entropy")
    np.testing.assert_array_equal(ours, logits.detach().numpy())
    reference = xr.grad.numpy()
    assert np.abs(reference).max() > 0  # the true gradient (zero almost everywhere) would be 0
    np.testing.assert_allclose(grad, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())


@pytest.fixture(scope="module")
def quantized_cnn(tmp_path_factory) -> dict[str, bytes]:
    """The digits CNN quantized by ONNX Runtime's quantize_static (uint8 activations, int8
    weights) in both formats; QOperator with Conv only, so every operator is the default domain's."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    folder = tmp_path_factory.mktemp("quantized")
    source = folder / "cnn.onnx"
    source.write_bytes(digits.onnx_bytes("cnn"))
    x_train = digits.digits()[0]

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x_train[i:i + 16]} for i in range(0, 256, 16)])

        def get_next(self):
            return next(self.batches, None)

    files = {}
    for name, form, ops in (("qdq", QuantFormat.QDQ, None), ("qoperator", QuantFormat.QOperator, ["Conv"])):
        target = folder / f"{name}.onnx"
        quantize_static(str(source), str(target), Calibration(), quant_format=form, op_types_to_quantize=ops,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        files[name] = target.read_bytes()
    quantize_dynamic(str(source), str(folder / "dynamic.onnx"), weight_type=QuantType.QInt8)
    files["dynamic"] = (folder / "dynamic.onnx").read_bytes()
    return files


def test_an_onnxruntime_qdq_model_is_attacked_through_its_pairs(quantized_cnn):
    model = quantized_cnn["qdq"]
    classifier = Classifier(model)
    pairs = sum(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(model).graph.node)
    assert classifier.straight_through == pairs > 0
    _, _, x, y = digits.digits()
    x, y = x[:120], y[:120]
    # predictions are the quantized model's own, as ONNX Runtime runs it (its fused int8 kernels)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(classifier.logits(x), session.run(None, {"input": x})[0])
    spec = EvaluationSpec.model_validate({"samples": "all", "attacks": [{"name": "fgsm", "eps": [0.1, 0.3]}]})
    result = evaluate(model, Dataset(x=x, y=y, source_dtype="float32"), spec).result
    assert result.model["straight_through"] == pairs
    assert result.clean_accuracy > 0.9
    accuracies = [a.robust_accuracy for a in result.attacks]
    assert accuracies[1] < 0.5 * result.clean_accuracy, accuracies
    assert any(w.startswith(f"quantized model: gradient attacks followed a straight-through gradient "
                            f"through its {pairs} quantizer(s)") for w in result.warnings)


def test_a_qoperator_model_is_black_box_only_and_told_how_to_get_gradients(quantized_cnn, tmp_path):
    from service.model_admission import validate_model

    path = tmp_path / "qoperator.onnx"
    path.write_bytes(quantized_cnn["qoperator"])
    info = validate_model(path, max_bytes=1 << 26)
    assert not info.gradients_available and info.gradients_straight_through == 0
    assert info.unsupported[0]["op_type"] == "QLinearConv"
    assert info.unsupported[0]["reason"].endswith(
        "is uint8, which carries no gradient; this is a QOperator-format quantized model: quantize it "
        "in the QDQ format (onnxruntime.quantization's QuantFormat.QDQ) for straight-through gradients")


def _dynamic_quantization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX's DynamicQuantizeLinear of one image, q = x / s + z straight through: (q, s, z)."""
    low, high = torch.clamp(x.detach().min(), max=0), torch.clamp(x.detach().max(), min=0)
    scale = (high - low) / 255
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    exact = x / scale + zero
    return exact + (torch.clamp(torch.round(x.detach() / scale) + zero, 0, 255) - exact).detach(), scale, zero


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_dynamically_quantized_model_is_differentiated_straight_through_one_image_at_a_time(per_channel,
                                                                                           tmp_path):
    """quantize_dynamic's DynamicQuantizeLinear -> ConvInteger / MatMulInteger -> Cast -> Mul: the
    gradient of q = x / s + z (s, z the image's own range) through the integer operators, checked
    against torch; the range is the whole batch's, so the model runs one image per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(2, 3, 8, 8),), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}})
    (tmp_path / "float.onnx").write_bytes(buffer.getvalue())
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dynamic.onnx"),
                     weight_type=QuantType.QInt8, per_channel=per_channel)
    model = onnx.load(tmp_path / "dynamic.onnx")
    w = {i.name: torch.tensor(numpy_helper.to_array(i).astype(np.float32)) for i in model.graph.initializer}

    def forward(x):  # one image
        q, s, z = _dynamic_quantization(x)
        kernel = w["0.weight_quantized"] - w["0.weight_zero_point"].reshape(-1, 1, 1, 1)
        h = nn.functional.conv2d(q - z, kernel, padding=1) * (s * w["0.weight_scale"].reshape(1, -1, 1, 1))
        q, s, z = _dynamic_quantization(torch.relu(h + w["0.bias"].reshape(1, -1, 1, 1)).flatten(1))
        matrix = w["3.weight_Transposed_quantized"] - w["3.weight_Transposed_zero_point"]
        return (q - z) @ matrix * (s * w["3.weight_Transposed_scale"]) + w["3.bias"]

    classifier = Classifier(model)
    assert (classifier.fixed_batch, classifier.straight_through) == (1, 2)
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x[0] *= 40  # a bright image: sharing its range would change its batch mates' quantization
    v = torch.randn(8, 5, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_(True)
    reference = torch.cat([forward(xr[i:i + 1]) for i in range(len(x))])
    (reference * v).sum().backward()
    assert xr.grad is not None
    logits, grad = classifier.logits_vjp(x.numpy(), v.numpy())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    alone = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    np.testing.assert_array_equal(classifier.logits(x.numpy()), alone)
    np.testing.assert_array_equal(logits, alone)  # the gradient graph runs the integer operators too
    np.testing.assert_allclose(grad, xr.grad.numpy(), rtol=1e-5, atol=1e-6 * np.abs(xr.grad.numpy()).max())


def test_a_dynamically_quantized_cnn_is_evaluated(quantized_cnn):
    from service.model_admission import inspect_classifier

    found = inspect_classifier(quantized_cnn["dynamic"])
    assert found.gradients_available and found.prepared.straight_through == 4
    _, _, x, y = digits.digits()
    spec = EvaluationSpec.model_validate({"samples": 60, "attacks": [{"name": "fgsm", "eps": [0.3]}]})
    result = evaluate(quantized_cnn["dynamic"], Dataset(x=x, y=y, source_dtype="float32"), spec).result
    assert (result.model["fixed_batch"], result.model["straight_through"]) == (1, 4)
    assert result.clean_accuracy > 0.9 and result.attacks[0].robust_accuracy < 0.5 * result.clean_accuracy


def test_the_upload_s_answer_and_inspect_say_the_gradient_is_straight_through(quantized_cnn, tmp_path,
                                                                               capsys):
    from client.cli import main
    from tests.service.conftest import gateway, make_settings

    with gateway(make_settings(tmp_path / "data")) as api:
        answer = api.post("/v1/models", files={"file": ("int8.onnx", quantized_cnn["qdq"])})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    pairs = sum(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(quantized_cnn["qdq"]).graph.node)
    assert (body["attacks"], body["gradients"]["straight_through"]) == ("all", pairs)
    path = tmp_path / "int8.onnx"
    path.write_bytes(quantized_cnn["qdq"])
    assert main(["inspect", str(path)]) == 0
    assert f"straight through {pairs} quantizer(s) (QuantizeLinear -> DequantizeLinear pairs" in \
        capsys.readouterr().out


def _linear_model(nodes, initializers) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    graph = helper.make_graph(
        [*nodes, helper.make_node("MatMul", ["h", "W"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])], [weight, *initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_integer_tensor_on_the_path_is_named_where_it_was_said_the_logits_ignore_the_image():
    scale = numpy_helper.from_array(np.array(255, np.float32), "scale")
    model = _linear_model([helper.make_node("Mul", ["x", "scale"], ["big"]),
                           helper.make_node("Cast", ["big"], ["pixels"], to=TensorProto.INT32),
                           helper.make_node("Cast", ["pixels"], ["h"], to=TensorProto.FLOAT)], [scale])
    with pytest.raises(UnsupportedOperatorError, match=r"Cast \(node 'pixels'\): its output 'pixels' is "
                                                       r"int32, which carries no gradient"):
        build_gradient_model(model)
    constant = _linear_model([helper.make_node("Shape", ["x"], ["shape"]),
                              helper.make_node("ConstantOfShape", ["shape"], ["h"])], [])
    with pytest.raises(InvalidModelError, match="the logits do not depend on the image input"):
        build_gradient_model(constant)


def test_a_quantized_tensor_read_as_a_number_is_not_differentiated_straight_through():
    """Cast(q) is q, not (q - z) * s: a straight-through gradient there would be off by 1 / s."""
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    model = _linear_model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                           helper.make_node("Cast", ["q"], ["h"], to=TensorProto.FLOAT)], [scale, zero])
    with pytest.raises(UnsupportedOperatorError, match="its integer output feeds Cast; only QuantizeLinear "
                                                       "-> DequantizeLinear pairs are differentiated"):
        build_gradient_model(model)
