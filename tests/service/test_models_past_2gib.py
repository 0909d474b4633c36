"""Models past protobuf's 2 GiB keep their large tensors in their data files: the command line
reads them in the model's folder, the service stores them as blobs beside the model, and workers
(here a real `robustness worker`, whose environment lacks the lowered limit) read them in their
store. The same code runs for any model past ROBUSTNESS_INLINE_MODEL_BYTES (the setting
inline_model_bytes on a server), which these tests lower to run it on a 28x28 model with one
weight over weights.INLINE_TENSOR_BYTES; tests/test_huge_model.py builds a real one over 2 GiB."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import onnx
import pytest

from tests.service.conftest import DATA, gateway, make_settings, upload, wait_for
from tests.zoo import export_default, export_onnx
from workers.onnxgrad import weights
from workers.runtime import Classifier

WIDE = 400  # Linear(784, 400): 1.2 MiB of weights, kept outside


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 28x28 classifier exported by the default exporter: (folder with wide.onnx + its data,
    the TorchScript export's bytes)."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, WIDE), torch.nn.ReLU(),
                                 torch.nn.Linear(WIDE, 10)).eval()
    folder = tmp_path_factory.mktemp("wide")
    export_default(module, (1, 28, 28), folder / "wide.onnx")
    return folder, export_onnx(module, (1, 28, 28)).SerializeToString()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def outside(monkeypatch):
    monkeypatch.setenv("ROBUSTNESS_INLINE_MODEL_BYTES", str(100_000))
    yield
    weights.set_folder(None)


def test_past_the_inline_limit_the_command_line_keeps_weights_in_their_file(wide, outside, tmp_path):
    from service.commands import read_model

    folder, legacy = wide
    data = read_model(str(folder / "wide.onnx"))
    model = onnx.load_from_string(data)
    kept = [t for t in model.graph.initializer if weights.is_external(t)]
    assert [weights.locations(model)] == [["wide.onnx.data"]] and weights.folder() == folder.resolve()
    assert sorted(list(t.dims) for t in kept) in ([[784, WIDE]], [[WIDE, 784]])
    assert len(data) < (folder / "wide.onnx.data").stat().st_size / 4  # the graph, small tensors only
    x = np.random.default_rng(0).random((16, 1, 28, 28), np.float32)
    y = np.arange(16) % 10
    ours, theirs = Classifier(data), Classifier(legacy)
    np.testing.assert_allclose(ours.logits(x), theirs.logits(x), rtol=1e-5, atol=1e-6)
    for loss in ("cross_entropy", "margin"):
        np.testing.assert_allclose(ours.loss_and_grad(x, y, loss)[2], theirs.loss_and_grad(x, y, loss)[2],
                                   rtol=1e-4, atol=1e-6)
    from client.cli import main

    assert main(["gradient-model", str(folder / "wide.onnx"), "--out", str(tmp_path / "grad.onnx")]) == 2
    assert main(["gradient-model", str(folder / "wide.onnx"), "--out", str(folder / "grad.onnx")]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "grad.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["grad"], {"input": x, "labels": y})[0],  # its default loss: auto
                               theirs.loss_and_grad(x, y, "auto")[2], rtol=1e-4, atol=1e-6)
    from workers.certify import IntervalBounds, UnsupportedForBounds

    with pytest.raises(UnsupportedForBounds, match="weights stay outside it"):  # certify says so, no crash
        IntervalBounds(data, method="ibp")


def test_past_the_inline_limit_the_service_stores_the_data_files_as_blobs(wide, outside, tmp_path,
                                                                           start_worker):
    from schemas.evaluation import EvaluationSpec
    from service.commands import read_model
    from workers.dataset_files import load_dataset_file
    from workers.evaluate import evaluate

    folder, _ = wide
    model, data = (folder / "wide.onnx").read_bytes(), (folder / "wide.onnx.data").read_bytes()
    settings = make_settings(tmp_path / "data", inline_model_bytes=100_000)
    spec = {"samples": 40, "shard_size": 20, "seed": 3, "batch_size": 16,
            "attacks": [{"name": "pgd", "eps": [0.1], "steps": 5, "random_start": True}]}
    start_worker(settings)  # its environment has no ROBUSTNESS_INLINE_MODEL_BYTES: it reads what is stored
    with gateway(settings) as api:
        stored = api.post("/v1/models", files=[("file", ("wide.onnx", model)),
                                               ("data", ("wide.onnx.data", data))])
        assert stored.status_code == 201, stored.text
        record = stored.json()
        graph = onnx.load_from_string((settings.blob_dir / record["sha256"][:2] /
                                       record["sha256"][2:]).read_bytes())
        blob = hashlib.sha256(data).hexdigest()
        assert weights.locations(graph) == [weights.blob_location(blob)]
        assert (settings.blob_dir / weights.blob_location(blob)).read_bytes() == data
        assert record["size"] == len(graph.SerializeToString()) + len(data)
        again = api.post("/v1/models", files=[("file", ("wide.onnx", model)),
                                              ("data", ("wide.onnx.data", data))])
        assert again.status_code == 200 and again.json()["id"] == record["id"]
        bundle = api.post("/v1/models", files={"file": ("wide.tar.gz", _tar_gz({"wide.onnx": model,
                                                                                 "wide.onnx.data": data}))})
        assert bundle.status_code == 200 and bundle.json()["id"] == record["id"], bundle.text
        assert sorted(p.name for p in (settings.blob_dir / "tmp").iterdir()) == []  # nothing left behind
        dataset = upload(api, "datasets", DATA).json()
        job = api.post("/v1/evaluations", json={**spec, "model_id": record["id"],
                                                "dataset_id": dataset["id"]}).json()
        assert "id" in job, job
        assert wait_for(api, job["id"])["state"] == "succeeded"
        result = api.get(f"/v1/evaluations/{job['id']}/result").json()
        assert api.delete(f"/v1/models/{record['id']}").status_code == 204
        assert not (settings.blob_dir / weights.blob_location(blob)).exists()  # no model names it now
    weights.set_folder(None)
    expected = evaluate(read_model(str(folder / "wide.onnx")), load_dataset_file(DATA, (0.0, 1.0)),
                        EvaluationSpec.model_validate(spec)).result.model_dump(mode="json")
    assert result["clean_accuracy"] == expected["clean_accuracy"]
    assert_same_up_to_rounding(result["attacks"], expected["attacks"])


def assert_same_up_to_rounding(ours, theirs, where: str = "result") -> None:
    """Equal documents, floats to 1e-6: a worker maps outside weights and runs unpacked kernels
    (weights.configure_session), which may round a mean confidence in its last bits."""
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), where
        for key in ours:
            assert_same_up_to_rounding(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_up_to_rounding(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-9), where
    else:
        assert ours == theirs, where


def test_a_float16_model_keeps_its_half_weights_outside_and_widens_them_in_the_graph(outside, tmp_path):
    """The float32 twin that gradients differentiate reads the outside float16 weight through a
    Cast (no float32 copy of it is written): logits and gradients equal the self-contained model's."""
    from onnx import TensorProto, helper, numpy_helper

    from service.commands import read_model

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((784, 700)) / 28).astype(np.float16), "W1")
    w2 = numpy_helper.from_array((rng.standard_normal((700, 10)) / 26).astype(np.float16), "W2")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "W1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["logits"])], "half",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", 10])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inside = model.SerializeToString()
    onnx.save_model(model, tmp_path / "half.onnx", save_as_external_data=True, location="half.onnx.data",
                    size_threshold=0)
    data = read_model(str(tmp_path / "half.onnx"))
    assert weights.locations(onnx.load_from_string(data)) == ["half.onnx.data"]
    ours, theirs = Classifier(data), Classifier(inside)
    assert ours.dtype == theirs.dtype == "float16"
    x = np.random.default_rng(1).random((8, 1, 28, 28), np.float32)
    y = np.arange(8)
    # float16 outputs; a mapped weight runs unpacked kernels, which may round one logit one ulp apart
    np.testing.assert_allclose(ours.logits(x), theirs.logits(x), rtol=2**-10, atol=1e-6)
    np.testing.assert_allclose(ours.loss_and_grad(x, y, "cross_entropy")[2],
                               theirs.loss_and_grad(x, y, "cross_entropy")[2], rtol=1e-5, atol=1e-7)
