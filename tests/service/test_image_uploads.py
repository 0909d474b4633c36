"""Zips of JPEG and PNG images of any size through the service: the upload declares resize,
center_crop and color; what is stored is the uint8 .npz they become, evaluated like any dataset."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from client.submit_cli import add_submit_parser, run_submit
from infra.database import migrate, session_factory
from schemas.evaluation import EvaluationSpec
from service.auth import create_key
from tests.service.conftest import MODEL, count_validations, gateway, upload, wait_for
from tests.test_image_folders import digit_zip, zipped
from workers.dataset_files import load_dataset_file
from workers.evaluate import evaluate
from workers.image_folders import ImageProcessing

DIGITS_28 = {"resize": "28", "center_crop": "28", "color": "grayscale"}


@pytest.fixture
def image_zip(tmp_path):
    path = tmp_path / "digits.zip"
    path.write_bytes(digit_zip(40)[0])
    return path


def post(api, path, **fields):
    with path.open("rb") as handle:
        return api.post("/v1/datasets", files={"file": (path.name, handle)}, data=fields)


def test_an_image_zip_is_stored_as_the_uint8_npz_it_becomes(api, image_zip):
    response = post(api, image_zip, **DIGITS_28)
    assert response.status_code == 201, response.text
    body = response.json()
    upload_sha = hashlib.sha256(image_zip.read_bytes()).hexdigest()
    assert (body["format"], body["samples"], body["shape"], body["source_dtype"]) == (
        "image-zip", 40, [1, 28, 28], "uint8")
    assert body["processing"] == {"resize": 28, "center_crop": [28, 28], "color": "grayscale"}
    assert body["images"] == {"png": 20, "jpeg": 20}
    assert body["source_sha256"] == upload_sha and body["sha256"] != upload_sha
    again = post(api, image_zip, **DIGITS_28)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    other = post(api, image_zip, resize="28", center_crop="24", color="grayscale")
    assert other.status_code == 201 and other.json()["shape"] == [1, 24, 24]
    made = api.get("/v1/datasets", params={"source_sha256": upload_sha}).json()["items"]
    assert sorted(d["id"] for d in made) == sorted([body["id"], other.json()["id"]])


def test_the_same_zip_with_the_same_processing_is_not_processed_again(settings, image_zip):
    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        tenants = [{"Authorization": f"Bearer {create_key(db, name)}"} for name in ("ci", "other")]

    def send(headers, **fields):
        with image_zip.open("rb") as handle:
            return api.post("/v1/datasets", files={"file": (image_zip.name, handle)}, data=fields,
                            headers=headers)

    with gateway(settings) as api:
        validations = count_validations(api)
        first = send(tenants[0], **DIGITS_28).json()
        again = send(tenants[1], **DIGITS_28)
        assert again.status_code == 201, again.text  # a record of its own, the same stored file
        assert again.json()["sha256"] == first["sha256"] and again.json()["id"] != first["id"]
        assert again.json()["source_sha256"] == first["source_sha256"]
        assert validations == ["dataset"]  # converted once
        assert send(tenants[0], **DIGITS_28).json()["id"] == first["id"]
        send(tenants[0], resize="28", center_crop="26", color="grayscale")
        assert validations == ["dataset", "dataset"]


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({}, 400, "all images must have the same size and mode: declare resize / center_crop"),
        ({"resize": "28"}, 400, "declare center_crop (e.g. 224) so that every image ends the same size"),
        ({"resize": "-3"}, 400, "resize must be N (the shorter side) or HxW"),
        ({"center_crop": "64", "resize": "28"}, 400, "does not fit in it; declare a resize at least"),
        ({"color": "sepia"}, 422, "color"),
    ],
)
def test_bad_processing_is_refused_with_the_fix(api, image_zip, fields, status, message):
    response = post(api, image_zip, **fields)
    assert response.status_code == status, response.text
    assert message in response.text


def test_processing_an_npz_is_refused(api):
    response = post(api, MODEL.parent / "digits-test.npz", resize="28")
    assert response.status_code == 400 and "an .npz is used as it is" in response.json()["detail"]


def test_an_evaluation_of_the_processed_zip_equals_the_local_one(settings, start_worker, image_zip, tmp_path):
    spec = {"samples": 40, "seed": 1, "attacks": [{"name": "fgsm", "eps": [0.1]}]}
    start_worker(settings)
    with gateway(settings) as api:
        model = upload(api, "models", MODEL).json()
        dataset = post(api, image_zip, **DIGITS_28).json()
        job = api.post("/v1/evaluations", json={**spec, "model_id": model["id"], "dataset_id": dataset["id"]})
        assert job.status_code == 202, job.text
        final = wait_for(api, job.json()["id"])
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{final['id']}/result").json()
    local = load_dataset_file(image_zip, processing=ImageProcessing.parse(**DIGITS_28))
    expected = evaluate(MODEL.read_bytes(), local, EvaluationSpec.model_validate(spec)).result
    expected_json = expected.model_dump(mode="json", exclude={"timing"})
    result.pop("timing")
    assert result["attacks"] == expected_json["attacks"]
    assert result["clean_accuracy"] == expected_json["clean_accuracy"] > 0.5
    assert result["dataset"]["sha256"] == dataset["sha256"]


def test_robustness_submit_sends_the_processing(settings, image_zip, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("samples: 8\nattacks:\n  - name: fgsm\n    eps: 0.1\n")
    parser = argparse.ArgumentParser(prog="robustness")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    with gateway(settings) as api:
        args = parser.parse_args(["submit", str(MODEL), str(image_zip), "--spec", str(spec), "--server",
                                  "http://testserver", "--resize", "28", "--center-crop", "28",
                                  "--color", "grayscale"])
        assert run_submit(args, transport=api._transport) == 0
        assert "processed into 40 images of 1x28x28" in capsys.readouterr().err
        assert run_submit(args, transport=api._transport) == 0  # the next CI run: nothing is sent
        datasets = api.get("/v1/datasets").json()["items"]
    assert [(d["format"], d["shape"]) for d in datasets] == [("image-zip", [1, 28, 28])]
    assert f"dataset {image_zip}: already on the server as {datasets[0]['id']}" in capsys.readouterr().err


DIGIT_CLASSES = "\n".join(f"digit{k}" for k in range(10))


def some_digits_zip(path, classes=(3, 7)):
    members = {name: data for name, data in digit_zip(60)[1].items()
               if int(name.split("/")[0][len("digit"):]) in classes}
    path.write_bytes(zipped(members))
    return path


def test_a_zip_of_some_classes_is_labelled_by_the_declared_class_list(settings, start_worker, tmp_path):
    """Folders digit3 and digit7 alone would be labels 0 and 1 (ImageFolder): the evaluation is
    refused until the upload names the model's classes, and then measures the model's accuracy."""
    spec = {"samples": "all", "attacks": [{"name": "fgsm", "eps": [0.05]}]}
    zip_path = some_digits_zip(tmp_path / "some.zip")
    start_worker(settings)
    with gateway(settings) as api:
        model = upload(api, "models", MODEL).json()
        folders = post(api, zip_path, **DIGITS_28).json()
        assert (folders["num_classes"], folders["classes"]) == (2, ["digit3", "digit7"])

        def submit(dataset):
            body = {**spec, "model_id": model["id"], "dataset_id": dataset["id"]}
            return api.post("/v1/evaluations", json=body)

        refused = submit(folders)
        assert refused.status_code == 422, refused.text
        assert "the dataset's zip has 2 class folders and the model 10 classes" in refused.json()["detail"]
        assert "--classes FILE" in refused.json()["detail"]
        declared = post(api, zip_path, **DIGITS_28, classes=DIGIT_CLASSES)
        assert declared.status_code == 201, declared.text
        body = declared.json()
        assert (body["num_classes"], body["classes"][3], body["processing"]["classes"][7]) == (
            10, "digit3", "digit7")
        assert body["id"] != folders["id"] and body["source_sha256"] == folders["source_sha256"]
        job = submit(body)
        assert job.status_code == 202, job.text
        final = wait_for(api, job.json()["id"])
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{final['id']}/result").json()
        short = post(api, zip_path, **DIGITS_28, classes="digit3,digit7,digit9")
        assert short.status_code == 201, short.text
        too_few = submit(short.json())
        assert too_few.status_code == 422 and "classes names 3 classes but the model has 10" in too_few.text
    local = load_dataset_file(zip_path, processing=ImageProcessing.parse(**DIGITS_28, classes=DIGIT_CLASSES))
    assert sorted(set(local.y.tolist())) == [3, 7]
    assert result["clean_accuracy"] >= 0.9  # labelled 0 and 1 it would be near 0
    assert result["dataset"]["classes"] == DIGIT_CLASSES.split("\n")  # the report names them


def test_robustness_submit_sends_the_class_list(settings, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("samples: 4\nattacks:\n  - name: fgsm\n    eps: 0.1\n")
    classes = tmp_path / "classes.txt"
    classes.write_text(DIGIT_CLASSES + "\n")
    zip_path = some_digits_zip(tmp_path / "some.zip")
    parser = argparse.ArgumentParser(prog="robustness")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    with gateway(settings) as api:
        args = parser.parse_args(["submit", str(MODEL), str(zip_path), "--spec", str(spec), "--server",
                                  "http://testserver", "--resize", "28", "--center-crop", "28",
                                  "--color", "grayscale", "--classes", str(classes)])
        assert run_submit(args, transport=api._transport) == 0
        assert run_submit(args, transport=api._transport) == 0  # found on the server: nothing is sent
        datasets = api.get("/v1/datasets").json()["items"]
    assert [(d["num_classes"], d["processing"]["classes"][0]) for d in datasets] == [(10, "digit0")]
    assert f"dataset {zip_path}: already on the server as {datasets[0]['id']}" in capsys.readouterr().err
