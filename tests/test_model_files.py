"""Model files nobody here wrote: legacy IR versions, and every file the `onnx` package ships
as backend test data, plus truncated and bit-flipped copies of a zoo model. Each is accepted
or refused with the engine's UserError (a 4xx on the service, exit 2 on the command line):
never another exception, a traceback or a 500."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from client.cli import main
from schemas.evaluation import EvaluationSpec
from service.model_admission import validate_model
from workers.dataset_files import load_dataset_file
from workers.errors import UserError
from workers.evaluate import evaluate
from workers.preprocess import compose_preprocessing
from workers.runtime import Classifier

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "digits-cnn.onnx"
DATA = ROOT / "examples" / "digits-test.npz"
BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
OPSET_7_DROPS = {"MaxPool": ("ceil_mode", "dilations")}  # attributes opset 7 lacks (defaults here)


def as_ir3(model: onnx.ModelProto) -> onnx.ModelProto:
    """The digits CNN as a 2017 exporter (CNTK, the Windows ML samples' mnist.onnx) wrote it:
    IR version 3, opset 7, every initializer also listed as a graph input."""
    legacy = onnx.ModelProto()
    legacy.CopyFrom(model)
    for node in legacy.graph.node:
        dropped = OPSET_7_DROPS.get(node.op_type, ())
        kept = [a for a in node.attribute if a.name not in dropped]
        assert all(helper.get_attribute_value(a) in (0, [1, 1]) for a in node.attribute if a.name in dropped)
        del node.attribute[:]
        node.attribute.extend(kept)
    for tensor in legacy.graph.initializer:
        legacy.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    del legacy.opset_import[:]
    legacy.opset_import.append(helper.make_opsetid("", 7))
    legacy.ir_version = 3
    return legacy


def accepted_or_refused(path: Path) -> str:
    try:
        validate_model(path, max_bytes=1 << 30)
    except UserError:
        return "refused"
    return "accepted"  # any other exception fails the test, naming the file


def test_every_backend_test_model_of_onnx_is_accepted_or_clearly_refused():
    files = sorted(BACKEND_DATA.rglob("*.onnx"))
    assert len(files) > 100, f"the onnx package ships {len(files)} backend test models"
    outcomes = [accepted_or_refused(path) for path in files]
    print(f"{len(files)} backend test models: {outcomes.count('accepted')} accepted, "
          f"{outcomes.count('refused')} refused")
    assert "accepted" in outcomes and "refused" in outcomes


@pytest.mark.parametrize("source", ["modern", "ir3"])
def test_truncated_and_bit_flipped_models_are_accepted_or_clearly_refused(tmp_path, source):
    model = onnx.load(MODEL)
    original = (model if source == "modern" else as_ir3(model)).SerializeToString()
    rng = random.Random(source)
    outcomes = []
    for i in range(300):
        data = bytearray(original)
        if i % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"mutant-{i}.onnx"
        path.write_bytes(bytes(data))
        outcomes.append(accepted_or_refused(path))
    assert outcomes.count("refused") > 100  # most truncations break the file


def test_a_legacy_ir3_model_is_accepted_and_evaluates_as_its_modern_export(tmp_path, capsys):
    legacy = tmp_path / "ir3.onnx"
    onnx.save(as_ir3(onnx.load(MODEL)), legacy)
    onnx.checker.check_model(onnx.load(legacy))  # valid IR 3
    without_weight_inputs = onnx.load(legacy)
    del without_weight_inputs.graph.input[1:]
    with pytest.raises(onnx.checker.ValidationError, match="initializer but not in graph input"):
        onnx.checker.check_model(without_weight_inputs)  # what the gradient builder made of it, before
    info = validate_model(legacy, max_bytes=1 << 30)
    assert info.gradients_available and info.num_classes == 10 and info.opset == 7
    assert main(["inspect", str(legacy)]) == 0
    assert "available" in capsys.readouterr().out
    spec = EvaluationSpec.model_validate({
        "samples": 100, "attacks": [{"name": "fgsm", "eps": 0.1}, {"name": "pgd", "eps": 0.1, "steps": 10}]})
    dataset = load_dataset_file(DATA)
    results = [evaluate(path.read_bytes(), dataset, spec).result for path in (MODEL, legacy)]
    modern, old = results
    assert old.clean_accuracy == modern.clean_accuracy
    for a, b in zip(modern.attacks, old.attacks, strict=True):
        np.testing.assert_allclose(b.robust_accuracy, a.robust_accuracy, atol=0.02)


def test_the_command_line_refuses_a_broken_model_with_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(MODEL.read_bytes()[:1000])
    assert main(["inspect", str(broken)]) == 2
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------ half precision, squeezed logits


def as_half(model: onnx.ModelProto, elem: int = onnx.TensorProto.FLOAT16) -> onnx.ModelProto:
    """The model as a float16 export is: half weights, half input and output."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    dtype = {onnx.TensorProto.FLOAT16: np.float16}[elem]
    for i, tensor in enumerate(half.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32:
            half.graph.initializer[i].CopyFrom(numpy_helper.from_array(array.astype(dtype), tensor.name))
    for value in (*half.graph.input, *half.graph.output):
        value.type.tensor_type.elem_type = elem
    return half


def with_rounded_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float32 model whose weights are the float16 model's (each half value exactly)."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    for i, tensor in enumerate(rounded.graph.initializer):
        array = numpy_helper.to_array(tensor)
        rounded.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(array.astype(np.float16).astype(np.float32), tensor.name))
    return rounded


@pytest.fixture(scope="module")
def digits():
    data = load_dataset_file(DATA)
    return data.x[:200], data.y[:200]


def test_a_float16_model_predicts_as_itself_and_has_its_float32_twins_gradient(tmp_path, digits):
    x, y = digits
    half = as_half(onnx.load(MODEL))
    own = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = own.run(None, {own.get_inputs()[0].name: x.astype(np.float16)})[0].astype(np.float32)
    classifier = Classifier(half.SerializeToString())
    assert classifier.dtype == "float16"
    np.testing.assert_array_equal(classifier.logits(x), expected)  # the file's own predictions
    twin = Classifier(with_rounded_weights(onnx.load(MODEL)).SerializeToString())
    for loss in ("cross_entropy", "margin"):
        _, _, grad = classifier.loss_and_grad(x, y, loss=loss)
        _, _, reference = twin.loss_and_grad(x, y, loss=loss)
        np.testing.assert_array_equal(grad, reference)
    path = tmp_path / "half.onnx"
    onnx.save(half, path)
    info = validate_model(path, max_bytes=1 << 30)
    assert info.gradients_available and info.num_classes == 10


def test_a_float16_model_evaluates_end_to_end_with_normalisation(tmp_path, digits):
    x, y = digits
    half = as_half(onnx.load(MODEL)).SerializeToString()
    spec = EvaluationSpec.model_validate({
        "samples": 200, "input": {"mean": [0.1], "std": [0.9]},
        "attacks": [{"name": "fgsm", "eps": 0.1}, {"name": "pgd", "eps": 0.1, "steps": 5}],
        "defenses": [{"name": "downsample", "factor": 0.5}, {"name": "bit_depth", "bits": 3}]})
    result = evaluate(half, load_dataset_file(DATA), spec).result
    assert result.model["dtype"] == "float16"
    assert result.defenses is not None and all(d.clean_accuracy > 0.5 for d in result.defenses)
    composed = compose_preprocessing(half, mean=[0.1], std=[0.9])
    assert composed.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # cast inside
    own = ort.InferenceSession(as_half(onnx.load(MODEL)).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    normalised = ((x - 0.1) / 0.9).astype(np.float16)
    predicted = own.run(None, {own.get_inputs()[0].name: normalised})[0].argmax(1)
    assert result.clean_accuracy == pytest.approx(float((predicted == y).mean()))
    assert result.attacks[0].robust_accuracy < result.clean_accuracy


def _with_output(model: onnx.ModelProto, shape: list[int], softmax_axis: int | None = None
                 ) -> onnx.ModelProto:
    """The digits model with its [N, 10] logits reshaped to ``shape`` (-1 for N), then a Softmax."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    graph = changed.graph
    logits = graph.output[0].name
    graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "out_shape"))
    graph.node.append(helper.make_node("Reshape", [logits, "out_shape"], ["reshaped"]))
    last = "reshaped"
    if softmax_axis is not None:
        graph.node.append(helper.make_node("Softmax", ["reshaped"], ["probabilities"], axis=softmax_axis))
        last = "probabilities"
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, ["N", *shape[1:]]))
    return changed


@pytest.mark.parametrize("shape, softmax_axis", [
    ([-1, 10, 1, 1], None), ([-1, 1, 10], None), ([-1, 10, 1, 1], 1), ([-1, 1, 10], -1)],
    ids=["nk11", "n1k", "nk11-softmax", "n1k-softmax"])
def test_logits_shaped_nk11_or_n1k_are_squeezed_and_the_result_says_so(digits, shape, softmax_axis):
    x, y = digits
    model = _with_output(onnx.load(MODEL), shape, softmax_axis)
    classifier, plain = Classifier(model.SerializeToString()), Classifier(MODEL.read_bytes())
    assert classifier.num_classes == 10 and classifier.squeezed_from == ("N", *shape[1:])
    assert classifier.ends_in_softmax == (softmax_axis is not None)
    np.testing.assert_allclose(classifier.logits(x), plain.logits(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(classifier.loss_and_grad(x, y, loss="cross_entropy")[2],
                               plain.loss_and_grad(x, y, loss="cross_entropy")[2], rtol=1e-4, atol=1e-6)
    spec = EvaluationSpec.model_validate({"samples": 50, "attacks": [{"name": "fgsm", "eps": 0.1}]})
    result = evaluate(model.SerializeToString(), load_dataset_file(DATA), spec).result
    assert result.model["output_squeezed_from"] == ["N", *shape[1:]]


def test_a_softmax_over_another_axis_is_still_refused():
    model = _with_output(onnx.load(MODEL), [-1, 10, 1, 1], softmax_axis=2)
    with pytest.raises(UserError, match="Softmax over axis"):
        Classifier(model.SerializeToString())


def test_the_service_accepts_legacy_half_and_squeezed_models_and_says_what_it_saw(tmp_path):
    from tests.service.conftest import gateway, make_settings, upload

    files = {"ir3": as_ir3(onnx.load(MODEL)), "half": as_half(onnx.load(MODEL)),
             "squeezed": _with_output(onnx.load(MODEL), [-1, 10, 1, 1])}
    with gateway(make_settings(tmp_path / "data")) as api:
        answers = {}
        for name, model in files.items():
            path = tmp_path / f"{name}.onnx"
            onnx.save(model, path)
            answers[name] = upload(api, "models", path)
        assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(files, 201), \
            {name: a.text for name, a in answers.items()}
        ir3, half, squeezed = (answers[name].json() for name in files)
        assert ir3["opset"] == 7 and ir3["attacks"] == "all" and ir3["dtype"] == "float32"
        assert half["dtype"] == "float16" and half["attacks"] == "all"
        assert squeezed["output_squeezed_from"] == [None, 10, 1, 1] and squeezed["num_classes"] == 10
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(MODEL.read_bytes()[:5000])
        refused = upload(api, "models", broken)
        assert refused.status_code == 400 and refused.json()["type"] == "invalid_model", refused.text


def test_a_bfloat16_model_that_the_runtime_cannot_run_is_refused_at_upload(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 Conv: refused with its reason at upload,
    not accepted and failed in every evaluation (the check loads what predictions run)."""
    import ml_dtypes

    model = onnx.load(MODEL)
    for i, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor).astype(ml_dtypes.bfloat16)
        model.graph.initializer[i].CopyFrom(helper.make_tensor(
            tensor.name, onnx.TensorProto.BFLOAT16, array.shape, array.view(np.uint16).tobytes(), raw=True))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    path = tmp_path / "bf16.onnx"
    onnx.save(model, path)
    with pytest.raises(UserError, match=r"ONNX Runtime .* cannot load the model: .*bfloat16"):
        validate_model(path, max_bytes=1 << 30)


def _ending_in(model: onnx.ModelProto, nodes: list[onnx.NodeProto], last: str, shape: list) -> bytes:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.node.extend(nodes)
    del changed.graph.output[:]
    changed.graph.output.append(helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, shape))
    return changed.SerializeToString()


