"""Transfer through the evaluation spec: one request runs Szegedy's table, locally and in
shards, and a bad transfer spec names the field."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from client.cli import main
from schemas.evaluation import EvaluationSpec
from tests.digits import digits, onnx_bytes
from workers.datasets import Dataset
from workers.errors import InvalidSpecError
from workers.evaluate import evaluate, finish, run_unit
from workers.plan import plan
from workers.spec_checks import check_spec
from workers.units import UnitOutput

SPEC = {
    "samples": 80,
    "shard_size": 40,
    "attacks": [{"name": "fgsm", "eps": [0.1]}],
    "transfer": {
        "models": {"fc100": "fc100.onnx", "fc200": "fc200.onnx"},
        "attacks": [{"name": "deepfool"}, {"name": "fgsm", "eps": [0.1]}],
    },
}


@pytest.fixture(scope="module")
def setup():
    _, _, x, y = digits()
    return (
        onnx_bytes("cnn"),
        {"fc100": onnx_bytes("fc100"), "fc200": onnx_bytes("fc200")},
        Dataset(x=x, y=y, source_dtype="float32"),
    )


def test_one_spec_gives_the_transfer_table_and_the_same_result_in_shards(setup):
    model, models, dataset = setup
    spec = EvaluationSpec.model_validate(SPEC)
    units = plan(spec, len(dataset.y))
    assert [u.kind for u in units] == ["shard", "shard", "transfer"]
    whole = evaluate(model, dataset, spec, models=models).result
    deepfool, fgsm = whole.model_dump(mode="json")["transfer"]
    header, clean, *rows = deepfool["table"]
    assert header[1:-1] == ["model", "fc100", "fc200"] and clean[0] == "clean"
    for i, row in enumerate(rows[:3]):  # crafted on model, fc100, fc200: white-box diagonal
        assert row[1 + i] >= 0.95, row
    assert len(rows) == 6 and all(r[0].startswith("Gaussian noise") for r in rows[3:])
    assert {(p["a"], p["b"]) for p in deepfool["cross_pairs"]} == {
        ("model", "fc100"),
        ("model", "fc200"),
        ("fc100", "fc200"),
    }
    assert fgsm["attack"] == "fgsm" and len(fgsm["table"]) == 2 + 6
    assert [a.attack for a in whole.attacks] == ["fgsm"]  # the spec's own attacks are unchanged
    outputs = [
        UnitOutput.from_bytes(run_unit(model, dataset, spec, u, models=models).to_bytes()) for u in units
    ]
    sharded = finish(model, dataset, spec, outputs).result
    assert sharded.model_dump(exclude={"timing"}) == whole.model_dump(exclude={"timing"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sources": ["fc300"]}, "transfer.sources: ['fc300'] not among the models"),
        ({"models": {"model": "x.onnx"}}, "'model' is not a usable name"),
        ({"attacks": [{"name": "pgdd", "eps": 0.1}]}, "unknown attack 'pgdd'"),
        ({"attacks": []}, "at least 1 item"),
    ],
)
def test_a_bad_transfer_spec_names_the_field(change, message):
    """What the spec alone shows is the contract's to refuse (ValidationError), an unknown
    attack the engine's (InvalidSpecError): both name the field."""
    with pytest.raises((ValidationError, InvalidSpecError), match="transfer") as caught:
        check_spec(EvaluationSpec.model_validate({**SPEC, "transfer": {**SPEC["transfer"], **change}}))
    assert message in str(caught.value)


def test_a_transfer_model_with_another_input_is_refused(setup):
    model, models, dataset = setup
    spec = EvaluationSpec.model_validate(
        {
            **SPEC,
            "samples": 10,
            "transfer": {"models": {"odd": "odd.onnx"}, "attacks": [{"name": "fgsm", "eps": 0.1}]},
        }
    )
    w = numpy_helper.from_array(np.zeros((3 * 32 * 32, 10), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["z"])],
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 10])],
        [w],
    )
    odd = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    ).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(odd))
    with pytest.raises(ValueError, match=r"transfer.models.odd: the images are \[1, 28, 28\].*\[N, 3, 32"):
        evaluate(model, dataset, spec, models={"odd": odd})


def test_the_cli_reads_transfer_models_next_to_the_spec(setup, tmp_path, capsys):
    model, models, dataset = setup
    (tmp_path / "model.onnx").write_bytes(model)
    for name, data in models.items():
        (tmp_path / f"{name}.onnx").write_bytes(data)
    np.savez(tmp_path / "data.npz", x=dataset.x[:30], y=dataset.y[:30])
    spec = {
        **SPEC,
        "samples": 30,
        "transfer": {**SPEC["transfer"], "attacks": [{"name": "fgsm", "eps": 0.1}]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code = main(
        [
            "evaluate",
            str(tmp_path / "model.onnx"),
            str(tmp_path / "data.npz"),
            "--spec",
            str(tmp_path / "spec.yaml"),
            "--out",
            str(tmp_path / "out.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "transfer: fgsm" in out and "av. distortion" in out
    assert json.loads((tmp_path / "out.json").read_text())["transfer"][0]["attack"] == "fgsm"
    (tmp_path / "fc200.onnx").unlink()
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "model.onnx"),
                str(tmp_path / "data.npz"),
                "--spec",
                str(tmp_path / "spec.yaml"),
            ]
        )
        == 2
    )
    assert "transfer.models.fc200: fc200.onnx: no such model file" in capsys.readouterr().err


def test_lipschitz_bounds_on_request_in_the_result_and_from_inspect(setup, capsys):
    model, _, dataset = setup
    spec = EvaluationSpec.model_validate(
        {"samples": 10, "lipschitz": True, "input": {"mean": [0.5], "std": [0.25]}}
    )
    bounds = evaluate(model, dataset, spec).result.model_dump(mode="json")["lipschitz"]
    layers = {layer["op_type"]: layer for layer in bounds["layers"]}
    assert {"Conv", "Gemm", "Relu"} <= set(layers) and bounds["unsupported"] == []
    product = np.prod([layer["norm"] for layer in bounds["layers"]])
    assert bounds["network_bound"] == pytest.approx(product, rel=1e-6)
    assert any(layer["norm"] == pytest.approx(4.0) for layer in bounds["layers"])  # the composed 1 / std
    assert main(["inspect", "examples/digits-cnn.onnx", "--lipschitz"]) == 0
    assert "network bound (L2" in capsys.readouterr().out


def test_a_universal_perturbation_crafted_on_each_source_transfers_to_the_others(setup):
    model, models, dataset = setup
    spec = EvaluationSpec.model_validate(
        {
            "samples": 80,
            "transfer": {
                "models": {"fc100": "fc100.onnx"},
                "noise_baseline": True,
                "attacks": [{"name": "universal", "eps": [0.2], "max_passes": 2}],
            },
        }
    )
    (entry,) = evaluate(model, dataset, spec, models={"fc100": models["fc100"]}).result.transfer
    header, clean, *rows = entry.table
    crafted = {row[0]: row for row in rows if not row[0].startswith("Gaussian")}
    noise = [row for row in rows if row[0].startswith("Gaussian")]
    assert set(crafted) == {"model (eps=0.2)", "fc100 (eps=0.2)"}
    for row, baseline in zip(crafted.values(), noise, strict=True):
        assert min(row[1:3]) > max(baseline[1:3])  # every model errs more on v than on noise of its size
