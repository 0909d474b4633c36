"""Benchmark the service end to end on this machine (embedded default: SQLite, the embedded
broker, real Celery worker processes, uvicorn on loopback).

    .venv/bin/python bench/service.py [--samples 500] [--steps 40] [--pollers 100] [--poll-seconds 30]
        [--json PATH] [--skip overhead,polling,scaling]

1. overhead: the same PGD evaluation (examples/digits-cnn.onnx on --samples images of
   examples/digits-test.npz, L-inf eps 0.1, --steps steps, 2 shards) run in this process
   through workers.evaluate.evaluate, and end to end through `robustness serve` (upload,
   submit, poll every 0.2 s until it succeeded). The overhead compares equal compute: the
   engine with ONNX Runtime's default threads (every core) against `serve --workers 1` (one
   worker process with every core). The embedded default (one single-threaded worker process
   per core, the shards in parallel) is reported beside it. --rounds interleaved rounds of
   (in process, service) against one running server; the median of the per-round ratios.
2. polling: --pollers concurrent clients (asyncio + httpx, one connection each) poll
   GET /v1/evaluations/{id} for --poll-seconds; p50/p99 latency, requests/s, errors.
3. scaling: the same sharded job (2 shards, --scaling-steps PGD steps) with `--workers 1` and
   `--workers 2`, one ONNX Runtime thread per worker process; speedup = time(1 worker) /
   time(2 workers), each from upload to succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
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

    def __init__(self, workers: int | None = None, threads: int | None = None):
        self.dir = tempfile.TemporaryDirectory(prefix="robustness-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUSTNESS_")}
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

    def upload(self) -> tuple[str, str]:
        ids = []
        for kind, path in (("models", MODEL), ("datasets", DATA)):
            with open(path, "rb") as f:
                response = self.client.post(f"/v1/{kind}", files={"file": (path.name, f)})
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
        while True:
            state = self.client.get(f"/v1/evaluations/{job_id}").json()
            if state["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        if state["state"] != "succeeded":
            raise RuntimeError(f"job ended {state}")
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


async def _poll(url: str, job_id: str, seconds: float, latencies: list, errors: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = await client.get(f"/v1/evaluations/{job_id}")
                if response.status_code != 200:
                    errors.append(response.status_code)
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - started)


def polling(args) -> dict:
    server = Server()
    try:
        _, job_id = server.run(pgd_spec(20, 1, 20))
        latencies: list[float] = []
        errors: list = []

        async def main():
            await asyncio.gather(
                *[
                    _poll(server.url, job_id, args.poll_seconds, latencies, errors)
                    for _ in range(args.pollers)
                ]
            )

        asyncio.run(main())
    finally:
        server.close()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "pollers": args.pollers,
        "seconds": args.poll_seconds,
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / args.poll_seconds, 1),
        "p50_ms": round(1000 * pick(0.50), 1),
        "p99_ms": round(1000 * pick(0.99), 1),
        "errors": len(errors),
        "error_kinds": sorted({str(e) for e in errors}),
    }


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
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--poll-seconds", type=float, default=30)
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
