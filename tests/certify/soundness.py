"""What every soundness test of the bounds checks: at each point of the ball, the margin of
the label over every other class is at least the bound."""

from __future__ import annotations

import numpy as np


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min_{j != y} z_y - z_j per sample."""
    own = logits[np.arange(len(y)), y][:, None]
    return np.where(np.eye(logits.shape[1], dtype=bool)[y], np.inf, own - logits).min(axis=1)


def assert_above(classifier, points: list[np.ndarray], y: np.ndarray, margin_low: np.ndarray,
                 slack: float = 1e-5) -> None:
    for point in points:
        assert np.all(margins(classifier.logits(point), y) >= margin_low - slack)
