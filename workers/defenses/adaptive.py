"""Attack models for a defended classifier f(g(x)): what an attack calls instead of the Classifier.

- Non-adaptive (the attacker ignores the defense; the examples are crafted on f and scored
  on f∘g): :class:`DefendedModel`, logits only. Score-based attacks (square, noise) may run
  on it directly: they see the defense as part of a black box.
- Adaptive (Athalye, Carlini and Wagner 2018, "Obfuscated gradients give a false sense of
  security"):
  - differentiable g: ``Classifier(defense.compose(model))``, exact gradients of f∘g;
  - random g (additive noise): :class:`EOTModel`, expectation over transformation;
  - non-differentiable g (bit depth, median, JPEG): :class:`BPDAModel`, forward through g,
    backward through its approximation (identity).
  :func:`adaptive_model` picks the right one.

Every model here follows ``workers.attacks.base.AttackModel`` (``num_classes``,
``logits(x)``, ``loss_and_grad(x, labels, loss)``), plus ``targets=`` for the targeted DLR
loss and ``logits_vjp`` (DeepFool, FAB), as ``workers.runtime.Classifier`` does. A random
defense draws from the model's own generator, seeded at construction: the same seed and the
same sequence of calls give the same answers.
"""

from __future__ import annotations

import numpy as np
import onnx

from workers.attacks.base import AttackModel, check, check_positive
from workers.runtime import Classifier, RuntimeOptions

from .base import Defense, RandomDefense


def _targets(targets: np.ndarray | None, repeats: int = 1) -> dict:
    return {} if targets is None else {"targets": np.tile(np.asarray(targets), repeats)}


class _Wrapped:
    def __init__(self, classifier: AttackModel, defense: Defense, seed: int):
        check(isinstance(defense, Defense), f"`defense` must be a Defense, got {type(defense).__name__}")
        self.classifier = classifier
        self.defense = defense
        self.num_classes = classifier.num_classes
        self.input_shape = getattr(classifier, "input_shape", None)
        self.rng = np.random.default_rng(seed)

    def defended(self, x: np.ndarray) -> np.ndarray:
        """g(x), a fresh draw for a random defense."""
        return self.defense.apply(np.asarray(x, np.float32), self.rng)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """f(g(x)): what the defended model outputs (one fresh draw for a random defense)."""
        return self.classifier.logits(self.defended(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)


class DefendedModel(_Wrapped):
    """f(g(x)) for scoring, and for attacks that only read scores; no gradients."""

    def __init__(self, classifier: AttackModel, defense: Defense, *, seed: int = 0):
        super().__init__(classifier, defense, seed)

    def loss_and_grad(self, x, labels, loss="auto", targets=None):
        raise TypeError(
            "DefendedModel has no gradients: craft non-adaptive examples on the bare Classifier, or "
            "attack adaptively with adaptive_model() (composed graph, EOTModel or BPDAModel)")

    logits_vjp = loss_and_grad


class BPDAModel(_Wrapped):
    """Backward pass differentiable approximation with the identity.

    ``logits(x)`` = f(g(x)); ``loss_and_grad(x)`` returns the logits and loss of f at g(x) and
    the gradient of f at g(x), i.e. dg/dx is taken as the identity. ``classifier`` should be
    built from ``defense.bpda(model)`` (for the identity approximation: the model itself).
    """

    def __init__(self, classifier: AttackModel, defense: Defense, *, seed: int = 0):
        super().__init__(classifier, defense, seed)

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, loss: str = "auto",
                      targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.classifier.loss_and_grad(self.defended(x), labels, loss, **_targets(targets))

    def logits_vjp(self, x: np.ndarray, dlogits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.classifier.logits_vjp(self.defended(x), dlogits)


class EOTModel(_Wrapped):
    """Expectation over transformation for a random defense t (Athalye et al. 2018).

    ``loss_and_grad(x)`` draws ``samples`` transformations t_1..t_k and returns the means over
    them of f's logits, per-sample loss and input gradient at t_i(x), the gradient multiplied
    by dt_i/dx (the identity for additive noise, zero where the defense clipped):
    the gradient of E_t[loss(f(t(x)))] estimated with k draws. ``logits(x)`` is f(t(x)) for ONE
    fresh draw: what the defended model answers when it is queried, so success is judged on the
    defense as deployed, not on its average. The k draws are evaluated as one batch of k·N.
    """

    defense: RandomDefense

    def __init__(self, classifier: AttackModel, defense: Defense, *, samples: int = 8, seed: int = 0):
        super().__init__(classifier, defense, seed)
        check(defense.random and isinstance(defense, RandomDefense),
              f"EOTModel needs a random defense; {defense.name} is deterministic: use "
              f"{'compose()' if defense.differentiable else 'BPDAModel'}")
        check_positive("samples", samples, integer=True)
        self.samples = int(samples)

    def _draws(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The k transformed copies of x stacked [k·N, ...], and their masks (or None)."""
        x = np.asarray(x, np.float32)
        draws = [self.defense.transform(x, self.rng) for _ in range(self.samples)]
        stacked = np.concatenate([d[0] for d in draws])
        masks = None
        if any(d[1] is not None for d in draws):
            masks = np.concatenate([np.ones_like(x) if d[1] is None else d[1] for d in draws])
        return stacked, masks

    def _mean(self, values: np.ndarray) -> np.ndarray:
        return values.reshape(self.samples, -1, *values.shape[1:]).mean(axis=0).astype(values.dtype)

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, loss: str = "auto",
                      targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stacked, masks = self._draws(x)
        labels = np.tile(np.asarray(labels), self.samples)
        logits, losses, grads = self.classifier.loss_and_grad(stacked, labels, loss,
                                                              **_targets(targets, self.samples))
        if masks is not None:
            grads = grads * masks
        return self._mean(logits), self._mean(losses), self._mean(grads)

    def logits_vjp(self, x: np.ndarray, dlogits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stacked, masks = self._draws(x)
        logits, grads = self.classifier.logits_vjp(stacked, np.tile(np.asarray(dlogits), (self.samples, 1)))
        if masks is not None:
            grads = grads * masks
        return self._mean(logits), self._mean(grads)


def adaptive_model(model: bytes | onnx.ModelProto, defense: Defense, *,
                   options: RuntimeOptions | None = None, samples: int = 8, seed: int = 0) -> AttackModel:
    """The model an adaptive attacker differentiates: f∘g composed in ONNX (differentiable g),
    EOTModel (random g, ``samples`` draws per gradient) or BPDAModel (the rest)."""
    if defense.random:
        return EOTModel(Classifier(model, options), defense, samples=samples, seed=seed)
    if defense.differentiable:
        return Classifier(defense.compose(model), options)
    return BPDAModel(Classifier(defense.bpda(model), options), defense, seed=seed)


def defended_model(model: bytes | onnx.ModelProto, defense: Defense, *,
                   options: RuntimeOptions | None = None, seed: int = 0) -> DefendedModel:
    """f∘g for scoring (non-adaptive evaluation)."""
    return DefendedModel(Classifier(model, options), defense, seed=seed)
