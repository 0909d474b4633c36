"""Benchmark the service end to end on this machine (embedded default: SQLite, the embedded
broker, real Celery worker processes, uvicorn on loopback).

    .venv/bin/python bench/service.py [--samples 500] [--steps 40] [--pollers 100] [--poll-seconds 30]
        [--pollers 100,1000] [--backends sqlite,postgresql] [--json PATH] [--skip overhead,polling,scaling]

1. overhead: the same PGD evaluation (examples/digits-cnn.onnx on --samples images of
   examples/digits-test.npz, L-inf eps 0.1, --steps steps, 2 shards) run in this process
   through workers.evaluate.evaluate, and end to end through `robustness serve` (upload,
   submit, long-poll (?wait=10) until it succeeded). The overhead compares equal compute: the
   engine with ONNX Runtime's default threads (every core) against `serve --workers 1` (one
   worker process with every core). The embedded default (one single-threaded worker process
   per core, the shards in parallel) is reported beside it. --rounds interleaved rounds of
   (in process, service) against one running server; the median of the per-round ratios.
2. polling: a CI fleet. On each backend (--backends: sqlite is the embedded default;
   postgresql is PostgreSQL + Redis at 127.0.0.1, a fresh database), --tenants tenants with an
   API key each submit one small evaluation per poller (at most --poll-jobs), which run to the
   end; then --busy evaluations keep the worker processes computing while, for each count in
   --pollers, that many keep-alive pollers (bench/pollers.py, raw asyncio streams) poll
   GET /v1/evaluations/{id} of their own evaluation every --poll-interval seconds for
   --poll-seconds: p50/p99/max latency, requests/s, errors.
3. scaling: the same sharded job (2 shards, --scaling-steps PGD steps) with `--workers 1` and
   `--workers 2`, one ONNX Runtime thread per worker process; speedup = time(1 worker) /
   time(2 workers), each from upload to succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from schemas.evaluation import EvaluationSpec  # noqa: E402
from workers.datasets import load_npz  # noqa: E402
from workers.evaluate import evaluate  # noqa: E402

MODEL = REPO / "examples" / "digits-cnn.onnx"
WARM = {
    "samples": 20,
    "shard_size": 10,
    "batch_size": 50,
    "attacks": [{"name": "pgd", "eps": [0.1], "steps": 1}],
}  # 2 shards
DATA = REPO / "examples" / "digits-test.npz"


def pgd_spec(samples: int, steps: int, shard_size: int) -> dict:
    return {
        "samples": samples,
        "shard_size": shard_size,
        "batch_size": 50,
        "seed": 0,
        "attacks": [{"name": "pgd", "norm": "linf", "eps": [0.1], "steps": steps, "random_start": True}],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`robustness serve` in a subprocess with its own data folder."""

    def __init__(self, workers: int | None = None, threads: int | None = None, env: dict | None = None):
        self.dir = tempfile.TemporaryDirectory(prefix="robustness-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTNESS_")} | (env or {})
        self.env = env
        if threads:
            env["ROBUSTNESS_ORT_THREADS"] = str(threads)
        command = [
            sys.executable,
            "-m",
            "client.cli",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            self.dir.name,
        ]
        if workers:
            command += ["--workers", str(workers)]
        self.log = open(Path(self.dir.name) / "serve.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if (
                    self.client.get("/readyz").status_code == 200
                    and b" ready." in Path(self.dir.name, "serve.log").read_bytes()
                ):
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(Path(self.dir.name, "serve.log").read_text()[-3000:])

    def cli(self, *args: str) -> str:
        """A server-side command against this server's store; its stdout."""
        done = subprocess.run([sys.executable, "-m", "client.cli", *args, "--data-dir", self.dir.name],
                              env=self.env, cwd=REPO, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def upload(self, key: str | None = None) -> tuple[str, str]:
        ids = []
        for kind, path in (("models", MODEL), ("datasets", DATA)):
            with open(path, "rb") as f:
                response = self.client.post(f"/v1/{kind}", files={"file": (path.name, f)},
                                            headers=_auth(key))
            response.raise_for_status()
            ids.append(response.json()["id"])
        return ids[0], ids[1]

    def run(self, spec: dict) -> tuple[float, str]:
        """Wall time from the first upload to the succeeded state, and the job id."""
        started = time.perf_counter()
        model_id, dataset_id = self.upload()
        job = self.client.post(
            "/v1/evaluations", json={**spec, "model_id": model_id, "dataset_id": dataset_id}
        )
        job.raise_for_status()
        job_id = job.json()["id"]
        while True:  # long polls, as `robustness submit --wait` makes them
            state = self.client.get(f"/v1/evaluations/{job_id}", params={"wait": 10}).json()
            if state["state"] in ("succeeded", "failed", "cancelled"):
                break
        elapsed = time.perf_counter() - started
        if state["state"] != "succeeded":
            raise RuntimeError(f"job ended {state}")
        # the report is rendered after the result: wait for it, untimed, so the next round
        # (in process) does not share the cores with it
        self.client.get(f"/v1/evaluations/{job_id}/report").raise_for_status()
        return elapsed, job_id

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        self.dir.cleanup()


def in_process(spec: dict) -> float:
    parsed = EvaluationSpec.model_validate(spec)
    dataset = load_npz(DATA.read_bytes(), tuple(parsed.input.range))
    started = time.perf_counter()
    evaluate(MODEL.read_bytes(), dataset, parsed)
    return time.perf_counter() - started


def _interleaved(spec: dict, rounds: int, workers: int | None) -> dict:
    """Rounds of (in process, through the service) back to back, so a burst of foreign load
    on this shared machine hits both sides of a round's ratio; the median ratio is kept."""
    server = Server(workers=workers)
    try:
        server.run(WARM)  # warm the worker processes
        in_process(WARM)
        pairs = [(in_process(spec), server.run(spec)[0]) for _ in range(rounds)]
    finally:
        server.close()
    ratios = [service / local for local, service in pairs]
    return {
        "in_process_s": [round(p[0], 2) for p in pairs],
        "service_s": [round(p[1], 2) for p in pairs],
        "ratio_median": round(statistics.median(ratios), 3),
    }


def overhead(args) -> dict:
    spec = pgd_spec(args.samples, args.steps, shard_size=(args.samples + 1) // 2)
    same_compute = _interleaved(spec, args.rounds, workers=1)  # one worker process with every core
    default = _interleaved(spec, args.rounds, workers=None)  # one single-threaded process per core
    return {
        "equal_compute": same_compute,
        "overhead_pct": round(100 * (same_compute["ratio_median"] - 1), 1),
        "embedded_default": default,
    }


def _service_time(spec: dict, workers: int | None = None, threads: int | None = None) -> float:
    server = Server(workers=workers, threads=threads)
    try:
        server.run(WARM)  # warm the worker processes
        elapsed, _ = server.run(spec)
    finally:
        server.close()
    return elapsed


def _auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/12"


def _backend(name: str):
    """(environment for the server, cleanup) of a backend; postgresql: a fresh database."""
    if name == "sqlite":
        return {}, lambda: None
    import redis
    import sqlalchemy

    database = f"robustness_bench_{os.getpid()}"
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
    redis.Redis.from_url(REDIS_URL).flushdb()

    def cleanup():
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()

    return {"ROBUSTNESS_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
            "ROBUSTNESS_BROKER_URL": REDIS_URL}, cleanup


QUICK = {"samples": 10, "shard_size": 10, "attacks": [{"name": "fgsm", "eps": [0.1]}]}
BUSY = {"samples": 500, "shard_size": 250, "batch_size": 50, "seed": 0,
        "attacks": [{"name": "pgd", "eps": [0.1], "steps": 1000}]}


def _fleet_setup(server: Server, tenants: int, jobs: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Keys for ``tenants`` tenants and ``jobs`` finished evaluations spread over them."""
    keys = [server.cli("keys", "create", "--tenant", f"team-{i}") for i in range(tenants)]
    uploads = {key: server.upload(key) for key in keys}
    targets = []
    for j in range(jobs):
        key = keys[j % tenants]
        model_id, dataset_id = uploads[key]
        response = server.client.post("/v1/evaluations", headers=_auth(key),
                                      json={**QUICK, "model_id": model_id, "dataset_id": dataset_id})
        response.raise_for_status()
        targets.append((f"/v1/evaluations/{response.json()['id']}", key))
    deadline = time.monotonic() + 1800
    for path, key in targets:
        while server.client.get(path, headers=_auth(key)).json()["state"] not in ("succeeded", "failed"):
            if time.monotonic() > deadline:
                raise RuntimeError("the fleet's evaluations did not finish in 30 minutes")
            time.sleep(0.5)
    return keys, targets


def _run_pollers(url: str, targets: list, pollers: int, interval: float, seconds: float) -> dict:
    job = json.dumps({"url": url, "targets": targets, "pollers": pollers, "interval": interval,
                      "seconds": seconds})
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pollers.py")], input=job, text=True,
                          capture_output=True, check=True, cwd=REPO)
    return json.loads(done.stdout)


def polling(args) -> list[dict]:
    counts = [int(n) for n in str(args.pollers).split(",")]
    rows = []
    for backend in args.backends.split(","):
        env, cleanup = _backend(backend)
        env |= {"ROBUSTNESS_MAX_CONCURRENT_JOBS": "100000", "ROBUSTNESS_TENANT_COST_QUOTA": str(10**15)}
        server = Server(env=env)
        try:
            keys, targets = _fleet_setup(server, args.tenants, min(max(counts), args.poll_jobs))
            model_id, dataset_id = server.upload(keys[0])
            busy_spec = {**BUSY, "model_id": model_id, "dataset_id": dataset_id}
            busy = [server.client.post("/v1/evaluations", headers=_auth(keys[0]), json=busy_spec).json()["id"]
                    for _ in range(args.busy)]
            for count in counts:
                figures = _run_pollers(server.url, targets, count, args.poll_interval, args.poll_seconds)
                states = {server.client.get(f"/v1/evaluations/{b}", headers=_auth(keys[0])).json()["state"]
                          for b in busy}
                rows.append({"backend": backend, "busy_jobs": args.busy, "busy_states": sorted(states),
                             "jobs_polled": len(targets), **figures})
                print("polling", json.dumps(rows[-1]), flush=True)
            for b in busy:
                server.client.post(f"/v1/evaluations/{b}/cancel", headers=_auth(keys[0]))
        finally:
            server.close()
            cleanup()
    return rows


def scaling(args) -> dict:
    spec = pgd_spec(args.samples, args.scaling_steps, shard_size=(args.samples + 1) // 2)
    times = {workers: _service_time(spec, workers=workers, threads=1) for workers in (1, 2)}
    return {
        "steps": args.scaling_steps,
        "one_worker_s": round(times[1], 2),
        "two_workers_s": round(times[2], 2),
        "speedup": round(times[1] / times[2], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the overhead runs")
    parser.add_argument("--scaling-steps", type=int, default=100, help="PGD steps of the scaling job")
    parser.add_argument("--pollers", default="100,1000", help="comma-separated poller counts")
    parser.add_argument("--poll-seconds", type=float, default=30)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between one poller's polls")
    parser.add_argument("--poll-jobs", type=int, default=1000, help="at most this many evaluations polled")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--busy", type=int, default=2, help="long evaluations running while polled")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--skip", default="", help="comma-separated: overhead, polling, scaling")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    figures = {"cpus": os.cpu_count()}
    for name, run in (("overhead", overhead), ("polling", polling), ("scaling", scaling)):
        if name not in skip:
            figures[name] = run(args)
            print(name, json.dumps(figures[name]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
