"""Square Attack: score-based random search with square-shaped updates (L-inf and L2).

Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search" (ECCV 2020). Gradient-free: it reads only
``model.logits``. It minimises the margin z_y - max_{j != y} z_j (targeted: max_{j != t} z_j
- z_t) by proposing, per sample, a change on one random square window and keeping it when
the margin falls; a sample stops as soon as it is misclassified (or classified as the target).

- L-inf: start from vertical stripes of +-eps; a proposal sets a window of side s to
  +-2 eps per channel, then projects onto the ball and the box.
- L2: start from a grid of the paper's centred "eta" patterns scaled to norm eps; a proposal
  moves the mass of a second window into the first (Algorithm 3), keeping the norm at eps.

The side s follows the fraction of pixels p: p = ``p_init`` halved after 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 iterations, a schedule written for 10,000 queries and
rescaled to ``queries``. ``p_init`` 0.8 is AutoAttack's setting (the paper's ImageNet runs
used 0.05 for L-inf and 0.1 for L2).

Arguments (keyword-only): norm "linf" | "l2"; queries (5000): model evaluations per sample,
the clean check included, never exceeded; p_init (0.8).

Shapes: x float32 [N, C, H, W] (channels first) within ``bounds``; y int64 [N]; targets int64
[N] or None. ``AttackRun.queries`` int64 [N]: the evaluations each sample used.
"""

from __future__ import annotations

import numpy as np

from workers.loop_graphs import P, square_judge_model, square_l2_propose_model, square_propose_model

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

HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # iterations at 10,000 queries


