"""FAB: the fast adaptive boundary attack, untargeted and FAB-T (L-inf and L2).

Croce and Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack" (ICML 2020); FAB-T as in AutoAttack (Croce and Hein 2020, "Reliable evaluation...").
FAB looks for the smallest perturbation that changes the class. At each step it linearises
the decision boundary between the true class y and a class j at the iterate x_k,

    f_j(z) ~ (z_j - z_y)(x_k) + <grad (z_j - z_y)(x_k), z - x_k> = 0,

(untargeted: the j != y whose linearised boundary is closest; FAB-T: a given target j),
projects both x_k and the original x onto that hyperplane inside the box (minimal
``norm`` distance, exact), and moves to a convex combination biased towards x:

    x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x + eta d_0)),  a = min(|d_k| / (|d_k| + |d_0|), alpha_max)

Whenever x_{k+1} is adversarial it is recorded when it is the closest so far, and the iterate
is pulled back towards x: x_{k+1} <- x + beta (x_{k+1} - x). Gradients of z_j - z_y come
from ``model.logits_vjp`` (one vector-Jacobian product per class, one for FAB-T).

FAB-T (``multi_targeted=True``, AutoAttack's standard version) runs once per target among the
``n_target_classes`` highest-scoring wrong classes of the clean input (AutoAttack uses 9),
each time on the samples not yet broken within eps. With ``targets`` the attack is targeted:
only points classified as the target count, and the boundary linearised at each step is the
one between the target and the strongest other class at the iterate (z_t - z_y in FAB-T).

As in AutoAttack, FAB takes a budget: a sample succeeds when the closest adversarial point
found lies within eps; eps also sets the radius (eps / 2) of the random starts of restarts
after the first. ``extra["distance"]`` holds the size of the closest adversarial point found
per sample (0 if misclassified already, inf if none was found), inside the budget or not.

Arguments (keyword-only): norm "linf" | "l2"; multi_targeted (False); n_target_classes (9,
clamped to K - 1); steps (100); restarts (1); alpha_max (0.1); eta (1.05); beta (0.9).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]; targets int64 [N] or None.
``AttackRun.x_adv`` [N, ...]: the closest adversarial point found where it lies within eps,
else x.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.bound_loop import chunks
from workers.loop_graphs import (
    P,
    fab_candidate_model,
    fab_judge_model,
    fab_plane_model,
    fab_rival_model,
    fab_step_model,
)

from .apgd import sphere_start
from .base import (
    Attack,
    AttackModel,
    AttackRun,
    Progress,
    check,
    check_positive,
    clip_to_box,
    get_norm,
    is_adversarial,
    register_attack,
)


def project_onto_hyperplane(t: np.ndarray, w: np.ndarray, b: np.ndarray, bounds: tuple[float, float],
                            norm: str) -> np.ndarray:
    """Per row i, the smallest d (L-inf or L2) with <w_i, t_i + d> = b_i and t_i + d in the box.

    t, w [n, D], b [n]. Where the box keeps the hyperplane out of reach, d goes as far towards
    it as the box allows. Moving coordinate k towards the plane by min(lam * r_k, room_k)
    (r_k = 1 for L-inf, |w_k| for L2, the KKT form of both problems) gains
    g(lam) = sum_k |w_k| min(lam r_k, room_k), piecewise linear and increasing in lam: sort
    the knots room_k / r_k and solve g(lam) = |b - <w, t>| on the segment that reaches it.
    """
    t, w = t.astype(np.float64), w.astype(np.float64)
    gap = b - np.einsum("ij,ij->i", w, t)
    direction = np.sign(w) * np.sign(gap)[:, None]
    room = np.where(direction > 0, bounds[1] - t, t - bounds[0]) * (direction != 0)
    size = np.abs(w)
    moves = size > 0
    rate = np.ones_like(w) if norm == "linf" else np.where(moves, size, 1.0)
    knots = np.where(moves, room / rate, np.inf)
    order = np.argsort(knots, axis=1, kind="stable")  # ties in index order, as ONNX's TopK sorts them
    # per coordinate, in knot order: the gain once saturated, and d gain / d lam before that
    knots, full, rising = (np.take_along_axis(a, order, axis=1) for a in (knots, size * room, size * rate))
    saturated = np.cumsum(full, axis=1) - full  # gain of the coordinates saturated before knot k
    slope = np.cumsum(rising[:, ::-1], axis=1)[:, ::-1]  # d gain / d lam between knots k-1 and k
    finite = np.isfinite(knots)
    beyond = np.where(slope > 0, np.inf, 0.0)  # past the last finite knot only unmoved coordinates remain
    reach = saturated + np.where(finite, np.where(finite, knots, 0.0) * slope, beyond)
    enough = reach >= np.abs(gap)[:, None]
    k = enough.argmax(axis=1)[:, None]
    rows = np.arange(len(t))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = (np.abs(gap)[:, None] - saturated[rows, k]) / slope[rows, k]
    lam = np.where(enough.any(axis=1)[:, None], np.nan_to_num(lam, nan=0.0, posinf=0.0), np.inf)
    step = np.where(moves, np.minimum(lam * rate, room), 0.0)
    return (direction * step).astype(np.float32)


@register_attack
class FAB(Attack):
    """Fast adaptive boundary attack (Croce and Hein 2020); see the module docstring."""

    name = "fab"
    norm = "linf"  # the default; the constructor's `norm` sets it per instance
    norms = ("linf", "l2")
    targeted_capable = True
    model_calls = ("logits", "logits_vjp")

    def __init__(self, *, norm: str = "linf", multi_targeted: bool = False, n_target_classes: int = 9,
                 steps: int = 100, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9):
        self.geometry = get_norm(norm)
        self.norm = norm
        check(isinstance(multi_targeted, bool), f"`multi_targeted` must be a bool, got {multi_targeted!r}")
        check_positive("n_target_classes", n_target_classes, integer=True)
        check_positive("steps", steps, integer=True)
        check_positive("restarts", restarts, integer=True)
        check(isinstance(alpha_max, int | float) and 0 <= alpha_max <= 1,
              f"`alpha_max` must lie in [0, 1], got {alpha_max!r}")
        check_positive("eta", eta)
        check(isinstance(beta, int | float) and 0 < beta <= 1, f"`beta` must lie in (0, 1], got {beta!r}")
        self.multi_targeted, self.n_target_classes = multi_targeted, int(n_target_classes)
        self.steps, self.restarts = int(steps), int(restarts)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        logits = model.logits(x)
        broken = is_adversarial(logits, y, targets)
        x_adv, distance = x.copy(), np.where(broken, 0.0, np.inf)
        if targets is not None:
            runs: list[np.ndarray | None] = [targets]
        elif self.multi_targeted:
            ranked = np.argsort(logits, axis=1)  # the clean scores rank the targets, as in AutoAttack
            count = min(self.n_target_classes, model.num_classes - 1)
            runs = [ranked[:, -rank] for rank in range(2, count + 2)]
        else:
            runs = [None]
        success = broken.copy()
        total, done = len(runs) * self.restarts, 0
        for plane in runs:
            for restart in range(self.restarts):
                todo = np.flatnonzero(~success)
                if len(todo):
                    found, size = self._single_run(
                        model, x[todo], y[todo], None if plane is None else plane[todo],
                        None if targets is None else targets[todo], eps, bounds, rng, restart > 0)
                    closer = size < distance[todo]
                    distance[todo[closer]] = size[closer]
                    within = size <= eps
                    x_adv[todo[within]] = found[within]
                    success[todo[within]] = True
                done += 1
                if progress is not None:
                    progress(done, total)
        return AttackRun(eps=eps, x_adv=x_adv, success=success, extra={"distance": distance})

    def _boundary(self, model, x1, y, plane, targeted):
        """(f [n], grad f [n, D]) of the boundary to linearise: f = z_j - z_rival, rival y.

        Untargeted: j the class whose linearised boundary is closest. Targeted (success means
        the target): j the target and the rival the strongest other class, so that crossing
        every such boundary in turn makes the target the top class.
        """
        n, k = len(x1), model.num_classes
        rows = np.arange(n)
        if plane is not None:
            rival = y
            if targeted:
                others = model.logits(x1)
                others[rows, plane] = -np.inf
                rival = others.argmax(axis=1)
            cotangent = np.zeros((n, k), np.float32)
            cotangent[rows, plane] = 1.0
            cotangent[rows, rival] -= 1.0
            logits, grad = model.logits_vjp(x1, cotangent)
            return logits[rows, plane] - logits[rows, rival], grad.reshape(n, -1)
        # the nearest boundary so far, class by class (the first of equally near ones)
        best_dist, best_f = np.full(n, np.inf), np.zeros(n)
        best_w = np.zeros((n, x1[0].size), np.float32)
        for j in range(k):
            if np.all(y == j):
                continue
            cotangent = -np.eye(k, dtype=np.float32)[y]
            cotangent[:, j] += 1.0
            logits, grad = model.logits_vjp(x1, cotangent)
            value = (logits[:, j] - logits[rows, y]).astype(np.float64)
            wide = grad.reshape(n, -1).astype(np.float64)
            dual = np.abs(wide).sum(axis=1) if self.norm == "linf" else np.linalg.norm(wide, axis=1)
            distance = np.where(y == j, np.inf, np.abs(value) / (dual + 1e-12))
            better = distance < best_dist
            best_dist[better], best_f[better] = distance[better], value[better]
            best_w[better] = grad.reshape(n, -1)[better]
        return best_f, best_w

    def calls_per_sample(self, num_classes: int) -> int:
        """Untargeted: a vector-Jacobian product per class each step; multi-targeted: one run
        per target class, three calls a step; and the scores of each step's point."""
        runs = min(self.n_target_classes, num_classes - 1) if self.multi_targeted else 1
        per_step = 3 if self.multi_targeted else num_classes + 1
        return 1 + runs * self.restarts * self.steps * per_step

    def _single_run(self, model, x0, y, plane, targets, eps, bounds, rng, random_start):
        """One FAB run: (closest adversarial point found [n, ...] or x0, its size [n] or inf)."""
        x1 = x0.copy()
        if random_start:
            x1 = clip_to_box(x0 + 0.5 * sphere_start(rng, self.norm, x0.shape, eps), bounds)
        if not getattr(model, "cheap_loops", False):
            return self._numpy_steps(model, x0, x1, y, plane, targets, bounds)
        # a workers.runtime.Classifier keeps the iterates in ONNX Runtime's buffers (on CUDA on the
        # device), a chunk of samples at a time: as fast as the numpy loop on the CPU, or faster
        best_x, best = x0.copy(), np.full(len(x0), np.inf)
        for rows in chunks(len(x0), getattr(model, "loop_rows", len(x0))):
            best_x[rows], best[rows] = self._bound_steps(
                model, x0[rows], x1[rows], y[rows], None if plane is None else plane[rows],
                None if targets is None else targets[rows], bounds)
        return best_x, best

    def _numpy_steps(self, model, x0, x1, y, plane, targets, bounds):
        """FAB's steps from x1, in numpy: (closest adversarial point [n, ...] or x0, its size or inf)."""
        n = len(x0)
        best_x, best = x0.copy(), np.full(n, np.inf)
        flat0 = x0.reshape(n, -1)
        for _ in range(self.steps):
            f, w = self._boundary(model, x1, y, plane, targets is not None)
            flat1 = x1.reshape(n, -1)
            b = np.einsum("ij,ij->i", w, flat1, dtype=np.float64) - f
            d1 = project_onto_hyperplane(flat1, w, b, bounds, self.norm)
            d0 = project_onto_hyperplane(flat0, w, b, bounds, self.norm)
            a1 = np.maximum(self.geometry.size(d1), 1e-8)
            a0 = np.maximum(self.geometry.size(d0), 1e-8)
            alpha = np.clip(a1 / (a1 + a0), 0.0, self.alpha_max).reshape(-1, 1)
            moved = (1 - alpha) * (flat1 + self.eta * d1) + alpha * (flat0 + self.eta * d0)
            x1 = clip_to_box(moved.reshape(x0.shape), bounds)
            hit = is_adversarial(model.logits(x1), y, targets)
            size = self.geometry.size(x1 - x0)
            closer = hit & (size < best)
            best_x[closer], best[closer] = x1[closer], size[closer]
            x1[hit] = x0[hit] + self.beta * (x1[hit] - x0[hit])
        return best_x, best

    def _bound_steps(self, model, x0, x1, y, plane, targets, bounds):
        """`_numpy_steps` as loop graphs (workers/loop_graphs/boundary.py): per step and batch one
        ONNX Runtime call per candidate class (FAB-T: one, and one for the rival where targeted),
        one for the move and one for the test; the host receives the closest points once."""
        iterate, k = model.input_name, model.num_classes
        targeted = targets is not None
        step = model.loop_session(
            ("fab_step", self.norm, self.eta, self.alpha_max, tuple(bounds)), None,
            lambda _: fab_step_model(model.input_shape, iterate, self.norm, eta=self.eta,
                                     alpha_max=self.alpha_max, bounds=bounds))
        judge = model.loop_session(
            ("fab_judge", self.norm, self.beta, targeted), "forward",
            lambda forward: fab_judge_model(forward, iterate, self.norm, beta=self.beta, targeted=targeted))
        n = len(x0)
        state = {iterate: x1, P + "x": x0, "labels": y, P + "best_x": x0, P + "best": np.full(n, np.inf),
                 P + "best_w": np.zeros_like(x0), P + "best_f": np.zeros(n),
                 P + "best_dist": np.full(n, np.inf)}
        if targeted:
            state[P + "goal"] = targets
        if plane is not None:
            state[P + "plane"], state[P + "rival"] = plane, y
            boundary = [model.loop_session(("fab_plane",), "cotangent",
                                           lambda gradient: fab_plane_model(gradient, iterate, k))]
            if targeted:
                boundary.insert(0, model.loop_session(("fab_rival",), "forward",
                                                      lambda forward: fab_rival_model(forward, iterate, k)))
            calls: list[tuple[Any, dict | None]] = [(session, None) for session in boundary]
        else:
            candidate = model.loop_session(
                ("fab_candidate", self.norm), "cotangent",
                lambda gradient: fab_candidate_model(gradient, iterate, self.norm, k))
            classes = [j for j in range(k) if not np.all(y == j)]
            calls = [(candidate, {P + "j": np.int64(j), P + "first": np.bool_(j == classes[0])})
                     for j in classes]
        loop = model.bound_loop(state)
        for _ in range(self.steps):
            for session, scalars in calls:
                loop.apply(*session, scalars)
            loop.apply(*step)
            loop.apply(*judge)
        return loop.fetch(P + "best_x"), loop.fetch(P + "best")
