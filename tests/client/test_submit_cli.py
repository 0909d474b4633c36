"""`robustness submit` against an in-memory fake of the HTTP contract."""

from __future__ import annotations

import argparse
import json
import os
import signal
import xml.etree.ElementTree as ET

import httpx
import pytest

from client.api import sha256_file
from client.submit_cli import add_submit_parser, run_submit
from tests.client.fake_api import FakeApi
from tests.client.test_api import unused_port

SERVER = "http://robustness.test"


def submit(argv: list[str], fake: FakeApi | None) -> int:
    parser = argparse.ArgumentParser(prog="robustness")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", *map(str, argv)])
    return args.run(args) if fake is None else run_submit(args, transport=fake.transport())


def test_submit_prints_the_id_and_uploads_each_file_once(inputs, capsys):
    model, data, spec = inputs
    fake = FakeApi()
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--name", "digits"], fake) == 0
    out, err = capsys.readouterr()
    assert out.strip() == next(iter(fake.evaluations))
    assert fake.uploads == [("models", "model.onnx", "digits"), ("datasets", "test.npz", None)]
    assert "uploaded as mdl_" in err
    body = fake.bodies[out.strip()]
    assert body["model_id"].startswith("mdl_") and body["attacks"][0]["eps"] == [0.3]

    requests_before = len(fake.requests)
    assert submit([model, data, "--spec", spec, "--server", SERVER], fake) == 0
    out2, err2 = capsys.readouterr()
    assert out2 == out  # the same evaluation: same inputs, same idempotency key
    assert len(fake.uploads) == 2 and len(fake.evaluations) == 1
    assert err2.count("already on the server") == 2
    assert [r.method for r in fake.requests[requests_before:]] == ["GET", "GET", "POST"]


def test_idempotency_key_is_stable_and_follows_the_run_id(inputs, tmp_path, capsys, monkeypatch):
    model, data, spec = inputs
    fake = FakeApi()

    def key_of_a_submit(spec_file, *extra) -> str:
        assert submit([model, data, "--spec", spec_file, "--server", SERVER, *extra], fake) == 0
        return fake.requests[-1].headers["idempotency-key"]

    first = key_of_a_submit(spec)
    assert key_of_a_submit(spec) == first
    same_spec = tmp_path / "same.json"  # JSON, keys reordered, list instead of scalar: the same spec
    same_spec.write_text(json.dumps({
        "gates": [{"min": 0.9, "metric": "clean_accuracy"},
                  {"metric": "robust_accuracy", "attack": "pgd", "eps": 0.3, "min": 0.5}],
        "attacks": [{"norm": "linf", "eps": [0.3], "name": "pgd"}], "samples": 100}))
    assert key_of_a_submit(same_spec) == first
    monkeypatch.setenv("GITHUB_RUN_ID", "8812")
    ci_run = key_of_a_submit(spec)
    assert ci_run != first and key_of_a_submit(spec) == ci_run
    assert key_of_a_submit(spec, "--idempotency-key", "nightly-7") not in (first, ci_run)
    assert len(fake.evaluations) == 3
    assert fake.uploads and len(fake.uploads) == 2


def test_wait_success_writes_json_and_junit(inputs, tmp_path, capsys, clock):
    model, data, spec = inputs
    fake = FakeApi("pass")
    junit, result_json = tmp_path / "out" / "junit.xml", tmp_path / "result.json"
    junit.parent.mkdir()
    code = submit([model, data, "--spec", spec, "--server", SERVER, "--wait", "--poll", "0.5",
                   "--junit", junit, "--json", result_json], fake)
    out, err = capsys.readouterr()
    assert code == 0, err
    evaluation_id = next(iter(fake.evaluations))
    assert "gate PASS: robust_accuracy pgd eps=0.3 >= 0.5 (got 0.6200)" in out
    assert "clean accuracy 0.9700 on 100 samples" in out
    assert "pgd" in err and "4/4" in err  # the progress bar's finished line
    assert f"evaluation {evaluation_id} succeeded: 2 gate(s) passed" in err
    assert set(clock.sleeps) == {0.5}

    document = json.loads(result_json.read_text())
    assert document == fake._result(fake.evaluations[evaluation_id])

    root = ET.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "robustness" and suite.get("tests") == "2" and suite.get("failures") == "0"
    assert [(c.get("name"), c.get("classname")) for c in suite.iter("testcase")] == [
        ("clean_accuracy >= 0.9", "robustness.gates"),
        ("robust_accuracy pgd eps=0.3 >= 0.5", "robustness.gates")]
    assert not list(suite.iter("failure"))
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["evaluation_id"] == evaluation_id
    assert properties["model_sha256"] == sha256_file(model)
    assert properties["clean_accuracy"] == "0.97"
    assert suite.find("system-out").text == "warning: 3 samples <are> & 'odd'"


