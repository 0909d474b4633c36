"""`robustness evaluate --html` writes the same self-contained report the service serves."""

from __future__ import annotations

from pathlib import Path

import yaml

from client.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_evaluate_writes_an_html_report(tmp_path):
    spec = {"samples": 30, "attacks": [{"name": "fgsm", "eps": [0.1]}], "lipschitz": True}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code = main(
        [
            "evaluate",
            str(ROOT / "examples" / "digits-cnn.onnx"),
            str(ROOT / "examples" / "digits-test.npz"),
            "--spec",
            str(tmp_path / "spec.yaml"),
            "--html",
            str(tmp_path / "report.html"),
        ]
    )
    html = (tmp_path / "report.html").read_text()
    assert code == 0 and "digits-cnn.onnx" in html and 'id="lipschitz"' in html and 'id="examples"' in html
    assert 'id="transfer"' not in html and 'id="defenses"' not in html  # stages not run are absent
