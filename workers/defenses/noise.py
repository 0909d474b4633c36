"""Additive random noise in front of the classifier: x -> x + n, a fresh n per call.

Liang et al. ("Deep adversarial robustness", section 5) add uniformly distributed noise
between a minimum and a maximum value; on Inception it cost 2.8 points of clean accuracy and
recovered 7 points under universal perturbations (Table 1), their best defense.

- ``uniform_noise``: n ~ U(low, high) per pixel.
- ``gaussian_noise``: n ~ N(0, sigma^2) per pixel.

The noise comes from the ``rng`` argument (required: the defense is random). ``clip``
(low, high) clips x + n into the pixel range; None (default) leaves it unclipped.

The defended model is random, so no fixed ONNX graph stands for it: an adaptive attacker uses
expectation over transformation (``adaptive.EOTModel``). d(x + n)/dx is the identity (zero
where ``clip`` cut the value), which ``transform`` reports as a mask.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from workers.attacks.base import check

from .base import RandomDefense, as_images, check_bounds, check_number, register_defense


class _AdditiveNoise(RandomDefense):
    def __init__(self, clip: tuple[float, float] | None):
        self.clip = None if clip is None else check_bounds("clip", clip)

    @abstractmethod
    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """float32 noise of ``shape``."""

    def transform(self, x, rng):
        check(isinstance(rng, np.random.Generator),
              f"{self.name}: `rng` must be a numpy Generator, got {type(rng).__name__}")
        x = as_images(x, self.name)
        noisy = x + self.draw(rng, x.shape)
        if self.clip is None:
            return noisy, None
        low, high = self.clip
        inside = ((noisy >= low) & (noisy <= high)).astype(np.float32)
        return np.clip(noisy, low, high).astype(np.float32, copy=False), inside


@register_defense
class UniformNoise(_AdditiveNoise):
    """x + U(low, high) per pixel (Liang et al.'s additive noise)."""

    name = "uniform_noise"
    magnitude = "the half-width of a symmetric interval [-m, m]"

    @classmethod
    def at_magnitude(cls, params: dict, magnitude: float) -> dict:
        return {**params, "low": -magnitude, "high": magnitude}

    def __init__(self, *, low: float, high: float, clip: tuple[float, float] | None = None):
        super().__init__(clip)
        self.low = check_number("low", low)
        self.high = check_number("high", high)
        check(self.low < self.high, f"`low` must be below `high`, got low={low!r}, high={high!r}")
        self.params = {"low": self.low, "high": self.high, "clip": self.clip}

    def draw(self, rng, shape):
        return rng.uniform(self.low, self.high, size=shape).astype(np.float32)


@register_defense
class GaussianNoise(_AdditiveNoise):
    """x + N(0, sigma^2) per pixel."""

    name = "gaussian_noise"
    magnitude = "sigma"

    @classmethod
    def at_magnitude(cls, params: dict, magnitude: float) -> dict:
        return {**params, "sigma": magnitude}

    def __init__(self, *, sigma: float, clip: tuple[float, float] | None = None):
        super().__init__(clip)
        self.sigma = check_number("sigma", sigma, low=0.0, low_open=True)
        self.params = {"sigma": self.sigma, "clip": self.clip}

    def draw(self, rng, shape):
        return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(self.sigma)
