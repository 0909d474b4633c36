"""Box-constrained L-BFGS: Szegedy et al.'s minimal perturbation towards a target class.

Szegedy, Zaremba, Sutskever, Bruna, Erhan, Goodfellow and Fergus, "Intriguing properties of
neural networks" (ICLR 2014), section 4.1: minimise ||r||_2 subject to f(x + r) = l and
x + r in the box, approximated by

    minimise over r:  c * ||r||_2^2 + loss_f(x + r, l)   subject to  x + r in [lo, hi]^m

with a box-constrained L-BFGS of our own, batched over the samples (their objectives are
separable, so every evaluation is one batched model call, and the same steps run as loop graphs
on a GPU worker: workers/loop_graphs/lbfgs.py). Per sample it keeps the last 10 pairs (s, y) of
steps and gradient changes; each iteration fixes the variables that sit on a bound with the
gradient pushing outwards, takes the two-loop recursion's quasi-Newton direction on the others
(the steepest descent when that is not a descent direction, and for the first step, scaled to
unit length), and backtracks along the projected path x + r = clip(x + r + a d) from a = 1 until
the Armijo condition holds (at most 20 halvings). A sample stops when its projected gradient
is below 1e-5, its objective's relative decrease below scipy's default (1e7 machine epsilons),
or its line search fails: the tolerances of scipy's L-BFGS-B, against which the tests measure
it; and when it has spent 2 x max_iter evaluations in the run (a bound on the compute, as
scipy's ``maxfun``). loss_f is the cross-entropy of the target l, with its gradient from one ``loss_and_grad``
call per evaluation, and a line search over c > 0 per sample finds the largest c (the smallest
r) whose minimiser still reaches the target: c is multiplied or divided by 10 until success and
failure bracket it, then bisected geometrically. The squared norm keeps the objective smooth at
r = 0. Each search step starts from the previous step's minimiser; per sample the smallest
successful r of all steps is kept.

Untargeted by default: the target is the most likely wrong class at x (per sample); with
``targets`` the attack is targeted and success means classified as the target.

Arguments (keyword-only):
    initial_const: the first c (1.0), in units of a [0, 1] box: the attack divides it by
        (hi - lo)^2, so that the same search finds the same points on a model whose inputs span
        [0, 255].
    search_steps: L-BFGS runs, i.e. values of c tried per sample (10).
    max_iter: L-BFGS iterations per run (100).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]; targets int64 [N] or None.
Returns one ``AttackRun`` (eps None): x_adv [N, ...] the smallest successful example per
sample (x where none; success False there), extra["targets"] int [N] the classes aimed at,
extra["const"] float [N] the c of the best example in the units of ``initial_const`` (nan
where none).
"""

from __future__ import annotations

import numpy as np

from workers.bound_loop import chunks
from workers.loop_graphs import P, lbfgs_check_model, lbfgs_direction_model, lbfgs_trial_model

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
HISTORY = 10  # pairs (s, y) kept per sample (scipy's default)
PGTOL, FTOL = 1e-5, 1e7 * np.finfo(np.float64).eps  # scipy's L-BFGS-B defaults
ARMIJO, TRIALS = 1e-4, 20
# variables per run: the history holds 2 x HISTORY float64 copies of them
_RUN_VARIABLES = 2 ** 21


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
        """Per run: the evaluation at the start, at most 2 x max_iter in the line searches, the
        scores of the minimiser; and the scores at x that choose the targets."""
        return 1 + self.search_steps * (2 * self.max_iter + 2)

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
            for group in range(0, n, per_run):
                part = slice(group, group + per_run)
                x_adv[part] = minimise(model, x[part], start[part], goal[part], const[part], bounds,
                                       self.max_iter)
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


