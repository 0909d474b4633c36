"""Compute budgets at submission: the cost estimate in the response, a 422 naming the bound
and its setting for each parameter over its bound, and the per-tenant quota (429)."""

from __future__ import annotations

import pytest

from infra.database import migrate, session_factory
from schemas.evaluation import EvaluationSpec
from service.auth import create_key
from tests.service.conftest import DATA, MODEL, gateway, make_settings, upload
from workers.cost import estimate
from workers.spec_checks import check_spec

PGD = {"name": "pgd", "eps": [0.05, 0.1], "steps": 40}


def _submit(api, ids, attacks, headers=None, **extra):
    body = {"model_id": ids[0], "dataset_id": ids[1], "samples": 20, "attacks": attacks, **extra}
    return api.post("/v1/evaluations", json=body, headers=headers or {})


def _uploaded(api, headers=None):
    return (upload(api, "models", MODEL, headers).json()["id"],
            upload(api, "datasets", DATA, headers).json()["id"])


def test_the_response_carries_the_cost_estimate(tmp_path):
    with gateway(make_settings(tmp_path / "data")) as api:
        ids = _uploaded(api)
        accepted = _submit(api, ids, [PGD, {"name": "fgsm", "eps": 0.1, "targets": "all"}])
        assert accepted.status_code == 202, accepted.text
        # the clean pass, PGD's 2 budgets x (40 steps + the final scores), FGSM at 9 targets x 2 calls
        assert accepted.json()["cost"] == 20 + 20 * 2 * 41 + 20 * 9 * 2
        assert api.get(f"/v1/evaluations/{accepted.json()['id']}").json()["cost"] == accepted.json()["cost"]


def test_the_estimate_counts_defenses_transfer_and_fooling():
    spec = check_spec(EvaluationSpec.model_validate({
        "samples": 10, "attacks": [{"name": "bim", "eps": [0.1], "steps": 4}],
        "defenses": [{"name": "gaussian_noise", "sigma": 0.1, "eot_samples": 3, "curve": [0.1, 0.2]}],
        "transfer": {"models": {"other": "md_x"}, "attacks": [{"name": "fgsm", "eps": [0.1, 0.2]}]},
        "fooling": {"samples": 5, "steps": 2},
    }))
    cost = estimate(spec, 100, 10)
    runs = 1  # one BIM budget
    assert cost.parts == {
        "clean": 10,
        "bim": 10 * 5,
        # clean + the attack's examples, adaptive EOT (3 draws of BIM's 5 calls), the curve's 2 points
        "defense:gaussian_noise": 10 * (1 + runs + 5 * 3 + 2 * (1 + runs)),
        # two sources (the model and `other`) crafting 2 budgets x 2 calls, each example on 2 targets
        "transfer": 10 * 2 * (2 * 2 + 2 * 2),
        "fooling": 5 * (1 + 10 * 3),
    }
    assert cost.total == sum(cost.parts.values())


@pytest.mark.parametrize("attack, setting", [
    ({**PGD, "steps": 10**9}, "ROBUSTNESS_MAX_STEPS"),
    ({**PGD, "steps": 2**53}, "ROBUSTNESS_MAX_STEPS"),  # the largest number a spec takes, not yet converted
    ({**PGD, "restarts": 10**6}, "ROBUSTNESS_MAX_RESTARTS"),
    ({"name": "square", "eps": 0.1, "queries": 10**12}, "ROBUSTNESS_MAX_QUERIES"),
    ({"name": "autoattack", "eps": 0.1, "square_queries": 10**7}, "ROBUSTNESS_MAX_QUERIES"),
    ({"name": "cw_l2", "max_iter": 10**9}, "ROBUSTNESS_MAX_ITERATIONS"),
    ({"name": "deepfool", "max_iter": 10**9}, "ROBUSTNESS_MAX_ITERATIONS"),
    ({"name": "fgsm", "eps": [i / 100_000 for i in range(100_000)]}, "ROBUSTNESS_MAX_EPS_VALUES"),
], ids=["steps", "steps_2_53", "restarts", "queries", "square_queries", "cw_max_iter", "deepfool_max_iter",
        "eps_values"])
