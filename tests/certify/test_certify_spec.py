"""`certify` in an evaluation: the bracket certified <= attacked per budget, gates on
certified_accuracy, and a model without bound rules reported as unavailable while the rest runs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from schemas.evaluation import EvaluationSpec
from tests import digits
from tests.certify.test_crown import MaxOfPairs
from tests.zoo import export_onnx
from workers.cost import estimate
from workers.datasets import Dataset
from workers.evaluate import evaluate

SPEC = {
    "samples": 150,
    "attacks": [{"name": "pgd", "eps": [0.01, 0.03], "steps": 10}],
    "certify": {"eps": [0.0, 0.01, 0.03]},
    "gates": [
        {"metric": "certified_accuracy", "attack": "ibp", "eps": 0.01, "min": 0.05},
        {"metric": "certified_accuracy", "attack": "ibp", "eps": 0.03, "min": 0.5},
    ],
}


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    _, _, x, y = digits.digits()
    return Dataset(x=x, y=y, source_dtype="float32")


def test_the_bracket_and_the_gates(dataset):
    result = evaluate(digits.onnx_bytes("cnn"), dataset, EvaluationSpec.model_validate(SPEC)).result
    section = result.certify
    assert section is not None and section.available
    by_eps = {e.eps: e for e in section.entries}
    assert by_eps[0.0].certified_accuracy == pytest.approx(result.clean_accuracy)
    for eps in (0.01, 0.03):
        entry = by_eps[eps]
        attacked = min(a.robust_accuracy for a in result.attacks if a.eps == eps)
        assert entry.attacked_accuracy == attacked
        assert entry.certified_accuracy <= attacked
        assert entry.certified + entry.broken + entry.unknown == entry.samples == 150
    assert by_eps[0.01].certified_accuracy > by_eps[0.03].certified_accuracy
    assert [g.verdict for g in result.gates] == ["passed", "failed"]
    assert "certify" in result.timing


def test_a_model_without_bound_rules_is_reported_and_the_rest_runs(dataset):
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["h"], transB=1),
         helper.make_node("Sin", ["h"], ["logits"])],
        "sin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (10, 784)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    spec = EvaluationSpec.model_validate({**SPEC, "gates": SPEC["gates"][:1]})
    result = evaluate(model.SerializeToString(), dataset, spec).result
    assert result.certify is not None and not result.certify.available
    assert "operator Sin" in result.certify.reason and "has no interval-bound rule" in result.certify.reason
    assert len(result.attacks) == 2  # the attacks still ran
    assert result.gates[0].verdict == "failed" and "is certify available" in result.gates[0].reason


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"certify": {"eps": [-0.1]}}, "certify.eps values must be finite and >= 0"),
        ({"certify": {"eps": [0.1], "methods": ["crown_full"]}}, "Input should be 'ibp'"),
        ({"gates": [{"metric": "certified_accuracy", "attack": "pgd", "eps": 0.01, "min": 0.1}]},
         "certified_accuracy reads a `certify` method as its `attack`; 'pgd' is not among certify.methods"),
    ],
)
def test_bad_certify_specs_are_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        EvaluationSpec.model_validate({**SPEC, **change})


def test_the_cost_counts_the_bounds():
    cost = estimate(EvaluationSpec.model_validate(SPEC), 1000, 10)
    assert cost.parts["certify"] == 150 * 3 * 4  # IBP: about four forward passes per budget
    both = EvaluationSpec.model_validate({**SPEC, "certify": {"eps": [0.01],
                                                              "methods": ["ibp", "alpha_crown"]}})
    assert estimate(both, 1000, 10).parts["certify"] == 150 * (4 + 24 * 41)


def test_the_report_shows_the_bracket_and_the_unavailable_reason(dataset):
    from workers.report import render_report

    result = evaluate(digits.onnx_bytes("cnn"), dataset, EvaluationSpec.model_validate(SPEC)).result
    html = render_report(result)
    section = html[html.index('<section id="certify">'):]
    assert section.count("<tr><td>ibp</td>") == 3 and "sound lower bound" in section
    reason = "ibp: operator Sin has no interval-bound rule"
    unavailable = result.model_copy(update={"certify": result.certify.model_copy(
        update={"available": False, "reason": reason, "entries": []})})
    assert "Not available for this model: ibp: operator Sin" in render_report(unavailable)


def test_crown_ibp_beside_ibp_and_a_method_that_cannot_run_is_named(dataset):
    spec = EvaluationSpec.model_validate({**SPEC, "certify": {"eps": [0.03], "methods": [
        "ibp", "crown_ibp", "crown"]}, "gates": []})
    fc = evaluate(digits.onnx_bytes("fc100"), dataset, spec).result.certify
    assert fc is not None and fc.available and not fc.unavailable
    ibp, crown_ibp, crown = fc.entries
    assert (ibp.method, crown_ibp.method, crown.method) == ("ibp", "crown_ibp", "crown")
    assert crown_ibp.certified_accuracy > ibp.certified_accuracy + 0.2  # much tighter on an MLP
    assert crown.certified_accuracy > crown_ibp.certified_accuracy + 0.1  # and full CROWN more so
    assert crown.certified_accuracy <= crown.attacked_accuracy
    model = export_onnx(MaxOfPairs().eval(), (1, 28, 28)).SerializeToString()
    section = evaluate(model, dataset, spec).result.certify
    assert section is not None and section.available and [e.method for e in section.entries] == ["ibp"]
    assert "operator ReduceMax" in section.unavailable["crown_ibp"]


def test_each_shard_bounds_its_own_samples_and_the_masks_travel_with_its_output(dataset):
    from workers.evaluate import run_unit
    from workers.plan import plan
    from workers.units import UnitOutput

    spec = EvaluationSpec.model_validate({"samples": 40, "shard_size": 25, "certify": {"eps": [0.0, 0.01]}})
    shards = [u for u in plan(spec, len(dataset.y)) if u.kind == "shard"]
    assert [u.samples for u in shards] == [25, 15]
    output = run_unit(digits.onnx_bytes("cnn"), dataset, spec, shards[1])
    again = UnitOutput.from_bytes(output.to_bytes())
    assert set(again.certified) == {"ibp@0", "ibp@1"} and len(again.certified["ibp@0"]) == 15
    np.testing.assert_array_equal(again.certified["ibp@1"], output.certified["ibp@1"])
