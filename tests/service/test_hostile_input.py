"""Hostile uploads and requests over HTTP while a real worker runs a job: each is answered
4xx with a message that says what is wrong, and the service and the job are unaffected."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.service.conftest import DATA, MODEL, gateway, wait_for
from tests.service.test_jobs_end_to_end import QUICK, submit


def _declared_tensor(name: str, dims: list[int]) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT)
    tensor.dims.extend(dims)
    return tensor


def external_data_model() -> bytes:
    weight = _declared_tensor("w", [784, 10])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "31360")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def huge_tensor_model() -> bytes:
    """An initializer that declares 10 GB of floats and carries 4 bytes."""
    weight = _declared_tensor("w", [50_000, 50_000])
    weight.raw_data = b"\0\0\0\0"
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 50_000])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 50_000])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def pickled_npz() -> bytes:
    x = np.empty(2, dtype=object)
    x[0], x[1] = {"evil": 1}, [2]
    return npz(x=x, y=np.array([0, 1]))


def slip_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../evil/0.png", b"\x89PNG\r\n\x1a\n")
    return buffer.getvalue()


def huge_header_npz() -> bytes:
    """x.npy whose header declares a 10 GB array, with no data after it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10_000_000, 1, 16, 16)}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(10, np.int64))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", header.getvalue())
        archive.writestr("y.npy", labels.getvalue())
    return buffer.getvalue()


x_ok = (np.random.default_rng(0).random((8, 1, 28, 28)) * 0.5).astype(np.float32)
nan_x = x_ok.copy()
nan_x[3, 0, 5, 5] = np.nan
HOSTILE = [
    ("models", "external data ../../etc/passwd", external_data_model(), 400, "external data"),
    ("models", "truncated protobuf", MODEL.read_bytes()[: len(MODEL.read_bytes()) // 2], 400, "ONNX"),
    ("models", "random bytes", os.urandom(4096), 400, "ONNX"),
    ("models", "declared 10 GB tensor", huge_tensor_model(), 400, "declares shape [50000, 50000]"),
    ("datasets", "pickle inside an .npz", pickled_npz(), 400, "object"),
    ("datasets", "zip with ../ members", slip_zip(), 400, ".."),
    ("datasets", "header declaring a 10 GB array", huge_header_npz(), 400, "declares [10000000, 1, 16, 16]"),
    ("datasets", "NaN data", npz(x=nan_x, y=np.arange(8) % 10), 400, "NaN"),
]


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    from tests.service.conftest import Worker, make_settings

    tmp = tmp_path_factory.mktemp("hostile")
    settings = make_settings(tmp / "data")
    worker = Worker(settings, tmp / "worker.log")
    try:
        with gateway(settings) as api:
            job = submit(api, QUICK)
            yield api, job, settings
    finally:
        worker.stop()


@pytest.mark.parametrize("kind, what, data, status, message", HOSTILE, ids=[h[1] for h in HOSTILE])
def test_hostile_upload_is_refused_with_a_message(running, kind, what, data, status, message):
    api, _, settings = running
    response = api.post(f"/v1/{kind}", files={"file": ("upload.bin", data)})
    assert response.status_code == status, (what, response.text)
    body = response.json()
    assert set(body) == {"type", "detail"} and message.lower() in body["detail"].lower(), body
    assert str(settings.data_dir) not in body["detail"]  # no server paths in messages
    assert api.get("/healthz").status_code == 200


def test_a_dataset_of_the_wrong_shape_is_refused_at_submission(running):
    api, _, _ = running
    model = api.post("/v1/models", files={"file": ("m.onnx", MODEL.read_bytes())}).json()
    rgb = npz(x=np.zeros((4, 3, 32, 32), np.float32), y=np.arange(4))
    dataset = api.post("/v1/datasets", files={"file": ("rgb.npz", rgb)}).json()
    response = api.post(
        "/v1/evaluations", json={**QUICK, "model_id": model["id"], "dataset_id": dataset["id"]}
    )
    assert response.status_code == 422 and "[3, 32, 32]" in response.json()["detail"]


def test_the_job_running_beside_them_succeeds(running):
    api, job, _ = running
    final = wait_for(api, job["id"])
    assert final["state"] == "succeeded", final
    assert api.get("/readyz").status_code == 200
    assert not list((running[2].blob_dir / "tmp").iterdir())  # refused uploads left nothing behind


def test_nothing_outside_the_store_was_written(running, tmp_path):
    _, _, settings = running
    assert DATA.exists() and not (settings.data_dir.parent / "evil").exists()
