"""DeepFool: the minimal perturbation that crosses the nearest linearised decision boundary.

Moosavi-Dezfooli, Fawzi and Frossard, "DeepFool: a simple and accurate method to fool deep
neural networks" (CVPR 2016), multi-class version (Algorithm 2). At the current point x_i
the classifier is linearised; for each candidate class k != y, with f_k = z_k - z_y and
w_k = grad f_k, the boundary of k is |f_k| / ||w_k||_q away (q the dual norm: 2 for L2, 1
for L-inf). The step goes to the nearest boundary l:

    L2:    r_i = (|f_l| + 1e-4) / ||w_l||_2^2 * w_l
    L-inf: r_i = (|f_l| + 1e-4) / ||w_l||_1 * sign(w_l)

and accumulates r = sum r_i; the iterate is x + (1 + overshoot) * r clipped to the box (as in
the authors' code and Foolbox), until the label flips or ``max_iter`` steps are done.

Batched: every iteration works on all samples not yet fooled at once; the gradients of
z_k - z_y for the ``candidates - 1`` most likely other classes (ranked once, at x) come from
one ``logits_vjp`` call each, with the cotangent e_k - e_y.

Arguments (keyword-only):
    norm: "l2" (default) or "linf", the geometry of the minimal perturbation.
    overshoot: the factor 1 + overshoot on the accumulated perturbation (0.02).
    max_iter: linearisation steps per sample (50).
    candidates: the top-k classes considered, the true class included (10; ART's ``nb_grads``,
        Foolbox's ``candidates``); clamped to the number of classes.

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]. Untargeted only. Returns one
``AttackRun`` (eps None) whose x_adv holds the adversarial examples found (x itself where
none was found within ``max_iter``; success False there) and extra["iterations"] int [N].
"""

from __future__ import annotations

import numpy as np

from workers.bound_loop import chunks
from workers.loop_graphs import P, deepfool_candidate_model, deepfool_check_model, deepfool_step_model

from .base import (
    Attack,
    AttackModel,
    AttackRun,
    Progress,
    check,
    check_positive,
    clip_to_box,
    get_norm,
    register_attack,
)

_PUSH = 1e-4  # the authors' constant added to |f_l|: lands just past the boundary
_TINY = 1e-12


