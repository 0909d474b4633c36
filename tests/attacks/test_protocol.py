"""Every registered attack runs on a model written from the AttackModel protocol alone.

The model is the trained fc100 digits MLP re-implemented in numpy: its forward pass, its
vector-Jacobian product and its losses (through ``workers.attacks.losses``, as the protocol's
docstring suggests), without ONNX Runtime or anything from workers.runtime. An attack that
calls something the protocol does not document fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests import digits
from tests.attacks.conftest import N
from workers.attacks import ATTACKS
from workers.attacks.base import MODEL_CALLS, check_model
from workers.attacks.losses import LOSSES, loss_and_dlogits
from workers.attacks.targets import attack_every_target

SAMPLES = 24


class NumpyMLP:
    """fc100 (784-100-100-10, ReLU) in float32 numpy, implementing AttackModel and no more."""

    def __init__(self):
        layers = [m for m in digits.trained("fc100") if hasattr(m, "weight")]
        self.weights = [layer.weight.detach().numpy().T.copy() for layer in layers]
        self.biases = [layer.bias.detach().numpy().copy() for layer in layers]
        self.num_classes = int(self.biases[-1].shape[0])
        self.calls: set[str] = set()

    def _forward(self, x: np.ndarray):
        h = np.asarray(x, np.float32).reshape(len(x), -1)
        pre = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                pre.append(h)
                h = np.maximum(h, 0)
        return h, pre

    def logits(self, x: np.ndarray) -> np.ndarray:
        self.calls.add("logits")
        return self._forward(x)[0]

    def logits_vjp(self, x: np.ndarray, dlogits: np.ndarray):
        self.calls.add("logits_vjp")
        return self._vjp(x, dlogits)

    def _vjp(self, x: np.ndarray, dlogits: np.ndarray):
        z, pre = self._forward(x)
        g = np.asarray(dlogits, np.float32)
        for i in range(len(self.weights) - 1, -1, -1):
            g = g @ self.weights[i].T
            if i:
                g = g * (pre[i - 1] > 0)
        return z, g.reshape(np.shape(x)).astype(np.float32)

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, loss: str = "auto",
                      targets: np.ndarray | None = None):
        self.calls.add("loss_and_grad")
        z = self._forward(x)[0]
        value, dz = loss_and_dlogits(z, labels, loss, targets)
        _, grad = self._vjp(x, dz.astype(np.float32))
        return z, value.astype(np.float32), grad


# per attack: parameters that keep it quick, and a budget (None: a minimal attack)
SETTINGS = {
    "fgsm": ({}, 0.1),
    "bim": ({"steps": 5}, 0.1),
    "pgd": ({"steps": 5}, 0.1),
    "apgd": ({"steps": 10}, 0.1),
    "apgd-t": ({"steps": 10, "n_target_classes": 3}, 0.1),
    "autoattack": ({"steps": 10, "square_queries": 40, "n_target_classes": 3}, 0.1),
    "fab": ({"steps": 10}, 0.1),
    "square": ({"queries": 40}, 0.1),
    "gaussian_noise": ({}, 0.3),
    "uniform_noise": ({}, 0.3),
    "deepfool": ({"max_iter": 20}, None),
    "cw_l2": ({"max_iter": 30, "binary_search_steps": 2, "learning_rate": 0.05}, None),
    "lbfgs": ({"max_iter": 10, "search_steps": 2}, None),
    "universal": ({"max_passes": 1}, 0.2),
}


@pytest.fixture(scope="module")
def model():
    return NumpyMLP()


@pytest.fixture(scope="module")
def samples(data):
    x, y = data
    return x[:SAMPLES], y[:SAMPLES]


def test_every_registered_attack_has_settings_here():
    assert set(SETTINGS) == set(ATTACKS)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_attack_runs_on_a_model_written_from_the_protocol(name, model, samples):
    x, y = samples
    params, eps = SETTINGS[name]
    attack = ATTACKS[name](**params)
    model.calls.clear()
    (run,) = attack(model, x, y, eps=eps, seed=0)
    assert model.calls <= set(MODEL_CALLS) and model.calls <= set(attack.model_calls), model.calls
    assert run.x_adv.shape == x.shape and run.x_adv.min() >= 0 and run.x_adv.max() <= 1
    predicted = model.logits(run.x_adv).argmax(1)
    np.testing.assert_array_equal(run.success[predicted != y], True)  # misclassified: counted
    clean_wrong = model.logits(x).argmax(1) != y
    if name not in ("gaussian_noise", "uniform_noise"):  # noise at 0.3 may leave every digit
        assert run.success.sum() > clean_wrong.sum(), name
    if attack.targeted_capable and name not in ("universal",):
        targets = (y + 3) % model.num_classes
        (targeted,) = attack(model, x, y, eps=eps, targets=targets, seed=0)
        hit = model.logits(targeted.x_adv).argmax(1) == targets
        np.testing.assert_array_equal(targeted.success, hit)


def test_every_target_gives_each_samples_worst_case(model, samples):
    x, y = samples
    pgd = ATTACKS["pgd"](steps=5)
    (every,) = attack_every_target(pgd, model, x, y, eps=[0.05], bounds=(0.0, 1.0), seed=0)
    wrong = model.logits(every.x_adv).argmax(1) != y
    np.testing.assert_array_equal(every.success, wrong)
    chosen = every.extra["targets"]
    assert np.all((chosen == -1) == ~wrong) and np.all(chosen[wrong] != y[wrong])
    # its first run is this one, on every sample: what that breaks stays broken
    (first,) = pgd(model, x, y, eps=0.05, targets=(y + 1) % model.num_classes, seed=1)
    assert np.all(every.success[model.logits(first.x_adv).argmax(1) != y])
    (untargeted,) = pgd(model, x, y, eps=0.05, seed=0)
    assert every.success.sum() >= untargeted.success.sum() - 2


def test_a_model_without_a_documented_method_is_refused_by_name(samples):
    x, y = samples

    class LogitsOnly:
        num_classes = 10

        def logits(self, x):
            return np.zeros((len(x), 10), np.float32)

    ATTACKS["square"](queries=5)(LogitsOnly(), x, y, eps=0.1)  # needs only logits
    with pytest.raises(ValueError, match="deepfool calls the model's logits_vjp, which LogitsOnly lacks"):
        ATTACKS["deepfool"]()(LogitsOnly(), x, y)
    with pytest.raises(ValueError, match="loss_and_grad"):
        ATTACKS["pgd"]()(LogitsOnly(), x, y, eps=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        check_model(object(), ("logits",), "square")


@pytest.mark.parametrize("loss", LOSSES)
def test_numpy_losses_match_the_gradient_graphs(loss, classifiers, data):
    """workers.attacks.losses (what a protocol model may use) computes what ONNX Runtime does."""
    model = classifiers("cnn")
    x, y = data[0][:N], data[1][:N]
    targets = (y + 1) % 10
    logits, value, grad = model.loss_and_grad(x, y, loss=loss, targets=targets)
    want_value, dz = loss_and_dlogits(logits, y, loss, targets)
    np.testing.assert_allclose(value, want_value, rtol=1e-4, atol=1e-5)
    _, want_grad = model.logits_vjp(x, dz.astype(np.float32))
    flat = (len(x), -1)
    errors = (np.linalg.norm((grad - want_grad).reshape(flat), axis=1)
              / np.maximum(np.linalg.norm(want_grad.reshape(flat), axis=1), 1e-30))
    assert np.sum(errors > 1e-4) <= 1, np.sort(errors)[-3:]


class CountingModel:
    """Counts sample-calls: each sample through any of the protocol's methods once."""

    def __init__(self, inner):
        self.inner, self.num_classes, self.sample_calls = inner, inner.num_classes, 0

    def logits(self, x):
        self.sample_calls += len(x)
        return self.inner.logits(x)

    def loss_and_grad(self, x, labels, loss="auto", targets=None):
        self.sample_calls += len(x)
        return self.inner.loss_and_grad(x, labels, loss, targets)

    def logits_vjp(self, x, dlogits):
        self.sample_calls += len(x)
        return self.inner.logits_vjp(x, dlogits)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_attack_costs_at_most_the_model_calls_it_declares(name, model, samples):
    """Attack.calls_per_sample is what the service's cost estimate and bounds count: an upper
    bound on the calls, exact for the attacks that never stop early."""
    x, y = samples
    params, eps = SETTINGS[name]
    attack = ATTACKS[name](**params)
    counting = CountingModel(model)
    attack(counting, x, y, eps=eps, seed=0)
    declared = attack.calls_per_sample(model.num_classes) * len(x)
    assert 0 < counting.sample_calls <= declared, (counting.sample_calls, declared)
    if name in ("fgsm", "bim", "pgd", "gaussian_noise", "uniform_noise"):
        assert counting.sample_calls == declared


class OverflowingMLP(NumpyMLP):
    """The fc100 MLP whose input gradient overflows to NaN for every third sample (a graph whose
    arithmetic broke): its NaN iterates classify as class 0, which is not a success."""

    def _vjp(self, x: np.ndarray, dlogits: np.ndarray):
        z, g = super()._vjp(x, dlogits)
        g[::3] = np.nan
        return z, g


def test_adversarial_examples_with_nan_pixels_count_as_failures_and_are_counted(samples):
    x, y = samples
    model = OverflowingMLP()
    (run,) = ATTACKS["pgd"](steps=5)(model, x, y, eps=0.1, seed=0)
    broken = np.zeros(len(x), bool)
    broken[::3] = True
    assert np.isfinite(run.x_adv).all() and run.logits is None
    np.testing.assert_array_equal(run.x_adv[broken], x[broken])
    assert not run.success[broken].any() and run.success[~broken].any()
    assert run.extra["nonfinite_examples"] == broken.sum()
    (healthy,) = ATTACKS["pgd"](steps=5)(NumpyMLP(), x, y, eps=0.1, seed=0)
    assert "nonfinite_examples" not in healthy.extra
