"""A model over protobuf's 2 GiB, end to end on the engine: a 224x224 classifier whose first
layer is a 150528 x 3600 float32 MatMul (2.17 GB) in `huge.onnx.data` beside `huge.onnx`, as
PyTorch's default exporter writes large models. The command line inspects it, its logits and
input gradients match numpy references computed from the data file, and an evaluation runs.
The service path is the same code (tests/service/test_models_past_2gib.py runs it past a lowered
limit); this file is the proof at the real size (about 25 s, 2.2 GB on disk, mapped in memory)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from client.cli import main
from schemas.evaluation import EvaluationSpec
from service.commands import read_model
from workers.datasets import Dataset
from workers.evaluate import evaluate
from workers.onnxgrad import weights
from workers.runtime import Classifier

D, H, K = 3 * 224 * 224, 3600, 10
GiB = 1 << 30


def _room(path) -> None:
    free = shutil.disk_usage(path).free
    if free < 6 * GiB:
        pytest.skip(f"a model over 2 GiB needs 6 GiB of free disk at {path}; {free / GiB:.1f} GiB free")


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    _room(folder)
    rng = np.random.default_rng(0)
    with open(folder / "huge.onnx.data", "wb") as data:
        for start in range(0, D, 8192):
            rows = min(8192, D - start)
            (rng.standard_normal((rows, H), dtype=np.float32) * np.float32(D ** -0.5)).tofile(data)
    w1 = TensorProto(name="W1", data_type=TensorProto.FLOAT, dims=[D, H])
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "huge.onnx.data"), ("offset", "0"), ("length", str(D * H * 4))):
        w1.external_data.add(key=key, value=value)
    b1 = np.full(H, 0.01, np.float32)
    w2 = rng.standard_normal((H, K), dtype=np.float32) * np.float32(H ** -0.5)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "W1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["logits"])], "huge",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
        [w1, numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (folder / "huge.onnx").write_bytes(model.SerializeToString())
    yield folder / "huge.onnx", b1, w2
    weights.set_folder(None)
    shutil.rmtree(folder, ignore_errors=True)


def _blocks(path):
    w1 = np.memmap(path.with_name("huge.onnx.data"), np.float32, "r", shape=(D, H))
    for start in range(0, D, 16384):
        yield slice(start, min(start + 16384, D)), np.asarray(w1[start:start + 16384], np.float64)


def test_a_model_over_2_gib_runs_end_to_end(huge, capsys):
    path, b1, w2 = huge
    assert path.with_name("huge.onnx.data").stat().st_size > 2**31  # past what protobuf can hold
    assert main(["inspect", str(path)]) == 0
    assert "available" in capsys.readouterr().out
    classifier = Classifier(read_model(str(path)))
    x = np.random.default_rng(1).random((4, 3, 224, 224), np.float32)
    y = np.arange(4)
    logits, _, grad = classifier.loss_and_grad(x, y, "cross_entropy")

    flat = x.reshape(4, -1).astype(np.float64)
    hidden = sum(flat[:, rows] @ block for rows, block in _blocks(path)) + b1
    expected = np.maximum(hidden, 0) @ w2
    assert np.abs(logits - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(classifier.logits(x), logits, rtol=1e-5, atol=1e-6)
    softmax = np.exp(expected - expected.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    softmax[np.arange(4), y] -= 1
    delta = (softmax @ w2.T.astype(np.float64)) * (hidden > 0)
    reference = np.empty((4, D))
    for rows, block in _blocks(path):
        reference[:, rows] = delta @ block.T
    error = np.linalg.norm(grad.reshape(4, -1) - reference) / np.linalg.norm(reference)
    assert error < 1e-5, error

    spec = EvaluationSpec.model_validate({"samples": 4, "batch_size": 4, "seed": 0, "attacks": [
        {"name": "pgd", "eps": [2 / 255], "steps": 2}]})
    labels = expected.argmax(1)
    result = evaluate(read_model(str(path)), Dataset(x=x, y=labels, source_dtype="float32"), spec).result
    assert result.clean_accuracy == 1.0
    assert [a.attack for a in result.attacks] == ["pgd"] and result.attacks[0].samples == 4
    assert result.attacks[0].robust_accuracy <= result.clean_accuracy