def _finals(logits: str) -> dict[str, tuple[list[onnx.NodeProto], str, str]]:
    """Heads after the digits model's logits: (nodes, output, what the model ends in)."""
    return {
        # sklearn-onnx's MLPClassifier with zipmap off; any renamed output
        "softmax-identity": ([helper.make_node("Softmax", [logits], ["p"], axis=1),
                              helper.make_node("Identity", ["p"], ["probabilities"])],
                             "probabilities", "Softmax"),
        "softmax-flatten": ([helper.make_node("Softmax", [logits], ["p"], axis=-1),
                             helper.make_node("Flatten", ["p"], ["probabilities"], axis=1)], "probabilities",
                            "Softmax"),
        "reshape-softmax-reshape": ([helper.make_node("Reshape", [logits, "n1k"], ["r"]),
                                     helper.make_node("Softmax", ["r"], ["p"], axis=-1),
                                     helper.make_node("Reshape", ["p", "nk"], ["probabilities"])],
                                    "probabilities", "Softmax"),
        "sigmoid": ([helper.make_node("Sigmoid", [logits], ["probabilities"])], "probabilities", "Sigmoid"),
        "sigmoid-identity": ([helper.make_node("Sigmoid", [logits], ["p"]),
                              helper.make_node("Identity", ["p"], ["probabilities"])],
                             "probabilities", "Sigmoid"),
    }


