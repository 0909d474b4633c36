"""Models with external data, as PyTorch's default exporter writes them (model.onnx and
model.onnx.data): the command line reads the data files next to the model, the service takes
them as multipart `data` parts or as one .zip / .tar.gz bundle and stores one self-contained
model, and every location, offset, length, link and name in a bundle is checked before a byte
is read."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import update

from client.api import RobustnessClient, data_files_of
from client.cli import main
from infra.records import StoredModel
from schemas.api import upload_digest
from service.model_admission import validate_model_upload
from tests.service.conftest import count_validations, gateway, make_settings, upload
from tests.zoo import export_default, export_onnx, make_model
from workers.errors import UserError
from workers.onnxgrad.weights import blob_location
from workers.runtime import Classifier

LIMIT = 1 << 30


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The zoo's LeNet exported both ways: (folder with lenet.onnx + lenet.onnx.data, the
    TorchScript export's bytes)."""
    folder = tmp_path_factory.mktemp("dynamo")
    module = make_model("lenet")
    export_default(module, (1, 28, 28), folder / "lenet.onnx")
    legacy = export_onnx(module, (1, 28, 28)).SerializeToString()
    return folder, legacy


def test_the_default_exporter_writes_external_data(exported):
    folder, _ = exported
    model = onnx.load(folder / "lenet.onnx", load_external_data=False)
    assert (folder / "lenet.onnx.data").is_file()
    assert any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    assert data_files_of(folder / "lenet.onnx") == [folder / "lenet.onnx.data"]


def test_the_command_line_reads_the_data_files_next_to_the_model(exported, tmp_path, capsys):
    folder, legacy = exported
    assert main(["inspect", str(folder / "lenet.onnx")]) == 0
    assert "available" in capsys.readouterr().out
    out = tmp_path / "grad.onnx"
    assert main(["gradient-model", str(folder / "lenet.onnx"), "--out", str(out)]) == 0
    x = np.random.default_rng(0).random((16, 1, 28, 28), np.float32)
    y = np.arange(16) % 10
    from service.commands import read_model

    default, torchscript = Classifier(read_model(str(folder / "lenet.onnx"))), Classifier(legacy)
    np.testing.assert_allclose(default.logits(x), torchscript.logits(x), rtol=1e-4, atol=1e-5)
    grad_default = default.loss_and_grad(x, y, loss="cross_entropy")[2]
    grad_torchscript = torchscript.loss_and_grad(x, y, loss="cross_entropy")[2]
    assert np.linalg.norm(grad_default - grad_torchscript) <= 1e-4 * np.linalg.norm(grad_torchscript)
    alone = tmp_path / "alone.onnx"
    alone.write_bytes((folder / "lenet.onnx").read_bytes())
    assert main(["inspect", str(alone)]) == 2
    assert "not a regular file next to it" in capsys.readouterr().err


def _zip(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (0o120777) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if name in links:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if name not in links else None)
    return buffer.getvalue()


