"""RobustnessClient against an in-memory fake of the HTTP contract."""

from __future__ import annotations

import socket

import httpx
import pytest

from client.api import ApiError, RobustnessClient, ServerUnreachable, WaitTimeout, parse_error, sha256_file
from tests.client.fake_api import FakeApi


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def fake():
    return FakeApi()


@pytest.fixture
def api(fake):
    with RobustnessClient("http://robustness.test/", api_key="k1", transport=fake.transport()) as client:
        yield client


def test_error_body_becomes_api_error(api):
    with pytest.raises(ApiError) as info:
        api.get_model("mdl_missing")
    error = info.value
    assert (error.status, error.type, error.detail) == (404, "not_found", "no record mdl_missing")
    assert str(info.value) == "no record mdl_missing (HTTP 404 not_found)"


@pytest.mark.parametrize(("response", "expected"), [
    (httpx.Response(422, json={"type": "invalid_spec", "detail": "attacks[0].eps: must be >= 0"}),
     (422, "invalid_spec", "attacks[0].eps: must be >= 0")),
    (httpx.Response(422, json={"detail": [{"loc": ["body", "model_id"], "msg": "Field required"}]}),
     (422, "unprocessable_entity", "body.model_id: Field required")),
    (httpx.Response(502, text="<html><body>\n<h1>Bad Gateway</h1></body></html>"),
     (502, "bad_gateway", "HTTP 502 Bad Gateway: <html><body> <h1>Bad Gateway</h1></body></html>")),
    (httpx.Response(500), (500, "internal_server_error", "HTTP 500 Internal Server Error")),
])
def test_parse_error(response, expected):
    error = parse_error(response)
    assert (error.status, error.type, error.detail) == expected


def test_requests_carry_the_api_key_and_base_url(api, fake):
    api.list_evaluations(state="running")
    request = fake.requests[-1]
    assert request.headers["authorization"] == "Bearer k1"
    assert str(request.url) == "http://robustness.test/v1/evaluations?state=running"


