"""The gateway over HTTP (the real ASGI app, SQLite, the embedded broker; no worker needed):
uploads, submission checks, idempotency, tenants, limits and errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.service.conftest import DATA, MODEL, denoiser_onnx, gateway, make_settings, tenant_headers, upload


def spec(model_id: str, dataset_id: str, **extra) -> dict:
    body = {
        "model_id": model_id,
        "dataset_id": dataset_id,
        "samples": 20,
        "attacks": [{"name": "fgsm", "eps": [0.1]}],
    }
    body.update(extra)
    return body


@pytest.fixture
def stored(api):
    model = upload(api, "models", MODEL).json()
    dataset = upload(api, "datasets", DATA).json()
    return model, dataset


def test_a_model_upload_reports_its_input_and_gradients(api):
    response = upload(api, "models", MODEL, name="digits cnn")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("mdl_") and body["name"] == "digits cnn"
    assert body["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert body["input"]["shape"][1:] == [1, 28, 28] and body["num_classes"] == 10
    assert body["gradients"] == {"available": True, "unsupported": [], "probed_side": None,
                                 "straight_through": 0}
    assert body["attacks"] == "all"
    again = upload(api, "models", MODEL)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    listed = api.get("/v1/models", params={"sha256": body["sha256"]}).json()
    assert listed["count"] == 1 and listed["items"][0]["id"] == body["id"]
    assert api.get("/v1/models", params={"sha256": "0" * 64}).json()["count"] == 0


def test_a_dataset_upload_reports_its_shape(api):
    body = upload(api, "datasets", DATA).json()
    assert body["id"].startswith("ds_") and body["format"] == "npz"
    assert body["shape"] == [1, 28, 28] and body["num_classes"] == 10 and body["samples"] > 0


def test_submission_queues_a_job_with_shards_and_progress(api, stored):
    model, dataset = stored
    response = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], shard_size=8))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued" and job["shards"] == 3
    assert job["progress"]["stage"] == "queued" and job["progress"]["done"] == 0
    assert job["progress"]["total"] > 0
    assert api.get(f"/v1/evaluations/{job['id']}/result").status_code == 409
    listed = api.get("/v1/evaluations", params={"state": "queued", "model_id": model["id"]}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]


def test_an_idempotency_key_returns_the_same_job(api, stored):
    model, dataset = stored
    headers = {"Idempotency-Key": "ci-run-42"}
    first = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]), headers=headers)
    second = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]), headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert api.get("/v1/evaluations").json()["count"] == 1
    other = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], seed=3), headers=headers)
    assert other.status_code == 409 and "different request" in other.json()["detail"]

    body = spec(model["id"], dataset["id"])
    empty = api.post("/v1/evaluations", json=body, headers={"Idempotency-Key": ""})
    assert empty.status_code == 422 and "idempotency-key" in empty.text.lower()


def test_concurrent_retries_with_one_idempotency_key_make_one_job(api, stored):
    """The loser of the race on the unique key answers the winner's job, never a 500."""
    from concurrent.futures import ThreadPoolExecutor

    model, dataset = stored
    body, headers = spec(model["id"], dataset["id"]), {"Idempotency-Key": "ci-run-race"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api.post("/v1/evaluations", json=body, headers=headers), range(8)))
    assert sorted(a.status_code for a in answers).count(202) == 1, [a.text for a in answers]
    assert {a.status_code for a in answers} <= {200, 202} and len({a.json()["id"] for a in answers}) == 1


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"input": {"layout": "NHWC"}}, 422, "the model expects"),
        ({"attacks": [{"name": "fgsmm", "eps": 0.1}]}, 422, "unknown attack 'fgsmm'"),
        ({"attacks": [{"name": "pgd", "eps": 0.1, "steps": 0}]}, 422, "steps"),
        (
            {"gates": [{"metric": "robust_accuracy", "attack": "pgd", "min": 0.5}]},
            422,
            "not among the attacks",
        ),
        ({"input": {"mean": [0.5, 0.5]}}, 422, "input.mean has 2 values"),
        (
            {"defenses": [{"name": "pca", "variance": 0.99, "fit_samples": 100_000}]},
            422,
            "20 are evaluated and 100000 more are needed to fit pca on held-out data",
        ),
        ({"model_id": "mdl_" + "0" * 32}, 404, "no model with id"),
    ],
)
def test_a_bad_submission_is_refused_before_anything_is_queued(api, stored, change, status, message):
    model, dataset = stored
    response = api.post("/v1/evaluations", json={**spec(model["id"], dataset["id"]), **change})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert set(response.json()) == {"type", "detail"}
    assert api.get("/v1/evaluations").json()["count"] == 0