def test_the_service_stores_one_model_from_parts_or_bundles(exported, tmp_path):
    folder, _ = exported
    model, data = (folder / "lenet.onnx").read_bytes(), (folder / "lenet.onnx.data").read_bytes()
    bundles = {"lenet.zip": _zip({"lenet.onnx": model, "lenet.onnx.data": data}),
               "lenet.tar.gz": _tar({"lenet.onnx": model, "lenet.onnx.data": data})}
    with gateway(make_settings(tmp_path / "data")) as api:
        alone = upload(api, "models", folder / "lenet.onnx")
        assert alone.status_code == 400 and "upload its data files with it" in alone.json()["detail"]
        parts = api.post("/v1/models", files=[("file", ("lenet.onnx", model)),
                                              ("data", ("lenet.onnx.data", data))])
        assert parts.status_code == 201, parts.text
        stored = parts.json()
        assert stored["attacks"] == "all" and stored["num_classes"] == 10
        assert stored["source_sha256"] == upload_digest(_sha(model), {"lenet.onnx.data": _sha(data)})
        for name, bundle in bundles.items():
            again = api.post("/v1/models", files={"file": (name, bundle)})
            assert again.status_code == 200 and again.json()["id"] == stored["id"], again.text
        client = RobustnessClient("http://testserver", transport=api._transport)
        record, uploaded = client.ensure_model(folder / "lenet.onnx")  # found by what it would send
        assert not uploaded and record == stored


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_bundle_sent_again_is_found_before_it_is_sent_and_not_validated_again(exported, tmp_path):
    """A CI run re-sends its model every time: the client finds the self-contained model the
    server made from the same bundle (or model and data files) by the upload's digest, and a
    client that sends it anyway is answered without a second validation."""
    folder, _ = exported
    model, data = (folder / "lenet.onnx").read_bytes(), (folder / "lenet.onnx.data").read_bytes()
    bundle = tmp_path / "lenet.zip"
    bundle.write_bytes(_zip({"lenet.onnx": model, "lenet.onnx.data": data}))
    with gateway(make_settings(tmp_path / "data")) as api:
        validations = count_validations(api)
        client = RobustnessClient("http://testserver", transport=api._transport)
        first, uploaded = client.ensure_model(bundle)
        assert uploaded and first["source_sha256"] == _sha(bundle.read_bytes()) != first["sha256"]
        assert client.ensure_model(bundle) == (first, False)
        again = api.post("/v1/models", files={"file": ("lenet.zip", bundle.read_bytes())})
        assert again.status_code == 200 and again.json() == first
        assert validations == ["model"]
        listed = api.get("/v1/models", params={"source_sha256": first["source_sha256"]}).json()["items"]
        assert [m["id"] for m in listed] == [first["id"]]
        with api.app.state.sessions() as db:  # a record from before uploads were named by their source
            db.execute(update(StoredModel).values(source_sha256=None))
            db.commit()
        assert client.ensure_model(bundle) == (first, True)  # sent, and the record learns its source
        assert validations == ["model", "model"] and client.ensure_model(bundle) == (first, False)


