"""Jobs through real Celery workers: the embedded SQLite broker, and Redis + PostgreSQL.

The result over HTTP must equal the engine's in-process result for the same spec and seed,
a cancel must stop a running job, and a SIGKILLed worker must end in a redelivery and
success, or in a clear failure, never in a job stuck in `running`; a worker that loses a pool
process must stop so that it is restarted, and lose no unit.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from sqlalchemy import select

from infra.database import migrate, session_factory
from infra.records import Shard
from schemas.evaluation import EvaluationSpec
from service.auth import create_key
from tests.service.conftest import DATA, MODEL, gateway, make_settings, upload, wait_for
from workers.dataset_files import load_dataset_file
from workers.evaluate import evaluate

QUICK = {
    "samples": 40,
    "shard_size": 16,
    "seed": 3,
    "batch_size": 16,
    "attacks": [
        {"name": "fgsm", "eps": [0.1, 0.2]},
        {"name": "pgd", "eps": [0.1], "steps": 5, "random_start": True},
    ],
    "gates": [{"metric": "robust_accuracy", "attack": "fgsm", "eps": 0.1, "min": 0.2}],
}
# long enough to be caught running: many PGD steps on every sample
SLOW = {
    "samples": 200,
    "shard_size": 100,
    "batch_size": 20,
    "attacks": [{"name": "pgd", "eps": [0.1, 0.2, 0.3], "steps": 400}],
}


def submit(api, body: dict, headers=None) -> dict:
    model = upload(api, "models", MODEL, headers=headers).json()
    dataset = upload(api, "datasets", DATA, headers=headers).json()
    response = api.post(
        "/v1/evaluations",
        json={**body, "model_id": model["id"], "dataset_id": dataset["id"]},
        headers=headers or {},
    )
    assert response.status_code == 202, response.text
    return response.json()


def in_process(body: dict) -> dict:
    spec = EvaluationSpec.model_validate(body)
    dataset = load_dataset_file(DATA, tuple(spec.input.range))
    return evaluate(MODEL.read_bytes(), dataset, spec).result.model_dump(mode="json", exclude={"timing"})


def check_same_as_in_process(api, job: dict, body: dict) -> None:
    result = api.get(f"/v1/evaluations/{job['id']}/result").json()
    result.pop("timing")
    assert result == in_process(body)
    dataset = api.get(f"/v1/datasets/{job['dataset_id']}").json()
    assert result["dataset"]["sha256"] == dataset["sha256"]  # the hash the API and the CLI show


def wait_running(api, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(f"/v1/evaluations/{job_id}").json()
        if body["state"] == "running" and body["progress"]["done"] > 0:
            return body
        time.sleep(0.2)
    raise AssertionError(f"never seen running with progress: {body}")


def test_embedded_broker_runs_a_sharded_job_to_the_in_process_result(settings, start_worker):
    worker = start_worker(settings, concurrency=2)
    with gateway(settings) as api:
        job = submit(api, QUICK)
        assert job["shards"] == 3
        final = wait_for(api, job["id"])
        assert final["state"] == "succeeded", final
        assert final["passed"] is True and final["progress"]["done"] == final["progress"]["total"]
        check_same_as_in_process(api, job, QUICK)
        artifacts = api.get(f"/v1/evaluations/{job['id']}/artifacts").json()["items"]
        names = {a["name"] for a in artifacts}
        assert "fgsm@0.1.delta" in names, names
        data = api.get(f"/v1/evaluations/{job['id']}/artifacts/fgsm@0.1.delta")
        delta = np.load(io.BytesIO(data.content))["delta"]
        assert delta.shape == (40, 1, 28, 28) and delta.dtype == np.float16
        assert np.abs(delta.astype(np.float32)).max() <= 0.1 * (1 + 2**-11)
    log = worker.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert log.count("evaluation.shard_succeeded") == 3 and "evaluation.succeeded" in log


def test_a_worker_shrinks_its_batches_to_its_memory_budget(tmp_path, start_worker):
    settings = make_settings(tmp_path / "data", worker_memory_mb=16)
    body = {**QUICK, "batch_size": 4096}  # ~0.2 MB per digit in a gradient call: 4,096 need 800 MB
    worker = start_worker(settings)
    with gateway(settings) as api:
        job = submit(api, body)
        final = wait_for(api, job["id"])
        assert final["state"] == "succeeded", final
        check_same_as_in_process(api, job, body)
    log = worker.log.read_text()
    assert "runtime.batch" in log and "instead of 4096 within 16 MB" in log, log[-3000:]


def test_universal_perturbations_run_on_the_whole_set_beside_the_shards(settings, start_worker):
    body = {
        "samples": 40,
        "shard_size": 16,
        "attacks": [{"name": "fgsm", "eps": [0.1]}, {"name": "universal", "eps": [0.3], "max_passes": 2}],
    }
    start_worker(settings, concurrency=2)
    with gateway(settings) as api:
        job = submit(api, body)
        assert job["shards"] == 4  # three slices and the whole set
        final = wait_for(api, job["id"])
        assert final["state"] == "succeeded", final
        check_same_as_in_process(api, job, body)
        names = {a["name"] for a in api.get(f"/v1/evaluations/{job['id']}/artifacts").json()["items"]}
        assert "universal@0.3.perturbation" in names, names
        delta = np.load(
            io.BytesIO(api.get(f"/v1/evaluations/{job['id']}/artifacts/universal@0.3.perturbation").content)
        )["perturbation"]
        assert delta.shape == (1, 28, 28) and np.abs(delta).max() <= 0.3 + 1e-6


def test_a_baseline_gate_compares_with_an_earlier_evaluation(settings, start_worker):
    start_worker(settings)
    with gateway(settings) as api:
        first = submit(api, QUICK)
        assert wait_for(api, first["id"])["state"] == "succeeded"
        gate = {
            "metric": "robust_accuracy",
            "attack": "fgsm",
            "eps": 0.1,
            "baseline": first["id"],
            "max_drop": 0.02,
        }
        second = submit(api, {**QUICK, "gates": [gate]})
        final = wait_for(api, second["id"])
        assert final["state"] == "succeeded" and final["passed"] is True
        result = api.get(f"/v1/evaluations/{second['id']}/result").json()
        baseline = api.get(f"/v1/evaluations/{first['id']}/result").json()
        fgsm = next(a for a in baseline["attacks"] if a["attack"] == "fgsm" and a["eps"] == 0.1)
        assert result["gates"][0]["baseline_value"] == fgsm["robust_accuracy"]
        unknown = {**gate, "baseline": "ev_" + "0" * 32}
        model_id, dataset_id = second_ids(api)
        refused = api.post(
            "/v1/evaluations",
            json={**QUICK, "gates": [unknown], "model_id": model_id, "dataset_id": dataset_id},
        )
        assert refused.status_code == 422 and "is not an evaluation of yours" in refused.json()["detail"]


def second_ids(api) -> tuple[str, str]:
    return (api.get("/v1/models").json()["items"][0]["id"], api.get("/v1/datasets").json()["items"][0]["id"])


def test_cancel_stops_a_running_job_and_the_next_job_still_runs(settings, start_worker):
    start_worker(settings)
    with gateway(settings) as api:
        job = submit(api, SLOW)
        running = wait_running(api, job["id"])
        assert (
            running["progress"]["stage"].startswith("pgd") and running["progress"]["eta_seconds"] is not None
        )
        started = time.monotonic()
        assert api.post(f"/v1/evaluations/{job['id']}/cancel").json()["state"] == "cancelled"
        after = submit(api, QUICK)
        final = wait_for(api, after["id"])
        assert final["state"] == "succeeded", final
        assert time.monotonic() - started < 30
        assert api.get(f"/v1/evaluations/{job['id']}").json()["state"] == "cancelled"


def test_a_job_past_its_time_limit_fails_with_time_limit(tmp_path, start_worker):
    settings = make_settings(tmp_path / "data", job_time_limit_s=2)
    start_worker(settings)
    with gateway(settings) as api:
        job = submit(api, SLOW)
        final = wait_for(api, job["id"], timeout=60)
        assert final["state"] == "failed" and final["error"]["code"] == "time_limit", final
        assert "time limit" in final["error"]["message"]


# ------------------------------------------------------------------- Redis + PostgreSQL


def test_redis_and_postgres_run_a_job_idempotently_per_tenant(distributed_settings, start_worker):
    migrate(distributed_settings.database_url)
    with session_factory(distributed_settings.database_url)() as db:
        key = create_key(db, "ci")
    headers = {"Authorization": f"Bearer {key}"}
    start_worker(distributed_settings, concurrency=2)
    with gateway(distributed_settings) as api:
        model = upload(api, "models", MODEL, headers=headers).json()
        dataset = upload(api, "datasets", DATA, headers=headers).json()
        body = {**QUICK, "model_id": model["id"], "dataset_id": dataset["id"]}
        retry = {**headers, "Idempotency-Key": "pipeline-7"}
        first = api.post("/v1/evaluations", json=body, headers=retry)
        second = api.post("/v1/evaluations", json=body, headers=retry)
        assert (first.status_code, second.status_code) == (202, 200)
        assert first.json()["id"] == second.json()["id"]
        final = wait_for(api, first.json()["id"], headers=headers)
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{final['id']}/result", headers=headers).json()
        result.pop("timing")
        assert result == in_process(QUICK)
        assert api.get(f"/v1/evaluations/{final['id']}").status_code == 401


@pytest.mark.parametrize("max_attempts, expected", [(3, "succeeded"), (1, "failed")])
def test_a_sigkilled_worker_ends_in_redelivery_or_a_clear_failure(
    distributed_settings, start_worker, tmp_path, max_attempts, expected
):
    settings = distributed_settings.model_copy(update={"max_attempts": max_attempts})
    # each shard must outlast the status poll and the kill by far: at 60 steps a shard took
    # 0.4 s on CI and sometimes finished first, so no attempt was ever killed
    body = {**SLOW, "attacks": [{"name": "pgd", "eps": [0.1], "steps": 500}]}
    worker = start_worker(settings)
    with gateway(settings) as api:
        job = submit(api, body)
        wait_running(api, job["id"])
        worker.kill_all()
        start_worker(settings)
        final = wait_for(api, job["id"], timeout=180)
        assert final["state"] == expected, final
        if expected == "failed":
            assert final["error"]["code"] == "worker_lost" and "stopped" in final["error"]["message"]
        else:
            check_same_as_in_process(api, job, body)
        with session_factory(settings.database_url)() as db:
            attempts = db.scalars(select(Shard.attempts).where(Shard.job_id == job["id"])).all()
        assert max(attempts) == (2 if expected == "succeeded" else 1)  # the killed shard ran again, or not


@pytest.mark.parametrize("broker, kill", [("embedded", 1), ("embedded", 2), ("redis", 1)])
def test_a_worker_that_loses_a_pool_process_stops_for_a_restart_and_loses_no_unit(
    broker, kill, request, start_worker
):
    """A pool process killed while idle (the OOM killer, a stray SIGKILL) can take the pool's
    queue lock with it, after which no unit runs and Celery's shutdown hangs: the worker must
    stop by itself with EXIT_POOL_LOST, and the units it took must run on the next worker."""
    from jobrunner.pool_watchdog import EXIT_POOL_LOST

    settings = request.getfixturevalue("settings" if broker == "embedded" else "distributed_settings")
    worker = start_worker(settings, concurrency=2)
    deadline = time.monotonic() + 30
    while len(worker.children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = worker.children()[:kill]
    assert len(killed) == kill, killed
    with gateway(settings) as api:
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        job = submit(api, QUICK)
        try:
            worker.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker was still running 90 s after losing its pool processes:\n"
                        + worker.log.read_text()[-2000:])
        log = worker.log.read_text()
        assert worker.process.returncode == EXIT_POOL_LOST, log[-2000:]
        assert "worker.pool_process_lost" in log and str(killed[0]) in log, log[-2000:]
        start_worker(settings)
        final = wait_for(api, job["id"], timeout=120)
        assert final["state"] == "succeeded", final
        check_same_as_in_process(api, job, QUICK)


def drain_broker(settings) -> int:
    """Take every waiting message and drop it, like a worker killed after it received its
    units and before it claimed them."""
    from infra.broker import QUEUE, make_celery

    taken = 0
    with make_celery(settings).connection_for_write() as connection:
        while connection.default_channel.basic_get(QUEUE, no_ack=True) is not None:
            taken += 1
    return taken


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_units_a_dead_worker_took_before_claiming_them_are_sent_again(
    broker, request, start_worker
):
    settings = request.getfixturevalue("settings" if broker == "embedded" else "distributed_settings")
    with gateway(settings) as api:
        job = submit(api, QUICK)
        assert drain_broker(settings) == job["shards"]
        start_worker(settings)
        final = wait_for(api, job["id"], timeout=120)
        assert final["state"] == "succeeded", final
        check_same_as_in_process(api, job, QUICK)


def test_transfer_through_the_service_names_model_ids(settings, start_worker, tmp_path):
    from tests.digits import onnx_bytes

    other = tmp_path / "fc100.onnx"
    other.write_bytes(onnx_bytes("fc100"))
    start_worker(settings, concurrency=2)
    with gateway(settings) as api:
        fc100 = upload(api, "models", other).json()
        transfer = {"models": {"fc100": fc100["id"]}, "attacks": [{"name": "fgsm", "eps": [0.1]}]}
        body = {"samples": 40, "shard_size": 20, "attacks": [], "transfer": transfer}
        job = submit(api, body)
        assert job["shards"] == 3  # two slices and the transfer unit
        final = wait_for(api, job["id"])
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{job['id']}/result").json()
        result.pop("timing")
        spec = EvaluationSpec.model_validate(body)
        dataset = load_dataset_file(DATA, tuple(spec.input.range))
        local = evaluate(MODEL.read_bytes(), dataset, spec, models={"fc100": other.read_bytes()})
        assert result == local.result.model_dump(mode="json", exclude={"timing"})
        assert result["transfer"][0]["table"][0][1:3] == ["model", "fc100"]
        bad = {**body, "transfer": {**transfer, "models": {"fc100": "mdl_" + "0" * 32}}}
        model_id, dataset_id = second_ids(api)
        refused = api.post("/v1/evaluations", json={**bad, "model_id": model_id, "dataset_id": dataset_id})
        assert (
            refused.status_code == 422
            and "transfer.models.fc100: no model with id" in refused.json()["detail"]
        )


def test_defenses_through_the_service_equal_the_engine(settings, start_worker):
    start_worker(settings, concurrency=2)
    with gateway(settings) as api:
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        defenses = [
            {"name": "pca", "variance": 0.95, "fit_samples": 100},
            {"name": "gaussian_noise", "sigma": 0.1},
            {"name": "pca", "variance": 0.95, "fit_dataset": dataset["id"], "label": "pca_fit"},
        ]
        body = {
            "samples": 40,
            "shard_size": 20,
            "attacks": [{"name": "fgsm", "eps": [0.1]}],
            "defenses": defenses,
        }
        job = api.post(
            "/v1/evaluations", json={**body, "model_id": model["id"], "dataset_id": dataset["id"]}
        ).json()
        final = wait_for(api, job["id"])
        assert final["state"] == "succeeded", final
        result = api.get(f"/v1/evaluations/{job['id']}/result").json()
        result.pop("timing")
        spec = EvaluationSpec.model_validate(body)
        local_data = load_dataset_file(DATA, tuple(spec.input.range))
        local = evaluate(MODEL.read_bytes(), local_data, spec, fit_images={"pca_fit": local_data.x})
        assert result == local.result.model_dump(mode="json", exclude={"timing"})
        assert [d["defense"] for d in result["defenses"]] == ["pca", "gaussian_noise", "pca_fit"]
        assert all(row["adaptive"] is not None for d in result["defenses"] for row in d["attacks"])


def test_an_internal_error_is_retried_up_to_the_attempt_limit_then_fails_as_internal(settings, start_worker):
    """The model's blob is gone from the store (a storage fault, not the user's): each attempt
    fails with an internal error and runs again, and after ROBUSTNESS_MAX_ATTEMPTS the job fails
    with internal_error, naming no server path. A user's error would fail at once."""
    from infra.blobs import LocalBlobStore

    with gateway(settings) as api:
        job = submit(api, {**QUICK, "samples": 16})
        model = api.get(f"/v1/models/{job['model_id']}").json()
        LocalBlobStore(settings.blob_dir).local_path(model["sha256"]).unlink()
        worker = start_worker(settings)
        final = wait_for(api, job["id"])
    assert final["state"] == "failed" and final["error"]["code"] == "internal_error", final
    message = final["error"]["message"]
    assert f"after {settings.max_attempts} attempt(s)" in message, message
    assert str(settings.blob_dir) not in message and str(settings.data_dir) not in message
    log = worker.log.read_text()
    assert log.count("evaluation.shard_retried") == settings.max_attempts - 1, log[-3000:]


def test_a_model_that_cannot_run_on_its_images_fails_at_once(settings, start_worker, tmp_path):
    """A model with free image axes that runs only at 4 x 4, on 5 x 5 images: accepted at
    submission (the axes are free), refused by ONNX Runtime's Reshape on every attempt."""
    from tests.test_runtime import reshape_to_16_features

    model_file, data_file = tmp_path / "reshape.onnx", tmp_path / "5x5.npz"
    model_file.write_bytes(reshape_to_16_features())
    np.savez(data_file, x=np.random.default_rng(0).random((4, 1, 5, 5), np.float32), y=np.zeros(4, np.int64))
    with gateway(settings) as api:
        model, dataset = upload(api, "models", model_file).json(), upload(api, "datasets", data_file).json()
        worker = start_worker(settings)
        job = api.post("/v1/evaluations", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                "attacks": [{"name": "fgsm", "eps": [0.1]}]})
        assert job.status_code == 202, job.text
        final = wait_for(api, job.json()["id"])
    assert final["state"] == "failed" and final["error"]["code"] == "invalid_input", final
    assert "its Reshape node 'flatten' fails in ONNX Runtime" in final["error"]["message"]
    assert "evaluation.shard_retried" not in worker.log.read_text()
