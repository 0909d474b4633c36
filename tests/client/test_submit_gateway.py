"""`robustness submit --wait` against the real gateway (uvicorn on a port, no worker: the job
stays queued) behind a proxy that fails the way a gateway does: it stops answering, it goes down."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.client.proxy import Proxy
from tests.client.test_submit_cli import submit
from tests.service.conftest import DATA, MODEL, ROOT, make_settings, uvicorn_gateway

SPEC = "samples: 20\nattacks:\n  - {name: fgsm, eps: [0.05]}\n"


@pytest.fixture
def served(tmp_path):
    """(proxy, gateway URL): one tenant (no API keys), reached through the proxy."""
    with uvicorn_gateway(make_settings(tmp_path / "data")) as url:
        proxy = Proxy(url)
        yield proxy, url
        proxy.stop()


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def when_submitted(url: str, then, after: float = 1.0) -> threading.Thread:
    """Run ``then(evaluation_id)`` ``after`` seconds after the gateway has an evaluation (asked
    directly, not through the proxy), when the client has had its answer and polls."""

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = httpx.get(f"{url}/v1/evaluations").json()["items"]
            if items:
                time.sleep(after)
                then(items[0]["id"])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_gateway_that_stops_answering_ends_the_wait_at_the_timeout(served, spec, capsys):
    proxy, url = served
    when_submitted(url, lambda _: proxy.freeze())
    started = time.monotonic()
    code = submit([MODEL, DATA, "--spec", spec, "--server", proxy.url, "--wait", "--poll", "1",
                   "--timeout", "6"], None)
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert took < 6 + 4, err  # each request and its retries end by the deadline (was 171 s)
    last = err.splitlines()[-1]
    assert "did not finish within 6s (state queued" in last
    assert f"then the server stopped answering: cannot reach the robustness server at {proxy.url}" in last
    assert "it keeps running on the server (the same command, run again, waits for this evaluation)" in last


def test_wait_rides_out_a_gateway_restart(served, spec, capsys):
    proxy, url = served

    def restart(evaluation_id: str) -> None:
        proxy.stop()  # connections refused for longer than 4 retries with backoff (7.5 s) last
        time.sleep(10)
        proxy.start()
        time.sleep(1)
        httpx.post(f"{url}/v1/evaluations/{evaluation_id}/cancel").raise_for_status()

    watcher = when_submitted(url, restart)
    code = submit([MODEL, DATA, "--spec", spec, "--server", proxy.url, "--wait", "--poll", "1",
                   "--timeout", "60"], None)
    watcher.join()
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.splitlines()[-1]  # the cancel, seen after the outage: not "cannot reach the server"
    assert last.startswith("robustness: error: evaluation ev_"), err
    assert last.endswith(" cancelled on request"), err


def test_a_ci_rerun_after_a_cancelled_evaluation_gets_a_new_one(served, spec, capsys, monkeypatch):
    _, url = served
    monkeypatch.setenv("GITHUB_RUN_ID", "4411")
    command = [MODEL, DATA, "--spec", spec, "--server", url]
    assert submit(command, None) == 0
    first = capsys.readouterr().out.strip()
    httpx.post(f"{url}/v1/evaluations/{first}/cancel").raise_for_status()
    assert submit(command, None) == 0  # a re-run of the job: the same run id
    out, err = capsys.readouterr()
    second = out.strip()
    assert second != first
    assert f"evaluation {first}, an earlier attempt of this command, cancelled; submitted a new one" in err
    assert submit(command, None) == 0  # and again: the queued new one
    assert capsys.readouterr().out.strip() == second
    states = {e["id"]: e["state"] for e in httpx.get(f"{url}/v1/evaluations").json()["items"]}
    assert states == {first: "cancelled", second: "queued"}


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_waiting_exits_cleanly_saying_how_to_get_the_result(served, spec, signum, code):
    _, url = served
    process = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "submit", str(MODEL), str(DATA), "--spec", str(spec),
         "--server", url, "--wait"], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    lines = []
    while not (lines and lines[-1].startswith("robustness: evaluation ev_")):
        lines.append(process.stderr.readline())
        assert lines[-1], lines
    time.sleep(1)  # waiting now
    process.send_signal(signum)
    rest = process.communicate(timeout=30)[1]
    assert process.returncode == code, rest
    evaluation_id = lines[-1].split()[2]
    name = signal.Signals(signum).name
    assert rest.splitlines()[-1] == (
        f"robustness: interrupted ({name}) while waiting for the evaluation; evaluation {evaluation_id} "
        f"keeps running on the server: run the same command again to get its result, or GET "
        f"{url}/v1/evaluations/{evaluation_id}")
    assert "Traceback" not in rest


def test_a_server_url_with_a_wrong_path_gets_a_hint(served, spec, capsys):
    _, url = served
    assert submit([MODEL, DATA, "--spec", spec, "--server", f"{url}/api/foo"], None) == 2
    assert capsys.readouterr().err == (
        f"robustness: error: Not Found (HTTP 404 not_found); the server URL {url}/api/foo is probably wrong: "
        "it should be the gateway's base URL, the one /v1 lies under, e.g. http://host:8000\n")
