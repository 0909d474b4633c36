"""Gradient-sign and projected-gradient attacks: FGSM, BIM and PGD (L-inf and L2).

- FGSM: Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples"
  (ICLR 2015). One step ``x + eps * sign(grad)`` on the cross-entropy (L-inf).
- BIM: Kurakin, Goodfellow and Bengio, "Adversarial examples in the physical world" (2017):
  FGSM iterated with a smaller step, clipped to the eps ball and the box after every step.
- PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks"
  (ICLR 2018): BIM from a random point of the ball, with random restarts.

Targeted attacks descend the loss of the target class instead of ascending the loss of
the true one. ``PGD(random_target=True)`` draws one target class != y per sample from the
attack's seeded rng, as Liang et al. ("Deep Adversarial Robustness", 2017) built their
gradient-perturbed dataset; the drawn targets are returned in ``extra["targets"]``.

Arguments (keyword-only):
    norm: "linf" or "l2" (PGD, BIM); FGSM is L-inf.
    steps: gradient steps (PGD 40, BIM 10).
    step_size / rel_step_size: the step, absolute or as a fraction of eps; at most one.
        Neither: ``rel_step_size = 2.5 / steps`` (Madry et al.'s rule).
    random_start: start uniformly inside the ball (PGD) or at x (BIM, FGSM).
    restarts: runs from independent random starts; per sample the first run that succeeds,
        else the run that ends at the highest loss, is kept.
    loss: "auto" (the default: the cross-entropy's ascent direction without its vanishing
        scale, see workers/attacks/losses.py), "cross_entropy", or "margin" (Carlini-Wagner's
        max_{j != y} z_j - z_y).
    random_target: draw a random target per sample (PGD, BIM).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]; targets int64 [N] or None.
Returns one ``AttackRun`` per eps with x_adv [N, ...] (the last iterate, inside the ball and
the box) and success bool [N].
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

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
    random_targets,
    register_attack,
)
from .losses import loss_values

LOSSES = ("auto", "cross_entropy", "margin")


def objective_from_logits(logits: np.ndarray, labels: np.ndarray, loss: str, targeted: bool) -> np.ndarray:
    """The per-sample value the attack ascends: the loss of y, or minus the loss of the target."""
    value = loss_values(logits, labels, loss)
    return -value if targeted else value


@register_attack
class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018); see the module docstring."""

    name = "pgd"
    norm = "linf"  # the default; the constructor's `norm` sets it per instance
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    targeted_capable = True

    @property
    def gradient_loss(self) -> str:
        return self.loss

    def __init__(self, *, norm: str = "linf", steps: int = 40, step_size: float | None = None,
                 rel_step_size: float | None = None, random_start: bool = True, restarts: int = 1,
                 loss: str = "auto", random_target: bool = False):
        self.geometry = get_norm(norm)
        self.norm = norm
        check_positive("steps", steps, integer=True)
        check(step_size is None or rel_step_size is None,
              "give at most one of `step_size` and `rel_step_size`, got both")
        if step_size is not None:
            check_positive("step_size", step_size)
        if rel_step_size is not None:
            check_positive("rel_step_size", rel_step_size)
        check(isinstance(random_start, bool), f"`random_start` must be a bool, got {random_start!r}")
        check_positive("restarts", restarts, integer=True)
        check(restarts == 1 or random_start,
              f"`restarts` > 1 needs `random_start=True` (the runs would be identical), got {restarts}")
        check(loss in LOSSES, f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
        check(isinstance(random_target, bool), f"`random_target` must be a bool, got {random_target!r}")
        self.steps, self.restarts, self.loss = int(steps), int(restarts), loss
        self.random_start, self.random_target = random_start, random_target
        self.step_size = None if step_size is None else float(step_size)
        self.rel_step_size = 2.5 / steps if step_size is None and rel_step_size is None else rel_step_size

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        extra = {}
        if self.random_target:
            check(targets is None, "`random_target` draws the targets itself; pass no `targets`")
            targets = extra["targets"] = random_targets(rng, y, model.num_classes)
        assert eps is not None
        if self.step_size is not None:
            step = self.step_size
        else:
            assert self.rel_step_size is not None
            step = self.rel_step_size * eps
        for restart in range(self.restarts):
            x_adv = self._single_run(model, x, y, eps, targets, bounds, rng, step, progress, restart)
            logits = model.logits(x_adv)
            success = is_adversarial(logits, y, targets)
            value = objective_from_logits(logits, y if targets is None else targets, self.loss,
                                          targets is not None)
            if restart == 0:
                best_x, best_success, best_value, best_logits = x_adv, success, value, logits
                continue
            better = ~best_success & (success | (value > best_value))
            best_x[better], best_value[better] = x_adv[better], value[better]
            best_logits[better] = logits[better]
            best_success = best_success | success
        return AttackRun(eps=eps, x_adv=best_x, success=best_success, extra=extra, logits=best_logits)

    def calls_per_sample(self, num_classes: int) -> int:
        return self.restarts * (self.steps + 1)

    def _single_run(self, model, x, y, eps, targets, bounds, rng, step, progress, restart):
        labels, sign = (y, 1.0) if targets is None else (targets, -1.0)
        delta = (self.geometry.random_start(rng, x.shape, eps) if self.random_start
                 else np.zeros_like(x))
        x_adv = clip_to_box(x + delta, bounds)
        # a model that takes a whole step in one call (workers.runtime.Classifier) does the same
        # float32 operations without a trip through numpy per step, and keeps the iterates in
        # ONNX Runtime's buffers (on the GPU: on the device) from step to step
        steps_at_once = getattr(model, "pgd_steps", None)
        if steps_at_once is not None:
            def advanced(i: int) -> None:
                if progress is not None:
                    progress(restart * self.steps + i, self.restarts * self.steps)

            return steps_at_once(x_adv, x, labels, norm=self.geometry.name, steps=self.steps, loss=self.loss,
                                 step=sign * step, eps=eps, bounds=bounds, progress=advanced)
        for i in range(self.steps):
            _, _, grad = model.loss_and_grad(x_adv, labels, loss=self.loss)
            x_adv = self._step(x_adv, x, sign * grad, step, eps, bounds)
            if progress is not None:
                progress(restart * self.steps + i + 1, self.restarts * self.steps)
        return x_adv

    def _step(self, x_adv, x, ascent, step, eps, bounds):
        x_adv = x_adv + np.float32(step) * self.geometry.ascent_direction(ascent)
        return clip_to_box(x + self.geometry.project(x_adv - x, eps), bounds)


@register_attack
class BIM(PGD):
    """Basic iterative method (Kurakin et al. 2017): PGD from x itself, no random start."""

    name = "bim"

    def __init__(self, *, norm: str = "linf", steps: int = 10, step_size: float | None = None,
                 rel_step_size: float | None = None, loss: str = "auto",
                 random_target: bool = False):
        super().__init__(norm=norm, steps=steps, step_size=step_size, rel_step_size=rel_step_size,
                         random_start=False, restarts=1, loss=loss, random_target=random_target)


@register_attack
class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps."""

    name = "fgsm"
    kind = "single_step"
    norm = "linf"
    norms = ("linf",)

    def __init__(self, *, loss: str = "auto"):
        super().__init__(norm="linf", steps=1, rel_step_size=1.0, random_start=False, loss=loss)

    shares_budgets = True

    def run_budgets(self, model, x, y, budgets, targets, bounds, rng, progress):
        """Every budget from one gradient: each is the step eps * sign(gradient at x) from x, and
        that gradient does not depend on eps (the same float32 operations as one budget's run,
        so the same images)."""
        if len(budgets) < 2:
            return super().run_budgets(model, x, y, budgets, targets, bounds, rng, progress)
        labels, sign = (y, 1.0) if targets is None else (targets, -1.0)
        start = clip_to_box(x, bounds)
        ascent = sign * model.loss_and_grad(start, labels, loss=self.loss)[2]
        runs = []
        for eps in budgets:
            x_adv = self._step(start, x, ascent, eps, eps, bounds)
            if progress is not None:
                progress(1, 1)
            logits = model.logits(x_adv)
            success = is_adversarial(logits, y, targets)
            runs.append(AttackRun(eps=eps, x_adv=x_adv, success=success, logits=logits))
        return runs
