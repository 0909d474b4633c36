"""Binary classifiers with one score per image (a Sigmoid's probability or a logit, [N, 1] or
[N]): read as two classes whose logits are [-z/2, z/2], so that the cross-entropy is the binary
cross-entropy of the score z and attacks have a gradient to follow. Read as one class, every
image would be class 0 whatever an attack did: a robust accuracy equal to the clean one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from schemas.evaluation import EvaluationSpec
from tests import digits
from tests.zoo import export_default, export_onnx
from workers.datasets import Dataset
from workers.evaluate import evaluate
from workers.onnxgrad.errors import InvalidModelError
from workers.runtime import Classifier


class Binary(nn.Module):
    """Zeros against ones of the digits: a small CNN whose head is one score."""

    def __init__(self, end: str = "sigmoid"):
        super().__init__()
        self.end = end
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(8 * 13 * 13, 1))

    def score(self, x):
        return self.body(x)

    def forward(self, x):
        z = self.body(x)
        if self.end == "sigmoid":
            return torch.sigmoid(z)
        if self.end == "sigmoid_squeezed":
            return torch.sigmoid(z).reshape(-1)
        if self.end == "softmax":
            return torch.softmax(z, dim=1)
        if self.end == "hard_sigmoid":
            return nn.functional.hardsigmoid(4 * z)
        return z


@pytest.fixture(scope="module")
def zeros_and_ones():
    x_train, y_train, x_test, y_test = digits.digits()
    keep, held = np.isin(y_train, (0, 1)), np.isin(y_test, (0, 1))
    return x_train[keep], y_train[keep], x_test[held], y_test[held]


@pytest.fixture(scope="module")
def trained(zeros_and_ones):
    x, y, _, _ = zeros_and_ones
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Binary()
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            optimiser.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(
                model.score(torch.tensor(x))[:, 0], torch.tensor(y, dtype=torch.float32))
            loss.backward()
            optimiser.step()
    return model.eval()


def with_end(model: Binary, end: str) -> Binary:
    other = Binary(end)
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize(("end", "binary"), [("sigmoid", "sigmoid"), ("sigmoid_squeezed", "sigmoid"),
                                              ("logit", "logit")])
def test_one_score_is_two_classes_whose_cross_entropy_is_the_binary_one(end, binary, trained, zeros_and_ones):
    _, _, x, y = zeros_and_ones
    module = with_end(trained, end)
    classifier = Classifier(export_onnx(module, (1, 28, 28)))
    assert (classifier.binary, classifier.num_classes) == (binary, 2)
    logits, loss, grad = classifier.loss_and_grad(x, y, loss="cross_entropy")
    z64 = with_end(trained, "logit").double()
    x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    score = z64(x64)[:, 0]
    np.testing.assert_allclose(logits, torch.stack([-score / 2, score / 2], 1).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        probability = module.double()(x64).reshape(-1).numpy()
    np.testing.assert_array_equal(logits.argmax(1), (probability > (0.5 if binary == "sigmoid" else 0)))
    bce = nn.functional.binary_cross_entropy_with_logits(score, torch.tensor(y, dtype=torch.float64),
                                                         reduction="none")
    (reference,) = torch.autograd.grad(bce.sum(), x64)
    np.testing.assert_allclose(loss, bce.detach().numpy(), rtol=1e-4, atol=1e-6)
    error = np.linalg.norm((grad - reference.numpy()).reshape(len(x), -1), axis=1)
    assert (error <= 1e-4 * np.linalg.norm(reference.numpy().reshape(len(x), -1), axis=1) + 1e-7).all()


def test_the_default_exporter_s_binary_model_is_read_the_same_way(trained, zeros_and_ones, tmp_path):
    _, _, x, _ = zeros_and_ones
    export_default(with_end(trained, "sigmoid"), (1, 28, 28), tmp_path / "binary.onnx")
    import onnx

    classifier = Classifier(onnx.load(tmp_path / "binary.onnx"))
    with torch.no_grad():
        probability = trained(torch.tensor(x))[:, 0].numpy()
    assert classifier.binary == "sigmoid"
    np.testing.assert_array_equal(classifier.logits(x).argmax(1), probability > 0.5)


def test_a_hard_sigmoid_head_keeps_its_decision_and_a_gradient_where_it_saturates(trained, zeros_and_ones):
    """hardsigmoid(4 z) is 0 or 1 for |4 z| >= 3, where its own gradient is 0: the score is its
    affine input minus 1/2 (4 z / 6 here), whose sign is the model's decision."""
    _, _, x, y = zeros_and_ones
    module = with_end(trained, "hard_sigmoid")
    classifier = Classifier(export_onnx(module, (1, 28, 28)))
    with torch.no_grad():
        probability = module(torch.tensor(x))[:, 0].numpy()
        score = trained.score(torch.tensor(x))[:, 0].numpy()
    logits, _, grad = classifier.loss_and_grad(x, y, loss="cross_entropy")
    assert classifier.binary == "hard_sigmoid"
    np.testing.assert_array_equal(logits.argmax(1), probability > 0.5)
    np.testing.assert_allclose(logits[:, 1], 4 * score / 6 / 2, rtol=1e-4, atol=1e-5)
    saturated = np.isin(probability, (0.0, 1.0))
    assert saturated.mean() > 0.5 and (np.abs(grad[saturated]).reshape(saturated.sum(), -1).max(1) > 0).all()


