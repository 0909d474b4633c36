"""`robustness worker --gpus 0,1`: one worker process per GPU, each started with only its
device visible (CUDA_VISIBLE_DEVICES) and the cores shared out; they run jobs (here on the
CPU: CI has no GPU, and ONNX Runtime on the CPU ignores the variable) and all stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.service.conftest import ROOT, env_for, gateway, wait_for
from tests.service.test_jobs_end_to_end import QUICK, check_same_as_in_process, submit


def _environ(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")  # noqa: SIM115 - read at once
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_one_worker_per_gpu_pinned_to_its_device_runs_jobs_and_stops(settings, tmp_path):
    log = tmp_path / "workers.log"
    with log.open("wb") as handle:
        parent = subprocess.Popen([sys.executable, "-m", "client.cli", "worker", "--gpus", "0,1"],
                                  env=env_for(settings), cwd=ROOT,
                                  stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while log.read_bytes().count(b" ready.") < 2 and time.monotonic() < deadline:
                assert parent.poll() is None, log.read_text()[-3000:]
                time.sleep(0.3)
            workers = _children(parent.pid)
            assert len(workers) == 2, log.read_text()[-3000:]
            environments = [_environ(pid) for pid in workers]
            assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in environments) == ["0", "1"]
            assert {env["ROBUSTNESS_WORKER_CONCURRENCY"] for env in environments} == {"1"}
            with gateway(settings) as api:
                job = submit(api, QUICK)
                final = wait_for(api, job["id"])
                assert final["state"] == "succeeded", final
                check_same_as_in_process(api, job, QUICK)
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(timeout=90) == 0
            assert not any(_alive(pid) for pid in workers)
        finally:
            if parent.poll() is None:
                parent.kill()


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"  # noqa: SIM115
    except FileNotFoundError:
        return False


def test_gpu_ids_must_be_distinct_numbers(settings):
    for bad in ("a,b", "0,0", "0,,1"):
        done = subprocess.run([sys.executable, "-m", "client.cli", "worker", "--gpus", bad],
                              env=env_for(settings), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--gpus takes distinct GPU ids" in done.stderr, done.stderr
