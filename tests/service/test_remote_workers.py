"""Workers on other machines: two real worker processes, each with a data folder of its own
(no folder shared with the gateway or with each other), given only the broker URL (Redis),
the database URL (PostgreSQL), the gateway URL and the worker token. They fetch the model and
the dataset from the gateway by sha256 and send their shard outputs back; the result is the
in-process one. The worker token opens /internal only: every /v1 route answers it 401."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from infra.database import migrate, session_factory
from infra.gateway_blobs import GatewayBlobStore, GatewayUnreachable
from infra.records import Job, Shard
from service.auth import create_key
from tests.service.conftest import ROOT, free_port, make_settings, tenant_headers, uvicorn_gateway
from tests.service.test_jobs_end_to_end import QUICK, in_process
from tests.service.test_models_past_2gib import assert_same_up_to_rounding

TOKEN = secrets.token_urlsafe(32)


def _blobs(folder) -> set[str]:
    return {p.parent.name + p.name for p in folder.glob("??/*")}


def _worker_settings(base, folder, url: str, token: str = TOKEN, **extra):
    return make_settings(folder, database_url=base.database_url, broker_url=base.broker_url,
                         gateway_url=url, worker_token=token, **extra)


def test_two_workers_without_a_shared_folder_run_a_job_through_the_gateway(
        distributed_settings, start_worker, tmp_path):
    gateway_settings = make_settings(tmp_path / "gateway", database_url=distributed_settings.database_url,
                                     broker_url=distributed_settings.broker_url, worker_token=TOKEN)
    migrate(gateway_settings.database_url)
    with session_factory(gateway_settings.database_url)() as db:
        key = create_key(db, "ci")
    headers = {"Authorization": f"Bearer {key}"}
    with uvicorn_gateway(gateway_settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        workers = [_worker_settings(distributed_settings, tmp_path / f"worker-{i}", url) for i in range(2)]
        for settings in workers:
            start_worker(settings)
        ids = {}
        for kind, path in (("models", ROOT / "examples" / "digits-cnn.onnx"),
                           ("datasets", ROOT / "examples" / "digits-test.npz")):
            with path.open("rb") as handle:
                ids[kind] = api.post(f"/v1/{kind}", files={"file": handle}, headers=headers).json()
        job = api.post("/v1/evaluations", headers=headers, json={
            **QUICK, "model_id": ids["models"]["id"], "dataset_id": ids["datasets"]["id"]}).json()
        state = job
        while state["state"] not in ("succeeded", "failed", "cancelled"):
            state = api.get(f"/v1/evaluations/{job['id']}", params={"wait": 10}, headers=headers).json()
        assert state["state"] == "succeeded", state
        result = api.get(f"/v1/evaluations/{job['id']}/result", headers=headers).json()
        result.pop("timing")
        assert result == in_process(QUICK)
        assert api.get(f"/v1/evaluations/{job['id']}/report", headers=headers).status_code == 200

        gateway_blobs = _blobs(gateway_settings.blob_dir)
        with session_factory(gateway_settings.database_url)() as db:
            shards = db.query(Shard).filter_by(job_id=job["id"])
            outputs = {shard.output_sha256 for shard in shards if shard.output_sha256}
            row = db.get(Job, job["id"])
            written = outputs | {a["sha256"] for a in row.artifacts.values()} | {row.report_sha256}
        assert len(outputs) == 3 and written <= gateway_blobs  # every output reached the gateway
        cached = [_blobs(settings.blob_dir) for settings in workers]
        model_sha = ids["models"]["sha256"]
        assert any(model_sha in blobs for blobs in cached)  # fetched, not shared
        assert gateway_settings.blob_dir not in {s.blob_dir for s in workers}

        # the worker token reads no tenant route, and only it opens /internal
        token = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/v1/models", "/v1/datasets", "/v1/evaluations", f"/v1/evaluations/{job['id']}",
                     f"/v1/evaluations/{job['id']}/result", f"/v1/evaluations/{job['id']}/report",
                     f"/v1/evaluations/{job['id']}/artifacts", f"/v1/models/{ids['models']['id']}", "/"):
            answer = api.get(path, headers=token)
            assert answer.status_code == 401 or (path == "/" and "Sign in" in answer.text), path
        model_bytes = (ROOT / "examples" / "digits-cnn.onnx").read_bytes()
        assert api.get(f"/internal/blobs/{model_sha}", headers=token).content == model_bytes
        assert api.get(f"/internal/blobs/{model_sha}", headers=headers).status_code == 401
        assert api.get(f"/internal/blobs/{model_sha}").status_code == 401


def test_the_blob_routes_check_names_hashes_and_the_token(tmp_path):
    settings = make_settings(tmp_path / "gateway", worker_token=TOKEN)
    token = {"Authorization": f"Bearer {TOKEN}"}
    with uvicorn_gateway(settings) as url, httpx.Client(base_url=url, timeout=30) as api:
        data = b"a shard output"
        sha = hashlib.sha256(data).hexdigest()
        assert api.put(f"/internal/blobs/{'0' * 64}", content=data, headers=token).status_code == 400
        assert api.put(f"/internal/blobs/{sha}", content=data, headers=token).status_code == 201
        assert api.put(f"/internal/blobs/{sha}", content=data, headers=token).status_code == 200
        assert api.get(f"/internal/blobs/{sha}", headers=token).content == data
        for name in ("..%2F..%2Fmetadata.db", "a" * 63, sha.upper()):
            assert api.get(f"/internal/blobs/{name}", headers=token).status_code == 404
        almost = {"Authorization": "Bearer " + TOKEN[:-1]}
        assert api.get(f"/internal/blobs/{sha}", headers=almost).status_code == 401

        store = GatewayBlobStore(url, TOKEN, tmp_path / "cache", max_cache_bytes=40)
        assert store.check_token() is None
        assert store.get_bytes(sha) == data and store.cache.exists(sha)
        other = store.put_bytes(b"x" * 30)  # the cache holds 40 bytes: the older blob goes
        assert api.get(f"/internal/blobs/{other}", headers=token).content == b"x" * 30
        assert not store.cache.exists(sha) and store.get_bytes(sha) == data  # fetched again
        with pytest.raises(FileNotFoundError):
            store.get_bytes("1" * 64)
        wrong = GatewayBlobStore(url, "wrong", tmp_path / "c2", 10**6)
        assert "refused the worker token" in (wrong.check_token() or "")

    plain = make_settings(tmp_path / "plain")  # no token configured: no such routes
    with uvicorn_gateway(plain) as url:
        answer = httpx.get(f"{url}/internal/blobs/{sha}", headers=token)
        assert answer.status_code == 404 and "ROBUSTNESS_WORKER_TOKEN" in answer.text


def test_a_worker_with_a_wrong_token_refuses_to_start(tmp_path):
    import subprocess
    import sys

    from tests.service.conftest import env_for

    with uvicorn_gateway(make_settings(tmp_path / "gateway", worker_token=TOKEN)) as url:
        settings = make_settings(tmp_path / "worker", gateway_url=url, worker_token="not-the-token" * 3)
        done = subprocess.run([sys.executable, "-m", "client.cli", "worker"], env=env_for(settings), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refused the worker token" in done.stderr, done.stderr[-2000:]


def test_a_remote_worker_fetches_the_data_files_of_a_model_past_the_inline_limit(
        distributed_settings, start_worker, tmp_path):
    """A model whose large tensors stay in their data file (workers/onnxgrad/weights.py): the
    worker fetches the model and its data file by sha256 into its own cache, whose root is where
    ONNX Runtime reads the weights; the result is the one of the same model made self-contained."""
    import torch

    from schemas.evaluation import EvaluationSpec
    from service.commands import read_model
    from tests.zoo import export_default
    from workers.dataset_files import load_dataset_file
    from workers.evaluate import evaluate
    from workers.onnxgrad import weights

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 400), torch.nn.ReLU(),
                                 torch.nn.Linear(400, 10)).eval()
    export_default(module, (1, 28, 28), tmp_path / "wide.onnx")
    data = (tmp_path / "wide.onnx.data").read_bytes()
    gateway_settings = make_settings(tmp_path / "gateway", database_url=distributed_settings.database_url,
                                     broker_url=distributed_settings.broker_url, worker_token=TOKEN,
                                     inline_model_bytes=100_000)
    migrate(gateway_settings.database_url)
    with session_factory(gateway_settings.database_url)() as db:
        key = create_key(db, "ci")
    headers = {"Authorization": f"Bearer {key}"}
    spec = {"samples": 40, "shard_size": 20, "seed": 3, "batch_size": 16,
            "attacks": [{"name": "pgd", "eps": [0.1], "steps": 5, "random_start": True}]}
    with uvicorn_gateway(gateway_settings) as url, httpx.Client(base_url=url, timeout=60) as api:
        worker = _worker_settings(distributed_settings, tmp_path / "worker", url)
        process = start_worker(worker)
        model = api.post("/v1/models", headers=headers, files=[
            ("file", ("wide.onnx", (tmp_path / "wide.onnx").read_bytes())),
            ("data", ("wide.onnx.data", data))]).json()
        with (ROOT / "examples" / "digits-test.npz").open("rb") as handle:
            dataset = api.post("/v1/datasets", files={"file": handle}, headers=headers).json()
        job = api.post("/v1/evaluations", headers=headers,
                       json={**spec, "model_id": model["id"], "dataset_id": dataset["id"]}).json()
        state = job
        while state["state"] not in ("succeeded", "failed", "cancelled"):
            state = api.get(f"/v1/evaluations/{job['id']}", params={"wait": 10}, headers=headers).json()
        assert state["state"] == "succeeded", state
        result = api.get(f"/v1/evaluations/{job['id']}/result", headers=headers).json()
        process.stop()  # while its gateway answers: a worker stopping waits for an absent one
    data_sha = hashlib.sha256(data).hexdigest()
    assert {model["sha256"], data_sha} <= _blobs(worker.blob_dir)  # both fetched into its own cache
    assert data_sha in _blobs(gateway_settings.blob_dir)
    expected = evaluate(read_model(str(tmp_path / "wide.onnx")),
                        load_dataset_file(ROOT / "examples" / "digits-test.npz", (0.0, 1.0)),
                        EvaluationSpec.model_validate(spec)).result.model_dump(mode="json")
    weights.set_folder(None)
    assert result["clean_accuracy"] == expected["clean_accuracy"]
    assert_same_up_to_rounding(result["attacks"], expected["attacks"])


def test_a_blob_transfer_waits_for_a_restarting_gateway_and_gives_up_on_one_that_stays_down(
        tmp_path, caplog):
    """A gateway down for 6 s (a restart, a redeploy): the upload is tried again until it is back.
    One that stays down: GatewayUnreachable after the store's window, saying "the gateway"
    without its address (the message may reach a tenant); the worker's log has the address."""
    settings = make_settings(tmp_path / "gateway", worker_token=TOKEN)
    port = free_port()
    store = GatewayBlobStore(f"http://127.0.0.1:{port}", TOKEN, tmp_path / "cache", 10**6, retry_s=60)
    sent: list = []
    upload = threading.Thread(target=lambda: sent.append(store.put_bytes(b"a shard output")))
    upload.start()
    time.sleep(6)
    with uvicorn_gateway(settings, port):
        upload.join(timeout=60)
    assert sent == [hashlib.sha256(b"a shard output").hexdigest()]
    assert sent[0] in _blobs(settings.blob_dir)  # it reached the gateway

    down = GatewayBlobStore(f"http://127.0.0.1:{port}", TOKEN, tmp_path / "c2", 10**6, retry_s=2)
    started = time.monotonic()
    with pytest.raises(GatewayUnreachable) as raised:
        down.put_bytes(b"another output")
    assert 2 <= time.monotonic() - started < 10
    assert str(raised.value).startswith("the gateway did not answer for 2 s: ")
    assert "127.0.0.1" not in str(raised.value) and f":{port}" not in str(raised.value)
    assert f"url=http://127.0.0.1:{port}" in caplog.text


