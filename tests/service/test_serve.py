"""`robustness serve` and `robustness keys create` as a user runs them (subprocesses)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import DATA, MODEL, ROOT, free_port
from tests.service.test_jobs_end_to_end import wait_running

BODY = {
    "samples": 100,
    "shard_size": 50,
    "batch_size": 20,
    # long enough (about a second a shard) that the worker is killed mid-shard, not after
    "attacks": [{"name": "pgd", "eps": [0.1], "steps": 500}],
}


def run_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(tmp_path):
    values = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTNESS_")}
    values.update(
        ROBUSTNESS_DATA_DIR=str(tmp_path / "data"),
        ROBUSTNESS_LEASE_S="3",
        ROBUSTNESS_PROGRESS_INTERVAL_S="0.5",
        ROBUSTNESS_PORT=str(free_port()),
    )
    return values


@pytest.fixture
def serve(env, tmp_path):
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "serve", "--workers", "1"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{env['ROBUSTNESS_PORT']}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield process, url
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def test_keys_create_prints_a_key_that_the_gateway_accepts(env, serve):
    _, url = serve
    created = run_cli("keys", "create", "--tenant", "team-a", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("rk_") and "not stored" in created.stderr
    assert httpx.get(f"{url}/v1/models").status_code == 401  # open mode ended with the first key
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert run_cli("keys", "create", "--tenant", "bad name!", env=env).returncode == 2


def test_serve_refuses_a_network_address_without_keys(env):
    refused = run_cli("serve", "--host", "0.0.0.0", env=env)
    assert refused.returncode == 2 and "robustness keys create" in refused.stderr


def test_serve_restarts_a_killed_worker_and_the_job_still_succeeds(serve):
    process, url = serve
    with httpx.Client(base_url=url, timeout=30) as api:
        ids = [
            api.post(f"/v1/{kind}", files={"file": (path.name, path.read_bytes())}).json()["id"]
            for kind, path in (("models", MODEL), ("datasets", DATA))
        ]
        job = api.post("/v1/evaluations", json={**BODY, "model_id": ids[0], "dataset_id": ids[1]}).json()
        wait_running(api, job["id"])
        worker = int(
            subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()[
                0
            ]
        )
        pool = subprocess.run(["pgrep", "-P", str(worker)], capture_output=True, text=True).stdout.split()
        for pid in [worker, *map(int, pool)]:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = api.get(f"/v1/evaluations/{job['id']}").json()
            if state["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.3)
        assert state["state"] == "succeeded", state


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, children) for d in [c, *descendants(c)]]


def test_stopping_serve_stops_its_worker_processes(serve):
    process, _ = serve
    workers = descendants(process.pid)
    assert workers, "serve started no worker"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.2)
    alive = [
        pid
        for pid in workers
        if os.path.exists(f"/proc/{pid}") and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    ]
    assert not alive, f"worker processes left running: {alive}"
