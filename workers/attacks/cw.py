"""Carlini-Wagner L2: the smallest L2 perturbation found by optimising a penalised margin.

Carlini and Wagner, "Towards Evaluating the Robustness of Neural Networks" (IEEE S&P 2017).
The box is removed by the change of variables x' = lo + (tanh(w) + 1) / 2 * (hi - lo), and

    minimise over w:  ||x' - x||_2^2 + c * f(x'),
    untargeted: f = max(z_y - max_{j != y} z_j, -kappa)
    targeted:   f = max(max_{j != t} z_j - z_t, -kappa)

with Adam (``learning_rate``, ``max_iter`` steps from w(x) each round). The runtime's
"margin" loss with labels=l is m_l = max_{j != l} z_j - z_l, so f = max(-m_y, -kappa)
untargeted and f = max(m_t, -kappa) targeted; one ``loss_and_grad`` call per step gives the
logits, m and its gradient. A binary search over c per sample (``binary_search_steps``
rounds from ``initial_const``: halve towards the largest failing c after a success, else
multiply by 10 until a success brackets it, as in the authors' code) keeps, per sample, the
smallest-L2 iterate that is adversarial with margin kappa. Early abort: a sample stops a
round when its objective has not improved by 0.01% over the last ``max_iter // 10`` steps.

Arguments (keyword-only):
    confidence: kappa >= 0, the logit margin the adversarial class must win by (0).
    learning_rate: Adam's step size in w space (0.01).
    max_iter: Adam steps per binary-search round (1000; the authors use 10000).
    binary_search_steps: rounds of the search over c (9).
    initial_const: the first c (1e-3), in units of a [0, 1] box: the attack multiplies it by
        (hi - lo)^2, so that c weighs the margin against squared distances of box-scaled pixels
        and the same search finds the same points on a model whose inputs span [0, 255].
    abort_early: stop a sample's round when its objective stalls (True).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]; targets int64 [N] or None.
Returns one ``AttackRun`` (eps None): x_adv [N, ...] the smallest adversarial example found
per sample (x itself where none was found; success False there), extra["const"] float [N]
the c of the best example in the units of ``initial_const`` (nan where none).
"""

from __future__ import annotations

import numpy as np

from workers.bound_loop import chunks
from workers.loop_graphs import P, cw_step_model

from .base import (
    Attack,
    AttackModel,
    AttackRun,
    Progress,
    check,
    check_positive,
    clip_to_box,
    register_attack,
)

