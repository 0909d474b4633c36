"""Box-constrained L-BFGS: Szegedy et al.'s minimal perturbation towards a target class.

Szegedy, Zaremba, Sutskever, Bruna, Erhan, Goodfellow and Fergus, "Intriguing properties of
neural networks" (ICLR 2014), section 4.1: minimise ||r||_2 subject to f(x + r) = l and
x + r in the box, approximated by

    minimise over r:  c * ||r||_2^2 + loss_f(x + r, l)   subject to  x + r in [lo, hi]^m

with L-BFGS-B (scipy.optimize.minimize, the box as simple bounds; loss_f the cross-entropy of
the target l, with its gradient from one ``loss_and_grad`` call per evaluation), and a line
search over c > 0 per sample for the largest c (the smallest r) whose minimiser still reaches
the target: c is multiplied or divided by 10 until success and failure bracket it, then
bisected geometrically. The squared norm keeps the objective smooth at r = 0.

The objectives of different samples are separable, so one L-BFGS-B run minimises their sum
over the concatenated variables: every evaluation is one batched model call. Each search
step restarts from r = 0; per sample the smallest successful r of all steps is kept.

Untargeted by default: the target is the most likely wrong class at x (per sample); with
``targets`` the attack is targeted and success means classified as the target.

Arguments (keyword-only):
    initial_const: the first c (1.0), in units of a [0, 1] box: the attack divides it by
        (hi - lo)^2, so that the same search finds the same points on a model whose inputs span
        [0, 255].
    search_steps: L-BFGS-B runs, i.e. values of c tried per sample (10).
    max_iter: L-BFGS-B iterations per run (100).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]; targets int64 [N] or None.
Returns one ``AttackRun`` (eps None): x_adv [N, ...] the smallest successful example per
sample (x where none; success False there), extra["targets"] int [N] the classes aimed at,
extra["const"] float [N] the c of the best example in the units of ``initial_const`` (nan
where none).
"""

from __future__ import annotations

import contextlib

import numpy as np
from scipy.optimize import Bounds, minimize

from .base import (
    Attack,
    AttackModel,
    AttackRun,
    Progress,
    check_positive,
    clip_to_box,
    register_attack,
)

_GROWTH = 10.0  # factor on c while the search is not bracketed
# variables per L-BFGS-B run: scipy's L-BFGS-B slows down sharply (about 50x per evaluation)
# beyond roughly 10^4 variables, so samples are minimised a few at a time
_RUN_VARIABLES = 8192


def _single_threaded_blas():
    """L-BFGS-B's vector operations run 20x faster on one BLAS thread than on OpenBLAS's
    threads (measured on 2 shared cores); threadpoolctl, where installed, limits them."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency, but the attack still works without it, only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def most_likely_wrong_class(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    others = logits.astype(np.float64, copy=True)
    others[np.arange(len(y)), y] = -np.inf
    return others.argmax(axis=1).astype(np.int64)


@register_attack
class LBFGS(Attack):
    """Szegedy et al.'s (2014) box-constrained L-BFGS attack; see the module docstring."""

    name = "lbfgs"
    kind = "minimal"
    norm = "l2"
    norms = ("l2",)
    minimal = True
    targeted_capable = True

    def __init__(self, *, initial_const: float = 1.0, search_steps: int = 10, max_iter: int = 100):
        check_positive("initial_const", initial_const)
        check_positive("search_steps", search_steps, integer=True)
        check_positive("max_iter", max_iter, integer=True)
        self.initial_const, self.search_steps, self.max_iter = float(initial_const), int(search_steps), \
            int(max_iter)

    def calls_per_sample(self, num_classes: int) -> int:
        """L-BFGS-B evaluates about once an iteration; its line searches add a few (counted twice)."""
        return 1 + self.search_steps * (2 * self.max_iter + 1)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        n = len(x)
        targeted = targets is not None
        goal = targets if targets is not None else most_likely_wrong_class(model.logits(x), y)
        scale = float(bounds[1] - bounds[0]) ** 2
        const = np.full(n, self.initial_const / scale)  # see initial_const
        best_succeeding = np.zeros(n)  # the largest c known to reach the goal (0: none yet)
        smallest_failing = np.full(n, np.inf)
        best_l2 = np.full(n, np.inf)
        best_x = x.copy()
        best_const = np.full(n, np.nan)
        per_run = max(1, _RUN_VARIABLES // int(np.prod(x.shape[1:])))
        start = x.copy()  # each run starts where the previous one for the sample ended
        for step in range(self.search_steps):
            x_adv = np.empty_like(x)
            with _single_threaded_blas():
                for group in range(0, n, per_run):
                    part = slice(group, group + per_run)
                    x_adv[part] = self._minimise(model, x[part], start[part], goal[part], const[part],
                                                 bounds)
            start = x_adv
            predicted = model.logits(x_adv).argmax(axis=1)
            reached = predicted == goal if targeted else predicted != y
            l2 = np.linalg.norm((x_adv.astype(np.float64) - x).reshape(n, -1), axis=1)
            better = reached & (l2 < best_l2)
            best_l2[better], best_x[better], best_const[better] = l2[better], x_adv[better], const[better]
            best_succeeding[reached] = np.maximum(best_succeeding[reached], const[reached])
            smallest_failing[~reached] = np.minimum(smallest_failing[~reached], const[~reached])
            bracketed = (best_succeeding > 0) & np.isfinite(smallest_failing)
            const = np.where(bracketed, np.sqrt(best_succeeding * smallest_failing),
                             np.where(best_succeeding > 0, const * _GROWTH, const / _GROWTH))
            if progress is not None:
                progress(step + 1, self.search_steps)
        success = np.isfinite(best_l2)
        return AttackRun(eps=None, x_adv=clip_to_box(best_x, bounds), success=success,
                         extra={"targets": goal, "const": best_const * scale})

    def _minimise(self, model: AttackModel, x: np.ndarray, start: np.ndarray, goal: np.ndarray,
                  const: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
        """argmin over x' in the box of sum_i c_i ||x'_i - x_i||^2 + CE(x'_i, goal_i), from start."""
        shape = x.shape
        x0 = x.astype(np.float64).ravel()
        weights = np.repeat(const, int(np.prod(shape[1:])))

        def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
            _, loss, grad = model.loss_and_grad(flat.reshape(shape).astype(np.float32), goal,
                                                loss="cross_entropy")
            r = flat - x0
            value = float(np.dot(weights, r * r) + loss.astype(np.float64).sum())
            return value, 2.0 * weights * r + grad.astype(np.float64).ravel()

        box = Bounds(np.full(x0.size, float(bounds[0])), np.full(x0.size, float(bounds[1])))
        result = minimize(objective, start.astype(np.float64).ravel(), jac=True, method="L-BFGS-B",
                          bounds=box, options={"maxiter": self.max_iter})
        return clip_to_box(result.x.reshape(shape).astype(np.float32), bounds)
