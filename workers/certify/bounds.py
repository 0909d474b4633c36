"""Running a bounds graph: which samples are certified robust within an L-inf ball."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx

from workers import memory_budget
from workers.certify.bounds_graph import CROWN_METHODS, build_bounds_model
from workers.certify.ibp import UnsupportedForBounds
from workers.onnxgrad import build_vjp_model
from workers.runtime import RuntimeOptions, new_session, session_peak

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


ALPHA_STEPS = 20  # alpha-CROWN: Adam steps on the lower slopes of the unstable ReLUs
ALPHA_RATE = 0.1


class IntervalBounds:
    """Bounds of a classifier over L-inf balls: interval propagation (``method`` "ibp",
    workers/certify/ibp.py), or with the margins also bounded by CROWN-IBP ("crown_ibp",
    workers/certify/crown.py), or by full CROWN ("crown": every relaxed operator's input bounds by
    CROWN too, where its coefficients fit FULL_CROWN_ELEMENTS), or by CROWN-IBP with its ReLU
    lower slopes optimised per sample and margin ("alpha_crown", Xu et al. 2021: every slope in
    [0, 1] gives a sound bound, so each is a step of projected gradient ascent on the bound, the
    best step kept)."""

    def __init__(self, model: bytes | onnx.ModelProto, options: RuntimeOptions | None = None,
                 method: str = "ibp", norm: str = "linf"):
        if norm not in ("linf", "l2"):
            raise ValueError(f"`norm` must be linf or l2, got {norm!r}")
        self.options = options or RuntimeOptions()
        self.method, self.norm = method, norm
        graph, prepared = build_bounds_model(model, method, norm)
        self.input_shape = prepared.input_shape
        self._graph = graph.SerializeToString()
        self._key = hashlib.sha256(self._graph).hexdigest()
        self._batch: int | None = None
        self._session = new_session(self._graph, self.options)
        self._alphas = [i.name for i in graph.graph.input if i.name.startswith("alpha/")]
        self._alpha_shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim[1:]]
                              for i in graph.graph.input if i.name.startswith("alpha/")}
        self.num_classes = prepared.num_classes
        self._slopes = None
        self._slopes_graph = b""
        if method == "alpha_crown":
            if not self._alphas:
                raise UnsupportedForBounds("alpha_crown: the model has no ReLU whose slope could be "
                                           "optimised")
            try:
                vjp = build_vjp_model(graph, wrt=self._alphas, output="crown_objective")
            except Exception as exc:  # the gradient builder's own refusal names the operator
                raise UnsupportedForBounds(f"alpha_crown: the bound cannot be differentiated: "
                                           f"{exc}") from None
            self._slopes_graph = vjp.SerializeToString()
            self._slopes = new_session(self._slopes_graph, self.options)

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
        step = self.batch_size()
        for start in range(0, len(x), step):
            rows = slice(start, start + step)
            feeds = {"x_low": low[rows], "x_high": high[rows], "labels": y[rows]}
            if self.method in CROWN_METHODS or norm == "l2":
                feeds.update(x=x[rows], l2_eps=np.array(eps, np.float32))
            if self._slopes is not None:
                parts.append(self._optimised(feeds))
                continue
            outputs = self._session.run(None, feeds)
            if norm == "l2" and self.method in ("crown_ibp", "crown"):
                outputs[2] = np.maximum(outputs[2], outputs[3])
            parts.append(outputs[:3])
        logits_low, logits_high, margins = (np.concatenate(column) for column in zip(*parts, strict=True))
        margin_low = margins.min(axis=1)
        return Certificate(eps=float(eps), certified=margin_low > MARGIN_TOLERANCE, margin_low=margin_low,
                           logits_low=logits_low, logits_high=logits_high)

    def batch_size(self) -> int:
        """Samples per call: the options' batch size, or fewer where a call of that many would take
        more than ``options.memory_budget`` (measured once per model, method and process: CROWN's
        coefficients are K rows of every activation per sample, 150 MB for a CIFAR MobileNetV2)."""
        if self._batch is None:
            self._batch = self._budgeted_batch()
        return self._batch

    def _budgeted_batch(self) -> int:
        cap, budget = self.options.batch_size, self.options.memory_budget
        if budget is None or not memory_budget.peak_tracking_available():
            return cap
        session = self._slopes if self._slopes is not None else self._session
        model = self._slopes_graph if self._slopes is not None else self._graph

        def measure(batch: int) -> int:
            feeds = {}
            for value in session.get_inputs():
                dims = [batch if not isinstance(d, int) or i == 0 else d for i, d in enumerate(value.shape)]
                if value.name in self._alphas:
                    dims[0] = batch * (self.num_classes or 1)
                kind = np.int64 if value.type == "tensor(int64)" else np.float32
                feeds[value.name] = np.zeros(dims if value.shape else [], kind)
            return session_peak(model, self.options, feeds)

        found = memory_budget.footprint((self._key, self.options.intra_op_threads), measure, cap, budget)
        batch = found.batch_within(budget, cap)
        if batch < 1:
            mib = memory_budget.MiB
            raise UnsupportedForBounds(
                f"{self.method}: bounding one image takes {found.at(1) / mib:.0f} MB, over this worker's "
                f"memory budget of {budget / mib:.0f} MB (ROBUSTNESS_WORKER_MEMORY_MB)")
        return batch

    def _optimised(self, feeds: dict) -> list[np.ndarray]:
        """(logits_low, logits_high, margin_low) with the slopes optimised by Adam on the sum of
        the margins' bounds (each row's bound depends on its own slopes only)."""
        assert self._slopes is not None
        names = [o.name for o in self._session.get_outputs()]
        rows = len(feeds["labels"]) * (self.num_classes or 0)
        placeholders = {a: np.zeros((rows, *self._alpha_shapes[a]), np.float32) for a in self._alphas}
        start = dict(zip(names, self._session.run(None, {**feeds, **placeholders}), strict=True))
        alphas = [start[f"alpha_init/{i}"].astype(np.float32) for i in range(len(self._alphas))]
        best = start["crown_objective"]
        first, second = [np.zeros_like(a) for a in alphas], [np.zeros_like(a) for a in alphas]
        cotangent = np.ones_like(best)
        for step in range(1, ALPHA_STEPS + 1):
            out = self._slopes.run(None, {**feeds, **dict(zip(self._alphas, alphas, strict=True)),
                                          "cotangent": cotangent})
            best = np.maximum(best, out[0])
            for i, grad in enumerate(out[1:]):
                first[i] = 0.9 * first[i] + 0.1 * grad
                second[i] = 0.999 * second[i] + 0.001 * grad * grad
                moved = (first[i] / (1 - 0.9**step)) / (np.sqrt(second[i] / (1 - 0.999**step)) + 1e-8)
                alphas[i] = np.clip(alphas[i] + ALPHA_RATE * moved, 0.0, 1.0).astype(np.float32)
        final = self._slopes.run(None, {**feeds, **dict(zip(self._alphas, alphas, strict=True)),
                                        "cotangent": cotangent})[0]
        best = np.maximum(best, final)
        own = np.eye(best.shape[1], dtype=bool)[feeds["labels"]]
        margin = np.maximum(start["margin_ibp"], np.where(own, np.float32(1e30), best))
        return [start["logits_low"], start["logits_high"], margin]
