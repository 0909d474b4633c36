"""Attack steps fused into one ONNX Runtime call (workers/loop_graphs.py: Classifier.pgd_steps,
APGD's loop graphs) give the numpy steps' results to the bit, for every attack that takes them,
under both norms."""

from __future__ import annotations

import numpy as np
import pytest

from tests.copy_loop import CopyLoop
from workers.attacks.apgd import APGD, APGDT
from workers.attacks.cw import CarliniWagnerL2
from workers.attacks.deepfool import DeepFool
from workers.attacks.gradient import BIM, FGSM, PGD
from workers.attacks.square import Square
from workers.loop_graphs import pgd_step_model
from workers.runtime import Classifier, RuntimeOptions

LOOPS = RuntimeOptions(batch_size=32, intra_op_threads=1, device_loops=True)  # loop graphs on the CPU too


@pytest.mark.parametrize(
    ("attack", "targeted"),
    [
        (PGD(steps=7), False),
        (PGD(steps=4, restarts=2), False),
        (PGD(steps=5, loss="margin"), False),
        (PGD(steps=5, loss="cross_entropy"), True),
        (PGD(steps=3, random_target=True), False),
        (BIM(steps=5), False),
        (FGSM(), False),
        (PGD(norm="l2", steps=5), False),
        (PGD(norm="l2", steps=4, loss="cross_entropy"), True),
        (APGD(steps=12), False),
        (APGD(norm="l2", steps=12, restarts=2), False),
        (APGD(steps=12, loss="ce"), True),
        (APGD(steps=12, loss="dlr"), False),
        (APGDT(norm="l2", steps=8, n_target_classes=2), False),
        (APGD(steps=8, loss="dlr_targeted"), True),
    ],
    ids=["pgd", "pgd-restarts", "pgd-margin", "pgd-targeted", "pgd-random-target", "bim", "fgsm",
         "pgd-l2", "pgd-l2-targeted", "apgd", "apgd-l2-restarts", "apgd-ce-targeted", "apgd-dlr",
         "apgd-t-l2", "apgd-dlr-targeted"],
)
@pytest.mark.parametrize("model", ["cnn", "fc100"])
def test_the_fused_step_equals_the_numpy_step_to_the_bit(attack, targeted, model, classifiers, data):
    x, y = data[0][:90], data[1][:90]
    classifier = Classifier(classifiers(model).model_bytes, LOOPS)
    targets = (y + 3) % 10 if targeted else None
    eps = [0.05, 0.2] if attack.norm == "linf" else [0.5, 2.0]
    fused = attack(classifier, x, y, eps=eps, targets=targets, seed=5)
    numpy = attack(CopyLoop(classifier), x, y, eps=eps, targets=targets, seed=5)
    for a, b in zip(fused, numpy, strict=True):
        np.testing.assert_array_equal(a.x_adv, b.x_adv)
        np.testing.assert_array_equal(a.success, b.success)
    size = attack.geometry.size(fused[1].x_adv - x) if attack.norm == "l2" else np.abs(fused[1].x_adv - x)
    assert size.max() <= eps[1] * (1 + 1e-6)
    assert fused[1].success.mean() > 0  # the steps did something


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("model", ["cnn", "fc100"])
def test_deepfool_on_loop_graphs_equals_the_numpy_loop_to_the_bit(norm, model, classifiers, data):
    x, y = data[0][:90], data[1][:90]
    classifier = Classifier(classifiers(model).model_bytes, LOOPS)
    attack = DeepFool(norm=norm, max_iter=20)
    fused, numpy = (attack(m, x, y, seed=5)[0] for m in (classifier, CopyLoop(classifier)))
    np.testing.assert_array_equal(fused.x_adv, numpy.x_adv)
    np.testing.assert_array_equal(fused.extra["iterations"], numpy.extra["iterations"])
    assert fused.success.mean() > 0.9


