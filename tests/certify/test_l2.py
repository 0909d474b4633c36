"""Certification over L2 balls: the box around the ball, the first affine layer over the ball
itself (each output +- eps ||w||_2, through the normalisation), and CROWN-IBP's dual norm."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.evaluation import EvaluationSpec
from tests import digits
from tests.certify.soundness import assert_above
from workers.attacks.gradient import PGD
from workers.certify import IntervalBounds
from workers.datasets import Dataset
from workers.evaluate import evaluate
from workers.preprocess import compose_preprocessing
from workers.runtime import Classifier, RuntimeOptions

OPTIONS = RuntimeOptions(batch_size=64, intra_op_threads=1)


@pytest.fixture(scope="module")
def data():
    _, _, x, y = digits.digits()
    return x[:60], y[:60]


def ball_points(x: np.ndarray, eps: float, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Points of the L2 ball of radius eps around each image, on its sphere, clipped to [0, 1]
    (clipping only moves a point closer to the image)."""
    points = []
    for _ in range(count):
        direction = rng.standard_normal(x.shape).astype(np.float32)
        direction /= np.linalg.norm(direction.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)
        points.append(np.clip(x + eps * direction, 0, 1))
    return points


@pytest.mark.parametrize(("name", "method"), [("fc100", "ibp"), ("fc100", "crown_ibp"), ("cnn", "ibp")])
@pytest.mark.parametrize("normalised", [False, True])
def test_l2_bounds_are_sound(data, name, method, normalised):
    x, y = data
    model = digits.onnx_bytes(name)
    if normalised:  # mean / std composed in front: the ball is stretched by 1 / std
        model = compose_preprocessing(model, mean=[0.2], std=[0.6]).SerializeToString()
        x = x * 0.6 + 0.2  # the same digits, in the range the normalisation expects
    classifier = Classifier(model, OPTIONS)
    eps = 0.2
    certificate = IntervalBounds(model, OPTIONS, method=method, norm="l2").certify(x, y, eps)
    rng = np.random.default_rng(0)
    points = ball_points(x, eps, rng, 30)
    points += [PGD(norm="l2", steps=20, loss=loss)(classifier, x, y, eps=[eps], seed=1)[0].x_adv
               for loss in ("cross_entropy", "margin")]
    for point in points:
        assert np.all(np.linalg.norm((point - x).reshape(len(x), -1), axis=1) <= eps * (1 + 1e-5))
    assert_above(classifier, points, y, certificate.margin_low)


def test_the_ball_is_much_tighter_than_its_box(data):
    x, y = data
    model = digits.onnx_bytes("fc100")
    box = IntervalBounds(model, OPTIONS).certify(x, y, 0.1)  # the L-inf ball of 0.1 contains the L2 one
    ball = IntervalBounds(model, OPTIONS, norm="l2").certify(x, y, 0.1)
    crown = IntervalBounds(model, OPTIONS, method="crown_ibp", norm="l2").certify(x, y, 0.1)
    assert np.all(ball.margin_low >= box.margin_low) and np.all(crown.margin_low >= ball.margin_low)
    assert crown.certified.mean() > 0.8 > box.certified.mean()


def test_an_l2_certify_section_pairs_with_the_l2_attacks(data):
    x, y = data
    spec = EvaluationSpec.model_validate({
        "attacks": [{"name": "pgd", "norm": "l2", "eps": [0.3], "steps": 10},
                    {"name": "pgd", "label": "pgd_linf", "eps": [0.3], "steps": 10}],
        "certify": {"norm": "l2", "eps": [0.3], "methods": ["ibp", "crown_ibp"]}})
    result = evaluate(digits.onnx_bytes("fc100"), Dataset(x=x, y=y, source_dtype="float32"), spec).result
    l2_attack = next(a for a in result.attacks if a.norm == "l2")
    for entry in result.certify.entries:
        assert entry.norm == "l2" and entry.attacked_accuracy == l2_attack.robust_accuracy
        assert entry.certified_accuracy <= entry.attacked_accuracy
