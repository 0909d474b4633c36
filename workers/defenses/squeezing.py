"""Feature squeezing (Xu, Evans and Qi 2018, "Feature squeezing: detecting adversarial examples
in deep neural networks"): reduce the colour depth, or smooth with a median filter.

- ``bit_depth``: ``bits`` in 1..8; pixels are mapped to [0, 1] by ``bounds``, rounded to
  2^bits levels (np.rint(u (2^bits - 1)) / (2^bits - 1), as Xu et al.) and mapped back. Xu
  et al. squeeze MNIST to 1 bit, CIFAR-10 and ImageNet to 4 and 5 bits.
- ``median``: a ``size`` x ``size`` median filter per channel, ``size`` 2 or 3 (Xu et al.:
  2 x 2 on MNIST, 2 x 2 and 3 x 3 on CIFAR-10 and ImageNet), scipy.ndimage.median_filter
  with reflected edges as in their code. An even window has no centre: it covers the pixel
  and the ones before it, and of its 4 values the upper middle one is taken. Inputs are
  NCHW [N, C, H, W].

Both have a zero or undefined gradient almost everywhere: ``compose`` refuses, and an
adaptive attacker uses BPDA with the identity (``adaptive.BPDAModel``; Athalye et al. 2018).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from workers.attacks.base import check

from .base import Defense, as_images, check_bounds, check_number, register_defense


@register_defense
class BitDepth(Defense):
    """Quantise each pixel to 2^bits levels across ``bounds``."""

    name = "bit_depth"

    def __init__(self, *, bits: int, bounds: tuple[float, float] = (0.0, 1.0)):
        self.bits = check_number("bits", bits, low=1, high=8, integer=True)
        self.bounds = check_bounds("bounds", bounds)
        self.params = {"bits": self.bits, "bounds": self.bounds}

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = as_images(x, self.name)
        low, high = self.bounds
        levels = np.float32(2**self.bits - 1)
        unit = np.clip((x - np.float32(low)) / np.float32(high - low), 0, 1)
        squeezed = np.rint(unit * levels) / levels
        return (squeezed * np.float32(high - low) + np.float32(low)).astype(np.float32, copy=False)


@register_defense
class Median(Defense):
    """A ``size`` x ``size`` median filter over each channel of NCHW images."""

    name = "median"

    def __init__(self, *, size: int = 2):
        self.size = check_number("size", size, integer=True)
        check(self.size in (2, 3), f"`size` must be 2 or 3 (the window's side in pixels), got {size!r}")
        self.params = {"size": self.size}

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = as_images(x, self.name, rank=4)
        return ndimage.median_filter(x, size=(1, 1, self.size, self.size), mode="reflect")
