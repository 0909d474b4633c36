"""Fixtures for the service: a gateway (the real ASGI app in process), real Celery worker
subprocesses, the embedded SQLite broker, or the real Redis and PostgreSQL at 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from infra.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "examples" / "digits-cnn.onnx"
DATA = ROOT / "examples" / "digits-test.npz"
REDIS = ("127.0.0.1", 6379)
POSTGRES = ("127.0.0.1", 5432)
REDIS_DB = 11  # flushed by the tests


def reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(settings: Settings) -> dict[str, str]:
    values = {
        "DATA_DIR": settings.data_dir,
        "DATABASE_URL": settings.database_url,
        "BROKER_URL": settings.broker_url,
        "BLOB_DIR": settings.blob_dir,
        "LEASE_S": settings.lease_s,
        "PROGRESS_INTERVAL_S": settings.progress_interval_s,
        "MAX_ATTEMPTS": settings.max_attempts,
        "JOB_TIME_LIMIT_S": settings.job_time_limit_s,
        "MAX_CONCURRENT_JOBS": settings.max_concurrent_jobs,
        "ORT_THREADS": settings.ort_threads or 1,
        "GATEWAY_RETRY_S": settings.gateway_retry_s,
    }
    if settings.worker_memory_mb is not None:
        values["WORKER_MEMORY_MB"] = settings.worker_memory_mb
    for name in ("gateway_url", "worker_token"):
        if getattr(settings, name):
            values[name.upper()] = getattr(settings, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTNESS_")}
    env.update({f"ROBUSTNESS_{k}": str(v) for k, v in values.items()})
    return env


def tenant_headers(settings: Settings, *tenants: str) -> list[dict[str, str]]:
    """Authorization headers with a new API key for each tenant, in the settings' database."""
    from infra.database import migrate, session_factory
    from service.auth import create_key

    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        return [{"Authorization": f"Bearer {create_key(db, tenant)}"} for tenant in tenants]


def make_settings(data_dir: Path, **overrides) -> Settings:
    values = dict(data_dir=data_dir, lease_s=4, progress_interval_s=0.5, reaper_interval_s=1, ort_threads=1)
    values.update(overrides)
    settings = Settings(**values)
    settings.prepare()
    return settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "data")


@contextmanager
def gateway(settings: Settings):
    from service.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client


def count_validations(api: TestClient) -> list[str]:
    """The kinds ("model", "dataset") of the validations the gateway runs from now on, in order."""
    validations: list[str] = []
    run = api.app.state.validation.run

    async def counted(*args):
        validations.append(args[0])
        return await run(*args)

    api.app.state.validation.run = counted
    return validations


@contextmanager
def uvicorn_gateway(settings: Settings, port: int | None = None):
    """The app on a real port (uvicorn in a thread): for browsers and real HTTP clients. Given a
    port, a gateway started again there is the same gateway restarted."""
    import uvicorn

    from service.app import create_app

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def api(settings):
    with gateway(settings) as client:
        yield client


class Worker:
    """A real `robustness worker` subprocess (prefork pool) with its log in a file."""

    def __init__(self, settings: Settings, log: Path, concurrency: int = 1):
        self.log = log
        self.handle = open(log, "wb")  # noqa: SIM115 - lives as long as the worker
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "worker", "--concurrency", str(concurrency)],
            env=env_for(settings),
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log.read_bytes():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker did not start:\n{self.log.read_text()[-3000:]}")

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL the whole worker: its main process and its pool."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_all()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)  # stray pool children
        self.handle.close()


@pytest.fixture
def start_worker(tmp_path):
    started: list[Worker] = []

    def start(settings: Settings, concurrency: int = 1) -> Worker:
        worker = Worker(settings, tmp_path / f"worker-{len(started)}.log", concurrency)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def distributed_settings(tmp_path) -> Settings:
    """Real Redis as broker and a fresh PostgreSQL database, both at 127.0.0.1."""
    if not reachable(REDIS):
        pytest.skip("Redis is not running at 127.0.0.1:6379; start it to run the distributed tests")
    if not reachable(POSTGRES):
        pytest.skip("PostgreSQL is not running at 127.0.0.1:5432; start it to run the distributed tests")
    import redis
    import sqlalchemy

    name = f"robustness_{secrets.token_hex(6)}"
    admin = sqlalchemy.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    redis.Redis(*REDIS, db=REDIS_DB).flushdb()
    settings = make_settings(
        tmp_path / "data",
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        broker_url=f"redis://127.0.0.1:6379/{REDIS_DB}",
    )
    yield settings
    from infra.database import engine_for

    engine_for(settings.database_url).dispose()
    engine_for(settings.database_url, settings.pool_size, settings.db_pool_timeout_s).dispose()
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def upload(client: TestClient, kind: str, path: Path, headers: dict | None = None, name: str | None = None):
    with open(path, "rb") as f:
        data = {"name": name} if name else None
        return client.post(f"/v1/{kind}", files={"file": (path.name, f)}, data=data, headers=headers or {})


def wait_for(
    client: TestClient,
    evaluation_id: str,
    states=("succeeded", "failed", "cancelled"),
    timeout: float = 120,
    headers: dict | None = None,
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/evaluations/{evaluation_id}", headers=headers or {}).json()
        if body["state"] in states:
            return body
        time.sleep(0.2)
    raise AssertionError(f"evaluation still {body['state']} after {timeout} s: {body}")


def denoiser_onnx(path, side: int = 28):
    """A 3x3 box blur of one-channel side x side images, clipped to [0, 1]."""
    kernel = numpy_helper.from_array(np.full((1, 1, 3, 3), 1 / 9, np.float32), "kernel")
    low, high = (numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("low", 0), ("high", 1)))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "kernel"], ["blurred"], pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["blurred", "low", "high"], ["reconstruction"])], "denoiser",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, side, side])],
        [helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["N", 1, side, side])],
        [kernel, low, high])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