def test_a_job_rides_out_a_gateway_restart_without_using_an_attempt(
        distributed_settings, start_worker, tmp_path):
    """The gateway stops for 12 s while a remote worker runs the job's shards: the worker waits for
    it (transfers tried again, its lease renewed through the database) and the job succeeds, its
    shards on their first attempt, although ROBUSTNESS_MAX_ATTEMPTS=1 leaves none to burn."""
    gateway_settings = make_settings(tmp_path / "gateway", database_url=distributed_settings.database_url,
                                     broker_url=distributed_settings.broker_url, worker_token=TOKEN,
                                     max_attempts=1)
    headers = tenant_headers(gateway_settings, "ci")[0]
    sessions = session_factory(gateway_settings.database_url)
    port = free_port()
    with uvicorn_gateway(gateway_settings, port) as url, \
            httpx.Client(base_url=url, headers=headers, timeout=60) as api:
        worker = start_worker(_worker_settings(distributed_settings, tmp_path / "worker", url,
                                               max_attempts=1))
        ids = {}
        for kind, path in (("models", ROOT / "examples" / "digits-cnn.onnx"),
                           ("datasets", ROOT / "examples" / "digits-test.npz")):
            with path.open("rb") as handle:
                ids[kind] = api.post(f"/v1/{kind}", files={"file": handle}).json()["id"]
        job = api.post("/v1/evaluations", json={
            **QUICK, "model_id": ids["models"], "dataset_id": ids["datasets"]}).json()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the gateway goes once the first shard runs
            with sessions() as db:
                if db.scalar(select(Shard.id).where(Shard.job_id == job["id"], Shard.state == "running")):
                    break
            time.sleep(0.05)
    time.sleep(12)  # the shards finish meanwhile and cannot send their outputs
    with uvicorn_gateway(gateway_settings, port) as url, \
            httpx.Client(base_url=url, headers=headers, timeout=60) as api:
        state = job
        while state["state"] not in ("succeeded", "failed", "cancelled"):
            state = api.get(f"/v1/evaluations/{job['id']}", params={"wait": 10}).json()
        worker.stop()  # while its gateway answers: a worker stopping waits for an absent one
    assert state["state"] == "succeeded", state
    with sessions() as db:
        assert set(db.scalars(select(Shard.attempts).where(Shard.job_id == job["id"]))) == {1}
    assert "gateway.unreachable" in worker.log.read_text()  # the outage was met, and waited out
