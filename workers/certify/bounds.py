"""Running a bounds graph: which samples are certified robust within an L-inf ball."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from workers.certify.ibp import build_bounds_model
from workers.runtime import RuntimeOptions, new_session

# a margin bound certifies a sample only above this: float32 rounding of the bound graph can
# move a bound by a few units in its last place, never by this much on logits of order 1-100
MARGIN_TOLERANCE = 1e-4


@dataclass
class Certificate:
    eps: float
    certified: np.ndarray  # bool [N]: no image in the ball changes the prediction from y
    margin_low: np.ndarray  # float32 [N]: a lower bound of min_{j != y} z_y - z_j over the ball
    logits_low: np.ndarray  # float32 [N, K]
    logits_high: np.ndarray  # float32 [N, K]


class IntervalBounds:
    """Bounds of a classifier over L-inf balls: interval propagation (``method`` "ibp",
    workers/certify/ibp.py), or with the margins also bounded by CROWN-IBP ("crown_ibp",
    workers/certify/crown.py)."""

    def __init__(self, model: bytes | onnx.ModelProto, options: RuntimeOptions | None = None,
                 method: str = "ibp", norm: str = "linf"):
        if norm not in ("linf", "l2"):
            raise ValueError(f"`norm` must be linf or l2, got {norm!r}")
        self.options = options or RuntimeOptions()
        self.method, self.norm = method, norm
        graph, prepared = build_bounds_model(model, method, norm)
        self.input_shape = prepared.input_shape
        self._session = new_session(graph.SerializeToString(), self.options)

    def certify(self, x: np.ndarray, y: np.ndarray, eps: float,
                bounds: tuple[float, float] = (0.0, 1.0)) -> Certificate:
        """Bounds over the ball of radius ``eps`` around each x in this bounder's norm, clipped
        to ``bounds``. An L2 ball is bounded through the box around it and, at the first affine
        layer, through the ball itself (each output +- eps ||w||_2); crown_ibp adds the dual
        norm of its final coefficients. The larger lower bound is kept."""
        norm = self.norm
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int64)
        low = np.clip(x - np.float32(eps), bounds[0], bounds[1]).astype(np.float32)
        high = np.clip(x + np.float32(eps), bounds[0], bounds[1]).astype(np.float32)
        parts = []
        step = self.options.batch_size
        for start in range(0, len(x), step):
            rows = slice(start, start + step)
            feeds = {"x_low": low[rows], "x_high": high[rows], "labels": y[rows]}
            if self.method == "crown_ibp" or norm == "l2":
                feeds.update(x=x[rows], l2_eps=np.array(eps, np.float32))
            outputs = self._session.run(None, feeds)
            if norm == "l2" and self.method == "crown_ibp":
                outputs[2] = np.maximum(outputs[2], outputs[3])
            parts.append(outputs[:3])
        logits_low, logits_high, margins = (np.concatenate(column) for column in zip(*parts, strict=True))
        margin_low = margins.min(axis=1)
        return Certificate(eps=float(eps), certified=margin_low > MARGIN_TOLERANCE, margin_low=margin_low,
                           logits_low=logits_low, logits_high=logits_high)
