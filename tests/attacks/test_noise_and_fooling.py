"""Noise baselines and fooling images on the digits models (Szegedy et al.'s Gaussian-noise
rows; Nguyen et al.'s high-confidence images of nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import digits
from workers.attacks.base import ATTACKS
from workers.attacks.fooling import fooling_rate_of_noise, gradient_ascent_fooling
from workers.attacks.noise import GaussianNoise, UniformNoise, noise_at_distortion
from workers.metrics import softmax
from workers.runtime import Classifier, RuntimeOptions

OPTIONS = RuntimeOptions(intra_op_threads=1)


def _classifier(name: str) -> Classifier:
    """Train (once per process) on one thread: two threads on two busy cores mostly spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Classifier(digits.onnx_bytes(name), OPTIONS)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fc100():
    return _classifier("fc100")


@pytest.fixture(scope="module")
def cnn():
    return _classifier("cnn")


@pytest.fixture(scope="module")
def test_split():
    _, _, x, y = digits.digits()
    return x, y


def test_registered_as_attacks_but_fooling_images_are_not():
    assert ATTACKS["gaussian_noise"] is GaussianNoise and ATTACKS["uniform_noise"] is UniformNoise
    assert GaussianNoise.norm is None and not GaussianNoise.minimal
    assert not any(name.startswith("fooling") for name in ATTACKS)  # a metric, not an attack


def test_gaussian_noise_accuracy_falls_from_stddev_0_1_to_0_3(fc100, test_split):
    x, y = test_split
    clean = float(np.mean(fc100.predict(x) == y))
    runs = GaussianNoise()(fc100, x, y, eps=[0.1, 0.3], seed=0)
    assert [r.eps for r in runs] == [0.1, 0.3]
    accuracy = {}
    for run in runs:
        pred = fc100.predict(run.x_adv)
        np.testing.assert_array_equal(run.success, pred != y)
        np.testing.assert_array_equal(run.queries, np.ones(len(x)))
        accuracy[run.eps] = float(np.mean(pred == y))
    # measured: clean 0.97, std 0.1 0.955, std 0.3 0.82 (Szegedy's FC100 on MNIST: 0% and 5% errors)
    assert accuracy[0.1] >= clean - 0.05
    assert accuracy[0.3] <= accuracy[0.1] - 0.05


def test_noise_respects_the_box_and_its_size(fc100, test_split):
    x, y = test_split[0][:64], test_split[1][:64]
    (gauss,) = GaussianNoise()(fc100, x, y, eps=0.3, seed=1)
    (uniform,) = UniformNoise()(fc100, x, y, eps=0.3, seed=1)
    for run in (gauss, uniform):
        assert run.x_adv.dtype == np.float32 and run.x_adv.shape == x.shape
        assert run.x_adv.min() == 0.0 and run.x_adv.max() == 1.0  # clipped: digits have 0 and 1 pixels
    assert np.abs(uniform.x_adv - x).max() <= 0.3 + 1e-6
    # away from the box the noise has the stated size: std 0.3, and U(-0.3, 0.3) has std 0.3 / sqrt(3)
    wide = (-10.0, 11.0)
    (gauss,) = GaussianNoise()(fc100, x, y, eps=0.3, bounds=wide, seed=2)
    (uniform,) = UniformNoise()(fc100, x, y, eps=0.3, bounds=wide, seed=2)
    assert np.std(gauss.x_adv - x) == pytest.approx(0.3, rel=0.02)
    assert np.std(uniform.x_adv - x) == pytest.approx(0.3 / np.sqrt(3), rel=0.02)
    assert np.abs(np.mean(gauss.x_adv - x)) < 0.005
    (zero,) = GaussianNoise()(fc100, x, y, eps=0.0, seed=3)
    np.testing.assert_array_equal(zero.x_adv, x)


def test_noise_is_reproducible_by_seed(fc100, test_split):
    x, y = test_split[0][:32], test_split[1][:32]
    for attack in (GaussianNoise(), UniformNoise()):
        a = attack(fc100, x, y, eps=[0.2, 0.4], seed=5)
        b = attack(fc100, x, y, eps=[0.2, 0.4], seed=5)
        c = attack(fc100, x, y, eps=[0.2, 0.4], seed=6)
        for ra, rb, rc in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(ra.x_adv, rb.x_adv)
            np.testing.assert_array_equal(ra.success, rb.success)
            assert not np.array_equal(ra.x_adv, rc.x_adv)


def test_repeats_keep_the_first_successful_draw(fc100, test_split):
    x, y = test_split[0][:200], test_split[1][:200]
    (once,) = GaussianNoise()(fc100, x, y, eps=0.5, seed=7)
    (thrice,) = GaussianNoise(repeats=3)(fc100, x, y, eps=0.5, seed=7)
    assert np.all(thrice.success[once.success])  # the first draw is the same draw
    assert thrice.success.sum() > once.success.sum()
    assert set(np.unique(thrice.queries)) <= {1, 2, 3}
    np.testing.assert_array_equal(thrice.queries[once.success], 1)
    np.testing.assert_array_equal(thrice.queries[~thrice.success], 3)
    np.testing.assert_array_equal(fc100.predict(thrice.x_adv) != y, thrice.success)


