"""An evaluation split into units: the plan, units run apart and serialized, then aggregated."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from schemas.evaluation import EvaluationResult, EvaluationSpec, GateSpec
from tests import digits
from workers.datasets import Dataset
from workers.evaluate import evaluate, finish, run_unit
from workers.gates import evaluate_gate
from workers.plan import plan, unit_work
from workers.units import UnitOutput, UnitOutputError, WorkUnit

ATTACKS = [
    {"name": "fgsm", "eps": [0.05, 0.1]},
    {"name": "pgd", "eps": 0.1, "steps": 3, "random_start": True, "targeted": True},
    {"name": "deepfool", "max_iter": 10},
    {"name": "autoattack", "eps": 0.05, "steps": 3, "square_queries": 10, "n_target_classes": 2},
    {"name": "universal", "eps": 2.0, "norm": "l2", "max_passes": 1},
    {"name": "square", "eps": 0.1, "queries": 10},
    {"name": "lbfgs", "search_steps": 1, "max_iter": 3},  # two arrays: targets and const
]


@pytest.fixture(scope="module")
def model() -> bytes:
    return digits.onnx_bytes("fc100")


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    _, _, x, y = digits.digits()
    return Dataset(x=x[:60], y=y[:60], source_dtype="float32")


def make_spec(**overrides) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"samples": 50, "shard_size": 20, "seed": 1, "attacks": ATTACKS,
                                         **overrides})


def apart(model, dataset, spec) -> list[UnitOutput]:
    """Each unit on its own, through bytes, as the service's workers run them."""
    return [UnitOutput.from_bytes(run_unit(model, dataset, spec, unit).to_bytes())
            for unit in plan(spec, len(dataset.x))]


def test_plan_shards_the_selected_samples_and_adds_one_whole_unit_for_universal_attacks():
    units = plan(make_spec(), 60)
    per_sample = (0, 1, 2, 3, 5, 6)
    assert units == [WorkUnit(0, 0, 20, per_sample, "shard"), WorkUnit(1, 20, 40, per_sample, "shard"),
                     WorkUnit(2, 40, 50, per_sample, "shard"), WorkUnit(3, 0, 50, (4,), "whole")]
    assert [u.samples for u in plan(make_spec(samples="all", attacks=[]), 60)] == [20, 20, 20]
    assert plan(make_spec(samples=500, shard_size=250, attacks=[]), 60) == [WorkUnit(0, 0, 60, (), "shard")]
    # samples x budgets per stage, the clean pass included
    assert unit_work(make_spec(), units[2]) == 10 * (1 + 2 + 1 + 1 + 1 + 1 + 1)
    assert unit_work(make_spec(), units[3]) == 50


def test_units_run_apart_and_serialized_give_exactly_the_result_of_evaluate(model, dataset):
    spec = make_spec(gates=[{"metric": "robust_accuracy", "attack": "fgsm", "min": 0.0}])
    together = evaluate(model, dataset, spec)
    outputs = apart(model, dataset, spec)
    separate = finish(model, dataset, spec, outputs[::-1])  # in any order
    assert (separate.result.model_dump_json(exclude={"timing"})
            == together.result.model_dump_json(exclude={"timing"}))
    assert separate.result.model_dump(exclude={"timing"}) == together.result.model_dump(exclude={"timing"})
    assert list(separate.artifacts) == list(together.artifacts)
    for name, array in together.artifacts.items():
        assert separate.artifacts[name].dtype == array.dtype
        np.testing.assert_array_equal(separate.artifacts[name], array, err_msg=name)
    assert {"fgsm", "pgd", "universal", "total", "finish"} <= set(together.result.timing)


def test_artifacts_hold_the_adversarial_examples_of_every_run_over_all_samples(model, dataset):
    artifacts = evaluate(model, dataset, make_spec()).artifacts
    assert {"fgsm@0.05/x_adv", "fgsm@0.1/x_adv", "pgd@0.1/x_adv", "deepfool/x_adv",
            "universal@2/x_adv", "universal@2/perturbation", "autoattack@0.05/broken_by"} <= set(artifacts)
    assert artifacts["pgd@0.1/x_adv"].shape == (50, 1, 28, 28)
    assert artifacts["pgd@0.1/x_adv"].dtype == np.float32
    assert artifacts["universal@2/perturbation"].shape == (1, 28, 28)
    assert artifacts["autoattack@0.05/broken_by"].dtype.kind == "U"  # strings, never objects
    assert np.abs(artifacts["fgsm@0.05/x_adv"] - dataset.x[:50]).max() <= 0.05 + 1e-6


def test_a_unit_run_twice_gives_identical_bytes(model, dataset):
    spec = make_spec()
    for unit in plan(spec, len(dataset.x))[1:4:2]:  # a shard and the whole unit
        first, second = run_unit(model, dataset, spec, unit), run_unit(model, dataset, spec, unit)
        assert first.to_bytes() == second.to_bytes()
        # timing stays out of the bytes; it travels beside them
        assert UnitOutput.from_bytes(first.to_bytes(), timing=first.timing).timing == first.timing != {}


