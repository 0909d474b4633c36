"""Defenses through the evaluation spec: Liang et al.'s tables with non-adaptive and adaptive
robust accuracy side by side, the same in shards, and bad specs that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.evaluation import EvaluationSpec
from workers import defense_stage
from workers.datasets import load_npz
from workers.errors import InvalidSpecError
from workers.evaluate import evaluate, finish, run_unit
from workers.plan import plan
from workers.spec_checks import check_spec
from workers.units import UnitOutput, WorkUnit

ROOT = Path(__file__).resolve().parents[1]
PGD = {"name": "pgd", "eps": [0.1, 0.15], "steps": 20}


@pytest.fixture(scope="module")
def demo():
    return (ROOT / "examples" / "digits-cnn.onnx").read_bytes(), load_npz(
        (ROOT / "examples" / "digits-test.npz").read_bytes()
    )


def by_key(result) -> dict:
    return {d["defense"]: d for d in result.model_dump(mode="json")["defenses"]}


def test_adaptive_pgd_through_pca_and_downsampling_is_no_weaker_than_non_adaptive(demo):
    model, dataset = demo
    spec = EvaluationSpec.model_validate(
        {
            "samples": 100,
            "shard_size": 50,
            "attacks": [PGD],
            "defenses": [
                {"name": "pca", "variance": 0.99, "fit_samples": 300},
                {"name": "downsample", "factor": 0.5},
            ],
        }
    )
    result = evaluate(model, dataset, spec).result
    for key in ("pca", "downsample"):
        defense = by_key(result)[key]
        assert defense["adaptive_method"].startswith("exact gradients")
        assert defense["clean_accuracy"] >= 0.95
        for row in defense["attacks"]:
            assert row["adaptive"] <= row["non_adaptive"], (key, row)
            assert row["bare"] is not None
    outputs = [
        UnitOutput.from_bytes(run_unit(model, dataset, spec, u).to_bytes())
        for u in plan(spec, len(dataset.y))
    ]
    assert finish(model, dataset, spec, outputs).result.model_dump(exclude={"timing"}) == result.model_dump(
        exclude={"timing"}
    )


def test_eot_against_additive_noise_beats_a_single_draw(demo):
    model, dataset = demo
    noise = {"name": "gaussian_noise", "sigma": 0.3}
    spec = EvaluationSpec.model_validate(
        {
            "samples": 100,
            "attacks": [PGD],
            "defenses": [
                {**noise, "eot_samples": 1, "label": "one_draw"},
                {**noise, "eot_samples": 16, "label": "eot"},
            ],
        }
    )
    defenses = by_key(evaluate(model, dataset, spec).result)
    one, eot = (sum(r["adaptive"] for r in defenses[k]["attacks"]) for k in ("one_draw", "eot"))
    assert eot < one


def test_a_defense_far_weaker_adaptively_is_flagged(demo, monkeypatch):
    model, dataset = demo
    monkeypatch.setattr(defense_stage, "ADAPTIVE_GAP", 0.0)  # any drop counts, to see the flag and its text
    spec = EvaluationSpec.model_validate(
        {
            "samples": 60,
            "attacks": [{"name": "pgd", "eps": [0.1], "steps": 20}],
            "defenses": [{"name": "downsample", "factor": 0.5}],
        }
    )
    defense = evaluate(model, dataset, spec).result.model_dump(mode="json")["defenses"][0]
    row = defense["attacks"][0]
    assert row["adaptive"] < row["non_adaptive"] and row["flagged"]
    assert "overstates its robustness" in defense["warnings"][0]


def test_the_worst_case_is_robust_only_where_neither_example_fools_the_defense():
    """Per sample, not the smaller of the two accuracies: shard 0's samples are each fooled by
    one kind of example, so the worst case is below both columns; a run without an adaptive
    attack (a whole-dataset universal perturbation) keeps its non-adaptive accuracy."""
    spec = EvaluationSpec.model_validate({
        "samples": 8, "attacks": [{"name": "pgd", "eps": [0.1]}, {"name": "universal", "eps": [0.1]}],
        "defenses": [{"name": "median", "size": 3}],
    })

    def output(index: int, kind: str, clean, runs) -> UnitOutput:
        unit = WorkUnit(index=index, start=4 * index, stop=4 * index + 4, attacks=(0,), kind=kind)
        return UnitOutput(unit=unit, clean_logits=None, runs=[],
                          document={"defenses": {"median": {"clean": clean, "runs": runs}}})

    outputs = [
        output(0, "shard", [1, 1, 1, 1], [{"attack": 0, "eps": 0.1, "non_adaptive": [1, 1, 0, 0],
                                          "adaptive": [1, 0, 1, 0]}]),
        output(1, "shard", [1, 1, 1, 1], [{"attack": 0, "eps": 0.1, "non_adaptive": [1, 1, 1, 1],
                                          "adaptive": [1, 1, 1, 0]}]),
        output(2, "whole", None, [{"attack": 1, "eps": 0.1, "non_adaptive": [1, 0, 1, 0, 1, 1, 1, 1],
                                   "adaptive": None}]),
    ]
    (result,) = defense_stage.defense_results(spec, outputs, [])
    pgd, universal = result["attacks"]
    assert (pgd["non_adaptive"], pgd["adaptive"], pgd["worst_case"]) == (0.75, 0.625, 0.5)
    assert (universal["non_adaptive"], universal["adaptive"], universal["worst_case"]) == (0.75, None, 0.75)


def test_pca_needs_held_out_samples(demo):
    model, dataset = demo
    spec = EvaluationSpec.model_validate(
        {"samples": 500, "defenses": [{"name": "pca", "variance": 0.99, "fit_samples": 200}]}
    )
    with pytest.raises(ValueError, match=r"defenses\[0\].fit_samples: the dataset has 597 samples"):
        evaluate(model, dataset, spec)


@pytest.mark.parametrize(
    "defense, message",
    [
        ({"name": "pcaa"}, "defenses[0].name: unknown defense 'pcaa'"),
        ({"name": "pca", "variance": 1.5, "fit_samples": 10}, "`variance` must be a finite number in (0, 1]"),
        ({"name": "pca", "variance": 0.0, "fit_samples": 10}, "`variance`"),
        ({"name": "pca", "variance": 0.9}, "defenses[0].fit_samples"),
        ({"name": "downsample", "factor": 0.5, "fit_samples": 10}, "downsample is not fitted"),
        ({"name": "autoencoder"}, "defenses[0].model: the autoencoder needs `model`"),
        ({"name": "gaussian_noise"}, "needs parameter 'sigma'"),
    ],
)
def test_bad_defense_specs_name_the_field(defense, message):
    with pytest.raises(InvalidSpecError) as info:
        check_spec(EvaluationSpec.model_validate({"defenses": [defense]}))
    assert message in str(info.value)


def identity_autoencoder() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["restored"])],
        "ae",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("restored", TensorProto.FLOAT, ["N", 1, 28, 28])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    ).SerializeToString()


def test_the_cli_prints_the_defense_table_and_loads_an_autoencoder_next_to_the_spec(tmp_path, capsys):
    import yaml

    from client.cli import main

    (tmp_path / "ae.onnx").write_bytes(identity_autoencoder())
    spec = {
        "samples": 40,
        "attacks": [{"name": "fgsm", "eps": [0.1]}],
        "defenses": [{"name": "autoencoder", "model": "ae.onnx"}, {"name": "bit_depth", "bits": 2}],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = [
        str(ROOT / "examples" / "digits-cnn.onnx"),
        str(ROOT / "examples" / "digits-test.npz"),
        "--spec",
        str(tmp_path / "spec.yaml"),
    ]
    assert main(["evaluate", *args]) == 0
    out = capsys.readouterr().out
    assert "non-adaptive" in out and "autoencoder" in out and "bit_depth" in out
    (tmp_path / "ae.onnx").unlink()
    assert main(["evaluate", *args]) == 2
    assert "defenses[0].model: ae.onnx: no such model file" in capsys.readouterr().err


def test_pca_fitted_on_a_separate_dataset_and_a_fit_dataset_of_another_shape(demo, tmp_path, capsys):
    import numpy as np
    import yaml

    from client.cli import main

    model, dataset = demo
    np.savez(tmp_path / "fit.npz", x=dataset.x[-300:], y=dataset.y[-300:])
    np.savez(tmp_path / "odd.npz", x=np.zeros((50, 1, 14, 14), np.float32), y=np.zeros(50, np.int64))
    spec = {
        "samples": 40,
        "attacks": [{"name": "fgsm", "eps": [0.1]}],
        "defenses": [{"name": "pca", "variance": 0.99, "fit_dataset": "fit.npz"}],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = [
        str(ROOT / "examples" / "digits-cnn.onnx"),
        str(ROOT / "examples" / "digits-test.npz"),
        "--spec",
        str(tmp_path / "spec.yaml"),
        "--out",
        str(tmp_path / "out.json"),
    ]
    assert main(["evaluate", *args]) == 0
    held_out = EvaluationSpec.model_validate(
        {**spec, "defenses": [{"name": "pca", "variance": 0.99, "fit_samples": 300}]}
    )
    expected = evaluate(model, dataset, held_out).result.model_dump(mode="json")["defenses"][0]
    import json

    assert json.loads((tmp_path / "out.json").read_text())["defenses"][0]["attacks"] == expected["attacks"]
    spec["defenses"][0]["fit_dataset"] = "odd.npz"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["evaluate", *args]) == 2
    assert "defenses[0].fit_dataset: its images are [1, 14, 14] but the evaluated ones are [1, 28, 28]" in (
        capsys.readouterr().err
    )


def test_accuracy_against_the_noise_magnitude(demo):
    model, dataset = demo
    spec = EvaluationSpec.model_validate(
        {
            "samples": 100,
            "attacks": [{"name": "fgsm", "eps": [0.1]}],
            "defenses": [
                {"name": "gaussian_noise", "sigma": 0.1, "adaptive": False, "curve": [0.05, 0.2, 0.5]}
            ],
        }
    )
    curve = evaluate(model, dataset, spec).result.model_dump(mode="json")["defenses"][0]["curve"]
    assert [p["magnitude"] for p in curve] == [0.05, 0.2, 0.5]
    clean = [p["clean_accuracy"] for p in curve]
    assert clean[0] >= clean[-1] + 0.1  # strong noise destroys clean accuracy
    assert all(len(p["attacks"]) == 1 and p["attacks"][0]["attack"] == "fgsm" for p in curve)
    with pytest.raises(InvalidSpecError, match=r"defenses\[0\]\.curve: positive noise magnitudes"):
        spec = {"defenses": [{"name": "bit_depth", "bits": 2, "curve": [0.1]}]}
        check_spec(EvaluationSpec.model_validate(spec))