def test_targeted_noise_succeeds_only_on_the_target(fc100, test_split):
    x, y = test_split[0][:100], test_split[1][:100]
    targets = (y + 1) % 10
    (run,) = GaussianNoise()(fc100, x, y, eps=0.6, targets=targets, seed=0)
    pred = fc100.predict(run.x_adv)
    np.testing.assert_array_equal(run.success, pred == targets)
    assert np.any((pred != y) & ~run.success)  # misclassified as another class is no success


def test_noise_refuses_bad_parameters(fc100, test_split):
    x, y = test_split[0][:4], test_split[1][:4]
    with pytest.raises(ValueError, match="repeats"):
        GaussianNoise(repeats=0)
    with pytest.raises(ValueError, match="eps"):
        UniformNoise()(fc100, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        GaussianNoise()(fc100, x, y)


def test_noise_at_distortion_matches_the_requested_norms():
    x = np.zeros((5, 1, 4, 4), np.float32)
    norms = np.array([0.0, 0.5, 1.0, 2.5, 10.0])
    noise = noise_at_distortion(x, norms, np.random.default_rng(0))
    assert noise.shape == x.shape and noise.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(noise.reshape(5, -1), axis=1), norms, rtol=1e-5)
    np.testing.assert_array_equal(noise[0], 0)
    again = noise_at_distortion(x, norms, np.random.default_rng(0))
    np.testing.assert_array_equal(noise, again)
    with pytest.raises(ValueError, match="one norm per sample"):
        noise_at_distortion(x, norms[:3], np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite"):
        noise_at_distortion(x, np.array([1, 1, 1, 1, np.inf]), np.random.default_rng(0))


def test_fooling_rate_of_noise_by_hand(fc100):
    n, threshold = 300, 0.9
    got = fooling_rate_of_noise(fc100, (1, 28, 28), n, threshold, np.random.default_rng(0), chunk=64)
    images = np.random.default_rng(0).uniform(0, 1, size=(n, 1, 28, 28)).astype(np.float32)
    probs = softmax(fc100.logits(images))
    confident = probs.max(1) >= threshold
    assert got["samples"] == n and got["threshold"] == threshold
    assert got["fooling_rate"] == pytest.approx(confident.mean())
    assert got["per_class_counts"] == np.bincount(probs.argmax(1)[confident], minlength=10).tolist()
    assert got["predicted_counts"] == np.bincount(probs.argmax(1), minlength=10).tolist()
    assert got["mean_confidence"] == pytest.approx(probs.max(1).mean())
    # the rubbish class: this MLP labels most uniform noise as one digit with >= 90% confidence
    assert got["fooling_rate"] > 0.5
    everything = fooling_rate_of_noise(fc100, (1, 28, 28), 10, 0.0, np.random.default_rng(1))
    assert everything["fooling_rate"] == 1.0
    with pytest.raises(ValueError, match="threshold"):
        fooling_rate_of_noise(fc100, (1, 28, 28), 10, 1.5, np.random.default_rng(1))
    with pytest.raises(ValueError, match="`n`"):
        fooling_rate_of_noise(fc100, (1, 28, 28), 0, 0.5, np.random.default_rng(1))


def test_gradient_ascent_makes_confident_fooling_images_for_every_class(cnn):
    targets = np.arange(10)
    start = gradient_ascent_fooling(cnn, targets, (1, 28, 28), 0, 0.02, 0.99, np.random.default_rng(0))
    assert start.share < 0.5  # noise alone is not confidently every digit
    result = gradient_ascent_fooling(cnn, targets, (1, 28, 28), 20, 0.02, 0.99, np.random.default_rng(0))
    assert result.share == 1.0 and result.reached.all()
    assert result.steps_used.max() <= 20 and result.steps_used.sum() > 0
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    probs = softmax(cnn.logits(result.images))  # the images really are what the result says
    np.testing.assert_array_equal(probs.argmax(1), targets)
    np.testing.assert_allclose(probs[np.arange(10), targets], result.confidences, rtol=1e-5)
    assert np.all(result.confidences >= 0.99)
    # the same start, so the images stay within steps * step_size of uniform noise in Linf
    noise = np.random.default_rng(0).uniform(0, 1, size=(10, 1, 28, 28)).astype(np.float32)
    drift = np.abs(result.images - noise).reshape(10, -1).max(1)
    assert np.all(drift <= result.steps_used * 0.02 + 1e-6)
    summary = result.summary()
    assert summary["share_reached"] == 1.0 and summary["max_steps"] == int(result.steps_used.max())


def test_gradient_ascent_logit_loss_and_refusals(cnn):
    result = gradient_ascent_fooling(cnn, [3, 3], (1, 28, 28), 30, 0.5, 0.9, np.random.default_rng(1),
                                     norm="l2", loss="logit")
    assert result.share == 1.0 and np.all(result.predicted == 3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="target_classes"):
        gradient_ascent_fooling(cnn, [10], (1, 28, 28), 5, 0.01, 0.9, rng)
    with pytest.raises(ValueError, match="loss"):
        gradient_ascent_fooling(cnn, [1], (1, 28, 28), 5, 0.01, 0.9, rng, loss="margin")
    with pytest.raises(ValueError, match="step_size"):
        gradient_ascent_fooling(cnn, [1], (1, 28, 28), 5, 0.0, 0.9, rng)