def _evaluate(model, x, v, goal, const):
    """(f [n], g [n, D]): c ||v - x||^2 + CE(v, goal) and its gradient, in float64."""
    _, loss, grad = model.loss_and_grad(v.reshape(x.shape).astype(np.float32), goal, loss="cross_entropy")
    r = v - x.reshape(len(x), -1)
    f = const * np.einsum("ij,ij->i", r, r) + loss.astype(np.float64)
    return f, 2.0 * const[:, None] * r + grad.reshape(len(x), -1).astype(np.float64)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


def direction(v, g, S, Y, rho, bounds):
    """The quasi-Newton direction on the free variables and its first trial step: (d [n, D],
    step [n], reset [n]: where it was no descent direction and the steepest descent replaces
    it, the history to be forgotten). S, Y [n, HISTORY, D] newest first; rho [n, HISTORY]
    1 / <s, y> (0: an empty slot)."""
    free = ~(((v <= bounds[0]) & (g > 0)) | ((v >= bounds[1]) & (g < 0)))
    q = np.where(free, g, 0.0)
    alphas = []
    for i in range(HISTORY):
        a = rho[:, i] * _dot(S[:, i], q)
        q = q - a[:, None] * Y[:, i]
        alphas.append(a)
    known = rho[:, 0] > 0
    yy = _dot(Y[:, 0], Y[:, 0])
    gamma = np.where(known, 1.0 / np.where(known, rho[:, 0] * yy, 1.0), 1.0)
    r = gamma[:, None] * q
    for i in reversed(range(HISTORY)):
        b = rho[:, i] * _dot(Y[:, i], r)
        r = r + (alphas[i] - b)[:, None] * S[:, i]
    d = np.where(free, -r, 0.0)
    reset = ~(_dot(g, d) < 0)
    d = np.where(reset[:, None], np.where(free, -g, 0.0), d)
    first = reset | ~known
    norm = np.sqrt(_dot(d, d))
    step = np.where(first, 1.0 / np.maximum(norm, 1e-300), 1.0)
    return d, step, reset


def remember(S, Y, rho, s, y):
    """The pair (s, y) as the newest of each sample's history where <s, y> > 0 (the
    curvature condition, as scipy's L-BFGS-B skips other pairs)."""
    sy = _dot(s, y)
    keep = sy > np.finfo(np.float64).eps * _dot(y, y)
    S[keep] = np.concatenate([s[keep][:, None], S[keep][:, :-1]], axis=1)
    Y[keep] = np.concatenate([y[keep][:, None], Y[keep][:, :-1]], axis=1)
    rho[keep] = np.concatenate([(1.0 / sy[keep])[:, None], rho[keep][:, :-1]], axis=1)


def converged(v, g, f_old, f, bounds) -> np.ndarray:
    """scipy's tests: the projected gradient's largest entry <= PGTOL, or a relative decrease
    of the objective <= FTOL."""
    projected = np.abs(np.clip(v - g, bounds[0], bounds[1]) - v).max(axis=1)
    small = (f_old - f) <= FTOL * np.maximum(np.maximum(np.abs(f_old), np.abs(f)), 1.0)
    return (projected <= PGTOL) | small