@pytest.mark.parametrize("targeted", [False, True])
def test_cw_on_loop_graphs_follows_the_numpy_loop(targeted, classifiers, data):
    x, y = data[0][:90], data[1][:90]
    classifier = Classifier(classifiers("cnn").model_bytes, LOOPS)
    targets = (y + 3) % 10 if targeted else None
    attack = CarliniWagnerL2(max_iter=30, binary_search_steps=3, learning_rate=0.05, initial_const=0.1)
    fused, numpy = (attack(m, x, y, targets=targets, seed=5)[0] for m in (classifier, CopyLoop(classifier)))
    np.testing.assert_array_equal(fused.success, numpy.success)
    np.testing.assert_allclose(fused.x_adv, numpy.x_adv, rtol=0, atol=1e-6)
    assert fused.success.mean() > 0.5


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_square_on_loop_graphs_equals_the_numpy_loop(targeted, norm, classifiers, data):
    x, y = data[0][:90], data[1][:90]
    classifier = Classifier(classifiers("cnn").model_bytes, LOOPS)
    targets = (y + 3) % 10 if targeted else None
    attack = Square(norm=norm, queries=200)
    fused, numpy = (attack(m, x, y, eps=0.2 if norm == "linf" else 2.0, targets=targets, seed=5)[0]
                    for m in (classifier, CopyLoop(classifier)))
    # L2's window sums run over whole images in the loop graph: float64 rounding, not the bit
    np.testing.assert_allclose(fused.x_adv, numpy.x_adv, rtol=0, atol=0 if norm == "linf" else 1e-6)
    np.testing.assert_array_equal(fused.queries, numpy.queries)
    assert fused.success.any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_step_model_outputs_only_the_next_iterate(classifiers, norm):
    import onnx

    classifier = classifiers("cnn")
    gradient = onnx.load_from_string(classifier._gradient_bytes("auto"))
    graph = pgd_step_model(gradient, classifier.input_name, norm)
    (output,) = [o.name for o in graph.model.graph.output]
    assert graph.writes == {output: classifier.input_name}
    onnx.checker.check_model(graph.model)
    # the loss value no step reads is gone (ONNX Runtime would compute it every step)
    produced = {name for node in graph.model.graph.node for name in node.output}
    assert "loss" not in produced and "logits" in produced
    full = onnx.load_from_string(classifier._gradient_bytes("auto")).graph.node
    assert {"loss", "logits", "grad"} <= {name for node in full for name in node.output}


def test_set_outputs_keeps_what_subgraphs_read():
    import onnx
    from onnx import TensorProto, helper

    from workers.loop_graphs.core import set_outputs

    branch = helper.make_graph([helper.make_node("Neg", ["a"], ["inner"])], "branch", [],
                               [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Exp", ["x"], ["dead"]),
         helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [],
        initializer=[helper.make_tensor("unused", TensorProto.FLOAT, [1], [0.0])])
    set_outputs(graph, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    assert [node.op_type for node in graph.node] == ["Abs", "If"]
    assert not graph.initializer
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _weights_as_constant_nodes(model_bytes: bytes) -> bytes:
    """The model with every initializer a Constant node, as some exporters and converters write
    them (the gradient then ends in an adjoint Conv, not in Col2Im)."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(model_bytes)
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


@pytest.mark.parametrize("attack", [PGD(steps=5), BIM(steps=3)], ids=["pgd", "bim"])
def test_the_linf_step_stays_finite_where_the_gradient_ends_in_a_conv(attack, data):
    """ONNX Runtime folds a constant Mul that follows a Conv into the Conv's weights: the sign
    must not be made of large factors (2^126 x 2^126 overflowed the folded weights to inf, and
    every iterate was NaN)."""
    from tests import digits

    x, y = data[0][:40], data[1][:40]
    classifier = Classifier(_weights_as_constant_nodes(digits.onnx_bytes("cnn")), LOOPS)
    fused = attack(classifier, x, y, eps=0.1, seed=2)[0]
    numpy = attack(CopyLoop(classifier), x, y, eps=0.1, seed=2)[0]
    assert np.isfinite(fused.x_adv).all() and "nonfinite_examples" not in fused.extra
    np.testing.assert_array_equal(fused.x_adv, numpy.x_adv)
    assert fused.success.mean() > 0.5