@pytest.mark.parametrize("head", list(_finals("z")))
def test_a_final_softmax_or_sigmoid_behind_shape_only_nodes_is_differentiated_before(digits, head):
    """Read as logits, probabilities saturate: a confident sample's gradient rounds away (a
    sigmoid head read that way left PGD at 0.375 robust accuracy, and DeepFool's median L2 came out
    12x too large behind an Identity)."""
    x, y = digits
    model = onnx.load(MODEL)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([-1, 1, 10], np.int64), "n1k"),
                                    numpy_helper.from_array(np.array([-1, 10], np.int64), "nk")])
    nodes, last, ends_in = _finals(model.graph.output[0].name)[head]
    classifier, plain = Classifier(_ending_in(model, nodes, last, ["N", 10])), Classifier(MODEL.read_bytes())
    assert classifier.ends_in_softmax == (ends_in == "Softmax")
    assert classifier.ends_in_sigmoid == (ends_in == "Sigmoid")
    np.testing.assert_allclose(classifier.logits(x), plain.logits(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(classifier.loss_and_grad(x, y)[2], plain.loss_and_grad(x, y)[2],
                               rtol=1e-4, atol=1e-6)


def test_a_softmax_over_other_values_reshaped_into_the_scores_is_read_as_scores(digits):
    """A softmax over two halves of the scores is no softmax over the classes: not looked through."""
    x, _ = digits
    model = onnx.load(MODEL)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([-1, 2, 5], np.int64), "halves"),
                                    numpy_helper.from_array(np.array([-1, 10], np.int64), "nk")])
    logits = model.graph.output[0].name
    nodes = [helper.make_node("Reshape", [logits, "halves"], ["r"]),
             helper.make_node("Softmax", ["r"], ["p"]), helper.make_node("Reshape", ["p", "nk"], ["scores"])]
    classifier = Classifier(_ending_in(model, nodes, "scores", ["N", 10]))
    assert not classifier.ends_in_softmax and not classifier.ends_in_sigmoid
    own = ort.InferenceSession(_ending_in(model, nodes, "scores", ["N", 10]))
    np.testing.assert_allclose(classifier.logits(x[:5]), own.run(None, {"input": x[:5]})[0], rtol=1e-6)