def minimise(model, x, start, goal, const, bounds, max_iter) -> np.ndarray:
    """argmin over x' in the box of c_i ||x'_i - x_i||^2 + CE(x'_i, goal_i) per sample, from
    ``start``, by the module's box-constrained L-BFGS; the minimisers, float32."""
    n, shape = len(x), x.shape
    v = start.reshape(n, -1).astype(np.float64)
    f, g = _evaluate(model, x, v, goal, const)
    if getattr(model, "device_loops", False):  # the same steps as loop graphs, a chunk at a time
        for part in chunks(n, getattr(model, "loop_rows", n)):
            v[part] = _bound_minimise(model, x[part], v[part], f[part], g[part], goal[part], const[part],
                                      bounds, max_iter)
        return clip_to_box(v.reshape(shape).astype(np.float32), bounds)
    S = np.zeros((n, HISTORY, v.shape[1]))
    Y = np.zeros_like(S)
    rho = np.zeros((n, HISTORY))
    spent = np.zeros(n, np.int64)  # line-search evaluations, at most 2 x max_iter
    active = ~converged(v, g, f + 1.0, f, bounds) if max_iter else np.zeros(n, bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        d, step, reset = direction(v[idx], g[idx], S[idx], Y[idx], rho[idx], bounds)
        rho[idx[reset]] = 0.0
        searching = np.ones(len(idx), bool)
        f_old = f[idx].copy()
        for _ in range(TRIALS):
            at = np.flatnonzero(searching & (spent[idx] < 2 * max_iter))
            if not at.size:
                break
            rows = idx[at]
            spent[rows] += 1
            trial = np.clip(v[rows] + step[at, None] * d[at], bounds[0], bounds[1])
            f_t, g_t = _evaluate(model, x[rows], trial, goal[rows], const[rows])
            ok = f_t <= f[rows] + ARMIJO * _dot(g[rows], trial - v[rows])
            won = rows[ok]
            s_, y_ = trial[ok] - v[won], g_t[ok] - g[won]
            sub_S, sub_Y, sub_rho = S[won], Y[won], rho[won]
            remember(sub_S, sub_Y, sub_rho, s_, y_)
            S[won], Y[won], rho[won] = sub_S, sub_Y, sub_rho
            v[won], f[won], g[won] = trial[ok], f_t[ok], g_t[ok]
            searching[at[ok]] = False
            step[at[~ok]] *= 0.5
        stopped = searching | converged(v[idx], g[idx], f_old, f[idx], bounds)
        active[idx[stopped]] = False
    return clip_to_box(v.reshape(shape).astype(np.float32), bounds)


def _bound_minimise(model, x, v, f, g, goal, const, bounds, max_iter) -> np.ndarray:
    """`minimise`'s iterations as loop graphs (workers/loop_graphs/lbfgs.py), from v with its
    objective f and gradient g: per iteration and batch one ONNX Runtime call for the
    direction, one per line-search trial, one for the stopping tests. The host reads [N] flags
    after each trial (who may try again) and each iteration (who is active), and the variables
    once."""
    n = len(x)
    box = tuple(bounds)
    direction_graph = model.loop_session(("lbfgs_direction", HISTORY, box), None,
                                         lambda _: lbfgs_direction_model(HISTORY, bounds))
    trial_graph = model.loop_session(
        ("lbfgs_trial", HISTORY, ARMIJO, box), "cross_entropy",
        lambda gradient: lbfgs_trial_model(gradient, model.input_name, HISTORY, ARMIJO, bounds))
    check_graph = model.loop_session(("lbfgs_check", PGTOL, FTOL, box), None,
                                     lambda _: lbfgs_check_model(PGTOL, FTOL, bounds))
    active = ~converged(v, g, f + 1.0, f, bounds)
    if not active.any() or not max_iter:
        return v
    loop = model.bound_loop({
        P + "x": x, "labels": goal, P + "const": const, P + "v": v, P + "f": f, P + "g": g,
        P + "S": np.zeros((n, HISTORY, v.shape[1])), P + "Y": np.zeros((n, HISTORY, v.shape[1])),
        P + "rho": np.zeros((n, HISTORY)), P + "d": np.zeros_like(v), P + "step": np.zeros(n),
        P + "f_old": f, P + "searching": np.zeros(n, bool), P + "trying": np.zeros(n, bool),
        P + "spent": np.zeros(n, np.int64), P + "active": active})
    budget = {P + "budget": np.int64(2 * max_iter)}
    for _ in range(max_iter):
        loop.apply(*direction_graph)
        for _ in range(TRIALS):
            loop.apply(*trial_graph, budget)
            if not loop.fetch(P + "trying").any():
                break
        loop.apply(*check_graph)
        if not loop.fetch(P + "active").any():
            break
    return loop.fetch(P + "v")
