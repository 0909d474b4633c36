"""compose(): the defended model as one ONNX graph. Its logits equal the classifier on apply(x),
the gradient builder differentiates it, and the gradient is the chain rule J_g^T grad f(g(x)),
checked against float64 central differences along a random direction."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from tests.defenses.conftest import OPTIONS, make_autoencoder
from tests.onnxgrad.gradcheck import check_vjp, to_float64
from workers.defenses import build_defense
from workers.defenses.downsample import _axis_matrix, resize_scale
from workers.onnxgrad import UnsupportedOperatorError, build_vjp_model, supported_op_types
from workers.runtime import Classifier

STAGES = ["pca", "pca-clip", "downsample-linear", "downsample-nearest", "autoencoder"]


def make_stage(kind: str, x_fit: np.ndarray):
    if kind.startswith("pca"):
        defense = build_defense("pca", variance=0.99, clip=(0.0, 1.0) if kind == "pca-clip" else None)
        defense.fit(x_fit)
        return defense
    if kind.startswith("downsample"):
        mode = kind.split("-")[1]
        return build_defense("downsample", factor=0.75 if mode == "linear" else 0.5, mode=mode)
    return build_defense("autoencoder", model=make_autoencoder())


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def identity_model(shape) -> onnx.ModelProto:
    """input -> Identity -> output: compose() onto it gives the stage alone."""
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", *shape])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", STAGES)
def test_composed_logits_equal_the_classifier_on_the_defended_input(kind, model_bytes, classifier,
                                                                    test_data, x_fit):
    x = test_data[0][:100]
    defense = make_stage(kind, x_fit)
    composed = defense.compose(model_bytes)
    original = onnx.load_from_string(model_bytes)
    assert [i.name for i in composed.graph.input] == [i.name for i in original.graph.input]
    assert composed.graph.input[0].type == original.graph.input[0].type
    assert [o.name for o in composed.graph.output] == [o.name for o in original.graph.output]
    # the defended input itself, then the logits (float32: MatMul sums in another order in ORT)
    stage = run(defense.compose(identity_model((1, 28, 28))), x)
    np.testing.assert_allclose(stage, defense.apply(x), atol=2e-6)
    expected = classifier.logits(defense.apply(x))
    np.testing.assert_allclose(run(composed, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(Classifier(composed, OPTIONS).logits(x), run(composed, x), atol=1e-6)


@pytest.mark.parametrize("kind", ["pca", "pca-clip", "downsample-linear", "downsample-nearest"])
def test_the_stage_uses_only_operators_the_gradient_builder_supports(kind, model_bytes, x_fit):
    composed = make_stage(kind, x_fit).compose(model_bytes)
    stage_ops = {n.op_type for n in composed.graph.node if n.name.startswith("defense/")}
    assert stage_ops and stage_ops <= set(supported_op_types())
    assert all(n.domain in ("", "ai.onnx") for n in composed.graph.node)


def _chain_rule(defense, kind: str, grad_at_defended: np.ndarray) -> np.ndarray:
    """J_g^T applied to the classifier's gradient at g(x), in float64."""
    g = grad_at_defended.astype(np.float64)
    if kind.startswith("pca"):
        u = defense.components.astype(np.float64)
        return ((g.reshape(len(g), -1) @ u) @ u.T).reshape(g.shape)
    rows, cols = defense.matrix(g.shape[2]).astype(np.float64), defense.matrix(g.shape[3]).astype(np.float64)
    return rows.T @ g @ cols


@pytest.mark.parametrize("kind", ["pca", "downsample-linear", "downsample-nearest"])
def test_composed_gradient_is_the_chain_rule(kind, model_bytes, classifier, test_data, x_fit):
    x, y = test_data[0][:32], test_data[1][:32]
    defense = make_stage(kind, x_fit)
    logits, loss, grad = Classifier(defense.compose(model_bytes), OPTIONS).loss_and_grad(x, y)
    # the classifier's gradient at the defended images exactly as the composed stage computes
    # them: numpy rounds the projection differently, which can move a sample across a ReLU or
    # max-pool kink of the classifier (seen on 2 of 32 samples, on some machines)
    defended = run(defense.compose(identity_model((1, 28, 28))), x)
    ref_logits, ref_loss, ref_grad = classifier.loss_and_grad(defended, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-5)
    expected = _chain_rule(defense, kind, ref_grad)
    flat = (len(x), -1)
    errors = (np.linalg.norm((grad - expected).reshape(flat), axis=1)
              / np.linalg.norm(expected.reshape(flat), axis=1))
    assert np.sum(errors >= 1e-4) == 0, np.sort(errors)[-3:]


@pytest.mark.parametrize("kind", STAGES)
def test_composed_gradient_against_float64_central_differences(kind, model_bytes, test_data, x_fit):
    composed = make_stage(kind, x_fit).compose(model_bytes)
    vjp = build_vjp_model(composed, wrt=["input"], output="logits")
    rng = np.random.default_rng(0)
    # digits have flat backgrounds: ties in the max-pool windows, where the classifier has no
    # derivative and central differences mislead; a little noise moves the points off them
    digits = test_data[0][:2] + rng.uniform(0, 0.01, (2, 1, 28, 28)).astype(np.float32)
    for seed, x in enumerate([digits, rng.random((2, 1, 28, 28), dtype=np.float32)]):
        error = check_vjp(to_float64(composed), to_float64(vjp), {"input": x}, wrt=["input"],
                          output="logits", eps=1e-6, rtol=1e-5, atol=1e-8, seed=seed)
        assert error < 1e-5