def test_failed_gate_exits_1_with_a_junit_failure(inputs, tmp_path, capsys, clock):
    model, data, spec = inputs
    junit = tmp_path / "junit.xml"
    code = submit([model, data, "--spec", spec, "--server", SERVER, "--junit", junit], FakeApi("fail_gate"))
    assert code == 1
    out, err = capsys.readouterr()
    assert "gate FAIL: robust_accuracy pgd eps=0.3 >= 0.5 (got 0.3100)" in out
    assert "1 of 2 gate(s) failed" in err
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1"
    failed = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["robust_accuracy pgd eps=0.3 >= 0.5"]
    failure = failed[0].find("failure")
    assert failure.get("message") == "robust_accuracy = 0.31, expected >= 0.5"
    assert "value: 0.31\nmin: 0.5" in failure.text


def test_inconclusive_gate_exits_3_and_junit_says_why(inputs, tmp_path, capsys, clock):
    model, data, spec = inputs
    junit = tmp_path / "junit.xml"
    code = submit([model, data, "--spec", spec, "--server", SERVER, "--junit", junit],
                  FakeApi("inconclusive"))
    assert code == 3
    out, err = capsys.readouterr()
    assert "gate INCONCLUSIVE: robust_accuracy pgd eps=0.3 >= 0.5 (got 0.6200; inconclusive: pgd" in out
    assert "1 of 2 gate(s) inconclusive" in err and "none failed" in err
    suite = ET.parse(junit).getroot().find("testsuite")
    (case,) = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    failure = case.find("failure")
    assert failure.get("type") == "GateInconclusive"
    assert failure.get("message").startswith("inconclusive, robust_accuracy = 0.62: inconclusive: pgd")
    assert "verdict: inconclusive" in failure.text
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["verdict"] == "inconclusive"


def test_failed_evaluation_exits_2_with_the_servers_error(inputs, tmp_path, capsys, clock):
    model, data, spec = inputs
    result_json = tmp_path / "result.json"
    code = submit([model, data, "--spec", spec, "--server", SERVER, "--json", result_json], FakeApi("error"))
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "robustness: error: evaluation ev_00000000000000000000000000000000 failed: unsupported_operator: "
        "node quantise: Round has no gradient; use black-box attacks")
    assert not result_json.exists()


def test_timeout_exits_2_and_names_the_evaluation(inputs, capsys, clock):
    model, data, spec = inputs
    fake = FakeApi("never")
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait", "--timeout", "5"], fake) == 2
    err = capsys.readouterr().err
    assert f"error: evaluation {next(iter(fake.evaluations))} did not finish within 5s (state running" in err
    assert sum(clock.sleeps) == pytest.approx(5.0)


def test_unreachable_server_exits_2(inputs, capsys, clock):
    model, data, spec = inputs
    url = f"http://127.0.0.1:{unused_port()}"
    assert submit([model, data, "--spec", spec, "--server", url], None) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(
        f"robustness: error: cannot reach the robustness server at {url} (connection failed")


def test_api_errors_exit_2_with_one_line(inputs, capsys, clock):
    model, data, spec = inputs
    fake = FakeApi()
    fake.faults = [httpx.Response(401, json={"type": "unauthorized", "detail": "missing or unknown API key"})]
    assert submit([model, data, "--spec", spec, "--server", SERVER], fake) == 2
    assert capsys.readouterr().err == (
        "robustness: error: missing or unknown API key (HTTP 401 unauthorized); "
        "pass --api-key or set ROBUSTNESS_API_KEY\n")


