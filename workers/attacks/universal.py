"""Universal adversarial perturbations: one image-agnostic v that fools most of a dataset.

Moosavi-Dezfooli, Fawzi, Fawzi and Frossard, "Universal adversarial perturbations"
(CVPR 2017), Algorithm 1. Start from v = 0; pass over the data in a random order and, for
every sample whose label x + v does not change yet (k(x + v) = k(x), k the model's clean
prediction), find the minimal perturbation dv that sends x + v across the boundary with
DeepFool (L2, as in the paper, whatever the ball) and update v <- P_{p,eps}(v + dv), the projection onto the
Lp ball of radius eps. Passes stop once the fooling rate, the share of samples with
k(clip(x + v)) != k(x), reaches ``target_fooling_rate`` (the paper's 1 - delta) or after
``max_passes``; the v returned is the one with the highest fooling rate at the end of a
pass (the rate swings by tens of points from pass to pass, as every update can undo earlier
ones, so the last v is often not the best).

Liang et al. ("Deep Adversarial Robustness", 2017) measure robustness as the accuracy on a
universally perturbed dataset; ``apply_universal`` applies a perturbation
crafted on one model and dataset to other data and models for such transfer studies.

Batched: the samples of a minibatch of ``batch_size`` that are still not fooled get their
DeepFool perturbations at the current v in one batched run; then v absorbs them one after
the other (v <- P(v + dv_i)), as in the sequential algorithm, though each dv_i was found at
the v of the batch's start. ``batch_size=1`` is the paper's algorithm exactly; on the digits
models batches of 32 reach similar fooling rates several times faster.

Unlike ART's implementation (v <- P(DeepFool(x + v) - x), where the DeepFool result is
clipped to the box), v keeps its components that the box clips away for one image: ART's
update erases, e.g., every negative entry of v on an image's black background, which makes
its perturbations far weaker on images with saturated pixels.

A budgeted attack (not minimal): eps is the radius of the ball, one AttackRun per eps.

Arguments (keyword-only):
    norm: "linf" (default) or "l2", the ball v is projected onto.
    target_fooling_rate: stop once this share of samples is fooled (0.8).
    max_passes: passes over the data at most (10).
    batch_size: samples per DeepFool run (32).
    overshoot, max_iter, candidates: the inner DeepFool's (0.02, 50, 10).

Shapes: x float32 [N, ...] within ``bounds``; y int64 [N]. Returns per eps an ``AttackRun``
with x_adv = clip(x + v) [N, ...], success = misclassified (argmax != y) bool [N],
extra["perturbation"] float32 v shaped like one image, extra["fooling_rate"] (vs. the clean
predictions) and extra["passes"].
"""

from __future__ import annotations

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
    register_attack,
)
from .deepfool import deepfool_search


def apply_universal(perturbation: np.ndarray, x: np.ndarray,
                    bounds: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """clip(x + v) for images x [N, *shape] and a perturbation v [*shape] (or [1, *shape])."""
    x = np.asarray(x, np.float32)
    v = np.asarray(perturbation, np.float32)
    if v.ndim == x.ndim and v.shape[0] == 1:
        v = v[0]
    check(x.ndim >= 2 and v.shape == x.shape[1:],
          f"`perturbation` must have one image's shape {list(x.shape[1:])}, got {list(v.shape)}")
    check(bounds[0] < bounds[1], f"`bounds` must satisfy low < high, got {bounds}")
    return clip_to_box(x + v[None], bounds)


@register_attack
class UniversalPerturbation(Attack):
    """Universal adversarial perturbations (Moosavi-Dezfooli et al. 2017); see the module docstring."""

    name = "universal"
    kind = "universal"
    whole_dataset = True  # the perturbation is one for all samples
    norm = "linf"  # the default; the constructor's `norm` sets it per instance
    norms = ("linf", "l2")
    model_calls = ("logits", "logits_vjp")

    def __init__(self, *, norm: str = "linf", target_fooling_rate: float = 0.8, max_passes: int = 10,
                 batch_size: int = 32, overshoot: float = 0.02, max_iter: int = 50, candidates: int = 10):
        self.geometry = get_norm(norm)
        self.norm = norm
        rate = target_fooling_rate
        check(isinstance(rate, int | float | np.number) and not isinstance(rate, bool) and 0 < rate <= 1,
              f"`target_fooling_rate` must be a share in (0, 1], got {target_fooling_rate!r}")
        check_positive("max_passes", max_passes, integer=True)
        check_positive("batch_size", batch_size, integer=True)
        check_positive("overshoot", overshoot, allow_zero=True)
        check_positive("max_iter", max_iter, integer=True)
        check(isinstance(candidates, int | np.integer) and not isinstance(candidates, bool)
              and candidates >= 2, f"`candidates` must be an integer >= 2, got {candidates!r}")
        self.target_fooling_rate = float(target_fooling_rate)
        self.max_passes, self.batch_size = int(max_passes), int(batch_size)
        self.overshoot, self.max_iter, self.candidates = float(overshoot), int(max_iter), int(candidates)

    def calls_per_sample(self, num_classes: int) -> int:
        """Every pass: DeepFool on each sample the perturbation does not fool yet, then the set."""
        return 1 + self.max_passes * ((self.max_iter + 1) * min(self.candidates, num_classes) + 1)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        assert eps is not None
        n = len(x)
        adv_logits = model.logits(x)  # at x + v, v = 0 so far
        clean = adv_logits.argmax(axis=1)
        v = np.zeros((1,) + x.shape[1:], np.float32)
        best_v, best_logits, best_rate = v, adv_logits, 0.0
        passes = 0
        while passes < self.max_passes and best_rate < self.target_fooling_rate and eps > 0:
            order = rng.permutation(n)
            for start in range(0, n, self.batch_size):
                batch = order[start:start + self.batch_size]
                x_v = clip_to_box(x[batch] + v, bounds)
                logits = model.logits(x_v)
                still = logits.argmax(axis=1) == clean[batch]
                if still.any():
                    x_df, fooled, _ = deepfool_search(
                        model, x_v[still], clean[batch][still], norm="l2", overshoot=self.overshoot,
                        max_iter=self.max_iter, candidates=self.candidates, bounds=bounds,
                        logits=logits[still])
                    for dv in (x_df - x_v[still])[fooled]:
                        v = self.geometry.project(v + dv[None], eps)
                if progress is not None:
                    progress(passes * n + min(start + self.batch_size, n), self.max_passes * n)
            passes += 1
            adv_logits = model.logits(apply_universal(v, x, bounds))
            rate = float(np.mean(adv_logits.argmax(axis=1) != clean))
            if rate > best_rate:
                best_v, best_logits, best_rate = v, adv_logits, rate
        return AttackRun(eps=eps, x_adv=apply_universal(best_v, x, bounds),
                         success=is_adversarial(best_logits, y, None),
                         extra={"perturbation": best_v[0], "fooling_rate": best_rate, "passes": passes})