def test_the_shard_size_changes_the_randomness_but_not_the_validity(model, dataset):
    attacks = [{"name": "pgd", "eps": 0.1, "steps": 3, "random_start": True}]
    small = evaluate(model, dataset, make_spec(attacks=attacks, shard_size=1)).result
    large = evaluate(model, dataset, make_spec(attacks=attacks, shard_size=1000)).result
    assert small.clean_accuracy == large.clean_accuracy
    assert small.dataset == large.dataset
    entries = small.attacks[0], large.attacks[0]
    assert all(e.samples == 50 and 0 <= e.robust_accuracy <= small.clean_accuracy for e in entries)
    assert all(e.mean_linf is None or e.mean_linf <= 0.1 + 1e-6 for e in entries)
    assert entries[0].model_dump() != entries[1].model_dump()  # other random starts


def test_autoattack_accuracies_merge_weighted_by_the_shard_sizes(model, dataset):
    spec = make_spec(samples=30, attacks=[ATTACKS[3]])  # shards of 20 and 10 samples
    outputs = apart(model, dataset, spec)
    per_shard = [o.runs[0].extra["robust_accuracy"] for o in outputs]
    merged = finish(model, dataset, spec, outputs).result.attacks[0].details["robust_accuracy"]
    assert list(merged) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]  # the components' order
    for component, value in merged.items():
        assert value == pytest.approx((20 * per_shard[0][component] + 10 * per_shard[1][component]) / 30)
    success = np.concatenate([o.runs[0].success for o in outputs])
    assert merged["square"] == pytest.approx(1 - success.mean())


def test_finish_refuses_outputs_that_are_not_the_plan(model, dataset):
    spec = make_spec(attacks=[ATTACKS[0]])
    outputs = apart(model, dataset, spec)
    with pytest.raises(ValueError, match="plan"):
        finish(model, dataset, spec, outputs[:-1])
    with pytest.raises(ValueError, match="not a unit of this spec's plan"):
        run_unit(model, dataset, spec, WorkUnit(0, 0, 7, (0,), "shard"))


@pytest.mark.parametrize("data", [b"", b"garbage", b"PK\x03\x04 truncated", "npy"])
def test_from_bytes_refuses_what_is_not_a_unit_output(data):
    if data == "npy":  # a valid .npz, but not ours
        buffer = io.BytesIO()
        np.savez(buffer, x=np.zeros(3))
        data = buffer.getvalue()
    with pytest.raises(UnitOutputError, match="not a serialized unit output"):
        UnitOutput.from_bytes(data)


def test_from_bytes_never_loads_pickles():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        member = io.BytesIO()
        np.save(member, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        archive.writestr("meta.npy", member.getvalue())
    with pytest.raises(UnitOutputError, match="pickle"):
        UnitOutput.from_bytes(buffer.getvalue())


# ---------------------------------------------------------------------------- baseline gates


def raised_by(result: EvaluationResult, amount: float) -> EvaluationResult:
    """``result`` with every robust accuracy higher by ``amount``: a better earlier model."""
    attacks = [a.model_copy(update={"robust_accuracy": a.robust_accuracy + amount}) for a in result.attacks]
    return result.model_copy(update={"attacks": attacks})


def test_baseline_gates_pass_within_max_drop_and_fail_beyond_or_without_the_metric(model, dataset):
    result = evaluate(model, dataset, make_spec(attacks=[ATTACKS[0]])).result
    baselines = {"earlier": raised_by(result, 0.1), "empty": result.model_copy(update={"attacks": []})}

    def gate(baseline="earlier", **fields):
        spec = GateSpec(metric="robust_accuracy", attack="fgsm", baseline=baseline, **fields)
        return evaluate_gate(spec, result.clean_accuracy, result.attacks, baselines)

    kept = gate(max_drop=0.1)
    assert kept.passed and kept.value == result.attacks[-1].robust_accuracy  # the largest eps
    assert kept.baseline_value == pytest.approx(kept.value + 0.1)
    dropped = gate(max_drop=0.05)
    assert not dropped.passed and "dropped by 0.1 from the baseline" in dropped.reason
    assert not gate(max_drop=0.1, min=0.99).passed  # the bounds still hold
    assert gate(max_drop=0.1, eps=0.3).reason == "no result of fgsm at eps=0.3 norm=None"
    assert gate("empty", max_drop=0.1).reason == "baseline 'empty': no result of fgsm at eps=None norm=None"
    assert gate("other", max_drop=0.1).reason == "the baseline 'other' is not available"


def test_a_baseline_gate_needs_max_drop_and_no_bounds():
    assert GateSpec(metric="clean_accuracy", baseline="e1", max_drop=0.01).min is None
    with pytest.raises(ValueError, match="`baseline` and `max_drop` go together"):
        GateSpec(metric="clean_accuracy", baseline="e1")
    with pytest.raises(ValueError, match="go together"):
        GateSpec(metric="clean_accuracy", max_drop=0.1, min=0.5)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        GateSpec(metric="clean_accuracy", baseline="e1", max_drop=-0.1)
