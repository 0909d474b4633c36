"""Auto-PGD: step-size-free projected gradient ascent with momentum (L-inf and L2).

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), Algorithm 1. From a random point on the sphere of
radius eps, with step size eta = 2 eps and momentum 0.75:

    z = P(x_k + eta grad / ||grad||_*)        (sign(grad) for L-inf)
    x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))

where P projects onto the eps ball, then clips to the box. At checkpoints w_j = ceil(p_j N),
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), the step size of a
sample is halved and its iterate restarted from its best point when (1) the loss went up in
at most a fraction ``rho`` of the steps since the last checkpoint, or (2) the step size was
not halved at the last checkpoint and the best loss has not improved since. (The paper
writes "fewer than" in (1); the authors' code, and torchattacks after it, halve at equality
too, which is measurably stronger where rho times the period is an integer: fc100, L2,
eps 1.5, 50 steps: 19.0% robust accuracy against 19.9%. We follow the code.)

Losses: "auto" (the default: the cross-entropy's ascent direction without the factor that
underflows on confident models, see workers/attacks/losses.py; APGD-CE's steps wherever the
cross-entropy's float32 gradient is informative), "ce" (cross-entropy), "dlr" (difference of
logits ratio, untargeted) and "dlr_targeted" (APGD-T): without ``targets`` it runs once per target among the
``n_target_classes`` highest-scoring wrong classes of the clean input (AutoAttack uses 9),
each time on the samples not yet misclassified, and succeeds on any misclassification. With
``targets`` ("auto", "ce" or "dlr_targeted") the attack is targeted: success means the target class.

Arguments (keyword-only): norm "linf" | "l2"; loss "auto" | "ce" | "dlr" | "dlr_targeted";
steps (100); restarts (1; later restarts only attack the samples still robust); rho (0.75);
n_target_classes (9, clamped to K - 1).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]; targets int64 [N] or None.
``AttackRun.x_adv`` [N, ...]: an adversarial iterate where one was found, else the
highest-loss point; always inside the eps ball and the box.
"""

from __future__ import annotations

import math

import numpy as np

from workers.bound_loop import chunks
from workers.loop_graphs import P, apgd_checkpoint_model, apgd_objective_model, apgd_update_model

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

LOSSES = ("auto", "ce", "dlr", "dlr_targeted")
MOMENTUM = 0.75


def sphere_start(rng: np.random.Generator, norm: str, shape: tuple[int, ...], eps: float) -> np.ndarray:
    """A random point at distance exactly eps (before clipping), as APGD and FAB start."""
    flat = (shape[0], -1)
    if norm == "linf":
        t = rng.uniform(-1.0, 1.0, size=shape)
        scale = np.abs(t.reshape(flat)).max(axis=1)
    else:
        t = rng.standard_normal(size=shape)
        scale = np.linalg.norm(t.reshape(flat), axis=1)
    return (eps * t / np.maximum(scale, 1e-12).reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)


