"""JPEG compression (Dziugaite et al. 2016; Guo et al. 2018 "Countering adversarial images
using input transformations"): encode each image as a JPEG of ``quality`` 1..95 with Pillow
and decode it again.

Inputs are NCHW [N, C, H, W] with C = 1 (grayscale) or 3 (RGB); pixels are mapped to 0..255
by ``bounds`` (rounded, clipped) and back, so the output holds multiples of (high - low)/255.
Pillow's defaults otherwise (4:2:0 chroma subsampling for RGB, standard tables).
Not differentiable: ``compose`` refuses; an adaptive attacker uses BPDA with the identity
(``adaptive.BPDAModel``), which Athalye et al. (2018) showed breaks it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from workers.attacks.base import check

from .base import Defense, as_images, check_bounds, check_number, register_defense

_MODES = {1: "L", 3: "RGB"}


@register_defense
class JPEG(Defense):
    """Round trip through a JPEG of the given ``quality``, per image."""

    name = "jpeg"

    def __init__(self, *, quality: int = 75, bounds: tuple[float, float] = (0.0, 1.0)):
        self.quality = check_number("quality", quality, low=1, high=95, integer=True)
        self.bounds = check_bounds("bounds", bounds)
        self.params = {"quality": self.quality, "bounds": self.bounds}

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = as_images(x, self.name, rank=4)
        channels = x.shape[1]
        check(channels in _MODES,
              f"jpeg: images must have 1 (grayscale) or 3 (RGB) channels, got shape {list(x.shape)}")
        low, high = self.bounds
        pixels = np.clip(np.rint((x - low) / (high - low) * 255), 0, 255).astype(np.uint8)
        out = np.empty(x.shape, np.float32)
        for i, image in enumerate(pixels):
            array = image[0] if channels == 1 else image.transpose(1, 2, 0)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                restored = np.asarray(decoded.convert(_MODES[channels]), np.float32)
            out[i] = restored[None] if channels == 1 else restored.transpose(2, 0, 1)
        return out / np.float32(255) * np.float32(high - low) + np.float32(low)
