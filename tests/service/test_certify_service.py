"""`certify` through the service: a worker computes the same certify section as the engine."""

from __future__ import annotations

from schemas.evaluation import EvaluationSpec
from tests.service.conftest import DATA, MODEL, gateway, upload, wait_for
from workers.dataset_files import load_dataset_file
from workers.evaluate import evaluate

BODY = {
    "samples": 60,
    "shard_size": 30,
    "attacks": [{"name": "fgsm", "eps": [0.01]}],
    "certify": {"eps": [0.005, 0.01]},
    "gates": [{"metric": "certified_accuracy", "attack": "ibp", "eps": 0.005, "min": 0.1}],
}


def test_the_certify_section_through_a_worker_equals_the_engines(settings, start_worker):
    start_worker(settings)
    with gateway(settings) as api:
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        job = api.post("/v1/evaluations", json={**BODY, "model_id": model["id"], "dataset_id": dataset["id"]})
        assert job.status_code == 202, job.text
        final = wait_for(api, job.json()["id"])
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{final['id']}/result").json()
    local = evaluate(MODEL.read_bytes(), load_dataset_file(DATA), EvaluationSpec.model_validate(BODY)).result
    assert result["certify"] == local.model_dump(mode="json")["certify"]
    assert result["certify"]["available"] and result["gates"][0]["metric"] == "certified_accuracy"
    assert result["verdict"] == local.verdict
