"""A JUnit XML report of an evaluation's gates, for CI systems that show test results.

One <testsuite name="robustness"> with one <testcase classname="robustness.gates"> per gate,
named after the gate (``robust_accuracy pgd eps=0.3 >= 0.5``); a failed gate carries a
<failure type="GateFailed"> with its value, bounds, baseline and reason, an inconclusive one
(its attack showed signs of gradient masking) a <failure type="GateInconclusive"> with the
warning; a gate that allow_inconclusive accepted passes, its warning in <system-out>. A
result without gates gives one passing testcase, "evaluation completed". Suite properties:
the evaluation id, the model's sha256, the clean accuracy, the verdict.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# characters XML 1.0 cannot carry at all, even escaped (ElementTree would write them as they are)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: Any) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _get(item: Any, key: str) -> Any:
    """A field of a dict or a pydantic model, None when this schema version lacks it."""
    return item.get(key) if isinstance(item, dict) else getattr(item, key, None)


def _bounds(gate: Any) -> str:
    bounds = [f"{op} {_num(_get(gate, key))}" for op, key in ((">=", "min"), ("<=", "max"))
              if _get(gate, key) is not None]
    if _get(gate, "max_drop") is not None:
        bounds.append(f"drop <= {_num(_get(gate, 'max_drop'))} from baseline")
    return " and ".join(bounds)


def gate_name(gate: Any) -> str:
    """``metric [attack] [norm] [eps=E] >= min and <= max [and drop <= D from baseline]``."""
    parts = [_get(gate, "metric"), _get(gate, "attack"), _get(gate, "norm")]
    if _get(gate, "eps") is not None:
        parts.append(f"eps={_num(_get(gate, 'eps'))}")
    parts.append(_bounds(gate))
    return " ".join(str(p) for p in parts if p)


def _verdict(gate: Any) -> str:
    return _get(gate, "verdict") or ("passed" if _get(gate, "passed") else "failed")


def _failure(gate: Any) -> tuple[str, str]:
    """The failure's one-line message and its body (one ``key: value`` line per known field)."""
    value = _get(gate, "value")
    reason = _get(gate, "reason")
    message = f"{_get(gate, 'metric')} = {_num(value)}" if value is not None else "no value"
    message += f": {reason}" if reason else f", expected {_bounds(gate)}"
    if _verdict(gate) == "inconclusive":
        message = f"inconclusive, {message}"
    if _get(gate, "baseline_value") is not None:
        message += f" (baseline {_num(_get(gate, 'baseline_value'))})"
    lines = [f"{key}: {_num(_get(gate, key))}"
             for key in ("verdict", "value", "min", "max", "max_drop", "baseline", "baseline_value", "reason")
             if _get(gate, key) is not None]
    return message, "\n".join(lines)


def junit_xml(result: Any, evaluation_id: str | None = None) -> str:
    """The report for a result document (a dict, or an `EvaluationResult`)."""
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    gates = result.get("gates") or []
    failures = sum(1 for g in gates if not _get(g, "passed"))
    timing = result.get("timing") or {}
    total = timing.get("total")
    suites = ET.Element("testsuites", name="robustness", tests=str(max(len(gates), 1)),
                        failures=str(failures), errors="0")
    suite = ET.SubElement(suites, "testsuite", name="robustness", tests=str(max(len(gates), 1)),
                          failures=str(failures), errors="0", skipped="0")
    if isinstance(total, int | float):
        suites.set("time", f"{total:.3f}")
        suite.set("time", f"{total:.3f}")
    properties = ET.SubElement(suite, "properties")
    model = result.get("model") or {}
    for name, value in (("evaluation_id", evaluation_id), ("model_sha256", model.get("sha256")),
                        ("clean_accuracy", result.get("clean_accuracy")), ("device", result.get("device")),
                        ("passed", result.get("passed")), ("verdict", result.get("verdict"))):
        if value is not None:
            ET.SubElement(properties, "property", name=name, value=_text(_num(value)))
    if not len(properties):
        suite.remove(properties)
    for gate in gates:
        case = ET.SubElement(suite, "testcase", name=_text(gate_name(gate)), classname="robustness.gates")
        if not _get(gate, "passed"):
            message, details = _failure(gate)
            kind = "GateInconclusive" if _verdict(gate) == "inconclusive" else "GateFailed"
            failure = ET.SubElement(case, "failure", message=_text(message), type=kind)
            failure.text = _text(details)
        elif _get(gate, "accepted_inconclusive"):
            ET.SubElement(case, "system-out").text = _text(_get(gate, "reason") or "")
    if not gates:
        ET.SubElement(suite, "testcase", name="evaluation completed", classname="robustness.gates")
    warnings = result.get("warnings") or []
    if warnings:
        ET.SubElement(suite, "system-out").text = _text("\n".join(f"warning: {w}" for w in warnings))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(path: str | Path, result: Any, evaluation_id: str | None = None) -> None:
    Path(path).write_text(junit_xml(result, evaluation_id), encoding="utf-8")
