"""An autoencoder defense on the service: its model is uploaded like a classifier and stored as
an image-to-image model (one output shaped like its input), which only a defense may name."""

from __future__ import annotations

import pytest

from tests.service.conftest import DATA, MODEL, denoiser_onnx, gateway, upload, wait_for


def _body(model_id: str, dataset_id: str, **extra) -> dict:
    return {"model_id": model_id, "dataset_id": dataset_id, "samples": 20,
            "attacks": [{"name": "fgsm", "eps": 0.1}], **extra}


def test_an_autoencoder_defense_runs_on_the_service(settings, start_worker, tmp_path):
    start_worker(settings)
    with gateway(settings) as api:
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        stored = upload(api, "models", denoiser_onnx(tmp_path / "denoiser.onnx"))
        assert stored.status_code == 201, stored.text
        denoiser = stored.json()
        assert (denoiser["kind"], denoiser["num_classes"]) == ("image_to_image", None)
        assert denoiser["attacks"] == "none"
        assert model["kind"] == "classifier"
        defenses = [{"name": "autoencoder", "model": denoiser["id"]}]
        job = api.post("/v1/evaluations", json=_body(model["id"], dataset["id"], defenses=defenses))
        assert job.status_code == 202, job.text
        final = wait_for(api, job.json()["id"])
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{final['id']}/result").json()
    (entry,) = result["defenses"]
    assert entry["name"] == "autoencoder"
    assert 0.5 < entry["clean_accuracy"] <= 1 and entry["attacks"][0]["adaptive"] is not None


@pytest.mark.parametrize("case, words", [
    ("evaluated", "model_id: model mdl_"),
    ("classifier_as_autoencoder", "is a classifier; an autoencoder's model has one output shaped like its"),
    ("wrong_size", "takes [1, 16, 16], the dataset's images are [1, 28, 28]"),
])
def test_image_to_image_models_are_named_only_where_they_fit(api, tmp_path, case, words):
    model = upload(api, "models", MODEL).json()
    dataset = upload(api, "datasets", DATA).json()
    denoiser = upload(api, "models", denoiser_onnx(tmp_path / "denoiser.onnx")).json()
    small = upload(api, "models", denoiser_onnx(tmp_path / "small.onnx", side=16)).json()
    body = {
        "evaluated": _body(denoiser["id"], dataset["id"]),
        "classifier_as_autoencoder": _body(model["id"], dataset["id"],
                                           defenses=[{"name": "autoencoder", "model": model["id"]}]),
        "wrong_size": _body(model["id"], dataset["id"],
                            defenses=[{"name": "autoencoder", "model": small["id"]}]),
    }[case]
    refused = api.post("/v1/evaluations", json=body)
    assert refused.status_code == 422 and words in refused.json()["detail"], refused.text
