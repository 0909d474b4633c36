"""The digits demo's result document (README: `robustness submit examples/...`) stays what it
was when this golden copy was written: same keys in the same order, same strings, integers
and booleans, and every number within 0.01 (a single sample of the 200, where another CPU's
float rounding flips one, moves an accuracy by 0.005). A restructuring that changes the
document shows here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "digits-demo-result.json"


def _differences(want, got, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        if list(want) != list(got):
            return [f"{path}: keys {list(want)} != {list(got)}"]
        return [d for k in want for d in _differences(want[k], got[k], f"{path}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{path}: {len(want)} items != {len(got)}"]
        pairs = enumerate(zip(want, got, strict=True))
        return [d for i, (w, g) in pairs for d in _differences(w, g, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float | int) and not isinstance(got, bool):
        return [] if abs(want - got) <= 0.01 else [f"{path}: {want} != {got}"]
    return [] if want == got and type(want) is type(got) else [f"{path}: {want!r} != {got!r}"]


def test_the_demo_result_document_is_unchanged(tmp_path):
    out = tmp_path / "result.json"
    examples = ROOT / "examples"
    code = main(["evaluate", str(examples / "digits-cnn.onnx"), str(examples / "digits-test.npz"),
                 "--spec", str(examples / "spec.yaml"), "--out", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert isinstance(document.pop("timing"), dict)
    differences = _differences(json.loads(GOLDEN.read_text()), document)
    if differences:
        pytest.fail(f"{len(differences)} differences from {GOLDEN.name}: " + "; ".join(differences[:10]))
