"""Random-noise baselines: what a perturbation of the same size does when nobody aims it.

Szegedy et al. (2014, "Intriguing properties of neural networks", Table 3) set the error
rate under adversarial distortion beside the error under Gaussian noise of stddev 0.1 and
0.3: FC100-100-10 misclassified 0% and 5% of MNIST under noise, 100% under its own
adversarial examples of average distortion 0.058. These attacks give that baseline.

- ``gaussian_noise``: x + N(0, std^2) per pixel, clipped to the box; ``eps`` is the list of
  std values.
- ``uniform_noise``: x + U(-eps, eps) per pixel, clipped to the box (inside the Linf ball).

Both are batched, draw from the rng the attack is called with (same seed, same noise) and
take ``repeats`` draws per sample, keeping the first draw that succeeds (misclassified, or
classified as the target when ``targets`` are given); ``queries`` counts the draws made.
``noise_at_distortion`` rescales Gaussian noise to given per-sample L2 norms, for
baselines matched to the distortion of an attack's adversarial examples.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from .base import (
    Attack,
    AttackModel,
    AttackRun,
    Progress,
    check,
    check_positive,
    clip_to_box,
    is_adversarial,
    register_attack,
)


class _Noise(Attack):
    norm = None
    targeted_capable = True
    kind = "noise"
    model_calls = ("logits",)

    def __init__(self, *, repeats: int = 1):
        check_positive("repeats", repeats, integer=True)
        self.repeats = int(repeats)

    @abstractmethod
    def draw(self, rng: np.random.Generator, shape: tuple[int, ...], eps: float) -> np.ndarray:
        """Noise of the given shape at budget ``eps``."""

    def calls_per_sample(self, num_classes: int) -> int:
        return self.repeats

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        assert eps is not None
        x_adv = x.copy()
        success = np.zeros(len(x), bool)
        queries = np.zeros(len(x), np.int64)
        for draw in range(self.repeats):
            todo = np.flatnonzero(~success)
            if not len(todo):
                break
            # draw for every sample so the noise of sample i does not depend on the others' luck
            noise = self.draw(rng, x.shape, eps)[todo]
            candidate = clip_to_box(x[todo] + noise, bounds)
            hit = is_adversarial(model.logits(candidate), y[todo],
                                 None if targets is None else targets[todo])
            queries[todo] += 1
            x_adv[todo] = candidate  # the last draw stays when none succeeds
            success[todo] = hit
            if progress is not None:
                progress(draw + 1, self.repeats)
        return AttackRun(eps=eps, x_adv=x_adv, success=success, queries=queries)


@register_attack
class GaussianNoise(_Noise):
    """Additive Gaussian noise of standard deviation ``eps`` per pixel, clipped to the box."""

    name = "gaussian_noise"

    def draw(self, rng, shape, eps):
        return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(eps)


@register_attack
class UniformNoise(_Noise):
    """Additive uniform noise U(-eps, eps) per pixel, clipped to the box."""

    name = "uniform_noise"

    def draw(self, rng, shape, eps):
        return rng.uniform(-eps, eps, size=shape).astype(np.float32)


def noise_at_distortion(x: np.ndarray, l2_per_sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise shaped like ``x`` whose sample i has L2 norm ``l2_per_sample[i]``.

    Returns the noise, not the noisy images: add it to ``x`` and clip to the box yourself
    (clipping can only shrink the norm). Norms must be finite and >= 0; a zero norm gives
    zero noise.
    """
    x = np.asarray(x)
    norms = np.asarray(l2_per_sample, np.float64)
    check(x.ndim >= 1 and norms.shape == (len(x),),
          f"`l2_per_sample` must have one norm per sample ({len(x)}), got shape {list(norms.shape)}")
    check(bool(np.all(np.isfinite(norms) & (norms >= 0))), "`l2_per_sample` must be finite and >= 0")
    direction = rng.standard_normal(size=x.shape).reshape(len(x), -1)
    length = np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    noise = direction / length * norms[:, None]
    return noise.reshape(x.shape).astype(np.float32)