def _broadcast(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def deepfool_search(model: AttackModel, x: np.ndarray, labels: np.ndarray, *, norm: str = "l2",
                    overshoot: float = 0.02, max_iter: int = 50, candidates: int = 10,
                    bounds: tuple[float, float] = (0.0, 1.0), logits: np.ndarray | None = None,
                    progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepFool on every sample at once; parameters as in the module docstring (unchecked).

    ``labels`` are the classes to leave (the true labels, or the model's predictions for the
    universal perturbation); ``logits`` optionally the model's logits at x. Returns
    (x_adv [N, ...], fooled bool [N], iterations int [N]): x_adv is the overshot, clipped
    iterate where the label left ``labels`` and x itself elsewhere.
    """
    n, num_classes = len(x), model.num_classes
    k = min(int(candidates), num_classes)
    z0 = model.logits(x) if logits is None else logits
    rows = np.arange(n)
    ranked = z0.copy()
    ranked[rows, labels] = -np.inf
    others = np.argsort(-ranked, axis=1, kind="stable")[:, :k - 1]  # [N, k-1] candidate classes
    r_total = np.zeros(x.shape, np.float64)
    x_adv = x.copy()
    active = z0.argmax(axis=1) == labels
    fooled = ~active
    iterations = np.zeros(n, np.int64)
    if getattr(model, "device_loops", False):  # the same steps as loop graphs, a chunk at a time
        for part in chunks(n, getattr(model, "loop_rows", n)):
            def chunk_progress(done: int, total: int, before: int = part.start) -> None:
                if progress is not None:
                    progress(before + done, n)

            _bound_search(model, x[part], labels[part], others[part], x_adv[part], r_total[part],
                          active[part], fooled[part], iterations[part], norm=norm, overshoot=overshoot,
                          max_iter=max_iter, bounds=bounds, progress=chunk_progress)
        x_adv[~fooled] = x[~fooled]
        return x_adv, fooled, iterations
    linf = norm == "linf"
    for step in range(max_iter + 1):
        idx = np.flatnonzero(active)
        if step > 0 and idx.size:
            flipped = model.logits(x_adv[idx]).argmax(axis=1) != labels[idx]
            active[idx[flipped]] = False
            fooled[idx[flipped]] = True
            idx = idx[~flipped]
        if progress is not None:
            progress(n - len(idx), n)
        if not idx.size or step == max_iter:
            break
        iterations[idx] += 1
        xa, la, m = x_adv[idx], labels[idx], len(idx)
        sub = np.arange(m)
        best_dist = np.full(m, np.inf)
        best_f = np.zeros(m)
        best_w = np.zeros(xa.shape, np.float32)
        for j in range(k - 1):
            cotangent = np.zeros((m, num_classes), np.float32)
            cotangent[sub, others[idx, j]] = 1.0
            cotangent[sub, la] -= 1.0
            z, w = model.logits_vjp(xa, cotangent)
            f = np.abs((z[sub, others[idx, j]] - z[sub, la]).astype(np.float64))
            flat = w.reshape(m, -1).astype(np.float64)
            dual = np.abs(flat).sum(axis=1) if linf else np.linalg.norm(flat, axis=1)
            dist = f / (dual + _TINY)
            better = dist < best_dist
            best_dist[better], best_f[better], best_w[better] = dist[better], f[better], w[better]
        flat = best_w.reshape(m, -1).astype(np.float64)
        if linf:
            scale = (best_f + _PUSH) / (np.abs(flat).sum(axis=1) + _TINY)
            r_step = _broadcast(scale, xa.ndim) * np.sign(best_w)
        else:
            scale = (best_f + _PUSH) / (np.square(flat).sum(axis=1) + _TINY)
            r_step = _broadcast(scale, xa.ndim) * best_w
        r_total[idx] += r_step
        x_adv[idx] = clip_to_box((x[idx] + (1.0 + overshoot) * r_total[idx]).astype(np.float32), bounds)
    x_adv[~fooled] = x[~fooled]
    return x_adv, fooled, iterations


def _bound_search(model, x, labels, others, x_adv, r_total, active, fooled, iterations, *, norm, overshoot,
                  max_iter, bounds, progress) -> None:
    """`deepfool_search`'s iterations as loop graphs (workers/loop_graphs.py), filling its
    arrays in place: per iteration and batch one ONNX Runtime call per candidate class, one
    for the step, one for the test of the labels. The host receives the active flags ([N]
    bools) after each test; when at most half the samples in the loop are still active, their
    state comes back and the loop goes on with the active ones only, as the numpy loop does."""
    iterate = model.input_name
    check = model.loop_session(("deepfool_check",), "forward",
                               lambda forward: deepfool_check_model(forward, iterate))
    candidate = model.loop_session(
        ("deepfool_candidate", norm), "cotangent",
        lambda gradient: deepfool_candidate_model(gradient, iterate, norm, model.num_classes))
    step_graph = model.loop_session(
        ("deepfool_step", norm, overshoot), None,
        lambda _: deepfool_step_model(model.input_shape, iterate, norm, overshoot))
    box = {P + "low": np.float32(bounds[0]), P + "high": np.float32(bounds[1])}
    idx, loop, in_loop = np.flatnonzero(active), None, np.zeros(0, bool)

    def harvest(loop) -> None:  # the loop's samples back into the host arrays
        x_adv[idx], r_total[idx], iterations[idx] = (loop.fetch(name) for name in (iterate, P + "r",
                                                                                   P + "iterations"))

    for step in range(max_iter + 1):
        if step > 0 and loop is not None:
            loop.apply(*check)
            still = loop.fetch(P + "active")
            fooled[idx[in_loop & ~still]] = True
            active[idx[in_loop & ~still]] = False
            in_loop = still
        remaining = int(active.sum())
        if progress is not None:
            progress(len(x) - remaining, len(x))
        if not remaining or step == max_iter:
            break
        if loop is not None and remaining <= len(idx) // 2:
            harvest(loop)
            idx, loop = np.flatnonzero(active), None
        if loop is None:
            m = len(idx)
            loop = model.bound_loop({
                iterate: x_adv[idx], P + "x": x[idx], P + "r": r_total[idx], "labels": labels[idx],
                P + "others": others[idx], P + "active": np.ones(m, bool), P + "iterations": iterations[idx],
                P + "best_w": np.zeros_like(x[idx]), P + "best_dist": np.full(m, np.inf),
                P + "best_f": np.zeros(m)})
            in_loop = np.ones(m, bool)
        for j in range(others.shape[1]):
            loop.apply(*candidate, {P + "j": np.int64(j), P + "first": np.bool_(j == 0)})
        loop.apply(*step_graph, box)
    if loop is not None:
        harvest(loop)


@register_attack
class DeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al. 2016), multi-class, L2 or L-inf; see the module docstring."""

    name = "deepfool"
    kind = "minimal"
    norm = "l2"  # the default; the constructor's `norm` sets it per instance
    norms = ("l2", "linf")
    minimal = True
    model_calls = ("logits", "logits_vjp")

    def __init__(self, *, norm: str = "l2", overshoot: float = 0.02, max_iter: int = 50,
                 candidates: int = 10):
        get_norm(norm)
        check_positive("overshoot", overshoot, allow_zero=True)
        check_positive("max_iter", max_iter, integer=True)
        check(isinstance(candidates, int | np.integer) and not isinstance(candidates, bool)
              and candidates >= 2,
              f"`candidates` must be an integer >= 2 (the true class and at least one other), "
              f"got {candidates!r}")
        self.norm = norm
        self.overshoot, self.max_iter, self.candidates = float(overshoot), int(max_iter), int(candidates)

    def calls_per_sample(self, num_classes: int) -> int:
        return 1 + (self.max_iter + 1) * min(self.candidates, num_classes)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        x_adv, success, iterations = deepfool_search(
            model, x, y, norm=self.norm, overshoot=self.overshoot, max_iter=self.max_iter,
            candidates=self.candidates, bounds=bounds, progress=progress)
        return AttackRun(eps=None, x_adv=x_adv, success=success, extra={"iterations": iterations})