def test_a_softmax_over_one_class_is_refused(trained):
    with pytest.raises(InvalidModelError, match="ends in a Softmax over one class, which is the same"):
        Classifier(export_onnx(with_end(trained, "softmax"), (1, 28, 28)))


def test_an_attack_on_a_binary_classifier_lowers_its_accuracy(trained, zeros_and_ones):
    _, _, x, y = zeros_and_ones
    model = export_onnx(with_end(trained, "sigmoid"), (1, 28, 28)).SerializeToString()
    spec = EvaluationSpec.model_validate({"samples": "all", "attacks": [{"name": "fgsm", "eps": [0.1, 0.3]}]})
    result = evaluate(model, Dataset(x=x, y=y, source_dtype="float32"), spec).result
    assert result.model["binary"] == "sigmoid" and result.model["num_classes"] == 2
    assert result.clean_accuracy > 0.95
    accuracies = [a.robust_accuracy for a in result.attacks]
    assert accuracies[0] < result.clean_accuracy and accuracies[1] < 0.5, accuracies


def test_the_upload_s_answer_says_the_model_is_binary(trained, zeros_and_ones, tmp_path):
    """...and a spec whose loss needs more classes than two is refused before it is queued."""
    import io

    from tests.service.conftest import gateway, make_settings

    _, _, x, y = zeros_and_ones
    model = export_onnx(with_end(trained, "sigmoid_squeezed"), (1, 28, 28)).SerializeToString()
    data = io.BytesIO()
    np.savez(data, x=x, y=y)
    with gateway(make_settings(tmp_path / "data")) as api:
        answer = api.post("/v1/models", files={"file": ("detector.onnx", model)})
        dataset = api.post("/v1/datasets", files={"file": ("ones.npz", data.getvalue())}).json()
        refused = api.post("/v1/evaluations", json={
            "model_id": answer.json()["id"], "dataset_id": dataset["id"],
            "attacks": [{"name": "apgd", "eps": 0.1, "loss": "dlr"}]})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert (body["num_classes"], body["binary"], body["attacks"]) == (2, "sigmoid", "all")
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == ("apgd: loss dlr needs at least 3 classes and the model has 2; "
                                        "use loss auto or ce")


def test_inspect_says_how_the_score_is_read_and_the_exported_opset(trained, tmp_path, capsys):
    from client.cli import main

    path = tmp_path / "detector.onnx"
    path.write_bytes(export_onnx(with_end(trained, "sigmoid"), (1, 28, 28), opset=13).SerializeToString())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "classes    2  (one score, a Sigmoid's probability: class 1 where it is > 0.5" in out
    assert "opset      13 (run as 17)" in out


def test_inspect_check_warns_where_the_gradient_is_zero_everywhere(tmp_path, capsys):
    """Scores that do not depend on the image (a thresholded or constant head) leave attacks
    nothing to follow: the check says so instead of printing a zero among the timings."""
    from onnx import TensorProto, helper, numpy_helper

    from client.cli import main

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    zero = numpy_helper.from_array(np.zeros((), np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])], [w, zero])
    path = tmp_path / "constant.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    assert main(["inspect", str(path), "--check", "--batch", "4"]) == 0
    assert "warning    the gradient is zero at every probe image" in capsys.readouterr().out
