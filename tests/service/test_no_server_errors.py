"""No input reaches a 5xx: NaN, infinity and NUL anywhere in a request are refused with a 422
that names the field, on SQLite and on PostgreSQL; an unexpected error answers JSON with the
request id the log carries; and a bounded schemathesis run against the OpenAPI document finds
no server error and no response outside the documented statuses and schemas."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import DATA, MODEL, gateway, make_settings, upload


@pytest.fixture(params=["sqlite", "postgresql"])
def any_settings(request, tmp_path):
    if request.param == "sqlite":
        return make_settings(tmp_path / "data")
    return request.getfixturevalue("distributed_settings")


BAD_SPECS = [
    ({"gates": [{"metric": "clean_accuracy", "min": "NaN"}]}, "gates[0].min: nan is not a JSON number"),
    ({"attacks": [{"name": "pgd", "eps": [0.1], "steps": "Infinity"}]}, "attacks[0].steps: inf is not"),
    ({"attacks": [{"name": "fgsm", "eps": [0.1], "label": "a\u0000b"}]}, "attacks[0].label: contains a NUL"),
    ({"defenses": [{"name": "gaussian_noise", "sigma": 0.1, "label": "x", "extra": {"k\u0000": 1}}]},
     "defenses[0].extra: a key contains a NUL"),
    ({"input": {"mean": ["-Infinity"]}}, "input.mean[0]: -inf is not a JSON number"),
    ({"attacks": [{"name": "pgd", "eps": [0.1], "steps": 10**400}]}, "attacks[0].steps: a number larger"),
    ({"seed": 2**64}, "seed: a number larger than 2**53"),
    ({"input": {"range": [0, 1e300]}}, "input.range[1]: a number larger than 2**53"),
]


def _raw(body: dict) -> bytes:
    """JSON with the NaN/Infinity tokens Python's parser accepts (sent unquoted, as a client
    writing them would)."""
    text = json.dumps(body)
    for token in ("NaN", "Infinity", "-Infinity"):
        text = text.replace(f'"{token}"', token)
    return text.encode()


@pytest.mark.parametrize("change, message", BAD_SPECS, ids=["nan", "inf", "nul", "nul-key", "neg-inf",
                                                            "huge-steps", "huge-seed", "huge-float"])
def test_nan_infinity_and_nul_are_refused_naming_the_field(any_settings, change, message):
    with gateway(any_settings) as api:
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        body = {"model_id": model["id"], "dataset_id": dataset["id"], "samples": 10,
                "attacks": [{"name": "fgsm", "eps": [0.1]}], **change}
        response = api.post("/v1/evaluations", content=_raw(body),
                            headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"], response.json()
        assert api.get("/v1/evaluations").json()["count"] == 0


def test_nul_in_names_ids_and_filters_is_a_4xx(any_settings):
    with gateway(any_settings) as api:
        named = upload(api, "models", MODEL, name="digits\u0000cnn")
        assert named.status_code == 422 and "control characters" in named.json()["detail"]
        assert upload(api, "datasets", DATA, name="tab\there").status_code == 422
        assert api.get("/v1/evaluations", params={"model_id": "mdl_\u0000"}).status_code == 422
        assert api.get("/v1/evaluations/ev_%00x").status_code == 404
        assert api.get("/v1/models/mdl_%00x").status_code == 404
        assert api.delete("/v1/datasets/ds_%00x").status_code == 404


def test_an_unexpected_error_answers_json_with_the_request_id_the_log_has(tmp_path, monkeypatch, caplog):
    from infra import jobs
    from service.app import create_app

    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        job = api.post("/v1/evaluations", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                "attacks": [{"name": "fgsm", "eps": [0.1]}]}).json()

        def broken(db, job_ids):
            raise RuntimeError("a bug, not the user's")

        monkeypatch.setattr(jobs, "statuses", broken)
        with caplog.at_level(logging.ERROR, logger="robustness.gateway"):
            response = api.get(f"/v1/evaluations/{job['id']}", headers={"X-Request-ID": "ci-run-42"})
    assert response.status_code == 500
    body = response.json()
    assert body["type"] == "internal_error" and body["request_id"] == "ci-run-42"
    assert "ci-run-42" in body["detail"] and response.headers["x-request-id"] == "ci-run-42"
    assert any("request_id=ci-run-42" in r.getMessage() and r.exc_info for r in caplog.records)


def test_every_answer_carries_a_request_id(tmp_path):
    with gateway(make_settings(tmp_path / "data")) as api:
        first, second = api.get("/healthz"), api.get("/v1/models/nope")
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        assert api.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["x-request-id"] != "bad id!"


def test_the_openapi_document_lists_every_error_with_its_model(tmp_path):
    with gateway(make_settings(tmp_path / "data")) as api:
        document = api.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(document)  # a 422 body the service never sends
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert {"401", "404", "422", "500"} <= codes, (method, path, codes)
            for code in codes - {"200", "201", "202", "204"}:
                schema = operation["responses"][code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)


SCHEMATHESIS_EXAMPLES = 60  # per operation: bounded, well under a minute per backend


def _schemathesis_run(app, ids: dict[str, str]) -> tuple[int, list[str], dict[int, int]]:
    """Every operation of the app's OpenAPI document, ``SCHEMATHESIS_EXAMPLES`` generated
    requests each, sent to the app in process; half of the time the generated path ids and body
    ids are swapped for real ones and the generated credentials dropped, so hostile specs and
    queries reach real objects. Returns (requests sent, failures, answers per status)."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck
    from hypothesis import strategies as st
    from schemathesis.checks import Failure, FailureGroup, not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    statuses: dict[int, int] = {}

    for loaded in schema.get_all_operations():
        operation = loaded.ok()

        @hypothesis.given(case=operation.as_strategy(), real=st.booleans())
        @hypothesis.settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None,
                             derandomize=True, suppress_health_check=list(HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def one(case, real):
            if real:
                for name in case.path_parameters or {}:
                    case.path_parameters[name] = ids.get(name, case.path_parameters[name])
                if isinstance(case.body, dict):
                    case.body.update({k: v for k, v in ids.items() if k in case.body})
                for name in [h for h in case.headers or {} if h.lower() == "authorization"]:
                    del case.headers[name]  # the open (loopback) tenant, who owns the ids
            response = case.call()
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            try:
                case.validate_response(response, checks=checks)
            except (Failure, FailureGroup, AssertionError) as failure:  # collected, all reported
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{str(failure)[:300]}")

        one()
    return sum(statuses.values()), failures, statuses


def test_schemathesis_finds_no_server_error_and_no_schema_violation(any_settings):
    from service.app import create_app

    # the job below stays queued (no worker): long polls of it wait at most 0.05 s here
    app = create_app(any_settings.model_copy(update={"max_status_wait_s": 0.05}))
    with TestClient(app) as api:  # its lifespan migrates the database for the run below
        model = upload(api, "models", MODEL).json()
        dataset = upload(api, "datasets", DATA).json()
        job = api.post("/v1/evaluations", json={"model_id": model["id"], "dataset_id": dataset["id"],
                                                "attacks": [{"name": "fgsm", "eps": [0.1]}]}).json()
        ids = {"model_id": model["id"], "dataset_id": dataset["id"], "evaluation_id": job["id"]}
        operations = sum(len(ops) for ops in api.get("/openapi.json").json()["paths"].values())
        sent, failures, statuses = _schemathesis_run(app, ids)
    print(f"schemathesis: {sent} requests over {operations} operations, {len(failures)} failures, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert sent >= SCHEMATHESIS_EXAMPLES * operations // 2, sent
    assert not failures, "\n".join(failures[:20])