_TANH_SHRINK = 0.999999  # keeps arctanh finite at the bounds (the authors' constant)
_NO_UPPER = 1e10
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _broadcast(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def reaches_goal(logits: np.ndarray, labels: np.ndarray, targeted: bool, confidence: float) -> np.ndarray:
    """Adversarial with margin: the target wins by ``confidence`` (or y loses by it)."""
    rows = np.arange(len(labels))
    z = logits.astype(np.float64, copy=True)
    z[rows, labels] += -confidence if targeted else confidence
    predicted = z.argmax(axis=1)
    return predicted == labels if targeted else predicted != labels


@register_attack
class CarliniWagnerL2(Attack):
    """Carlini-Wagner L2 (2017) with Adam and a binary search over c; see the module docstring."""

    name = "cw_l2"
    kind = "minimal"
    norm = "l2"
    norms = ("l2",)
    minimal = True
    targeted_capable = True

    def __init__(self, *, confidence: float = 0.0, learning_rate: float = 0.01, max_iter: int = 1000,
                 binary_search_steps: int = 9, initial_const: float = 1e-3, abort_early: bool = True):
        check_positive("confidence", confidence, allow_zero=True)
        check_positive("learning_rate", learning_rate)
        check_positive("max_iter", max_iter, integer=True)
        check_positive("binary_search_steps", binary_search_steps, integer=True)
        check_positive("initial_const", initial_const)
        check(isinstance(abort_early, bool), f"`abort_early` must be a bool, got {abort_early!r}")
        self.confidence, self.learning_rate = float(confidence), float(learning_rate)
        self.max_iter, self.binary_search_steps = int(max_iter), int(binary_search_steps)
        self.initial_const, self.abort_early = float(initial_const), abort_early

    def calls_per_sample(self, num_classes: int) -> int:
        return 1 + self.binary_search_steps * (self.max_iter + 1)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        n = len(x)
        if getattr(model, "device_loops", False) and n > getattr(model, "loop_rows", n):  # bounded memory
            return self._in_chunks(model, x, y, targets, bounds, rng, progress)
        targeted = targets is not None
        labels = targets if targets is not None else y
        low, high = bounds
        span = high - low
        unit = (x.astype(np.float64) - low) / span
        w0 = np.arctanh((2.0 * unit - 1.0) * _TANH_SHRINK)
        const = np.full(n, self.initial_const * span ** 2)  # see initial_const
        lower, upper = np.zeros(n), np.full(n, _NO_UPPER)
        best_l2 = np.full(n, np.inf)
        best_x = x.copy()
        best_const = np.full(n, np.nan)
        total = self.binary_search_steps * self.max_iter
        # a classifier with device loops (workers.runtime.Classifier on CUDA) keeps the state in ONNX
        # Runtime's buffers on the device, one call per Adam step
        one_round = self._bound_round if getattr(model, "device_loops", False) else self._numpy_round
        for round_ in range(self.binary_search_steps):
            before = best_l2.copy()
            succeeded = one_round(model, x, labels, targeted, w0, const, best_l2, best_x, bounds, round_,
                                  progress)
            improved = best_l2 < before
            best_const[improved] = const[improved]

            # the binary search on c, per sample (the authors' update)
            upper[succeeded] = np.minimum(upper[succeeded], const[succeeded])
            failed = ~succeeded
            lower[failed] = np.maximum(lower[failed], const[failed])
            bracketed = upper < _NO_UPPER
            const = np.where(bracketed, (lower + upper) / 2.0, const * 10.0)
        if progress is not None:
            progress(total, total)
        success = np.isfinite(best_l2)
        return AttackRun(eps=None, x_adv=clip_to_box(best_x, bounds), success=success,
                         extra={"const": best_const / span ** 2})

    def _in_chunks(self, model, x, y, targets, bounds, rng, progress) -> AttackRun:
        """`run` on chunks of ``model.loop_rows`` samples (they do not interact)."""
        parts = chunks(len(x), getattr(model, "loop_rows", len(x)))
        runs = []
        for k, rows in enumerate(parts):
            def chunk_progress(done: int, total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * total + done, len(parts) * total)

            runs.append(self.run(model, x[rows], y[rows], None, None if targets is None else targets[rows],
                                 bounds, rng, chunk_progress))
        return AttackRun(eps=None, x_adv=np.concatenate([r.x_adv for r in runs]),
                         success=np.concatenate([r.success for r in runs]),
                         extra={"const": np.concatenate([r.extra["const"] for r in runs])})

    def _numpy_round(self, model, x, labels, targeted, w0, const, best_l2, best_x, bounds, round_, progress):
        """One round of Adam steps at the constants ``const``, in numpy; updates best_l2 and
        best_x in place and returns which samples reached the goal."""
        n, low, span = len(x), bounds[0], bounds[1] - bounds[0]
        sign = 1.0 if targeted else -1.0  # f = max(sign * margin(labels), -kappa)
        check_every = max(1, self.max_iter // 10)
        total = self.binary_search_steps * self.max_iter
        modifier = np.zeros_like(w0)
        m1, m2 = np.zeros_like(w0), np.zeros_like(w0)
        active = np.ones(n, bool)
        succeeded = np.zeros(n, bool)
        previous = np.full(n, np.inf)
        for step in range(self.max_iter):
            idx = np.flatnonzero(active)
            if not idx.size:
                break
            tanh = np.tanh(w0[idx] + modifier[idx])
            x_adv = (low + (tanh + 1.0) / 2.0 * span).astype(np.float32)
            logits, margin, grad = model.loss_and_grad(x_adv, labels[idx], loss="margin")
            diff = x_adv.astype(np.float64) - x[idx]
            l2sq = np.square(diff.reshape(len(idx), -1)).sum(axis=1)
            f_raw = sign * margin.astype(np.float64)
            f = np.maximum(f_raw, -self.confidence)
            objective = l2sq + const[idx] * f

            goal = reaches_goal(logits, labels[idx], targeted, self.confidence)
            succeeded[idx] |= goal
            better = goal & (l2sq < best_l2[idx])
            won = idx[better]
            best_l2[won], best_x[won] = l2sq[better], x_adv[better]

            # d objective / d w = (2 (x' - x) + c * d f / d x') * (1 - tanh^2) / 2 * span
            c_grad = const[idx] * sign * (f_raw > -self.confidence)
            grad_x = 2.0 * diff + _broadcast(c_grad, diff.ndim) * grad
            grad_w = grad_x * (1.0 - np.square(tanh)) / 2.0 * span
            t = step + 1
            m1[idx] = _BETA1 * m1[idx] + (1 - _BETA1) * grad_w
            m2[idx] = _BETA2 * m2[idx] + (1 - _BETA2) * np.square(grad_w)
            corrected = np.sqrt(1 - _BETA2 ** t) / (1 - _BETA1 ** t)
            modifier[idx] -= self.learning_rate * corrected * m1[idx] / (np.sqrt(m2[idx]) + _ADAM_EPS)

            if self.abort_early and step % check_every == 0:
                stalled = objective > previous[idx] * 0.9999
                active[idx[stalled]] = False
                previous[idx] = objective
            if progress is not None and step % check_every == 0:
                progress(round_ * self.max_iter + step, total)
        return succeeded

    def _bound_round(self, model, x, labels, targeted, w0, const, best_l2, best_x, bounds, round_, progress):
        """`_numpy_round` as one loop graph (workers/loop_graphs.py): one ONNX Runtime call per
        Adam step and batch. The host reads the active flags at the early-abort checks and
        goes on with the active samples only once half of the loop's have stopped."""
        n = len(x)
        check_every = max(1, self.max_iter // 10)
        total = self.binary_search_steps * self.max_iter
        session = model.loop_session(
            ("cw", targeted, self.confidence, tuple(bounds)), "margin",
            lambda gradient: cw_step_model(gradient, model.input_name, targeted=targeted,
                                           confidence=self.confidence, bounds=bounds))
        host = {P + "w0": w0, P + "modifier": np.zeros_like(w0), P + "m1": np.zeros_like(w0),
                P + "m2": np.zeros_like(w0), P + "x": x, P + "best_x": best_x, P + "const": const,
                P + "best_l2": best_l2, P + "previous": np.full(n, np.inf), P + "active": np.ones(n, bool),
                P + "succeeded": np.zeros(n, bool), "labels": labels}
        carried = (P + "modifier", P + "m1", P + "m2", P + "best_x", P + "best_l2", P + "previous",
                   P + "active", P + "succeeded")
        idx = np.arange(n)
        loop = model.bound_loop({name: value[idx] for name, value in host.items()})
        for step in range(self.max_iter):
            check = self.abort_early and step % check_every == 0
            t = step + 1
            rate = self.learning_rate * (np.sqrt(1 - _BETA2 ** t) / (1 - _BETA1 ** t))
            loop.apply(*session, {P + "check": np.bool_(check), P + "rate": np.float64(rate)})
            if progress is not None and step % check_every == 0:
                progress(round_ * self.max_iter + step, total)
            if not check:
                continue
            still = loop.fetch(P + "active")
            if still.all():
                continue
            for name in carried:  # the loop's samples back into the host arrays
                host[name][idx] = loop.fetch(name)
            if not still.any():
                loop = None
                break
            if still.sum() <= len(idx) // 2:
                idx = idx[still]
                loop = model.bound_loop({name: value[idx] for name, value in host.items()})
        if loop is not None:
            for name in carried:
                host[name][idx] = loop.fetch(name)
        return host[P + "succeeded"]
