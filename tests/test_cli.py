"""The `robustness` command line: inspect and gradient-model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from client.cli import main

ROOT = Path(__file__).resolve().parents[1]


def example_model(tmp_path) -> Path:
    out = tmp_path / "example.onnx"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_example_model.py"), str(out)],
                   check=True, capture_output=True)
    return out


def test_inspect_reports_gradients_and_timings(tmp_path, capsys):
    model = example_model(tmp_path)
    assert main(["inspect", str(model), "--check", "--batch", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"] == {"name": "image", "shape": ["N", 1, 28, 28]}
    assert report["classes"] == 10
    assert report["gradients"] == {"available": True, "unsupported": [], "probed_side": None,
                                   "straight_through": 0}
    assert report["check"]["gradient_finite"] is True
    assert report["check"]["mean_gradient_l2"] > 0


def test_inspect_names_operators_without_gradients(tmp_path, capsys):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Round", ["x"], ["q"], name="quantise"),
         helper.make_node("MatMul", ["q", "W"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])], [w])
    path = tmp_path / "rounding.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                      ir_version=9), path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gradients  unavailable" in out and "Round (node quantise)" in out


def test_gradient_model_is_written_and_runs(tmp_path):
    model = example_model(tmp_path)
    out = tmp_path / "grad.onnx"
    assert main(["gradient-model", str(model), "--out", str(out), "--loss", "margin"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    grad, = session.run(["grad"], {"image": x, "labels": np.array([3, 7])})
    assert grad.shape == x.shape


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    assert main(["inspect", str(junk)]) == 2
    assert "not a valid ONNX protobuf" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