def test_cancel_a_queued_job_and_refuse_to_cancel_twice(api, stored):
    model, dataset = stored
    job = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"])).json()
    cancelled = api.post(f"/v1/evaluations/{job['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert api.post(f"/v1/evaluations/{job['id']}/cancel").status_code == 409


def test_a_model_in_use_cannot_be_deleted_until_its_jobs_end(api, stored, settings):
    model, dataset = stored
    job = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"])).json()
    assert api.delete(f"/v1/models/{model['id']}").status_code == 409
    api.post(f"/v1/evaluations/{job['id']}/cancel")
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert api.get(f"/v1/models/{model['id']}").status_code == 404
    blob = settings.blob_dir / model["sha256"][:2] / model["sha256"][2:]
    assert not blob.exists()


def _linear_classifier(path: Path) -> Path:
    """Another [N, 1, 28, 28] -> 10 classifier."""
    weights = numpy_helper.from_array(np.full((784, 10), 0.01, np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [weights],
    )
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                       ir_version=8).SerializeToString())
    return path


def _fit_dataset(path: Path) -> Path:
    np.savez(path, x=np.random.default_rng(0).random((20, 1, 28, 28), np.float32), y=np.arange(20) % 10)
    return path


def test_models_and_datasets_a_queued_spec_names_cannot_be_deleted(api, stored, tmp_path):
    model, dataset = stored
    other = upload(api, "models", _linear_classifier(tmp_path / "linear.onnx")).json()
    fit = upload(api, "datasets", _fit_dataset(tmp_path / "fit.npz")).json()
    autoencoder = upload(api, "models", denoiser_onnx(tmp_path / "ae.onnx")).json()
    transfer = {"models": {"linear": other["id"]}, "attacks": [{"name": "fgsm", "eps": [0.1]}]}
    defenses = [{"name": "pca", "variance": 0.9, "fit_dataset": fit["id"]},
                {"name": "autoencoder", "model": autoencoder["id"]}]
    job = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], transfer=transfer,
                                                defenses=defenses))
    assert job.status_code == 202, job.text
    named = (("models", other), ("datasets", fit), ("models", autoencoder))
    for kind, record in named:
        refused = api.delete(f"/v1/{kind}/{record['id']}")
        assert refused.status_code == 409 and "used by 1 queued or running" in refused.json()["detail"]
    api.post(f"/v1/evaluations/{job.json()['id']}/cancel")
    for kind, record in named:
        assert api.delete(f"/v1/{kind}/{record['id']}").status_code == 204


def test_a_tenant_over_its_job_limit_gets_429_with_retry_after(tmp_path):
    settings = make_settings(tmp_path / "data", max_concurrent_jobs=1)
    with gateway(settings) as api:
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        assert api.post("/v1/evaluations", json=spec(model["id"], dataset["id"])).status_code == 202
        response = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], seed=1))
        assert response.status_code == 429 and response.headers["Retry-After"] == "30"
        assert response.json()["type"] == "too_many_jobs"


def test_a_body_over_the_limit_is_refused_with_413(tmp_path):
    settings = make_settings(tmp_path / "data", max_body_bytes=4096)
    with gateway(settings) as api:
        response = upload(api, "models", MODEL)
        assert response.status_code == 413 and response.json()["type"] == "too_large"
        assert api.get("/healthz").status_code == 200


def test_health_readiness_and_metrics(api, stored):
    model, dataset = stored
    api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]))
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "database": "ok",
        "broker": "ok",
        "blobs": "ok",
    }
    text = api.get("/metrics").text
    assert 'robustness_evaluations{state="queued"} 1.0' in text
    assert "robustness_queue_depth 1.0" in text


def test_openapi_docs_are_served(api):
    assert api.get("/docs").status_code == 200
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/datasets", "/v1/evaluations", "/v1/evaluations/{evaluation_id}/cancel"} <= set(
        paths
    )


# ------------------------------------------------------------------------------ tenants


@pytest.fixture
def two_tenants(settings):
    a, b = tenant_headers(settings, "alice", "bob")
    with gateway(settings) as api:
        yield api, a, b