def test_upload_find_and_dedupe(api, fake, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model bytes" * 1000)
    assert api.find_model(sha256_file(path)) is None
    model = api.upload_model(path, name="digits")
    assert model["sha256"] == sha256_file(path) and model["name"] == "digits"
    assert fake.uploads == [("models", "m.onnx", "digits")]
    assert api.find_model(model["sha256"]) == model == api.get_model(model["id"])
    assert api.ensure_model(path) == (model, False)
    assert len(fake.uploads) == 1
    other = tmp_path / "other.onnx"
    other.write_bytes(b"other model" * 1000)
    assert api.ensure_model(other)[1] and len(fake.uploads) == 2  # not mistaken for the first
    dataset, uploaded = api.ensure_dataset(path)
    assert uploaded and dataset["id"].startswith("ds_") and api.find_dataset(dataset["sha256"]) == dataset


def test_retry_on_503_then_success(api, fake, clock):
    fake.faults = [httpx.Response(503), httpx.Response(502, text="proxy"), httpx.ConnectError("refused")]
    assert api.list_evaluations() == []
    assert len(fake.requests) == 4
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_retries_give_up_with_the_last_error(api, fake, clock):
    fake.faults = [_error_503() for _ in range(10)]
    with pytest.raises(ApiError) as info:
        api.get_evaluation("ev_1")
    assert info.value.status == 503 and info.value.detail == "workers are restarting"
    assert len(fake.requests) == 5  # the first attempt and 4 retries


def _error_503():
    return httpx.Response(503, json={"type": "unavailable", "detail": "workers are restarting"})


def test_submit_without_idempotency_key_is_not_retried(api, fake, clock, tmp_path):
    fake.faults = [httpx.Response(503)]
    with pytest.raises(ApiError) as info:
        api.submit({"attacks": []}, "mdl_x", "ds_x")
    assert info.value.status == 503 and len(fake.requests) == 1 and clock.sleeps == []


def test_idempotent_submit_is_retried_and_returns_the_same_job(api, fake, clock, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"m")
    model = api.upload_model(path)
    fake.faults = [httpx.Response(504), httpx.ReadTimeout("slow")]
    first = api.submit({"attacks": []}, model["id"], "ds_x", idempotency_key="k")
    assert first["state"] == "queued" and len(fake.evaluations) == 1
    assert api.submit({"attacks": []}, model["id"], "ds_x", idempotency_key="k")["id"] == first["id"]
    with pytest.raises(ApiError) as info:
        api.submit({"attacks": [], "seed": 1}, model["id"], "ds_x", idempotency_key="k")
    assert info.value.type == "conflict"


def test_429_honours_retry_after(api, fake, clock, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"m")
    model = api.upload_model(path)
    busy = httpx.Response(429, headers={"Retry-After": "7"},
                          json={"type": "too_many_jobs", "detail": "3 evaluations running; the limit is 3"})
    fake.faults = [busy]
    api.submit({"attacks": []}, model["id"], "ds_x")  # even a non-idempotent request: 429 did nothing
    assert clock.sleeps == [7.0]
    fake.faults = [busy] * 10
    with pytest.raises(ApiError) as info:
        api.submit({"attacks": []}, model["id"], "ds_x")
    assert info.value.type == "too_many_jobs"


def test_upload_retry_rewinds_the_file(api, fake, clock, tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"0123456789" * 10_000)
    fake.faults = [httpx.Response(503), httpx.Response(503)]
    dataset = api.upload_dataset(path)
    assert dataset["sha256"] == sha256_file(path) and dataset["size"] == 100_000
    assert len(fake.requests) == 3


def test_unreachable_server(clock):
    url = f"http://127.0.0.1:{unused_port()}"
    with RobustnessClient(url) as api, pytest.raises(ServerUnreachable) as info:
        api.get_evaluation("ev_1")
    assert isinstance(info.value, ApiError) and info.value.status == 0
    assert str(info.value).startswith(f"cannot reach the robustness server at {url} (connection failed")
    assert len(clock.sleeps) == 4


def test_wait_reports_progress_and_returns_the_final_state(api, fake, clock, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"m")
    model = api.upload_model(path)
    spec = {"attacks": [{"name": "pgd", "eps": [0.1], "norm": "linf"}], "gates": []}
    evaluation = api.submit(spec, model["id"], "ds_x")
    seen = []
    final = api.wait(evaluation["id"], poll_interval=0.25, on_progress=seen.append)
    assert final["state"] == "succeeded" and final["passed"] is True
    assert [(e["state"], e["progress"]["done"]) for e in seen] == [
        ("running", 0), ("running", 2), ("running", 4), ("succeeded", 4)]
    # the polls after the first are long polls; this fake answers them at once, as a server
    # without long polls would, and the client keeps the poll interval itself
    polls = [r for r in fake.requests if r.url.path == f"/v1/evaluations/{evaluation['id']}"]
    assert [r.url.params.get("wait") for r in polls] == [None, "0.25", "0.25", "0.25"]
    assert clock.sleeps == [0.25] * 2
    assert api.result(final["id"])["clean_accuracy"] == pytest.approx(0.97)
    assert api.artifacts(final["id"]) == [{"name": "universal.npz", "size": len(fake.artifact_bytes)}]
    dest = api.download_artifact(final["id"], "universal.npz", tmp_path / "u.npz")
    assert dest.read_bytes() == fake.artifact_bytes and not (tmp_path / "u.npz.part").exists()


def test_result_before_success_is_a_conflict_and_wait_times_out(api, fake, clock, tmp_path):
    fake.outcome = "never"
    path = tmp_path / "m.onnx"
    path.write_bytes(b"m")
    evaluation = api.submit({"attacks": []}, api.upload_model(path)["id"], "ds_x")
    with pytest.raises(ApiError) as info:
        api.result(evaluation["id"])
    assert (info.value.status, info.value.type) == (409, "conflict")
    with pytest.raises(WaitTimeout) as timeout:
        api.wait(evaluation["id"], poll_interval=1.0, timeout=2.5)
    assert "did not finish within 2.5s (state running, stage pgd" in str(timeout.value)
    assert clock.sleeps == [1.0, 1.0, 0.5]
    assert api.cancel(evaluation["id"])["state"] == "cancelled"


def test_a_deadline_bounds_each_requests_timeouts_and_its_retries(api, fake, clock, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"m")
    evaluation = api.submit({"attacks": []}, api.upload_model(path)["id"], "ds_x")
    fake.requests.clear()
    api.deadline = clock.now + 3
    fake.faults = [httpx.ConnectError("refused")] * 10
    with pytest.raises(ServerUnreachable):
        api.get_evaluation(evaluation["id"], wait=2)
    assert clock.sleeps == [0.5, 1.0]  # a third retry, 2 s later, would start past the deadline
    timeouts = [r.extensions["timeout"] for r in fake.requests]
    assert timeouts[0] == {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}  # 3 s left + GRACE_S
    assert timeouts[-1]["read"] == 3.5  # 1.5 s left
    api.deadline = None
    fake.faults = [httpx.ConnectError("refused")]
    api.get_evaluation(evaluation["id"], wait=2)
    unbounded = fake.requests[-1].extensions["timeout"]
    assert (unbounded["connect"], unbounded["read"]) == (5.0, 32.0)


def test_a_404_for_the_path_itself_hints_at_the_server_url(api, fake):
    fake.faults = [httpx.Response(404, text="<html><body>nginx</body></html>")]
    with pytest.raises(ApiError) as info:
        api.list_evaluations()
    assert "the server URL http://robustness.test is probably wrong" in str(info.value)
    with pytest.raises(ApiError) as info:
        api.get_model("mdl_missing")  # a record the server lacks: no hint
    assert info.value.hint == ""