def _external_model(tmp_path, location: str, offset: int = 0, length: int | None = None) -> Path:
    """A one-layer classifier whose weight W [64, 10] lives in the file ``location``."""
    weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(64 * 10 * 4 if length is None else length))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [weight])
    path = tmp_path / "model.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _weights(tmp_path, name="weights.bin", size=64 * 10 * 4) -> Path:
    path = tmp_path / name
    path.write_bytes(np.ones(size // 4, np.float32).tobytes())
    return path


def _refused(tmp_path, model: Path, data: dict[str, Path]) -> str:
    with pytest.raises(UserError) as refused:
        validate_model_upload(model, data, tmp_path / "out.onnx", max_bytes=LIMIT)
    return str(refused.value)


def test_a_well_formed_bundle_is_accepted(tmp_path):
    model, weights = _external_model(tmp_path, "weights.bin"), {"weights.bin": _weights(tmp_path)}
    info, bundled = validate_model_upload(model, weights, tmp_path / "out.onnx", max_bytes=LIMIT)
    assert bundled and info.num_classes == 10
    stored = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert not stored.graph.initializer[0].external_data  # one self-contained model


@pytest.mark.parametrize("location",
                         ["../weights.bin", "/etc/passwd", "sub/weights.bin", "..\\weights.bin", ".."])
def test_a_location_that_is_not_a_plain_name_is_refused(tmp_path, location):
    message = _refused(tmp_path, _external_model(tmp_path, location), {"weights.bin": _weights(tmp_path)})
    assert "plain file name" in message


def test_an_offset_or_length_past_the_end_is_refused_before_reading(tmp_path):
    weights = {"weights.bin": _weights(tmp_path)}
    assert "has 2560 bytes" in _refused(tmp_path, _external_model(tmp_path, "weights.bin", offset=4), weights)
    short = {"weights.bin": _weights(tmp_path, size=64)}
    assert "has 64 bytes" in _refused(tmp_path, _external_model(tmp_path, "weights.bin"), short)
    wrong = _external_model(tmp_path, "weights.bin", length=16)
    assert "2560 bytes, but its external data has 16" in _refused(tmp_path, wrong, weights)


def test_a_missing_data_file_is_named_and_nothing_next_to_the_upload_is_read(tmp_path):
    _weights(tmp_path)  # lies next to the uploaded file, but was not uploaded
    other = {"other.bin": _weights(tmp_path, "other.bin")}
    message = _refused(tmp_path, _external_model(tmp_path, "weights.bin"), other)
    assert "'weights.bin', which was not given" in message and "other.bin" in message


@pytest.mark.parametrize("pack", [_zip, _tar], ids=["zip", "tar.gz"])
def test_hostile_bundles_are_refused(tmp_path, pack):
    model = _external_model(tmp_path, "weights.bin").read_bytes()
    weights = _weights(tmp_path).read_bytes()
    cases = {
        "a link": (pack({"model.onnx": model, "weights.bin": weights}, links=("weights.bin",)),
                   ("symbolic link", "not a regular file")),
        "a folder": (pack({"model.onnx": model, "sub/weights.bin": weights}), ("not a plain file name",)),
        "two models": (pack({"a.onnx": model, "b.onnx": model, "weights.bin": weights}), ("2 .onnx files",)),
        "a traversal": (pack({"model.onnx": model, "../weights.bin": weights}), ("not a plain file name",)),
    }
    for what, (bundle, messages) in cases.items():
        path = tmp_path / f"bundle-{what}"
        path.write_bytes(bundle)
        message = _refused(tmp_path, path, {})
        assert any(m in message for m in messages), (what, message)


def test_a_name_clash_is_refused(tmp_path):
    model = _external_model(tmp_path, "weights.bin").read_bytes()
    weights = _weights(tmp_path).read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in (("model.onnx", model), ("weights.bin", weights), ("weights.bin", weights)):
            archive.writestr(name, data)
    path = tmp_path / "clash.zip"
    path.write_bytes(buffer.getvalue())
    assert "twice" in _refused(tmp_path, path, {})
    with gateway(make_settings(tmp_path / "data")) as api:
        twice = api.post("/v1/models", files=[("file", ("model.onnx", model)),
                                              ("data", ("weights.bin", weights)),
                                              ("data", ("weights.bin", weights))])
        assert twice.status_code == 400 and "named 'weights.bin'" in twice.json()["detail"]
        escaping = api.post("/v1/models", files=[("file", ("model.onnx", model)),
                                                 ("data", ("../weights.bin", weights))])
        assert escaping.status_code == 400, escaping.text


def test_an_outside_location_a_user_wrote_is_refused(tmp_path):
    """The blob form is the store's own: a user's model naming it is refused like any path."""
    location = blob_location("ab" * 32)
    message = _refused(tmp_path, _external_model(tmp_path, location), {"weights.bin": _weights(tmp_path)})
    assert "plain file name" in message


def _extended_headers(kind: bytes, size: int, count: int = 1) -> bytes:
    """A .tar.gz of ``count`` pax or GNU long-name headers (``kind``) of ``size`` bytes each, then a
    member."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as out:
        for _ in range(count):
            header = tarfile.TarInfo("././@PaxHeader")
            header.type, header.size = kind, size
            out.write(header.tobuf(format=tarfile.USTAR_FORMAT))
            out.write(b"9 a=bcde\n" * (size // 9) + b"\n" * (size % 9) + b"\0" * (-size % 512))
        member = tarfile.TarInfo("model.onnx")
        member.size = 4
        out.write(member.tobuf(format=tarfile.USTAR_FORMAT) + b"onnx".ljust(512, b"\0") + b"\0" * 1024)
    return buffer.getvalue()


@pytest.mark.parametrize(("kind", "size", "count"), [
    (tarfile.XHDTYPE, 8 << 20, 1), (tarfile.GNUTYPE_LONGNAME, 8 << 20, 1), (tarfile.XGLTYPE, 64 << 10, 32),
    (tarfile.XHDTYPE, 0, 2000)], ids=["pax", "gnu-longname", "global-pax-many", "pax-chain"])
def test_a_tar_bundle_with_huge_headers_is_refused_before_they_are_read(tmp_path, kind, size, count):
    """tarfile reads a pax or GNU long-name header whole (and a chain of them recursively): they are
    bounded before it does, however small the compressed bundle."""
    path = tmp_path / "headers.tar.gz"
    path.write_bytes(_extended_headers(kind, size, count))
    tracemalloc.start()
    try:
        message = _refused(tmp_path, path, {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "pax or GNU long-name headers take more than 1048576 bytes" in message, message
    assert peak < 4 << 20, peak


def test_a_tar_bundle_with_a_sparse_member_is_refused(tmp_path):
    member = tarfile.TarInfo("model.onnx")
    member.type, member.size = tarfile.GNUTYPE_SPARSE, 0
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as out:
        out.write(member.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    path = tmp_path / "sparse.tar.gz"
    path.write_bytes(buffer.getvalue())
    assert "sparse file" in _refused(tmp_path, path, {})
