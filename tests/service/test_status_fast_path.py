"""Status polls answered before routing (service/status_fast_path.py) answer exactly what the
declared route answers: the same body for the owner, the same JSON errors for a wrong key and
another tenant's id, and anything unusual (a bad or extra query parameter, another path) goes
to the route, which validates it."""

from __future__ import annotations

import re

from tests.service.conftest import DATA, MODEL, gateway, make_settings, tenant_headers, upload
from tests.service.test_api import spec


def _polls(api, path: str) -> float:
    text = api.get("/metrics").text
    found = re.search(rf'robustness_status_polls_total{{path="{path}"}} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def test_fast_polls_answer_what_the_route_answers(tmp_path):
    settings = make_settings(tmp_path / "data")
    a, b = tenant_headers(settings, "alice", "bob")
    with gateway(settings) as api:
        ids = [upload(api, kind, path, headers=a).json()["id"] for kind, path in (("models", MODEL),
                                                                                 ("datasets", DATA))]
        job_id = api.post("/v1/evaluations", json=spec(*ids), headers=a).json()["id"]
        url = f"/v1/evaluations/{job_id}"
        cases = [  # (fast request, the same through the route: an extra parameter sends it there)
            ({"headers": a}, {"headers": a, "params": {"x": "1"}}),
            ({"headers": a, "params": {"wait": "0.01"}},
             {"headers": a, "params": {"wait": "0.01", "x": "1"}}),
            ({"headers": b}, {"headers": b, "params": {"x": "1"}}),
            ({"headers": {"Authorization": "Bearer rk_wrong"}},
             {"headers": {"Authorization": "Bearer rk_wrong"}, "params": {"x": "1"}}),
        ]
        for fast, routed in cases:
            before = (_polls(api, "fast"), _polls(api, "routed"))
            one, two = api.get(url, **fast), api.get(url, **routed)
            assert (one.status_code, one.json()) == (two.status_code, two.json()), (fast, one.text, two.text)
            assert one.headers["content-type"] == two.headers["content-type"] == "application/json"
            assert one.headers["x-request-id"]
            if one.status_code == 200:  # errors are counted by neither
                assert (_polls(api, "fast"), _polls(api, "routed")) == (before[0] + 1, before[1] + 1)
        assert api.get(url, headers=a).json()["state"] == "queued"
        for bad in ("31", "nan", "-1", "abc"):  # the route validates: 422 naming wait
            answer = api.get(url, headers=a, params={"wait": bad})
            assert answer.status_code == 422 and "wait" in answer.text, (bad, answer.text)
        assert api.get("/v1/evaluations/ev_x/result", headers=a).status_code == 404  # other paths: routed
