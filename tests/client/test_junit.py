"""The JUnit XML report of a result document."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from client.junit import gate_name, junit_xml


def gate(**fields) -> dict:
    return {"metric": "robust_accuracy", "attack": "pgd", "eps": 0.3, "norm": None, "min": None, "max": None,
            "value": 0.5, "passed": True, "reason": None} | fields


def test_no_gates_is_one_passing_testcase():
    suite = ET.fromstring(junit_xml({"gates": [], "clean_accuracy": 0.9, "model": {}})).find("testsuite")
    assert [c.get("name") for c in suite.iter("testcase")] == ["evaluation completed"]
    assert suite.get("tests") == "1" and suite.get("failures") == "0" and not list(suite.iter("failure"))


def test_gate_names():
    assert gate_name(gate(min=0.5)) == "robust_accuracy pgd eps=0.3 >= 0.5"
    assert gate_name(gate(metric="mean_l2", norm="l2", eps=None, min=0.1, max=2.0)) == \
        "mean_l2 pgd l2 >= 0.1 and <= 2"
    assert gate_name(gate(baseline="ev_123", max_drop=0.05)) == \
        "robust_accuracy pgd eps=0.3 drop <= 0.05 from baseline"
    assert gate_name({"metric": "clean_accuracy", "attack": None, "min": 0.9}) == "clean_accuracy >= 0.9"


def test_failures_carry_value_bounds_baseline_and_reason_escaped():
    result = {"gates": [
        gate(baseline="ev_<old>", max_drop=0.05, value=0.4, baseline_value=0.5, passed=False),
        gate(attack='sq"uare & <co>', value=None, passed=False, min=0.2,
             reason='attack "sq" & <co> has no eps=0.3 entry\x00\x1b'),
    ], "model": {"sha256": "ab"}, "clean_accuracy": 0.9, "passed": False}
    text = junit_xml(result, "ev_1")
    suite = ET.fromstring(text).find("testsuite")  # parses: escaped, no raw control characters
    assert suite.get("failures") == "2"
    first, second = (c.find("failure") for c in suite.iter("testcase"))
    assert first.get("message") == "robust_accuracy = 0.4, expected drop <= 0.05 from baseline (baseline 0.5)"
    assert first.text == "value: 0.4\nmax_drop: 0.05\nbaseline: ev_<old>\nbaseline_value: 0.5"
    assert second.get("message") == 'no value: attack "sq" & <co> has no eps=0.3 entry\ufffd\ufffd'
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names[1] == 'robust_accuracy sq"uare & <co> eps=0.3 >= 0.2'


def test_accepts_an_evaluation_result_model():
    from schemas.evaluation import EvaluationResult, EvaluationSpec, GateResult

    result = EvaluationResult(
        model={"sha256": "cd"}, dataset={"samples": 10}, spec=EvaluationSpec(), device="cpu",
        clean_accuracy=0.8, attacks=[], warnings=[], passed=False, timing={"total": 1.0},
        gates=[GateResult(metric="clean_accuracy", attack=None, eps=None, norm=None, min=0.9, max=None,
                          value=0.8, passed=False)])
    suite = ET.fromstring(junit_xml(result, "ev_2")).find("testsuite")
    assert suite.find("testcase/failure").get("message") == "clean_accuracy = 0.8, expected >= 0.9"
    assert {p.get("name"): p.get("value") for p in suite.iter("property")}["model_sha256"] == "cd"