def test_a_parameter_over_its_bound_is_refused_naming_the_setting(tmp_path, attack, setting):
    with gateway(make_settings(tmp_path / "data")) as api:
        refused = _submit(api, _uploaded(api), [attack])
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert body["type"] == "over_budget" and setting in body["detail"] and "attacks[0]" in body["detail"]
        assert api.get("/v1/evaluations").json()["count"] == 0  # nothing queued


@pytest.mark.parametrize("attack, change, field", [
    ({**PGD, "label": "a" * 200_000}, {}, "attacks.0.label"),  # drawn in the report's plots
    ({**PGD, "name": "p" * 200_000}, {}, "attacks.0.name"),
    (PGD, {"defenses": [{"name": "pca", "fit_dataset": "ds_" * 100_000}]}, "defenses.0.fit_dataset"),
    (PGD, {"transfer": {"models": {"other": "md_" * 100_000}, "attacks": [PGD]}}, "transfer.models.other"),
], ids=["label", "name", "fit_dataset", "transfer_model"])
def test_free_text_in_a_spec_is_bounded(tmp_path, attack, change, field):
    with gateway(make_settings(tmp_path / "data")) as api:
        refused = _submit(api, _uploaded(api), [attack], **change)
        assert refused.status_code == 422, refused.text
        assert field in refused.text and "String should have at most" in refused.text, refused.text[:300]


def test_too_many_attacks_and_too_costly_a_job_are_refused(tmp_path):
    with gateway(make_settings(tmp_path / "data", max_attacks=3, max_job_cost=1000)) as api:
        ids = _uploaded(api)
        many = _submit(api, ids, [{"name": "fgsm", "eps": 0.1, "label": f"f{i}"} for i in range(4)])
        assert many.status_code == 422 and "ROBUSTNESS_MAX_ATTACKS" in many.json()["detail"]
        costly = _submit(api, ids, [PGD])
        assert costly.status_code == 422 and "ROBUSTNESS_MAX_JOB_COST" in costly.json()["detail"], costly.text
        assert "'pgd'" in costly.json()["detail"]  # the largest part is named
        assert _submit(api, ids, [{"name": "fgsm", "eps": 0.1}]).status_code == 202


def test_a_tenant_over_its_quota_waits_while_another_tenant_submits(tmp_path):
    settings = make_settings(tmp_path / "data", tenant_cost_quota=4000)
    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        alice, bob = ({"Authorization": f"Bearer {create_key(db, name)}"} for name in ("alice", "bob"))
    with gateway(settings) as api:
        ids = _uploaded(api, alice)
        first = _submit(api, ids, [PGD], alice)  # 1660 each: two fit in 4000, a third does not
        assert first.status_code == 202 and first.json()["cost"] == 1660
        assert _submit(api, ids, [PGD], alice, seed=1).status_code == 202
        waiting = _submit(api, ids, [PGD], alice, seed=2)
        assert waiting.status_code == 429 and waiting.headers["Retry-After"] == "30"
        assert waiting.json()["type"] == "over_quota"
        assert "ROBUSTNESS_TENANT_COST_QUOTA" in waiting.json()["detail"]
        assert _submit(api, _uploaded(api, bob), [PGD], bob).status_code == 202  # bob has his own quota
        assert api.post(f"/v1/evaluations/{first.json()['id']}/cancel", headers=alice).status_code == 200
        assert _submit(api, ids, [PGD], alice, seed=2).status_code == 202  # a cancelled job frees its share
        too_big = _submit(api, ids, [{**PGD, "eps": [0.1] * 10}], alice)
        assert too_big.status_code == 422 and "ROBUSTNESS_TENANT_COST_QUOTA" in too_big.json()["detail"]