def test_api_key_from_the_environment(inputs, capsys, monkeypatch):
    model, data, spec = inputs
    fake = FakeApi()
    monkeypatch.setenv("ROBUSTNESS_API_KEY", "from-env")
    assert submit([model, data, "--spec", spec, "--server", SERVER], fake) == 0
    assert {r.headers["authorization"] for r in fake.requests} == {"Bearer from-env"}
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--api-key", "flag"], fake) == 0
    assert fake.requests[-1].headers["authorization"] == "Bearer flag"


def test_bad_input_exits_2_before_contacting_the_server(inputs, tmp_path, capsys):
    model, data, spec = inputs
    fake = FakeApi()
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks:\n  - name: pgd\n    eps: -1\n")
    assert submit([model, data, "--spec", bad, "--server", SERVER], fake) == 2
    assert "invalid spec: attacks.0.eps: eps values must be finite and >= 0" in capsys.readouterr().err
    assert submit([model, tmp_path / "missing.npz", "--spec", spec, "--server", SERVER], fake) == 2
    assert capsys.readouterr().err == f"robustness: error: {tmp_path / 'missing.npz'}: no such file\n"
    assert submit([model, data, "--spec", spec], fake) == 2
    assert "--server URL is required" in capsys.readouterr().err
    assert fake.requests == []


class BusyApi(FakeApi):
    """Submissions answered 429 too_many_jobs, Retry-After 30, ``busy`` times."""

    def __init__(self, busy: int):
        super().__init__()
        self.busy = busy

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/evaluations" and self.busy:
            self.busy -= 1
            self.requests.append(request)
            return httpx.Response(429, headers={"Retry-After": "30"}, json={
                "type": "too_many_jobs", "detail": "4 evaluations queued or running; the limit is 4"})
        return super().handle(request)


def test_a_busy_server_is_retried_until_the_timeout(inputs, capsys, clock):
    model, data, spec = inputs
    fake = BusyApi(busy=8)  # 4 minutes of Retry-After 30
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait", "--timeout", "300"], fake) == 0
    assert clock.sleeps[:8] == [30.0] * 8 and len(fake.evaluations) == 1

    fake = BusyApi(busy=100)
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait", "--timeout", "300"], fake) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "robustness: error: 4 evaluations queued or running; the limit is 4 (HTTP 429 too_many_jobs); "
        "the server stayed busy for all of --timeout 300s: run the command again later, or with a longer "
        "--timeout")


def test_a_busy_server_without_a_timeout_says_how_to_retry(inputs, capsys, clock):
    model, data, spec = inputs
    assert submit([model, data, "--spec", spec, "--server", SERVER], BusyApi(busy=100)) == 2
    assert clock.sleeps == [30.0] * 4
    assert capsys.readouterr().err.splitlines()[-1] == (
        "robustness: error: 4 evaluations queued or running; the limit is 4 (HTTP 429 too_many_jobs); "
        "the server is busy: run the command again later, or with --wait --timeout SECONDS to keep "
        "retrying until then")


class OutageApi(FakeApi):
    """The ``outage`` requests after the submission find no server (connection refused)."""

    def __init__(self, outage: int, outcome: str = "pass"):
        super().__init__(outcome)
        self.outage = outage

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.evaluations and self.outage:
            self.outage -= 1
            self.requests.append(request)
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return super().handle(request)


def test_wait_rides_out_an_outage_until_the_timeout(inputs, capsys, clock):
    model, data, spec = inputs
    fake = OutageApi(outage=12)  # about a minute of backoff, 0.5 s doubling up to 8 s
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait", "--timeout", "300"], fake) == 0
    assert clock.sleeps[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]

    fake = OutageApi(outage=10_000)
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait", "--timeout", "300"], fake) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert f"evaluation {next(iter(fake.evaluations))} did not finish within 300s (state not known yet; " \
           f"then the server stopped answering: cannot reach the robustness server at {SERVER}" in last
    assert last.endswith("it keeps running on the server (the same command, run again, waits for this "
                         "evaluation)")


def test_wait_without_a_timeout_gives_up_on_a_long_outage_saying_how_to_reattach(inputs, capsys, clock):
    model, data, spec = inputs
    fake = OutageApi(outage=10_000)
    started = clock.now
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait"], fake) == 2
    assert 300 - 8 <= clock.now - started <= 300  # max_outage
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"robustness: error: cannot reach the robustness server at {SERVER} (connection failed: [Errno 111] "
        f"Connection refused); evaluation {next(iter(fake.evaluations))} keeps running on the server: the "
        "same command, run again, waits for it")