# --------------------------------------------------------------------------- downsampling


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("factor", [0.3, 0.5, 0.6, 0.75, 0.9])
def test_downsample_apply_equals_the_onnx_stage(mode, factor):
    defense = build_defense("downsample", factor=factor, mode=mode)
    for shape in [(1, 28, 28), (3, 17, 23), (2, 5, 64)]:
        x = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
        stage = run(defense.compose(identity_model(shape)), x)
        np.testing.assert_allclose(defense.apply(x), stage, atol=1e-6)
        small = [defense.small_size(s) for s in shape[1:]]
        assert small == [max(1, round(s * factor)) for s in shape[1:]]


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("factor", [0.5, 0.75])
def test_downsample_matches_pytorch_interpolate(mode, factor, test_data):
    """linear: bilinear with align_corners=False; nearest: PyTorch's (legacy) nearest."""
    x = test_data[0][:16]
    small = round(28 * factor)
    options = {"mode": "bilinear", "align_corners": False} if mode == "linear" else {"mode": "nearest"}
    down = torch.nn.functional.interpolate(torch.tensor(x), size=(small, small), **options)
    expected = torch.nn.functional.interpolate(down, size=(28, 28), **options).numpy()
    out = build_defense("downsample", factor=factor, mode=mode).apply(x)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_resize_scales_give_the_intended_sizes_in_onnx_and_onnxruntime():
    """float32(t / L) can give t - 1 pixels (ONNX floors the exact product L * s)."""
    pairs = [(28, 21), (97, 255), (299, 189), (257, 97), (224, 168), (32, 24), (5, 1), (1, 7)]
    for length, target in pairs:
        scale = resize_scale(length, target)
        assert target <= float(length) * float(scale) < target + 1
        assert _axis_matrix("linear", length, scale).shape == (target, length)  # ORT agrees
    assert float(97) * float(np.float32(255 / 97)) < 255  # the naive scale falls one short


def test_downsample_refuses_a_model_without_static_spatial_sizes():
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(ValueError, match=r"input 'input' has shape \['N', 3, 'H', 'W'\]; it needs NCHW "
                                         r"with a static height and width"):
        build_defense("downsample").compose(model)


def test_pca_refuses_a_model_of_another_image_shape(model_bytes):
    defense = build_defense("pca", variance=0.9)
    defense.fit(np.random.default_rng(0).random((50, 1, 14, 14), dtype=np.float32))
    with pytest.raises(ValueError, match=r"input 'input' has shape \['batch', 1, 28, 28\]; the PCA was fit "
                                         r"on images of shape \[N, 1, 14, 14\]"):
        defense.compose(model_bytes)


# --------------------------------------------------------------------------- autoencoder


def test_autoencoder_names_never_collide_with_the_classifier(model_bytes, classifier, test_data):
    original = onnx.load_from_string(model_bytes)
    clash = {"x": "input", "y": "logits", "w1": original.graph.initializer[0].name,
             "h": original.graph.node[0].output[0]}
    defense = build_defense("autoencoder", model=make_autoencoder(names=clash))
    composed = defense.compose(model_bytes)
    x = test_data[0][:20]
    np.testing.assert_allclose(run(composed, x), classifier.logits(defense.apply(x)), atol=1e-4)
    assert all(o.startswith("defense/autoencoder/") for n in composed.graph.node[:5] for o in n.output)


def test_autoencoder_with_a_fixed_batch_and_another_opset(model_bytes, classifier, test_data):
    defense = build_defense("autoencoder", model=make_autoencoder(batch=1, opset=18))
    x = test_data[0][:5]
    out = defense.apply(x)
    assert out.shape == x.shape
    composed = defense.compose(model_bytes)
    assert {o.version for o in composed.opset_import if o.domain in ("", "ai.onnx")} == {18}
    np.testing.assert_allclose(run(composed, x), classifier.logits(out), atol=1e-4)
    Classifier(composed, OPTIONS).loss_and_grad(x, test_data[1][:5])


def test_autoencoder_shapes_must_match(model_bytes):
    with pytest.raises(ValueError, match=r"shapes differ: its output \[N, 1, 14, 14\], its input "
                                         r"\[N, 1, 28, 28\]; they must match"):
        build_defense("autoencoder", model=make_autoencoder(out_shape=(1, 14, 14)))
    small = build_defense("autoencoder", model=make_autoencoder(shape=(1, 16, 16)))
    with pytest.raises(ValueError, match=r"shapes differ: its input \[N, 1, 16, 16\], the model's input "
                                         r"'input' \[batch, 1, 28, 28\]"):
        small.compose(model_bytes)
    with pytest.raises(ValueError, match=r"shapes differ: its input \[N, 1, 16, 16\], the images "
                                         r"\[\?, 1, 28, 28\]"):
        small.apply(np.zeros((2, 1, 28, 28), np.float32))


def test_autoencoder_must_be_differentiable():
    with pytest.raises(UnsupportedOperatorError, match=r"autoencoder: .*Round") as info:
        build_defense("autoencoder", model=make_autoencoder(op="Round"))
    assert info.value.op_types == ["Round"]
