"""Every input layout and every way of choosing targets, through whole evaluations.

- NCHW/NHWC twins: one network exported channels-first and channels-last (as tf2onnx and
  Keras export it) gives the same result document with NCHW or NHWC data, per-channel
  normalisation and Square's per-channel stripes included; artifacts come back in the
  dataset's layout.
- Targets: random, least likely, every class, and the dataset's own array t.
- AutoAttack on inputs that are not images keeps what it found and says Square was skipped.
- A model whose graph depends on its fixed batch of 1 evaluates, batch by batch, with the
  results of the same network with a free batch axis.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from schemas.evaluation import EvaluationSpec
from tests import digits
from workers.attacks.targets import least_likely
from workers.datasets import Dataset, DatasetError, load_npz
from workers.evaluate import evaluate
from workers.runtime import Classifier
from workers.spec_checks import check_spec

SAMPLES = 60


def _export(module: nn.Module, shape) -> bytes:
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.zeros(2, *shape),), buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


class _RGB(nn.Module):
    """A small 3-channel CNN, trained briefly on coloured digits."""

    def __init__(self, channels_last: bool):
        super().__init__()
        torch.manual_seed(0)
        self.channels_last = channels_last
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2) if self.channels_last else x)


def _coloured(x: np.ndarray) -> np.ndarray:
    gray = torch.nn.functional.interpolate(torch.tensor(x), size=(16, 16), mode="area").numpy()
    return np.concatenate([gray, 0.6 * gray + 0.2, 1.0 - 0.8 * gray], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def twins():
    """(NCHW export, NHWC export) of one network, and colour images [N, 3, 16, 16] NCHW."""
    x_train, y_train, x, y = digits.digits()
    nchw = _RGB(channels_last=False)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        optimiser = torch.optim.Adam(nchw.parameters(), lr=3e-3)
        xt, yt = torch.tensor(_coloured(x_train)), torch.tensor(y_train)
        for _ in range(3):
            for batch in torch.randperm(len(xt), generator=torch.Generator().manual_seed(0)).split(64):
                optimiser.zero_grad()
                nn.functional.cross_entropy(nchw(xt[batch]), yt[batch]).backward()
                optimiser.step()
    nhwc = _RGB(channels_last=True)
    nhwc.load_state_dict(nchw.state_dict())
    return _export(nchw, (3, 16, 16)), _export(nhwc, (16, 16, 3)), _coloured(x[:SAMPLES]), y[:SAMPLES]


TWIN_SPEC = {
    "input": {"mean": [0.4, 0.5, 0.45], "std": [0.2, 0.25, 0.3]},
    "samples": SAMPLES, "shard_size": 25,
    "attacks": [{"name": "fgsm", "eps": [0.03, 0.06]},
                {"name": "pgd", "eps": 0.03, "steps": 5},
                {"name": "square", "eps": 0.05, "queries": 60},
                {"name": "deepfool", "max_iter": 10},
                {"name": "pgd", "eps": 0.05, "steps": 5, "targets": "least_likely", "label": "pgd-ll"}],
    "gates": [{"metric": "robust_accuracy", "attack": "pgd", "min": 0.0}],
}


def _comparable(result) -> dict:
    document = result.model_dump(mode="json")
    for key in ("timing",):
        document.pop(key)
    document["model"] = {k: v for k, v in document["model"].items() if k not in ("sha256", "input_shape",
                                                                                "layout")}
    document["dataset"].pop("sha256")
    document["spec"]["input"].pop("layout")
    return document


def test_nchw_and_nhwc_twins_give_the_same_result_document(twins):
    nchw_model, nhwc_model, x, y = twins
    nhwc_x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    runs = {
        "nchw model, nchw data": (nchw_model, x, "NCHW"),
        "nhwc model, nhwc data": (nhwc_model, nhwc_x, "NHWC"),
        "nhwc model, nchw data": (nhwc_model, x, "NCHW"),
        "nchw model, nhwc data": (nchw_model, nhwc_x, "NHWC"),
    }
    results = {}
    for label, (model, data, layout) in runs.items():
        spec = EvaluationSpec.model_validate({**TWIN_SPEC, "input": {**TWIN_SPEC["input"], "layout": layout}})
        results[label] = evaluate(model, Dataset(x=data, y=y, source_dtype="float32"), spec)
    reference = _comparable(results["nchw model, nchw data"].result)
    assert reference["attacks"][0]["robust_accuracy"] < reference["clean_accuracy"]
    for label, evaluation in results.items():
        assert _comparable(evaluation.result) == reference, label
        layout = runs[label][2]
        assert evaluation.result.model["layout"] == ("NHWC" if runs[label][0] is nhwc_model else "NCHW")
        x_adv = evaluation.artifacts["square@0.05/x_adv"]
        assert x_adv.shape == runs[label][1].shape  # back in the dataset's layout
        np.testing.assert_array_equal(
            x_adv if layout == "NCHW" else x_adv.transpose(0, 3, 1, 2),
            results["nchw model, nchw data"].artifacts["square@0.05/x_adv"])
        assert evaluation.examples["fgsm@0.03"]["x"].shape[1:] == runs[label][1].shape[1:]


def test_an_nhwc_model_with_free_spatial_axes_needs_no_declaration(twins):
    """Keras exports often leave H and W symbolic: [N, ?, ?, 3]."""
    _, nhwc_model, x, y = twins
    model = onnx.load_from_string(nhwc_model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "H", "W"
    spec = EvaluationSpec.model_validate({"samples": 10, "attacks": [{"name": "fgsm", "eps": 0.03}]})
    result = evaluate(model.SerializeToString(), Dataset(x=x, y=y, source_dtype="float32"), spec).result
    assert result.model["layout"] == "NHWC" and result.model["input_shape"] == [None, None, None, 3]


def test_a_dataset_declared_in_the_wrong_layout_is_refused_with_a_hint(twins):
    nchw_model, _, x, y = twins
    data = Dataset(x=np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y=y, source_dtype="float32")
    spec = EvaluationSpec.model_validate({"attacks": [{"name": "fgsm", "eps": 0.03}]})
    with pytest.raises(DatasetError, match="set input.layout to the dataset's layout"):
        evaluate(nchw_model, data, spec)


# ------------------------------------------------------------------------------ targets


@pytest.fixture(scope="module")
def digit_data():
    _, _, x, y = digits.digits()
    return digits.onnx_bytes("cnn"), Dataset(x=x[:SAMPLES], y=y[:SAMPLES], source_dtype="float32")


def _targeted(mode: str, **more) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"seed": 3, "shard_size": 25, "attacks": [
        {"name": "pgd", "eps": [0.1, 0.2], "steps": 10, "targets": mode, **more}]})


def test_least_likely_targets_are_the_dataset_targets_of_the_clean_argmin(digit_data):
    model, data = digit_data
    least = evaluate(model, data, _targeted("least_likely")).result
    t = least_likely(Classifier(model).logits(data.x))
    assert np.all(t != data.y)
    given = evaluate(model, Dataset(x=data.x, y=data.y, source_dtype="float32", t=t),
                     _targeted("dataset")).result
    assert [e.model_dump(exclude={"details"}) for e in least.attacks] == \
        [e.model_dump(exclude={"details"}) for e in given.attacks]
    assert least.attacks[0].details["targets"] == "least_likely"


def test_every_target_is_at_least_as_strong_as_random_targets(digit_data):
    model, data = digit_data
    every = evaluate(model, data, _targeted("all")).result
    random = evaluate(model, data, _targeted("random")).result
    assert random.spec.attacks[0].target_mode == "random"
    for e, r in zip(every.attacks, random.attacks, strict=True):
        assert e.robust_accuracy <= r.robust_accuracy, (e.eps, e.robust_accuracy, r.robust_accuracy)
    assert every.attacks[1].robust_accuracy < every.attacks[0].robust_accuracy


def test_targets_from_the_dataset_are_required_and_checked(digit_data, tmp_path):
    model, data = digit_data
    with pytest.raises(DatasetError, match="no target labels; add an array t"):
        evaluate(model, data, _targeted("dataset"))
    bad = Dataset(x=data.x, y=data.y, source_dtype="float32", t=np.full(len(data.y), 12))
    with pytest.raises(DatasetError, match="target labels t go up to 12 but the model has 10 classes"):
        evaluate(model, bad, _targeted("dataset"))
    buffer = io.BytesIO()
    np.savez(buffer, x=data.x, y=data.y, t=(data.y + 1) % 10)
    assert list(load_npz(buffer.getvalue()).t[:3]) == list((data.y[:3] + 1) % 10)
    with pytest.raises(ValueError, match="contradicts"):
        _targeted("all", targeted=False)
    with pytest.raises(ValueError, match="no targeted variant"):
        check_spec(EvaluationSpec.model_validate({"attacks": [{"name": "deepfool", "targets": "all"}]}))


# ------------------------------------------------------------------------------ inputs that are not images


def test_autoattack_on_vectors_keeps_its_components_and_skips_square():
    _, _, x, y = digits.digits()
    data = Dataset(x=x[:40].reshape(40, 784, 1), y=y[:40], source_dtype="float32")
    spec = EvaluationSpec.model_validate({"attacks": [
        {"name": "autoattack", "eps": 0.1, "steps": 10, "square_queries": 50, "n_target_classes": 3}]})
    result = evaluate(digits.variant_onnx_bytes("fc100-flat"), data, spec).result
    (entry,) = result.attacks
    assert list(entry.details["robust_accuracy"]) == ["clean", "apgd-ce", "apgd-t", "fab-t"]
    assert entry.details["robust_accuracy"]["fab-t"] == pytest.approx(entry.robust_accuracy)
    assert entry.robust_accuracy < result.clean_accuracy - 0.2
    assert "[N, 784, 1]" in entry.details["skipped"]["square"]
    assert any("square skipped" in w for w in result.warnings)
    assert entry.warnings == []  # a skipped component is not a sign of masking


# ------------------------------------------------------------------------------ a fixed batch


def _batch_one_model(free: bool) -> bytes:
    """Flatten, then Concat with a constant row [1, 4] (the graph needs batch 1), then MatMul;
    ``free``: the same function with the constant folded into a bias (any batch)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((788, 10)).astype(np.float32) * 0.1
    extra = rng.standard_normal((1, 4)).astype(np.float32)
    batch = "N" if free else 1
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 28, 28])
    z = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    if free:
        nodes = [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["h"]),
                 helper.make_node("Add", ["h", "b"], ["logits"])]
        inits = [numpy_helper.from_array(w[:784], "w"), numpy_helper.from_array(extra @ w[784:], "b")]
    else:
        nodes = [helper.make_node("Flatten", ["input"], ["f"]),
                 helper.make_node("Concat", ["f", "extra"], ["c"], axis=1),
                 helper.make_node("MatMul", ["c", "w"], ["logits"])]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(extra, "extra")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [z], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_a_model_that_needs_its_batch_of_one_evaluates_batch_by_batch(digit_data):
    _, data = digit_data
    spec = EvaluationSpec.model_validate({"attacks": [{"name": "fgsm", "eps": 0.05},
                                                      {"name": "pgd", "eps": 0.05, "steps": 3},
                                                      {"name": "deepfool", "max_iter": 5}]})
    fixed = evaluate(_batch_one_model(free=False), data, spec).result
    free = evaluate(_batch_one_model(free=True), data, spec).result
    assert fixed.model["fixed_batch"] == 1 and free.model["fixed_batch"] is None
    assert fixed.clean_accuracy == free.clean_accuracy
    for a, b in zip(fixed.attacks, free.attacks, strict=True):
        assert abs(a.robust_accuracy - b.robust_accuracy) <= 1 / SAMPLES, (a.attack, a.robust_accuracy,
                                                                           b.robust_accuracy)


def test_upload_and_evaluation_agree_on_a_batch_of_one(tmp_path):
    from service.model_admission import validate_model

    path = tmp_path / "batch1.onnx"
    path.write_bytes(_batch_one_model(free=False))
    info = validate_model(path, max_bytes=1 << 20)
    assert info.gradients_available and info.input_shape == [None, 1, 28, 28]
    assert copy.deepcopy(Classifier(path.read_bytes()).fixed_batch) == 1


def test_the_cli_evaluates_an_nhwc_model_on_nhwc_images(twins, tmp_path):
    import yaml

    from client.cli import main

    _, nhwc_model, x, y = twins
    (tmp_path / "model.onnx").write_bytes(nhwc_model)
    np.savez(tmp_path / "data.npz", x=x.transpose(0, 2, 3, 1), y=y)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "input": {"layout": "NHWC", "mean": [0.4, 0.5, 0.45], "std": [0.2, 0.25, 0.3]},
        "attacks": [{"name": "square", "eps": 0.05, "queries": 20}]}))
    args = [str(tmp_path / "model.onnx"), str(tmp_path / "data.npz"), "--spec", str(tmp_path / "spec.yaml")]
    assert main(["evaluate", *args]) == 0
