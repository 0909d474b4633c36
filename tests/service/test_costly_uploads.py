"""Uploads whose checking or running could cost unbounded compute: validation runs in a child
process under a CPU-time bound (the gateway keeps answering meanwhile), and Loops whose trip
count is not a constant within the bound are refused."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.service.conftest import MODEL, gateway, make_settings, upload


def _model(nodes: list, initializers: list, last: str) -> onnx.ModelProto:
    """Flatten [N,1,8,8] -> nodes ... -> ``last`` [N,64] -> MatMul -> logits [N,10]."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), *nodes,
             helper.make_node("MatMul", [last, "W"], ["logits"])]
    initializers = [*initializers, numpy_helper.from_array(np.zeros((64, 10), np.float32), "W")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _relu_chain(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["f" if i == 0 else f"r{i - 1}"], [f"r{i}"]) for i in range(n)]
    return _model(nodes, [], f"r{n - 1}")


def _loop_body(p: str, inner: onnx.NodeProto | None = None) -> onnx.GraphProto:
    """Names prefixed by ``p``: a graph's names are unique, nested bodies included."""
    nodes = [helper.make_node("Identity", [f"{p}cond_in"], [f"{p}cond_out"])]
    if inner is None:
        nodes.append(helper.make_node("Relu", [f"{p}v_in"], [f"{p}v_out"]))
    else:
        nodes.append(inner)
    return helper.make_graph(
        nodes, f"{p}body",
        [helper.make_tensor_value_info(f"{p}i", TensorProto.INT64, []),
         helper.make_tensor_value_info(f"{p}cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"{p}v_in", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(f"{p}cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"{p}v_out", TensorProto.FLOAT, ["N", 64])])


def _loop_model(trips: int | None, inner_trips: int | None = None) -> onnx.ModelProto:
    """A Loop over Relu with a constant trip count (None: computed from the input's shape);
    with inner_trips, the body holds another Loop of that many iterations."""
    initializers = [numpy_helper.from_array(np.array(True), "cond")]
    nodes = []
    if trips is None:
        nodes += [helper.make_node("Shape", ["f"], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["trips"], axis=0)]
        initializers.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
    else:
        initializers.append(numpy_helper.from_array(np.array(trips, np.int64), "trips"))
    inner = None
    if inner_trips is not None:
        initializers.append(numpy_helper.from_array(np.array(inner_trips, np.int64), "inner_trips"))
        inner = helper.make_node("Loop", ["inner_trips", "o_cond_in", "o_v_in"], ["o_v_out"],
                                 body=_loop_body("i_"))
    nodes.append(helper.make_node("Loop", ["trips", "cond", "f"], ["looped"], name="outer",
                                  body=_loop_body("o_", inner)))
    return _model(nodes, initializers, "looped")


def _upload_model(api, tmp_path, model: onnx.ModelProto, name: str):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return upload(api, "models", path)


def test_a_model_too_costly_to_validate_is_refused_while_the_gateway_answers(tmp_path):
    # 3 s of validation CPU: a gateway that validated in its own process would stall at least
    # that long; a busy 2-core machine delays an answer by up to about 1 s (measured 0.99 s)
    settings = make_settings(tmp_path / "data", validation_cpu_s=3)
    with gateway(settings) as api:
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(response=_upload_model(api, tmp_path, _relu_chain(30_000), "chain")))
        worker.start()
        slowest = 0.0
        while worker.is_alive():
            started = time.perf_counter()
            assert api.get("/healthz").status_code == 200
            assert api.get("/v1/models").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)
        worker.join()
        refused = result["response"]
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert body["type"] == "too_costly" and "ROBUSTNESS_VALIDATION_CPU_S" in body["detail"]
        assert slowest < 1.5, f"the gateway took {slowest:.2f} s to answer while validating"
        assert upload(api, "models", MODEL).status_code == 201  # the next upload is validated as usual


@pytest.mark.parametrize("trips, inner, message", [
    (10**15, None, "runs 1000000000000000 iterations"),
    (1000, 1000, "1000000 with the loops around it"),
    (None, None, "no constant trip count"),
], ids=["huge", "nested", "computed"])
def test_loops_that_cannot_be_bounded_are_refused(tmp_path, trips, inner, message):
    with gateway(make_settings(tmp_path / "data", max_loop_iterations=100_000)) as api:
        refused = _upload_model(api, tmp_path, _loop_model(trips, inner), "loop")
        assert refused.status_code == 400 and refused.json()["type"] == "invalid_model", refused.text
        assert message in refused.json()["detail"]
        if trips == 10**15 or inner:
            assert "ROBUSTNESS_MAX_LOOP_ITERATIONS" in refused.json()["detail"]


def test_a_loop_within_the_bound_is_accepted(tmp_path):
    with gateway(make_settings(tmp_path / "data", max_loop_iterations=100_000)) as api:
        accepted = _upload_model(api, tmp_path, _loop_model(10, 10), "loop")
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["num_classes"] == 10