def _features_first() -> tuple[onnx.ModelProto, str]:
    """The digits model returning (features [N, 4], logits), as a module returning both would."""
    model = onnx.load(MODEL)
    logits = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Slice", [logits, "start", "end", "axis"], ["features"]))
    model.graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), name)
                                    for name, v in (("start", 0), ("end", 4), ("axis", 1))])
    model.graph.output.insert(0, helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 4]))
    return model, logits


def test_input_model_output_picks_the_scores_of_a_model_with_features_first():
    """Its first float output is read unless the spec names another."""
    model, logits = _features_first()
    data = model.SerializeToString()
    dataset = load_dataset_file(DATA)
    spec = {"samples": 40, "attacks": [{"name": "fgsm", "eps": 0.1}]}
    with pytest.raises(UserError, match="labels go up to 9 but the model has 4 classes"):
        evaluate(data, dataset, EvaluationSpec.model_validate(spec))
    named = EvaluationSpec.model_validate({**spec, "input": {"model_output": logits}})
    chosen = evaluate(data, dataset, named)
    plain = evaluate(MODEL.read_bytes(), dataset, EvaluationSpec.model_validate(spec))
    assert chosen.result.model["num_classes"] == 10
    assert chosen.result.clean_accuracy == plain.result.clean_accuracy
    assert chosen.result.attacks[0].robust_accuracy == plain.result.attacks[0].robust_accuracy
    with pytest.raises(UserError, match="input.model_output: the model has no output 'scores'; its outputs "
                                        f"are 'features', '{logits}'"):
        evaluate(data, dataset, EvaluationSpec.model_validate({**spec, "input": {"model_output": "scores"}}))


