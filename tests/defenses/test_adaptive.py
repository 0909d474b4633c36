"""Attack models for a defended classifier: EOT for noise, BPDA for squeezing, the non-adaptive
DefendedModel, and Liang et al.'s clean-accuracy check on the digits CNN."""

from __future__ import annotations

import numpy as np
import pytest

from workers.attacks.gradient import PGD
from workers.defenses import BPDAModel, DefendedModel, EOTModel, build_defense

N = 24


@pytest.fixture(scope="module")
def batch(test_data):
    return test_data[0][:N], test_data[1][:N]


def gaussian_draws(seed: int, k: int, shape, sigma: float) -> list[np.ndarray]:
    """The noise EOTModel(seed) draws, in order, for a GaussianNoise(sigma)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size=shape, dtype=np.float32) * np.float32(sigma) for _ in range(k)]


def test_eot_gradient_is_the_mean_of_the_per_draw_gradients(classifier, batch):
    x, y = batch
    eot = EOTModel(classifier, build_defense("gaussian_noise", sigma=0.1), samples=5, seed=3)
    logits, loss, grad = eot.loss_and_grad(x, y)
    per_draw = [classifier.loss_and_grad(x + n, y) for n in gaussian_draws(3, 5, x.shape, 0.1)]
    np.testing.assert_allclose(grad, np.mean([g for _, _, g in per_draw], axis=0), atol=1e-6)
    np.testing.assert_allclose(loss, np.mean([l for _, l, _ in per_draw], axis=0), atol=1e-5)
    np.testing.assert_allclose(logits, np.mean([z for z, _, _ in per_draw], axis=0), atol=1e-5)
    assert grad.shape == x.shape and grad.dtype == np.float32 and loss.shape == (N,)


def test_eot_with_one_draw_is_the_classifier_gradient_at_the_noisy_input(classifier, batch):
    x, y = batch
    eot = EOTModel(classifier, build_defense("gaussian_noise", sigma=0.2), samples=1, seed=11)
    first, second = gaussian_draws(11, 2, x.shape, 0.2)
    np.testing.assert_allclose(eot.loss_and_grad(x, y, loss="margin")[2],
                               classifier.loss_and_grad(x + first, y, loss="margin")[2], atol=1e-6)
    # logits(): the defended model's answer on one fresh draw, the next one from the same stream
    np.testing.assert_allclose(eot.logits(x), classifier.logits(x + second), atol=1e-6)


def test_eot_gradient_is_zero_where_the_noise_was_clipped(classifier, batch):
    x, y = batch
    eot = EOTModel(classifier, build_defense("uniform_noise", low=-0.3, high=0.3, clip=(0.0, 1.0)),
                   samples=1, seed=5)
    noise = np.random.default_rng(5).uniform(-0.3, 0.3, size=x.shape).astype(np.float32)
    noisy = x + noise
    inside = (noisy >= 0) & (noisy <= 1)
    assert 0.2 < inside.mean() < 0.9
    grad = eot.loss_and_grad(x, y)[2]
    expected = classifier.loss_and_grad(np.clip(noisy, 0, 1), y)[2] * inside
    np.testing.assert_allclose(grad, expected, atol=1e-6)
    assert not grad[~inside].any()


def test_eot_passes_targets_and_cotangents_through(classifier, batch):
    x, y = batch
    defense = build_defense("gaussian_noise", sigma=0.05)
    targeted = EOTModel(classifier, defense, samples=3, seed=0)
    logits, loss, grad = targeted.loss_and_grad(x, y, loss="dlr_targeted", targets=(y + 1) % 10)
    assert logits.shape == (N, 10) and loss.shape == (N,) and grad.shape == x.shape
    dlogits = np.random.default_rng(0).standard_normal((N, 10)).astype(np.float32)
    logits, vjp = EOTModel(classifier, defense, samples=3, seed=0).logits_vjp(x, dlogits)
    per_draw = [classifier.logits_vjp(x + n, dlogits) for n in gaussian_draws(0, 3, x.shape, 0.05)]
    np.testing.assert_allclose(vjp, np.mean([g for _, g in per_draw], axis=0), atol=1e-6)
    np.testing.assert_allclose(logits, np.mean([z for z, _ in per_draw], axis=0), atol=1e-5)


def test_eot_is_reproducible_and_refuses_deterministic_defenses(classifier, batch):
    x, y = batch
    defense = build_defense("uniform_noise", low=-0.1, high=0.1)
    a = EOTModel(classifier, defense, samples=2, seed=1).loss_and_grad(x, y)[2]
    b = EOTModel(classifier, defense, samples=2, seed=1).loss_and_grad(x, y)[2]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="EOTModel needs a random defense; bit_depth is deterministic: "
                                         "use BPDAModel"):
        EOTModel(classifier, build_defense("bit_depth", bits=4))
    with pytest.raises(ValueError, match="`samples` must be a positive integer, got 0"):
        EOTModel(classifier, defense, samples=0)


def test_bpda_forward_through_squeezing_backward_through_the_identity(model_bytes, classifier, batch):
    x, y = batch
    defense = build_defense("bit_depth", bits=2)
    squeezed = defense.apply(x)
    assert not np.array_equal(squeezed, x)
    bpda = BPDAModel(classifier, defense)
    np.testing.assert_array_equal(bpda.logits(x), classifier.logits(squeezed))
    logits, loss, grad = bpda.loss_and_grad(x, y)
    ref_logits, ref_loss, ref_grad = classifier.loss_and_grad(squeezed, y)
    np.testing.assert_array_equal(grad, ref_grad)
    np.testing.assert_array_equal(loss, ref_loss)
    np.testing.assert_array_equal(logits, ref_logits)
    dlogits = np.ones((N, 10), np.float32)
    np.testing.assert_array_equal(bpda.logits_vjp(x, dlogits)[1], classifier.logits_vjp(squeezed, dlogits)[1])
    assert bpda.num_classes == 10


def test_bpda_pgd_runs_through_one_bit_squeezing(classifier, test_data):
    """1-bit squeezing (Xu et al.'s MNIST setting), Linf PGD: the defense keeps some accuracy
    against examples crafted on the bare CNN; PGD through BPDA does at least as well as them and
    takes the defended accuracy far below clean (measured: clean 0.96; eps 0.1: bare CNN 0.29,
    defended 0.64 (transfer), 0.62 (BPDA); eps 0.2: 0.11 and 0.12)."""
    x, y = test_data[0][:100], test_data[1][:100]
    defense = build_defense("bit_depth", bits=1)
    defended = DefendedModel(classifier, defense)
    attack = PGD(steps=20)
    for eps in (0.1, 0.2):
        transfer = attack(classifier, x, y, eps=eps, seed=0)[0].x_adv
        adaptive = attack(BPDAModel(classifier, defense), x, y, eps=eps, seed=0)[0].x_adv
        clean, non_adaptive, bpda = (float((defended.predict(v) == y).mean())
                                     for v in (x, transfer, adaptive))
        bare = float((classifier.predict(transfer) == y).mean())
        print(f"\n1-bit squeezing, Linf {eps}: clean {clean:.2f}; PGD on the bare CNN: bare {bare:.2f}, "
              f"defended {non_adaptive:.2f}; BPDA-PGD: defended {bpda:.2f}")
        assert bare < non_adaptive  # the squeezing does remove some of the transferred perturbation
        assert bpda <= non_adaptive + 0.05
    assert bpda < 0.3 < clean


def test_defended_model_scores_the_defended_input_and_has_no_gradient(classifier, batch, x_fit):
    x, y = batch
    defense = build_defense("pca", variance=0.9)
    defense.fit(x_fit)
    defended = DefendedModel(classifier, defense)
    np.testing.assert_array_equal(defended.logits(x), classifier.logits(defense.apply(x)))
    np.testing.assert_array_equal(defended.predict(x), defended.logits(x).argmax(axis=1))
    with pytest.raises(TypeError, match="DefendedModel has no gradients"):
        defended.loss_and_grad(x, y)
    noisy = DefendedModel(classifier, build_defense("gaussian_noise", sigma=0.3), seed=4)
    first, second = noisy.logits(x), noisy.logits(x)
    assert not np.array_equal(first, second)  # a fresh draw per query
    np.testing.assert_array_equal(DefendedModel(classifier, noisy.defense, seed=4).logits(x), first)


@pytest.mark.parametrize(("name", "params"), [("pca", {"variance": 0.99}), ("downsample", {"factor": 0.75}),
                                              ("downsample", {"factor": 0.5}),
                                              ("uniform_noise", {"low": -0.1, "high": 0.1})])
def test_clean_accuracy_stays_close_to_the_bare_model(name, params, classifier, test_data, x_fit):
    """Liang et al. lose 2.8 points (noise) to 13 points (50% downsampling) on Inception; on 28x28
    digits upsampled from 8x8 these stages remove little, so a few points at most."""
    x, y = test_data
    defense = build_defense(name, **params)
    defense.fit(x_fit)
    bare = float((classifier.predict(x) == y).mean())
    defended = float((DefendedModel(classifier, defense).predict(x) == y).mean())
    print(f"\n{name} {params}: clean accuracy {defended:.4f} (bare model {bare:.4f})")
    assert defended >= bare - 0.03
