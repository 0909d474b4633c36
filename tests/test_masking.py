"""A PASS that holds: saturated models, masked gradients and the verdicts that follow.

On models whose logits run into the hundreds or thousands (scaled logits, a saturated Softmax
output, pixels fed as 0..255), the cross-entropy's float32 gradient is exactly zero and
cross-entropy attacks leave most samples "robust". The default loss must move them as the C&W
margin does, and a gate over an attack that followed a vanishing gradient must never pass.

Run with -s for the table of default, margin and cross-entropy robust accuracies.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from client.cli import main
from schemas.evaluation import EvaluationSpec
from tests import digits
from workers.datasets import Dataset
from workers.evaluate import evaluate

SAMPLES = 597  # every held-out digit: one point of accuracy is 6 samples
EPS, PGD_STEPS = 0.1, 20  # 10% of the pixel range, as the CNTK MNIST model was tried

# name -> (ONNX bytes, pixel scale of its data)
SATURATED = {
    "cnn-x100": (lambda: digits.variant_onnx_bytes("cnn-x100"), 1.0),
    "cnn-x1000": (lambda: digits.variant_onnx_bytes("cnn-x1000"), 1.0),
    "cnn-softmax-x100": (lambda: digits.variant_onnx_bytes("cnn-softmax-x100"), 1.0),
    "cnn-0..255": (lambda: digits.onnx_bytes("cnn"), 255.0),
}


def dataset(scale: float = 1.0, samples: int = SAMPLES) -> Dataset:
    _, _, x, y = digits.digits()
    return Dataset(x=(x[:samples] * scale).astype(np.float32), y=y[:samples], source_dtype="float32")


def spec_for(scale: float, losses=("default", "margin", "cross_entropy"), gates=()) -> EvaluationSpec:
    attacks = []
    for loss in losses:
        extra = {} if loss == "default" else {"loss": loss}
        attacks += [{"name": "fgsm", "eps": EPS * scale, "label": f"fgsm-{loss}", **extra},
                    {"name": "pgd", "eps": EPS * scale, "steps": PGD_STEPS, "label": f"pgd-{loss}", **extra}]
    return EvaluationSpec.model_validate({"input": {"range": [0, scale]}, "attacks": attacks,
                                          "gates": list(gates)})


# on each saturated model: it would pass on the cross-entropy's masked number (over 95% "robust"),
# and fails on the default loss's (under 30%)
MASKED_GATE = {"metric": "robust_accuracy", "attack": "pgd-cross_entropy", "min": 0.5}
HONEST_GATE = {"metric": "robust_accuracy", "attack": "pgd-default", "min": 0.5}


@pytest.fixture(scope="module")
def saturated_results():
    results = {}
    for name, (make, scale) in SATURATED.items():
        spec = spec_for(scale, gates=[MASKED_GATE, HONEST_GATE])
        results[name] = evaluate(make(), dataset(scale), spec).result
    return results


def _entry(result, key):
    return next(e for e in result.attacks if e.attack == key)


def test_default_loss_moves_what_the_margin_moves_on_saturated_models(saturated_results):
    print(f"\nrobust accuracy on {SAMPLES} test digits (default loss / margin / cross-entropy)")
    for name, result in saturated_results.items():
        row = []
        for attack in ("fgsm", "pgd"):
            default, margin, ce = (_entry(result, f"{attack}-{loss}").robust_accuracy
                                   for loss in ("default", "margin", "cross_entropy"))
            row.append(f"{attack} {default:.3f} / {margin:.3f} / {ce:.3f}")
            assert abs(default - margin) <= 0.01 + 1e-9, (name, attack, default, margin)
            assert ce > default + 0.3, (name, attack, ce, default)  # the old default's false robustness
        print(f"  {name:18s} " + "   ".join(row))


def test_warnings_describe_the_loss_each_attack_followed(saturated_results):
    for name, result in saturated_results.items():
        for attack in ("fgsm", "pgd"):
            for loss in ("default", "margin"):
                entry = _entry(result, f"{attack}-{loss}")
                assert entry.warnings == [], (name, entry.attack, entry.warnings)
                assert entry.details["gradient_stats"]["zero_fraction"] == 0.0
            masked = _entry(result, f"{attack}-cross_entropy")
            stats = masked.details["gradient_stats"]
            assert stats["loss"] == "cross_entropy" and stats["zero_fraction"] > 0.5, (name, stats)
            zero = [w for w in masked.warnings if "gradient is zero" in w]
            assert len(zero) == 1 and f"{attack}-cross_entropy (linf, eps=" in zero[0], masked.warnings
            assert f"{stats['zero_fraction']:.0%} of the {stats['probed']} correctly classified" in zero[0]
        assert all("cross_entropy" in w for w in result.warnings), (name, result.warnings)


def test_a_gate_that_would_pass_on_a_masked_gradient_is_inconclusive_on_every_saturated_model(
        saturated_results):
    for name, result in saturated_results.items():
        masked, honest = result.gates
        assert masked.value > 0.5 and (masked.verdict, masked.passed) == ("inconclusive", False), name
        assert (honest.verdict, honest.passed) == ("failed", False), name
        assert result.verdict == "failed"


def test_a_gate_over_a_masked_attack_is_inconclusive_unless_allowed():
    make, scale = SATURATED["cnn-x1000"]
    gates = [
        {"metric": "robust_accuracy", "attack": "pgd-cross_entropy", "min": 0.5},  # passes on masking
        {"metric": "robust_accuracy", "attack": "fgsm-cross_entropy", "min": 0.5, "allow_inconclusive": True},
        {"metric": "robust_accuracy", "attack": "pgd-default", "max": 0.5},  # an honest pass
    ]
    spec = spec_for(scale, ("default", "cross_entropy"), gates)
    result = evaluate(make(), dataset(scale, 100), spec).result
    masked, allowed, honest = result.gates
    assert (masked.verdict, masked.passed) == ("inconclusive", False)
    assert masked.reason.startswith("inconclusive: pgd-cross_entropy (linf, eps=0.1): the cross_entropy "
                                    "gradient is zero for")
    assert masked.value > 0.5 and masked.warnings
    assert (allowed.verdict, allowed.passed, allowed.accepted_inconclusive) == ("passed", True, True)
    assert allowed.reason.startswith("accepted as inconclusive (allow_inconclusive): fgsm-cross_entropy")
    assert (honest.verdict, honest.passed, honest.warnings) == ("passed", True, [])
    assert (result.verdict, result.passed) == ("inconclusive", False)
    # masked, the attack leaves robust every sample the model gets right (0.99 of these 100 on one
    # machine, less on another: the digits CNN trains a little differently): max 0.5 fails on any
    failing = {"metric": "robust_accuracy", "attack": "pgd-cross_entropy", "max": 0.5}
    result = evaluate(make(), dataset(scale, 100),
                      spec_for(scale, ("cross_entropy",), [failing, gates[0]])).result
    assert [g.verdict for g in result.gates] == ["failed", "inconclusive"]  # a failure stands
    assert result.verdict == "failed"


def test_evaluate_exits_3_on_an_inconclusive_gate_and_junit_marks_it(tmp_path, capsys):
    from client.junit import junit_xml

    (tmp_path / "model.onnx").write_bytes(digits.variant_onnx_bytes("cnn-x100"))
    data = dataset(1.0, 60)
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    spec = {"attacks": [{"name": "pgd", "eps": 0.1, "steps": 5, "loss": "cross_entropy"}],
            "gates": [{"metric": "robust_accuracy", "attack": "pgd", "min": 0.5}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = ["evaluate", str(tmp_path / "model.onnx"), str(tmp_path / "data.npz"), "--spec",
            str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "result.json")]
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "gate INCONCLUSIVE: robust_accuracy pgd" in out and "gradient is zero" in out
    document = json.loads((tmp_path / "result.json").read_text())
    assert document["verdict"] == "inconclusive" and document["passed"] is False
    xml = junit_xml(document)
    assert 'type="GateInconclusive"' in xml and "inconclusive, robust_accuracy" in xml
    spec["gates"][0]["allow_inconclusive"] = True
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(args) == 0
    assert "gate PASS (inconclusive, allowed)" in capsys.readouterr().out
    spec["attacks"][0].pop("loss")  # the default loss: nothing masked, an honest verdict
    spec["gates"][0].pop("allow_inconclusive")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(args) == 1
    assert json.loads((tmp_path / "result.json").read_text())["verdict"] == "failed"
