"""Stored adversarial examples: float16 perturbations from the clean images, compressed."""

from __future__ import annotations

import io

import numpy as np

from workers.artifacts import stored_artifact
from workers.datasets import Pixels


def test_adversarial_examples_are_stored_as_compressed_float16_deltas():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (300, 3, 32, 32), dtype=np.uint8)
    clean = Pixels(raw, (0.0, 1.0))
    eps = 8 / 255
    steps = rng.choice([-eps, eps, 0.5 * eps], size=raw.shape, p=[0.45, 0.45, 0.1])  # PGD-like
    x_adv = np.clip(np.asarray(clean) + steps, 0, 1).astype(np.float32)
    name, data = stored_artifact("pgd@0.031/x_adv", x_adv, clean)
    assert name == "pgd@0.031.delta"
    delta = np.load(io.BytesIO(data))["delta"]
    assert delta.dtype == np.float16 and delta.shape == x_adv.shape
    rebuilt = np.asarray(clean) + delta.astype(np.float32)
    exact = x_adv - np.asarray(clean)
    assert np.all(np.abs(rebuilt - x_adv) <= np.abs(exact) * 2**-11 + 1e-7)
    assert len(data) < x_adv.nbytes / 6  # float32 -> float16 is 2x; the rest is compression


def test_other_arrays_are_stored_as_they_are():
    perturbation = np.random.default_rng(1).random((3, 8, 8), dtype=np.float32)
    clean = Pixels(np.zeros((4, 3, 8, 8), np.uint8))
    name, data = stored_artifact("universal@2/perturbation", perturbation, clean)
    assert name == "universal@2.perturbation"
    np.testing.assert_array_equal(np.load(io.BytesIO(data))["perturbation"], perturbation)