def margin(logits: np.ndarray, y: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    """The margin Square minimises: <= 0 once the sample is (mis)classified as wanted."""
    rows = np.arange(len(y))
    labels = y if targets is None else targets
    at_label = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    best_other = others.max(axis=1)
    return at_label - best_other if targets is None else best_other - at_label


def eta_pattern(s: int) -> np.ndarray:
    """The paper's L2 window: concentric squares weighted 1/(r+1)^2, + on top, - below; unit norm."""
    def rectangles(height: int, width: int) -> np.ndarray:
        rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
        ring = np.maximum(np.abs(rows - height // 2), np.abs(cols - width // 2))
        # a cell at ring distance r is covered by the squares of radius r, r + 1, ...
        radii = np.arange(max(height, width) // 2 + 1)
        weights = np.cumsum(1.0 / (radii[::-1] + 1.0) ** 2)[::-1]
        out = weights[np.minimum(ring, len(radii) - 1)]
        return out / np.linalg.norm(out)

    top = s // 2
    pattern = np.concatenate([rectangles(top, s), -rectangles(s - top, s)]) if top else -rectangles(s, s)
    return pattern / np.linalg.norm(pattern)


def window_index(corner_h: np.ndarray, corner_w: np.ndarray, s: int, channels: int):
    """Fancy index of one s x s window per sample: a[index] has shape [n, C, s, s]."""
    n = len(corner_h)
    span = np.arange(s)
    return (np.arange(n)[:, None, None, None], np.arange(channels)[None, :, None, None],
            (corner_h[:, None] + span)[:, None, :, None], (corner_w[:, None] + span)[:, None, None, :])


@register_attack
class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020); see the module docstring."""

    name = "square"
    kind = "black_box"
    norms = ("linf", "l2")
    model_calls = ("logits",)
    norm = "linf"  # the default; the constructor's `norm` sets it per instance
    targeted_capable = True

    def __init__(self, *, norm: str = "linf", queries: int = 5000, p_init: float = 0.8):
        self.geometry = get_norm(norm)
        self.norm = norm
        check_positive("queries", queries, integer=True)
        check(isinstance(p_init, int | float) and 0 < p_init <= 1,
              f"`p_init` must lie in (0, 1], got {p_init!r}")
        self.queries, self.p_init = int(queries), float(p_init)

    def fraction(self, iteration: int) -> float:
        """p at a (0-based) iteration, the 10,000-query schedule rescaled to ``queries``."""
        return self.p_init / 2 ** int(np.searchsorted(HALVINGS, iteration * 10000 // self.queries))

    def side(self, iteration: int, shape: tuple[int, int, int]) -> int:
        c, h, w = shape
        s = int(round(np.sqrt(self.fraction(iteration) * h * w)))
        if self.norm == "l2":
            s = max(s, 3) + (max(s, 3) % 2 == 0)  # odd, at least 3
        return int(np.clip(s, 1, min(h, w)))

    def calls_per_sample(self, num_classes: int) -> int:
        return self.queries + 1

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        check(x.ndim == 4, f"Square needs images [N, C, H, W], got shape {list(x.shape)}")
        success = is_adversarial(model.logits(x), y, targets)
        queries = np.ones(len(x), np.int64)
        x_adv = x.copy()
        todo = np.flatnonzero(~success)
        if not len(todo) or self.queries < 2:
            return AttackRun(eps=eps, x_adv=x_adv, success=success, queries=queries)
        xs, ys = x[todo], y[todo]
        ts = None if targets is None else targets[todo]
        x_best = self._project(xs, xs + self._start(rng, xs, eps), eps, bounds)
        logits = model.logits(x_best)
        queries[todo] += 1
        won = is_adversarial(logits, ys, ts)
        if getattr(model, "device_loops", False):
            self._bound_queries(model, xs, ys, ts, x_best, margin(logits, ys, ts), won, queries, todo, eps,
                                bounds, rng, progress)
            x_adv[todo], success[todo] = x_best, won
            return AttackRun(eps=eps, x_adv=x_adv, success=success, queries=queries)
        # the samples still running, gathered once per change of the set rather than per query
        active = np.flatnonzero(~won)
        xa, ya, ta = xs[active], ys[active], None if ts is None else ts[active]
        xb, best = x_best[active], margin(logits, ys, ts)[active]
        for i in range(self.queries - 2):
            if not len(active):
                break
            candidate = self._project(xa, self._propose(rng, xa, xb, i, eps), eps, bounds)
            logits = model.logits(candidate)
            queries[todo[active]] += 1
            value = margin(logits, ya, ta)
            hit = is_adversarial(logits, ya, ta)
            keep = hit | (value < best)
            xb[keep], best[keep] = candidate[keep], value[keep]
            if hit.any():
                x_best[active], won[active[hit]] = xb, True
                stay = ~hit
                active, xa, ya, xb, best = active[stay], xa[stay], ya[stay], xb[stay], best[stay]
                ta = None if ta is None else ta[stay]
            if progress is not None and (i + 1) % 100 == 0:
                progress(i + 2, self.queries)
        x_best[active] = xb
        x_adv[todo], success[todo] = x_best, won
        return AttackRun(eps=eps, x_adv=x_adv, success=success, queries=queries)

    def _bound_queries(self, model, xs, ys, ts, x_best, best, won, queries, todo, eps, bounds, rng, progress):
        """`run`'s queries as loop graphs (workers/loop_graphs.py), filling x_best, won and
        queries in place: per query and batch one ONNX Runtime call for the proposals, one for
        the forward pass and the bookkeeping, with the same random draws as the numpy loop
        (sent with each call: corners, signs and L2's patterns, a few numbers per sample); the
        host reads the active flags after each query and goes on with the active samples only
        once half of the loop's have stopped."""
        _, c, h, w = xs.shape
        iterate = model.input_name
        build = square_propose_model if self.norm == "linf" else square_l2_propose_model
        propose = model.loop_session(("square_propose", self.norm), None,
                                     lambda _: build(model.input_shape, iterate))
        targeted = ts is not None
        judge = model.loop_session(("square_judge", targeted), "forward",
                                   lambda forward: square_judge_model(forward, iterate, targeted=targeted))
        labels = ys if ts is None else ts
        box = {P + "eps": np.float32(eps), P + "eps64": np.float64(eps), P + "low": np.float32(bounds[0]),
               P + "high": np.float32(bounds[1])}
        active = np.flatnonzero(~won)  # the numpy loop's running samples, in its order
        rows, loop, running = active, None, np.zeros(0, bool)  # the loop's samples; which still run
        for i in range(self.queries - 2):
            if not len(active):
                break
            if loop is not None and len(active) <= len(rows) // 2:
                x_best[rows], best[rows] = loop.fetch(P + "best_x"), loop.fetch(P + "best")
                loop = None
            if loop is None:
                rows, running = active, np.ones(len(active), bool)
                loop = model.bound_loop({iterate: x_best[rows], P + "x": xs[rows], P + "best_x": x_best[rows],
                                         P + "best": best[rows], P + "active": running,
                                         "labels": labels[rows]})
            side = self.side(i, (c, h, w))
            sends = {}
            for name, drawn in self._draws(rng, len(active), (c, h, w), side, eps).items():
                full = np.zeros((len(rows), *drawn.shape[1:]), drawn.dtype)
                full[running] = drawn
                sends[P + name] = full
            loop.apply(*propose, {**box, P + "side": np.int64(side)}, sends)
            loop.apply(*judge)
            queries[todo[active]] += 1
            still = loop.fetch(P + "active")
            if (running & ~still).any():
                won[rows[running & ~still]] = True
                running = still
                active = rows[running]
            if progress is not None and (i + 1) % 100 == 0:
                progress(i + 2, self.queries)
        if loop is not None:
            x_best[rows] = loop.fetch(P + "best_x")

    def _draws(self, rng, n, shape, side, eps) -> dict[str, np.ndarray]:
        """`_propose`'s random numbers, drawn in its order, for the loop graphs."""
        c, h, w = shape
        draws = {"rows": rng.integers(0, h - side + 1, n), "cols": rng.integers(0, w - side + 1, n)}
        if self.norm == "linf":
            draws["change"] = (2 * eps * rng.choice([-1.0, 1.0], size=(n, c, 1, 1))).astype(np.float32)
            return draws
        draws["rows2"], draws["cols2"] = rng.integers(0, h - side + 1, n), rng.integers(0, w - side + 1, n)
        pattern = eta_pattern(side)
        flip = rng.random(n) < 0.5
        draws["patterns"] = np.where(flip[:, None, None], pattern.T, pattern)
        draws["signs"] = rng.choice([-1.0, 1.0], size=(n, c, 1, 1))
        return draws

    def _project(self, x, candidate, eps, bounds):
        return clip_to_box(x + self.geometry.project(candidate - x, eps), bounds)

    def _start(self, rng, x, eps):
        n, c, h, w = x.shape
        if self.norm == "linf":  # vertical stripes
            return (eps * rng.choice([-1.0, 1.0], size=(n, c, 1, w))).astype(np.float32)
        if min(h, w) < 5:  # too small for the 5 x 5 grid of windows
            return self._rescale(rng.standard_normal(size=x.shape), eps)
        s = min(h, w) // 5
        delta = np.zeros(x.shape)
        for top in (h - 5 * s) // 2 + s * np.arange(5):
            for left in (w - 5 * s) // 2 + s * np.arange(5):
                rows, cols = slice(top, top + s), slice(left, left + s)
                delta[:, :, rows, cols] += self._patterns(rng, n, c, s)[..., : h - top, : w - left]
        return self._rescale(delta, eps)

    def _patterns(self, rng, n, c, s):
        """[n, c, s, s]: the eta window, transposed for half the samples, times a sign per channel."""
        pattern = eta_pattern(s)
        flip = rng.random(n) < 0.5
        return (np.where(flip[:, None, None], pattern.T, pattern)[:, None]
                * rng.choice([-1.0, 1.0], size=(n, c, 1, 1)))

    @staticmethod
    def _rescale(delta, eps):
        norms = np.linalg.norm(delta.reshape(len(delta), -1), axis=1).reshape(-1, 1, 1, 1)
        return (delta / (norms + 1e-12) * eps).astype(np.float32)

    def _propose(self, rng, x, x_best, iteration, eps):
        n, c, h, w = x.shape
        s = self.side(iteration, (c, h, w))
        first = window_index(rng.integers(0, h - s + 1, n), rng.integers(0, w - s + 1, n), s, c)
        if self.norm == "linf":
            candidate = x_best.copy()
            candidate[first] += (2 * eps * rng.choice([-1.0, 1.0], size=(n, c, 1, 1))).astype(np.float32)
            return candidate
        # L2 (Algorithm 3): move the mass of a second window into the first, keeping the norm at eps
        second = window_index(rng.integers(0, h - s + 1, n), rng.integers(0, w - s + 1, n), s, c)
        delta = (x_best - x).astype(np.float64)
        window = delta[first]
        window_norms = np.sqrt((window ** 2).sum(axis=(2, 3), keepdims=True))
        image_norms = np.sqrt((delta ** 2).sum(axis=(1, 2, 3), keepdims=True))
        touched = np.zeros(delta.shape, bool)
        touched[first] = touched[second] = True
        touched_norms = np.sqrt(((delta * touched) ** 2).sum(axis=(1, 2, 3), keepdims=True))
        new = self._patterns(rng, n, c, s) + window / (window_norms + 1e-12)
        budget = np.sqrt(np.maximum(eps ** 2 - image_norms ** 2, 0) / c + touched_norms ** 2)
        new = new / (np.sqrt((new ** 2).sum(axis=(2, 3), keepdims=True)) + 1e-12) * budget
        delta[second] = 0.0
        delta[first] = new
        return x + self._rescale(delta, eps)
