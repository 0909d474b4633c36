"""Adding an attack is one class and its registration: an L1 attack defined here runs through
the spec, the gateway, the shard runner and the report without a change anywhere else.

The attack is registered for these tests only (the registry is process-wide), and the shards
run in this process (jobrunner.shards.run_shard, as a Celery worker runs them): a worker
subprocess would import the registry without it.
"""

from __future__ import annotations

import numpy as np
import pytest

from schemas.evaluation import EvaluationSpec
from tests.service.conftest import DATA, MODEL, env_for, gateway, make_settings, upload
from workers.attacks import ATTACKS
from workers.attacks.base import Attack, AttackRun, clip_to_box
from workers.dataset_files import load_dataset_file
from workers.evaluate import evaluate
from workers.report import render_report
from workers.spec_checks import check_spec


class L1Descent(Attack):
    """Steepest ascent in L1: each step moves the ``k`` pixels of largest |gradient| by
    ``step`` in their gradient's sign, within an L1 ball of radius eps (a toy, for the test)."""

    name = "test_l1_descent"
    kind = "iterative"
    norm = "l1"
    norms = ("l1",)

    def __init__(self, *, steps: int = 10, k: int = 20):
        self.steps, self.k = int(steps), int(k)

    def run(self, model, x, y, eps, targets, bounds, rng, progress) -> AttackRun:
        flat_x = x.reshape(len(x), -1)
        delta = np.zeros_like(flat_x)
        step = eps / (self.steps * self.k)
        for _ in range(self.steps):
            _, _, grad = model.loss_and_grad((flat_x + delta).reshape(x.shape), y)
            g = grad.reshape(len(x), -1)
            top = np.argsort(-np.abs(g), axis=1)[:, :self.k]
            rows = np.arange(len(x))[:, None]
            delta[rows, top] += step * np.sign(g[rows, top])
            delta = clip_to_box(flat_x + delta, bounds) - flat_x
        x_adv = (flat_x + delta).reshape(x.shape)
        return AttackRun(eps=eps, x_adv=x_adv, success=model.logits(x_adv).argmax(1) != y)


@pytest.fixture
def registered():
    ATTACKS[L1Descent.name] = L1Descent
    yield L1Descent
    del ATTACKS[L1Descent.name]


SPEC = {"samples": 40, "shard_size": 25,
        "attacks": [{"name": "test_l1_descent", "eps": [2.0, 6.0], "steps": 5, "norm": "l1"},
                    {"name": "fgsm", "eps": 0.1}],
        "gates": [{"metric": "robust_accuracy", "attack": "test_l1_descent", "eps": 6.0, "norm": "l1",
                   "max": 0.9}]}


def test_an_attack_defined_here_runs_through_the_spec_the_service_and_the_report(registered, tmp_path,
                                                                               monkeypatch):
    spec = check_spec(EvaluationSpec.model_validate(SPEC))
    with pytest.raises(ValueError, match="`norm` must be one of l1"):
        check_spec(EvaluationSpec.model_validate({"attacks": [{**SPEC["attacks"][0], "norm": "l2"}]}))
    local = evaluate(MODEL.read_bytes(), load_dataset_file(DATA), spec).result
    l1 = [e for e in local.attacks if e.attack == "test_l1_descent"]
    assert [e.norm for e in l1] == ["l1", "l1"] and l1[1].robust_accuracy < l1[0].robust_accuracy
    assert l1[0].details["gradient_stats"]["loss"] == "margin" and l1[0].warnings == []
    assert local.gates[0].verdict == "passed"
    assert 'alt="robust accuracy against l1 budget"' in render_report(local)

    settings = make_settings(tmp_path / "data")
    for name, value in env_for(settings).items():
        if name.startswith("ROBUSTNESS_"):
            monkeypatch.setenv(name, value)
    from infra import settings as settings_module
    from jobrunner import shards

    settings_module.get_settings.cache_clear()  # the shard runner reads the environment's settings
    shards._store.cache_clear()
    try:
        with gateway(settings) as api:
            model = upload(api, "models", MODEL).json()
            dataset = upload(api, "datasets", DATA).json()
            job = api.post("/v1/evaluations", json={**SPEC, "model_id": model["id"],
                                                    "dataset_id": dataset["id"]}).json()
            assert job["state"] == "queued", job
            for position in range(job["shards"] + 1):  # the shards, then the aggregation
                shards.run_shard(job["id"], position)
            status = api.get(f"/v1/evaluations/{job['id']}").json()
            assert (status["state"], status["verdict"]) == ("succeeded", "passed"), status
            served = api.get(f"/v1/evaluations/{job['id']}/result").json()
            served.pop("timing")
            assert served == local.model_dump(mode="json", exclude={"timing"})
            report = api.get(f"/v1/evaluations/{job['id']}/report")
            assert report.status_code == 200 and "test_l1_descent" in report.text
            assert 'alt="robust accuracy against l1 budget"' in report.text
    finally:
        settings_module.get_settings.cache_clear()
        shards._store.cache_clear()