def test_a_rerun_after_a_failed_evaluation_submits_a_new_one(inputs, capsys, clock, monkeypatch):
    model, data, spec = inputs
    monkeypatch.setenv("GITHUB_RUN_ID", "8812")
    fake = FakeApi("error")
    command = [model, data, "--spec", spec, "--server", SERVER, "--wait"]
    assert submit(command, fake) == 2
    first = next(iter(fake.evaluations))
    capsys.readouterr()
    assert submit(command, fake) == 2  # "Re-run failed jobs": the same GITHUB_RUN_ID
    second = list(fake.evaluations)[1]
    err = capsys.readouterr().err
    assert f"evaluation {first}, an earlier attempt of this command, failed; submitted a new one" in err
    assert f"robustness: error: evaluation {second} failed" in err
    keys = {evaluation_id: k for k, evaluation_id in fake.keys.items()}
    assert keys[second] == f"{keys[first]}/after-{first}"

    fake.outcome = "never"
    assert submit([*command, "--timeout", "5"], fake) == 2  # a third attempt: still the same key chain
    third = list(fake.evaluations)[2]
    assert {k: e for k, e in fake.keys.items() if e == third} == {f"{keys[first]}/after-{second}": third}
    assert submit(command[:-1], fake) == 0  # the running one is returned, as before
    assert capsys.readouterr().out.strip() == third and len(fake.evaluations) == 3


class SignalApi(FakeApi):
    """Ctrl-C (KeyboardInterrupt) during the ``at``-th request, or a real SIGTERM to this process."""

    def __init__(self, at: int, outcome: str = "never", sigterm: bool = False):
        super().__init__(outcome)
        self.at = at
        self.sigterm = sigterm

    def handle(self, request: httpx.Request) -> httpx.Response:
        if len(self.requests) == self.at:
            if self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before the answer returns
            else:
                raise KeyboardInterrupt
        return super().handle(request)


def test_ctrl_c_during_the_upload_exits_130_with_one_line(inputs, capsys):
    model, data, spec = inputs
    fake = SignalApi(at=1)  # the model's upload, after its lookup
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait"], fake) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"robustness: interrupted (SIGINT) while uploading the model {model}; nothing was submitted")


def test_ctrl_c_or_sigterm_while_waiting_says_how_to_get_the_result(inputs, capsys, clock):
    model, data, spec = inputs
    for sigterm, code, name in ((False, 130, "SIGINT"), (True, 143, "SIGTERM")):
        fake = SignalApi(at=7, sigterm=sigterm)  # the second poll
        assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait"], fake) == code
        evaluation_id = next(iter(fake.evaluations))
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"robustness: interrupted ({name}) while waiting for the evaluation; evaluation {evaluation_id} "
            f"keeps running on the server: run the same command again to get its result, or GET "
            f"{SERVER}/v1/evaluations/{evaluation_id}")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_no_answer_to_the_submission_says_a_rerun_finds_it(inputs, capsys, clock):
    model, data, spec = inputs
    fake = SubmitLostApi()
    assert submit([model, data, "--spec", spec, "--server", SERVER, "--wait"], fake) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"robustness: error: cannot reach the robustness server at {SERVER} (timed out); the server may have "
        "the evaluation: the same command, run again, finds it")
    assert len(fake.evaluations) == 1


class SubmitLostApi(FakeApi):
    """Every answer to a submission is lost (the server has the evaluation, the client times out)."""

    def handle(self, request: httpx.Request) -> httpx.Response:
        response = super().handle(request)
        if request.method == "POST" and request.url.path == "/v1/evaluations":
            raise httpx.ReadTimeout("timed out")
        return response
