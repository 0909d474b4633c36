"""The evaluation engine and `robustness evaluate`: specs, results, gates, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from client.cli import main
from schemas.__main__ import render
from schemas.evaluation import EvaluationSpec
from tests import digits
from workers.datasets import load_npz
from workers.evaluate import evaluate
from workers.plan import EvaluationCancelled

SAMPLES = 120


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    model = folder / "cnn.onnx"
    model.write_bytes(digits.onnx_bytes("cnn"))
    _, _, x, y = digits.digits()
    data = folder / "digits.npz"
    np.savez(data, x=np.round(x * 255).astype(np.uint8), y=y)
    return model, data


def spec_dict(**overrides) -> dict:
    spec = {
        "samples": SAMPLES,
        "seed": 3,
        "attacks": [
            {"name": "fgsm", "eps": [0.05, 0.1, 0.2]},
            {"name": "pgd", "norm": "linf", "eps": [0.1], "steps": 10, "rel_step_size": 0.25},
            {"name": "deepfool", "max_iter": 20},
            {"name": "gaussian_noise", "std": [0.1, 0.3]},
        ],
        "gates": [{"metric": "robust_accuracy", "attack": "pgd", "eps": 0.1, "min": 0.0}],
    }
    spec.update(overrides)
    return spec


def run(model_path, data_path, spec: dict):
    data = load_npz(data_path.read_bytes())
    return evaluate(model_path.read_bytes(), data, EvaluationSpec.model_validate(spec)).result


def test_result_document_has_every_attack_and_budget(demo):
    result = run(*demo, spec_dict())
    assert result.dataset["samples"] == SAMPLES
    assert result.clean_accuracy > 0.9
    entries = [(e.attack, e.eps) for e in result.attacks]
    assert entries == [("fgsm", 0.05), ("fgsm", 0.1), ("fgsm", 0.2), ("pgd", 0.1), ("deepfool", None),
                       ("gaussian_noise", 0.1), ("gaussian_noise", 0.3)]
    fgsm = [e.robust_accuracy for e in result.attacks if e.attack == "fgsm"]
    assert fgsm[0] >= fgsm[1] >= fgsm[2] and fgsm[2] < result.clean_accuracy
    pgd = next(e for e in result.attacks if e.attack == "pgd")
    assert pgd.robust_accuracy <= fgsm[1] + 0.02  # iterative at least as strong as one step
    assert pgd.mean_linf is None or pgd.mean_linf <= 0.1 + 1e-6
    deepfool = next(e for e in result.attacks if e.attack == "deepfool")
    assert deepfool.kind == "minimal" and deepfool.minimal["quantiles"]["p50"] > 0
    noise = [e for e in result.attacks if e.kind == "noise"]
    assert noise[0].robust_accuracy >= pgd.robust_accuracy
    assert result.gates[0].passed and result.passed


def test_same_spec_and_seed_give_an_identical_document(demo):
    spec = spec_dict(attacks=[{"name": "pgd", "norm": "l2", "eps": [1.0], "steps": 5,
                               "rel_step_size": 0.3, "random_start": True},
                              {"name": "gaussian_noise", "std": [0.2]}])
    first = run(*demo, spec).model_dump(mode="json")
    second = run(*demo, spec).model_dump(mode="json")
    first.pop("timing"), second.pop("timing")
    assert first == second


def test_targeted_entries_aim_at_reproducible_random_targets(demo):
    spec = spec_dict(attacks=[{"name": "pgd", "eps": [0.3], "steps": 20, "targeted": True}], gates=[])
    first, second = run(*demo, spec), run(*demo, spec)
    entry = first.attacks[0]
    assert entry.success_rate > 0.8  # success: classified as the drawn target
    assert entry.robust_accuracy < 0.2
    assert entry.model_dump() == second.attacks[0].model_dump()


def test_fooling_images_on_request(demo):
    result = run(*demo, spec_dict(attacks=[], gates=[],
                                  fooling={"samples": 200, "threshold": 0.9, "steps": 15}))
    noise, ascent = (result.fooling.model_dump()[k] for k in ("noise", "gradient_ascent"))
    assert noise["samples"] == 200 and 0.0 <= noise["fooling_rate"] <= 1.0
    assert sum(noise["predicted_counts"]) == 200
    assert ascent["samples"] == 10 and ascent["share_reached"] >= 0.8  # digits CNN: easy to fool
    assert run(*demo, spec_dict(attacks=[], gates=[])).fooling is None


def test_a_failing_gate_fails_the_result(demo):
    result = run(*demo, spec_dict(gates=[
        {"metric": "robust_accuracy", "attack": "fgsm", "eps": 0.2, "min": 0.99},
        {"metric": "clean_accuracy", "min": 0.5},
        {"metric": "robust_accuracy", "attack": "fgsm", "eps": 0.42, "min": 0.1},
    ]))
    assert [g.passed for g in result.gates] == [False, True, False]
    assert "no result of fgsm at eps=0.42" in result.gates[2].reason
    assert not result.passed


@pytest.mark.parametrize(("spec", "message"), [
    ({"attacks": [{"name": "fgsmm", "eps": 0.1}]}, "unknown attack 'fgsmm'"),
    ({"attacks": [{"name": "pgd", "eps": 0.1, "steps": 0}]}, "`steps`"),
    ({"attacks": [{"name": "pgd", "steps": 10}]}, "needs `eps`"),
    ({"attacks": [{"name": "deepfool", "eps": 0.1}]}, "takes no `eps`"),
    ({"attacks": [{"name": "fgsm", "eps": -0.1}]}, "eps values must be finite and >= 0"),
    ({"attacks": [{"name": "fgsm", "eps": 0.1, "norm": "l3"}]}, "(fgsm): `norm` must be one of linf"),
    ({"attacks": [{"name": "gaussian_noise", "eps": 0.1, "norm": "l2"}]}, "none: remove `norm`"),
    ({"samples": 0}, "samples must be a positive integer"),
    ({"input": {"range": [1, 0]}}, "low < high"),
    ({"gates": [{"metric": "robust_accuracy", "attack": "pgd", "min": 0.5}]}, "not among the attacks"),
    ({"gates": [{"metric": "robust_accuracy", "attack": "fgsm"}]}, "needs `min` or `max`"),
    ({"attack": []}, "attack: Extra inputs are not permitted"),
    ({"attacks": [{"name": "deepfool", "targeted": True}]}, "has no targeted variant"),
    ({"attacks": [{"name": "fgsm", "eps": 0.1, "stepz": 5}]},
     "fgsm has no parameter 'stepz'; its parameters: loss"),
    ({"attacks": [{"name": "pgd", "eps": 0.1, "steps": 10**400}]}, "attacks[0].steps: a number larger"),
    ({"attacks": [{"name": "deepfool", "overshoot": 10**400}]}, "attacks[0].overshoot: a number larger than"),
    ({"attacks": [{"name": "fgsm", "eps": 0.1, "label": "a" * 101}]}, "label: String should have at most"),
])
def test_bad_specs_name_the_field(spec, message, demo, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    model, data = demo
    assert main(["evaluate", str(model), str(data), "--spec", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_number_longer_than_python_reads_exits_2(demo, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("attacks:\n  - {name: pgd, eps: 0.1, steps: 1" + "0" * 5000 + "}\n")
    model, data = demo
    assert main(["evaluate", str(model), str(data), "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML or JSON (Exceeds the limit (4300 digits)" in err and "set_int_max" not in err


def test_cli_prints_a_summary_writes_json_and_exits_1_on_a_failed_gate(demo, tmp_path, capsys):
    model, data = demo
    spec = spec_dict(attacks=[{"name": "fgsm", "eps": [0.1]}],
                     gates=[{"metric": "robust_accuracy", "attack": "fgsm", "min": 0.999}])
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "result.json"
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "clean accuracy" in printed.out and "gate FAIL: robust_accuracy fgsm" in printed.out
    assert "fgsm" in printed.err  # the progress line
    document = json.loads(out.read_text())
    assert document["passed"] is False and document["attacks"][0]["attack"] == "fgsm"


@pytest.mark.parametrize(("shape", "message"), [
    ((3, 3, 32, 32), "expects [N, 1, 28, 28]"),
    ((8, 1, 0, 5), "'x' holds images of shape [1, 0, 5], with a dimension of size 0"),
], ids=["wrong-size", "empty-side"])
def test_bad_data_exits_2(demo, tmp_path, capsys, shape, message):
    model, _ = demo
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"attacks": [{"name": "fgsm", "eps": 0.1}]}))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros(shape, np.float32), y=np.zeros(shape[0], np.int64))
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path)]) == 2
    assert message in capsys.readouterr().err


def test_a_model_that_cannot_run_on_the_images_exits_2(tmp_path, capsys):
    from tests.test_runtime import reshape_to_16_features

    model, data, spec = tmp_path / "reshape.onnx", tmp_path / "5x5.npz", tmp_path / "spec.yaml"
    model.write_bytes(reshape_to_16_features())
    np.savez(data, x=np.zeros((4, 1, 5, 5), np.float32), y=np.zeros(4, np.int64))
    spec.write_text(yaml.safe_dump({"attacks": [{"name": "fgsm", "eps": 0.1}]}))
    assert main(["evaluate", str(model), str(data), "--spec", str(spec)]) == 2
    assert "its Reshape node 'flatten' fails in ONNX Runtime" in capsys.readouterr().err


def test_committed_json_schemas_are_current():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "schemas" / "json"
    for filename, text in render().items():
        assert (folder / filename).read_text() == text, f"run `python -m schemas` ({filename})"


def test_the_readme_demo_spec_runs_on_the_shipped_files():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    spec = yaml.safe_load((examples / "spec.yaml").read_text())
    spec["samples"] = 30  # the demo's attacks and gates, on fewer images
    spec["fooling"]["samples"] = 50
    data = load_npz((examples / "digits-test.npz").read_bytes())
    result = evaluate((examples / "digits-cnn.onnx").read_bytes(), data,
                      EvaluationSpec.model_validate(spec)).result
    assert result.clean_accuracy > 0.9
    assert {e.attack for e in result.attacks} == {a.get("label", a["name"]) for a in spec["attacks"]}


def test_a_progress_callback_can_stop_an_evaluation_between_batches(demo):
    model, data_path = demo
    seen = []

    def cancel_during_pgd(stage, done, total):
        seen.append(stage)
        if stage == "pgd":
            raise EvaluationCancelled

    spec = EvaluationSpec.model_validate(spec_dict())
    with pytest.raises(EvaluationCancelled):
        evaluate(model.read_bytes(), load_npz(data_path.read_bytes()), spec, progress=cancel_during_pgd)
    assert seen[-1] == "pgd" and "deepfool" not in seen


def test_cli_gates_on_a_baseline_result_file(demo, tmp_path, capsys):
    model, data = demo
    spec_path, earlier = tmp_path / "spec.yaml", tmp_path / "earlier.json"
    spec_path.write_text(yaml.safe_dump(spec_dict(attacks=[{"name": "fgsm", "eps": [0.1]}], gates=[])))
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path), "--out", str(earlier)]) == 0
    gate = {"metric": "robust_accuracy", "attack": "fgsm", "baseline": str(earlier), "max_drop": 0.0}
    spec_path.write_text(yaml.safe_dump(spec_dict(attacks=[{"name": "fgsm", "eps": [0.1]}], gates=[gate])))
    capsys.readouterr()
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path)]) == 0  # the same result
    assert f"at most 0 below baseline {earlier}" in capsys.readouterr().out

    gate["baseline"] = str(tmp_path / "missing.json")
    spec_path.write_text(yaml.safe_dump(spec_dict(attacks=[{"name": "fgsm", "eps": [0.1]}], gates=[gate])))
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path)]) == 2
    assert "missing.json: no such baseline result file" in capsys.readouterr().err
    gate["baseline"] = str(spec_path)  # a file, but not a result document
    spec_path.write_text(yaml.safe_dump(spec_dict(attacks=[{"name": "fgsm", "eps": [0.1]}], gates=[gate])))
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path)]) == 2
    assert "spec.yaml: not a result document" in capsys.readouterr().err


def test_cli_artifacts_hold_the_attacks_arrays_but_not_the_adversarial_examples(demo, tmp_path):
    model, data = demo
    spec_path, artifacts = tmp_path / "spec.yaml", tmp_path / "arrays.npz"
    spec_path.write_text(yaml.safe_dump(spec_dict(attacks=[{"name": "deepfool", "max_iter": 5}], gates=[])))
    assert main(["evaluate", str(model), str(data), "--spec", str(spec_path),
                 "--artifacts", str(artifacts)]) == 0
    with np.load(artifacts, allow_pickle=False) as saved:
        assert saved.files == ["deepfool/iterations"] and saved["deepfool/iterations"].shape == (SAMPLES,)