@register_attack
class APGD(Attack):
    """Auto-PGD (Croce and Hein 2020); see the module docstring."""

    name = "apgd"
    norm = "linf"  # the default; the constructor's `norm` sets it per instance
    norms = ("linf", "l2")
    targeted_capable = True

    @property
    def gradient_loss(self) -> str:
        return {"auto": "auto", "ce": "cross_entropy"}.get(self.loss, "dlr")

    def __init__(self, *, norm: str = "linf", loss: str = "auto", steps: int = 100, restarts: int = 1,
                 rho: float = 0.75, n_target_classes: int = 9):
        self.geometry = get_norm(norm)
        self.norm = norm
        check(loss in LOSSES, f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
        check_positive("steps", steps, integer=True)
        check_positive("restarts", restarts, integer=True)
        check(isinstance(rho, int | float) and 0 < rho < 1, f"`rho` must lie in (0, 1), got {rho!r}")
        check_positive("n_target_classes", n_target_classes, integer=True)
        self.loss, self.steps, self.restarts = loss, int(steps), int(restarts)
        self.rho, self.n_target_classes = float(rho), int(n_target_classes)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        check(targets is None or self.loss != "dlr",
              "`loss`='dlr' is untargeted; use 'auto', 'ce' or 'dlr_targeted' with `targets`")
        logits = model.logits(x)
        success = is_adversarial(logits, y, targets)
        x_adv, best = x.copy(), np.full(len(x), -np.inf, np.float32)
        if self.loss == "dlr_targeted" and targets is None:
            ranked = np.argsort(logits, axis=1)  # the clean scores rank the targets, as in AutoAttack
            count = min(self.n_target_classes, model.num_classes - 1)
            runs: list[np.ndarray | None] = [ranked[:, -rank] for rank in range(2, count + 2)]
        else:
            runs = [targets]
        total, done = len(runs) * self.restarts, 0
        for loss_targets in runs:
            for _ in range(self.restarts):
                todo = np.flatnonzero(~success)
                if len(todo):
                    sub = None if loss_targets is None else loss_targets[todo]
                    found, hit, x_best, loss_best = self._single_run(
                        model, x[todo], y[todo], sub, targets is not None, eps, bounds, rng)
                    higher = ~hit & (loss_best > best[todo])
                    x_adv[todo[hit]] = found[hit]
                    x_adv[todo[higher]], best[todo[higher]] = x_best[higher], loss_best[higher]
                    success[todo[hit]] = True
                done += 1
                if progress is not None:
                    progress(done, total)
        return AttackRun(eps=eps, x_adv=x_adv, success=success)

    def calls_per_sample(self, num_classes: int) -> int:
        runs = min(self.n_target_classes, num_classes - 1) if self.loss == "dlr_targeted" else 1
        return 1 + runs * self.restarts * (self.steps + 1)

    def _objective(self, model, x_adv, y, targets, targeted):
        """(logits, the loss APGD ascends, its gradient)."""
        loss = {"ce": "cross_entropy"}.get(self.loss, self.loss)
        if loss in ("auto", "cross_entropy") and targeted:
            logits, value, grad = model.loss_and_grad(x_adv, targets, loss=loss)
            return logits, -value, -grad
        if loss == "dlr_targeted":
            return model.loss_and_grad(x_adv, y, loss="dlr_targeted", targets=targets)
        return model.loss_and_grad(x_adv, y, loss=loss)

    def _single_run(self, model, x, y, targets, targeted, eps, bounds, rng):
        """One APGD run: (adversarial iterates, success, highest-loss points, their loss)."""
        x_adv = clip_to_box(x + sphere_start(rng, self.norm, x.shape, eps), bounds)
        logits, loss, grad = self._objective(model, x_adv, y, targets, targeted)
        success = is_adversarial(logits, y, targets if targeted else None)
        step = np.full(len(x), 2.0 * eps, np.float32)
        # a classifier with device loops (workers.runtime.Classifier on CUDA) keeps the state in ONNX
        # Runtime's buffers on the device, with the same float32 operations, a chunk of samples at a time
        if getattr(model, "device_loops", False):
            parts = [self._bound_iterations(model, x[rows], y[rows],
                                            None if targets is None else targets[rows],
                                            targeted, eps, bounds, x_adv[rows], loss[rows], grad[rows],
                                            success[rows], step[rows])
                     for rows in chunks(len(x), model.loop_rows)]
            return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
        norm = self.geometry
        column = (-1,) + (1,) * (x.ndim - 1)

        def project(z):
            return clip_to_box(x + norm.project(z - x, eps), bounds)

        found = x_adv.copy()
        x_best, loss_best, grad_best = x_adv.copy(), loss.copy(), grad.copy()
        x_prev, last_loss = x_adv, loss
        increases = np.zeros(len(x), np.int64)
        best_at_check, halved_at_check = loss_best.copy(), np.ones(len(x), bool)
        for i, threshold in enumerate(checkpoints(self.steps, self.rho)):
            z = project(x_adv + step.reshape(column) * norm.ascent_direction(grad))
            if i > 0:
                z = project(x_adv + MOMENTUM * (z - x_adv) + (1 - MOMENTUM) * (x_adv - x_prev))
            x_prev, x_adv = x_adv, z
            logits, loss, grad = self._objective(model, x_adv, y, targets, targeted)
            hit = is_adversarial(logits, y, targets if targeted else None)
            found[hit] = x_adv[hit]
            success |= hit
            improved = loss > loss_best
            x_best[improved], grad_best[improved], loss_best[improved] = (
                x_adv[improved], grad[improved], loss[improved])
            increases += loss > last_loss
            last_loss = loss
            if threshold is not None:  # checkpoint w_j
                halve = (increases <= threshold) | (~halved_at_check & (loss_best <= best_at_check))
                step[halve] /= 2
                x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
                last_loss[halve] = loss_best[halve]
                halved_at_check, best_at_check = halve, loss_best.copy()
                increases[:] = 0
        return found, success, x_best, loss_best

    def _bound_iterations(self, model, x, y, targets, targeted, eps, bounds,
                          x_adv, loss, grad, success, step):
        """The iterations of `_single_run` as loop graphs (workers/loop_graphs.py): per
        iteration and batch one ONNX Runtime call for the next iterate, one for the objective
        and the bookkeeping, one more at a checkpoint; the host sends the starting state once
        and receives the four results once. (The objective's graph starts from its input, as the
        plain gradient graph does: ONNX Runtime then runs the gradient with the same kernels.)"""
        gradient_loss = {"ce": "cross_entropy"}.get(self.loss, self.loss)
        negate = targeted and gradient_loss in ("auto", "cross_entropy")  # as in _objective
        hit_when = ("labels" if negate else "targets") if targeted else "differs"
        iterate = model.input_name
        state = {P + "x": x, "labels": targets if negate else y, iterate: x_adv, P + "x_prev": x_adv,
                 P + "grad": grad, P + "step": step, P + "found": x_adv, P + "success": success,
                 P + "x_best": x_adv, P + "grad_best": grad, P + "loss_best": loss, P + "last_loss": loss,
                 P + "increases": np.zeros(len(x), np.int64), P + "halved": np.ones(len(x), bool),
                 P + "best_at_check": loss}
        if gradient_loss == "dlr_targeted":
            state["targets"] = targets
        update = model.loop_session(
            ("apgd_update", self.norm), None,
            lambda _: apgd_update_model(model.input_shape, iterate, self.norm, MOMENTUM))
        objective = model.loop_session(
            ("apgd_objective", negate, hit_when), gradient_loss,
            lambda gradient: apgd_objective_model(gradient, iterate, negate=negate, hit_when=hit_when))
        checkpoint = model.loop_session(("apgd_checkpoint",), None,
                                        lambda _: apgd_checkpoint_model(model.input_shape, iterate))
        loop = model.bound_loop(state)
        scalars = {P + "eps": np.float32(eps), P + "low": np.float32(bounds[0]),
                   P + "high": np.float32(bounds[1])}
        for i, threshold in enumerate(checkpoints(self.steps, self.rho)):
            loop.apply(*update, {**scalars, P + "momentum": np.bool_(i > 0)})
            loop.apply(*objective)
            if threshold is not None:
                loop.apply(*checkpoint, {P + "threshold": np.int64(threshold)})
        return tuple(loop.fetch(P + name) for name in ("found", "success", "x_best", "loss_best"))


def checkpoints(steps: int, rho: float) -> list[int | None]:
    """Per iteration: None, or (a checkpoint follows it) the most steps of the period that may
    have raised the loss for the step size to be halved, floor(rho * period)."""
    period, min_period, decrease = (max(int(p * steps), 1) for p in (0.22, 0.06, 0.03))
    schedule: list[int | None] = []
    since_check = 0
    for _ in range(steps):
        since_check += 1
        if since_check == period:
            schedule.append(math.floor(rho * period))
            since_check, period = 0, max(period - decrease, min_period)
        else:
            schedule.append(None)
    return schedule


@register_attack
class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss over the top ``n_target_classes`` wrong classes."""

    name = "apgd-t"

    def __init__(self, *, norm: str = "linf", steps: int = 100, restarts: int = 1, rho: float = 0.75,
                 n_target_classes: int = 9):
        super().__init__(norm=norm, loss="dlr_targeted", steps=steps, restarts=restarts, rho=rho,
                         n_target_classes=n_target_classes)