def test_keys_are_required_once_one_exists(two_tenants):
    api, alice, _ = two_tenants
    assert api.get("/v1/models").status_code == 401
    bad = api.get("/v1/models", headers={"Authorization": "Bearer rk_nope"})
    assert bad.status_code == 401 and "robustness keys create" in bad.json()["detail"]
    assert api.get("/v1/models", headers=alice).status_code == 200
    assert api.get("/healthz").status_code == 200  # health stays open for probes


def test_another_tenant_gets_404_on_every_route(two_tenants):
    api, alice, bob = two_tenants
    model = upload(api, "models", MODEL, headers=alice).json()
    dataset = upload(api, "datasets", DATA, headers=alice).json()
    job = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]), headers=alice).json()
    missing = {"model": "mdl_" + "f" * 32, "dataset": "ds_" + "f" * 32, "job": "ev_" + "f" * 32}
    routes = [
        ("GET", "/v1/models/{model}"),
        ("DELETE", "/v1/models/{model}"),
        ("GET", "/v1/datasets/{dataset}"),
        ("DELETE", "/v1/datasets/{dataset}"),
        ("GET", "/v1/evaluations/{job}"),
        ("GET", "/v1/evaluations/{job}/result"),
        ("POST", "/v1/evaluations/{job}/cancel"),
        ("GET", "/v1/evaluations/{job}/artifacts"),
        ("GET", "/v1/evaluations/{job}/artifacts/x_adv"),
    ]
    for method, route in routes:
        theirs = api.request(
            method, route.format(model=model["id"], dataset=dataset["id"], job=job["id"]), headers=bob
        )
        nobody = api.request(method, route.format(**missing), headers=bob)
        assert theirs.status_code == 404, (method, route, theirs.text)
        assert theirs.json()["type"] == nobody.json()["type"] == "not_found"
        assert theirs.json()["detail"].replace(job["id"], "X").replace(model["id"], "X").replace(
            dataset["id"], "X"
        ) == nobody.json()["detail"].replace(missing["job"], "X").replace(missing["model"], "X").replace(
            missing["dataset"], "X"
        )
    stolen = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]), headers=bob)
    assert stolen.status_code == 404
    assert api.get("/v1/models", headers=bob).json()["count"] == 0
    assert api.get("/v1/evaluations", headers=bob).json()["count"] == 0
    assert api.get("/v1/datasets", params={"sha256": dataset["sha256"]}, headers=bob).json()["count"] == 0
    # alice's job is untouched by bob's attempts
    assert api.get(f"/v1/evaluations/{job['id']}", headers=alice).json()["state"] == "queued"
    assert api.get(f"/v1/models/{model['id']}", headers=alice).status_code == 200


def test_the_same_bytes_from_two_tenants_are_two_records_and_one_blob(two_tenants, settings):
    api, alice, bob = two_tenants
    a = upload(api, "models", MODEL, headers=alice).json()
    b = upload(api, "models", MODEL, headers=bob).json()
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert api.delete(f"/v1/models/{a['id']}", headers=alice).status_code == 204
    assert (settings.blob_dir / b["sha256"][:2] / b["sha256"][2:]).exists()  # bob still has it
    assert api.get(f"/v1/models/{b['id']}", headers=bob).status_code == 200


def test_a_hundred_concurrent_pollers_all_get_answers(settings):
    """More requests at once than the request thread pool: a pool smaller than it deadlocked
    (every thread waiting for a connection, every connection waiting for a thread)."""
    import asyncio
    import threading

    import httpx
    import uvicorn

    from service.app import create_app
    from tests.service.conftest import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            if server.started:
                break
            threading.Event().wait(0.1)
        with httpx.Client(base_url=url) as client:
            model = upload(client, "models", MODEL).json()
            dataset = upload(client, "datasets", DATA).json()
            job = client.post("/v1/evaluations", json=spec(model["id"], dataset["id"])).json()

        async def poll_all():
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as client:
                return await asyncio.gather(*[client.get(f"/v1/evaluations/{job['id']}") for _ in range(100)])

        responses = asyncio.run(poll_all())
        assert [r.status_code for r in responses] == [200] * 100
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_fit_dataset_of_another_shape_is_refused_at_submission(api, stored):
    import io

    import numpy as np

    model, dataset = stored
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((20, 1, 14, 14), np.float32), y=np.zeros(20, np.int64))
    odd = api.post("/v1/datasets", files={"file": ("odd.npz", buffer.getvalue())}).json()
    defenses = [{"name": "pca", "variance": 0.99, "fit_dataset": odd["id"]}]
    response = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], defenses=defenses))
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "defenses[0].fit_dataset: its images are [1, 14, 14] but the evaluated ones are [1, 28, 28]"
    )
    defenses[0]["fit_dataset"] = dataset["id"]
    assert (
        api.post("/v1/evaluations", json=spec(model["id"], dataset["id"], defenses=defenses)).status_code
        == 202
    )


