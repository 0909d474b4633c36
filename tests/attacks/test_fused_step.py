"""The L-inf step fused into one ONNX Runtime call (Classifier.linf_step) gives the numpy
step's results to the bit, for every attack that takes it."""

from __future__ import annotations

import numpy as np
import pytest

from workers.attacks.gradient import BIM, FGSM, PGD
from workers.runtime import Classifier, RuntimeOptions, linf_step_model


class NumpySteps:
    """The classifier through the attack protocol alone: the attacks step in numpy."""

    def __init__(self, classifier: Classifier):
        self.classifier, self.num_classes = classifier, classifier.num_classes

    def logits(self, x):
        return self.classifier.logits(x)

    def loss_and_grad(self, x, labels, loss="auto", targets=None):
        return self.classifier.loss_and_grad(x, labels, loss=loss, targets=targets)


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
    ],
    ids=["pgd", "pgd-restarts", "pgd-margin", "pgd-targeted", "pgd-random-target", "bim", "fgsm"],
)
@pytest.mark.parametrize("model", ["cnn", "fc100"])
def test_the_fused_step_equals_the_numpy_step_to_the_bit(attack, targeted, model, classifiers, data):
    x, y = data[0][:90], data[1][:90]
    classifier = Classifier(classifiers(model).model_bytes, RuntimeOptions(batch_size=32, intra_op_threads=1))
    targets = (y + 3) % 10 if targeted else None
    fused = attack(classifier, x, y, eps=[0.05, 0.2], targets=targets, seed=5)
    numpy = attack(NumpySteps(classifier), x, y, eps=[0.05, 0.2], targets=targets, seed=5)
    for a, b in zip(fused, numpy, strict=True):
        np.testing.assert_array_equal(a.x_adv, b.x_adv)
        np.testing.assert_array_equal(a.success, b.success)
    assert np.abs(fused[1].x_adv - x).max() <= 0.2 + 1e-6


def test_the_step_model_outputs_only_the_next_iterate(classifiers):
    import onnx

    classifier = classifiers("cnn")
    model = linf_step_model(onnx.load_from_string(classifier._gradient_bytes("auto")), classifier.input_name)
    assert [o.name for o in model.graph.output] == ["linf_step/x_next"]
    onnx.checker.check_model(model)
