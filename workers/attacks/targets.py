"""Target classes for targeted attacks, and the every-target worst case.

Modes (the spec's ``targets``):

- ``random``: one class != y per sample, uniformly, from a seeded generator;
- ``least_likely``: the class the model scores lowest on the clean image (Kurakin et al. 2017);
- ``dataset``: the dataset's own target labels (an .npz array ``t``);
- ``all``: the attack once per class other than y, each sample's worst case
  (:func:`attack_every_target`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Attack, AttackModel, AttackRun, Progress, check, random_targets

TARGET_MODES = ("random", "least_likely", "all", "dataset")

__all__ = ["TARGET_MODES", "attack_every_target", "least_likely", "random_targets"]


def least_likely(logits: np.ndarray) -> np.ndarray:
    """The lowest-scoring class per sample (int64 [N])."""
    return np.asarray(logits).argmin(axis=1).astype(np.int64)


def attack_every_target(attack: Attack, model: AttackModel, x: np.ndarray, y: np.ndarray, *,
                        eps: Sequence[float] | None, bounds: tuple[float, float], seed: int,
                        progress: Progress | None = None) -> list[AttackRun]:
    """``attack`` aimed at every class t != y in turn (K - 1 targeted runs per budget), as
    AutoAttack's targeted attacks run over the top classes: each sample's worst case.

    A budgeted attack aims at (y + k) mod K for k = 1 .. K - 1, each time only at the samples no
    earlier run has misclassified; a sample is broken (``success``) once some run misclassifies
    it, and keeps that run's x_adv (unbroken samples keep the last run's). A minimal attack
    runs every target on every sample and keeps, per sample, the smallest perturbation that
    reached its target. ``extra["targets"]`` holds the target of the kept run (-1: none).
    """
    check(attack.targeted_capable, f"{attack.name} has no targeted variant")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    k = model.num_classes
    if attack.minimal:
        budgets: list[float | None] = [None]
    else:
        assert eps is not None
        budgets = [float(e) for e in np.atleast_1d(eps)]
    n = len(x)
    runs = []
    for b, budget in enumerate(budgets):
        x_adv, broken = x.copy(), np.zeros(n, bool)
        chosen = np.full(n, -1, np.int64)
        size = np.full(n, np.inf)
        for offset in range(1, k):
            todo = np.arange(n) if attack.minimal else np.flatnonzero(~broken)
            if not len(todo):
                break
            targets = (y[todo] + offset) % k
            done = (b * (k - 1) + offset - 1) * n

            def step(finished: int, of: int, done: int = done) -> None:
                if progress is not None:
                    progress(min(done + int(n * finished / max(of, 1)), len(budgets) * (k - 1) * n),
                             len(budgets) * (k - 1) * n)

            (run,) = attack(model, x[todo], y[todo], eps=None if attack.minimal else budget,
                            targets=targets, bounds=bounds, seed=seed + offset, progress=step)
            if attack.minimal:
                distance = np.linalg.norm((run.x_adv - x[todo]).reshape(len(todo), -1), axis=1)
                keep = run.success & (distance < size[todo])
                size[todo[keep]] = distance[keep]
                hit = todo[keep]
                x_adv[hit], chosen[hit], broken[hit] = run.x_adv[keep], targets[keep], True
                continue
            wrong = model.logits(run.x_adv).argmax(axis=1) != y[todo]
            x_adv[todo] = run.x_adv  # the breaking point, or the latest run's for the unbroken
            chosen[todo[wrong]] = targets[wrong]
            broken[todo[wrong]] = True
        runs.append(AttackRun(eps=budget, x_adv=x_adv, success=broken, extra={"targets": chosen}))
    return runs