def test_the_service_checks_the_class_count_of_the_first_output_only_where_no_other_is_named(tmp_path):
    from tests.service.conftest import gateway, make_settings, upload

    model, logits = _features_first()
    onnx.save(model, tmp_path / "features-first.onnx")
    with gateway(make_settings(tmp_path / "data")) as api:
        model_id = upload(api, "models", tmp_path / "features-first.onnx").json()["id"]
        dataset_id = upload(api, "datasets", DATA).json()["id"]
        body = {"model_id": model_id, "dataset_id": dataset_id, "samples": 8,
                "attacks": [{"name": "fgsm", "eps": 0.1}]}
        refused = api.post("/v1/evaluations", json=body)
        assert refused.status_code == 422 and "labels up to 9 but the model has 4 classes" in refused.text
        named = api.post("/v1/evaluations", json={**body, "input": {"model_output": logits}})
        assert named.status_code == 202, named.text


def test_a_clean_accuracy_below_chance_is_flagged_with_what_to_check():
    """Features read as 4 class scores (labels moved into 0-3, away from the true class): below chance."""
    model, _ = _features_first()
    del model.graph.output[1:]
    shifted = load_dataset_file(DATA)
    shifted.y[:] = (shifted.y + 1) % 4
    result = evaluate(model.SerializeToString(), shifted, EvaluationSpec.model_validate(
        {"samples": 40, "attacks": [{"name": "fgsm", "eps": 0.1}]})).result
    assert result.clean_accuracy < 0.25
    assert any("below chance (1/4)" in w and "input.model_output" in w for w in result.warnings)