def test_target_labels_past_the_models_classes_are_named_as_such(api, stored, tmp_path):
    model, _ = stored
    path = tmp_path / "targets.npz"
    np.savez(path, x=np.zeros((4, 1, 28, 28), np.float32), y=np.arange(4), t=np.array([5, 6, 7, 102]))
    dataset = upload(api, "datasets", path).json()
    refused = api.post("/v1/evaluations", json=spec(model["id"], dataset["id"]))
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "the dataset's target labels t go up to 102 but the model has 10 classes (0 to 9); fix t, or upload "
        "the dataset without it"
    )


def test_nhwc_models_and_datasets_with_target_labels_are_accepted(api, tmp_path):
    """A channels-last export (tf2onnx, Keras) with channels-last images: layout NHWC; and
    targets: dataset, which needs an .npz with target labels t."""
    import numpy as np

    from tests import digits

    nhwc_path = tmp_path / "nhwc.onnx"
    nhwc_path.write_bytes(digits.variant_onnx_bytes("cnn-nhwc"))
    model = upload(api, "models", nhwc_path).json()
    assert model["input"]["shape"][1:] == [28, 28, 1]
    _, _, x, y = digits.digits()
    np.savez(tmp_path / "nhwc.npz", x=x[:20].transpose(0, 2, 3, 1), y=y[:20], t=(y[:20] + 1) % 10)
    with_targets = upload(api, "datasets", tmp_path / "nhwc.npz").json()
    assert with_targets["shape"] == [28, 28, 1] and with_targets["targets"] is True
    attacks = [{"name": "pgd", "eps": [0.1], "steps": 5, "targets": "dataset"}]
    accepted = api.post("/v1/evaluations", json=spec(model["id"], with_targets["id"], attacks=attacks,
                                                     input={"layout": "NHWC"}))
    assert accepted.status_code == 202, accepted.text
    wrong = api.post("/v1/evaluations", json=spec(model["id"], with_targets["id"], attacks=attacks))
    assert wrong.status_code == 422 and "set input.layout to the dataset's layout" in wrong.json()["detail"]
    np.savez(tmp_path / "plain.npz", x=x[:20].transpose(0, 2, 3, 1), y=y[:20])
    plain = upload(api, "datasets", tmp_path / "plain.npz").json()
    assert plain["targets"] is False
    refused = api.post("/v1/evaluations", json=spec(model["id"], plain["id"], attacks=attacks,
                                                    input={"layout": "NHWC"}))
    assert refused.status_code == 422 and "an array t" in refused.json()["detail"]
    np.savez(tmp_path / "same.npz", x=x[:20], y=y[:20], t=y[:20])
    same = upload(api, "datasets", tmp_path / "same.npz")
    assert same.status_code == 400 and "equal the labels 'y' for 20 samples" in same.json()["detail"]


def test_bytes_already_stored_are_not_validated_again(two_tenants):
    """Every CI run re-sends its model: validation (a child process) runs once per content."""
    api, alice, bob = two_tenants
    pool = api.app.state.validation
    calls = []
    original = pool.run

    async def counting(what, *args):
        calls.append(what)
        return await original(what, *args)

    pool.run = counting
    first = upload(api, "models", MODEL, headers=alice)
    again = upload(api, "models", MODEL, headers=alice)
    other = upload(api, "models", MODEL, headers=bob)
    assert (first.status_code, again.status_code, other.status_code) == (201, 200, 201)
    assert first.json()["gradients"] == other.json()["gradients"] and other.json()["id"] != first.json()["id"]
    assert upload(api, "datasets", DATA, headers=alice).status_code == 201
    assert upload(api, "datasets", DATA, headers=bob).status_code == 201
    assert calls == ["model", "dataset"]
