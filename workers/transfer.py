"""Transfer of adversarial examples between models: Szegedy-style cross-model tables.

Szegedy et al., "Intriguing properties of neural networks" (ICLR 2014), section 4.2,
cross-model generalization: adversarial examples crafted on one model (white-box) are fed to
other models; rows are the model the examples were crafted on, columns the models evaluated,
cells error rates, with each row's average distortion and Gaussian-noise rows as the
baseline. Liang et al., "Deep Adversarial Robustness" (2017), cross-test pairs of models: A
on B's adversarial examples and B on A's; and measure accuracy on a universally perturbed
dataset (``universal_transfer``).

Conventions (those of ``workers.metrics``):

- An error rate is 1 - accuracy against the true labels ``y`` over all N samples, the
  samples an attack failed on (x_adv = x) and those misclassified when clean included; each
  target's clean error is reported beside it.
- A row's distortion is Szegedy's average distortion as ``metrics.attack_summary`` computes
  it: sqrt(mean(r^2)) = ||r||_2 / sqrt(D) per sample, averaged over the samples the source
  classified correctly and the attack fooled (None when it fooled none).
- ``success_on_source`` is the attack's success rate on the source model over the samples
  it classified correctly (``attack_summary``'s success_rate).

Noise baselines: for each attack row, a row of Gaussian noise clip(x + sigma * z) with the
same average distortion, z ~ N(0, 1) per pixel drawn once per row from the row's seed. As
clipping to the box shrinks the noise (on saturated pixels, most of a digit image), sigma is
not the target distortion: it is found by bisection on the measured distortion, the mean of
||clip(x + sigma z) - x||_2 / sqrt(D) over all N samples, which grows monotonically with
sigma for a fixed z. The noisy images are exactly ``gaussian_noise`` at eps=sigma with the
row's seed (``noise_seed``).

Arrays: x float32 [N, ...] within ``bounds``; y int64 [N]; models ``workers.runtime.Classifier``
(anything with ``logits``, ``predict``, ``loss_and_grad``, ``logits_vjp`` and ``num_classes``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from schemas.results import NOISE_ATTACK, TransferRow
from workers import metrics
from workers.attacks.base import Attack, check, clip_to_box
from workers.attacks.universal import apply_universal
from workers.runtime import Classifier

# progress(stage, done, total), as the engine's StageProgress: the stage is the source model,
# done/total count its samples times budgets
StageProgress = Callable[[str, int, int], None]

_BISECTION_STEPS = 60
_RELATIVE_TOLERANCE = 1e-4  # on the matched distortion


@dataclass
class TransferMatrix:
    """Cross-model error rates: attack rows (source-major, budgets in order), then noise rows."""

    sources: list[str]
    targets: list[str]
    rows: list[TransferRow]
    clean_error: dict[str, float]  # each target's error on the clean data

    def attack_rows(self) -> list[TransferRow]:
        return [row for row in self.rows if not row.is_baseline]

    def noise_rows(self) -> list[TransferRow]:
        return [row for row in self.rows if row.is_baseline]

    def row(self, source: str, eps: float | None = None) -> TransferRow:
        """The attack row crafted on ``source`` at budget ``eps``."""
        for row in self.attack_rows():
            if row.source == source and _same_eps(row.eps, eps):
                return row
        raise KeyError(f"no row crafted on {source!r} at eps={eps}")

    def as_table(self) -> list[list]:
        """Szegedy's layout: a header, a "clean" row, then one row per attack row and baseline.

        Header ["", *targets, "av. distortion"]; each row [label, *error rates (floats in
        [0, 1]), distortion (float or None)].
        """
        table: list[list] = [["", *self.targets, "av. distortion"],
                             ["clean", *(self.clean_error[t] for t in self.targets), 0.0]]
        for row in self.rows:
            table.append([row.label, *(row.error_rates[t] for t in self.targets), row.distortion])
        return table

    def as_text(self) -> str:
        """``as_table`` as aligned text, error rates in percent as in the paper."""
        table = self.as_table()
        cells = [[str(c) for c in table[0]]]
        for row in table[1:]:
            distortion = "-" if row[-1] is None else f"{row[-1]:.3g}"
            cells.append([row[0], *(f"{100 * e:.1f}%" for e in row[1:-1]), distortion])
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                         for r in cells)


def _same_eps(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-12)


def _seed(seed: int, *parts: str) -> int:
    """An integer seed for one stream (a source's attack, a row's noise), independent of order."""
    words = [zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence([seed, *words]).generate_state(1, np.uint64)[0])


def attack_seed(seed: int, source: str) -> int:
    """The seed the attack runs with on the source model ``source``."""
    return _seed(seed, "attack", source)


def noise_seed(seed: int, baseline_for: str) -> int:
    """The seed of the noise row matching the attack row labelled ``baseline_for``."""
    return _seed(seed, "noise", baseline_for)


def szegedy_distortion(x: np.ndarray, x_adv: np.ndarray) -> np.ndarray:
    """Per-sample sqrt(mean((x_adv - x)^2)) = ||r||_2 / sqrt(D), as ``metrics.attack_summary``."""
    pixels = int(np.prod(np.shape(x)[1:]))
    return metrics.perturbation_norms(x, x_adv)["l2"] / math.sqrt(pixels)


def matched_noise(x: np.ndarray, z: np.ndarray, distortion: float, bounds: tuple[float, float]
                  ) -> tuple[float, np.ndarray, float]:
    """(sigma, clip(x + sigma z), measured distortion) with the mean distortion over all
    samples equal to ``distortion`` (to a relative 1e-4), by bisection on sigma.

    The largest reachable distortion (every pixel pushed to a bound) caps it; the noise
    then has the cap's distortion.
    """
    def noisy(sigma: float) -> tuple[np.ndarray, float]:
        x_noise = clip_to_box(x + z * np.float32(sigma), bounds)
        return x_noise, float(np.mean(szegedy_distortion(x, x_noise)))

    if distortion <= 0:
        return 0.0, x.copy(), 0.0
    low, high = 0.0, distortion
    x_high, measured = noisy(high)
    for _ in range(_BISECTION_STEPS):  # bracket: clipping only shrinks it, so grow sigma
        if measured >= distortion:
            break
        low, high = high, 2 * high
        x_high, measured = noisy(high)
    best = (high, x_high, measured)
    for _ in range(_BISECTION_STEPS):
        if abs(best[2] - distortion) <= _RELATIVE_TOLERANCE * distortion:
            break
        middle = (low + high) / 2
        x_middle, value = noisy(middle)
        if value < distortion:
            low = middle
        else:
            high = middle
        if abs(value - distortion) < abs(best[2] - distortion):
            best = (middle, x_middle, value)
    return best


def _error(model: Classifier, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    logits = model.logits(x)
    return 1.0 - metrics.accuracy(logits.argmax(axis=1), y), logits


def transfer_matrix(models: dict[str, Classifier], sources: Sequence[str], targets: Sequence[str],
                    x: np.ndarray, y: np.ndarray, attack: Attack, *,
                    eps: Sequence[float] | float | None = None, bounds: tuple[float, float] = (0.0, 1.0),
                    seed: int = 0, noise_baseline: bool = True,
                    progress: StageProgress | None = None) -> TransferMatrix:
    """Craft adversarial examples with ``attack`` on each source model (white-box), evaluate
    every target on them; see the module docstring for the metrics and the noise baselines.

    ``eps`` as the attack takes it: None for minimal-perturbation attacks (one row per
    source), one or more budgets otherwise (one row per source and budget). Each source's
    attack runs with its own seed, derived from ``seed`` and the source's name, so a row
    does not depend on the other sources; the same call gives the same matrix.
    """
    sources, targets = list(sources), list(targets)
    check(bool(sources), "`sources` must name at least one model")
    check(bool(targets), "`targets` must name at least one model")
    for name, names in (("sources", sources), ("targets", targets)):
        unknown = [m for m in names if m not in models]
        check(not unknown, f"`{name}` names models not in `models`: {unknown}; known: {sorted(models)}")
        check(len(set(names)) == len(names), f"`{name}` names a model twice: {names}")
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    check(x.ndim >= 2 and y.shape == (len(x),), f"x [N, ...] and y [N] disagree: {x.shape} vs {y.shape}")
    check(len(x) > 0, "`x` must hold at least one sample")
    check(bounds[0] < bounds[1], f"`bounds` must satisfy low < high, got {bounds}")

    clean_logits = {name: models[name].logits(x) for name in dict.fromkeys([*sources, *targets])}
    clean_error = {t: 1.0 - metrics.accuracy(clean_logits[t].argmax(axis=1), y) for t in targets}
    budgets = 1 if attack.minimal or eps is None else len(np.atleast_1d(eps))

    rows: list[TransferRow] = []
    crafted: list[TransferRow] = []
    for source in sources:
        model = models[source]
        total = len(x) * budgets

        def report(done: int, of: int, stage: str = source, total: int = total) -> None:
            if progress is not None:
                progress(stage, min(total, done), total)

        if progress is not None:
            progress(source, 0, total)
        runs = attack(model, x, y, eps=eps, bounds=bounds, seed=attack_seed(seed, source),
                      progress=report)
        for run in runs:
            errors, logits = {}, {}
            for target in targets:
                errors[target], logits[target] = _error(models[target], run.x_adv, y)
            source_logits = logits[source] if source in logits else model.logits(run.x_adv)
            summary = metrics.attack_summary(
                x, y, clean_logits[source].argmax(axis=1), run.x_adv, source_logits, run.success,
                num_classes=model.num_classes, eps=run.eps, norm=getattr(attack, "norm", None))
            crafted.append(TransferRow(source=source, attack=attack.name, eps=run.eps,
                                       distortion=summary["distortion"], error_rates=errors,
                                       success_on_source=summary["success_rate"]))
        if progress is not None:
            progress(source, total, total)
    rows += crafted

    if noise_baseline:
        for row in crafted:
            rng = np.random.default_rng(noise_seed(seed, row.label))
            z = rng.standard_normal(size=x.shape, dtype=np.float32)  # as gaussian_noise draws it
            sigma, x_noise, measured = matched_noise(x, z, row.distortion or 0.0, bounds)
            errors = {t: _error(models[t], x_noise, y)[0] for t in targets}
            rows.append(TransferRow(source=f"noise(std={sigma:.3g})", attack=NOISE_ATTACK, eps=None,
                                    distortion=measured, error_rates=errors, success_on_source=None,
                                    noise_std=sigma, baseline_for=row.label))
    return TransferMatrix(sources=sources, targets=targets, rows=rows, clean_error=clean_error)


def cross_test_pairs(matrix: TransferMatrix) -> list[dict]:
    """Liang et al.'s cross-testing: for each pair of models that are both sources and
    targets (in ``matrix.sources`` order, A before B) and each attack budget, A's error on
    B's adversarial examples and B's error on A's.

    Keys: a, b, attack, eps, a_error_on_b_examples, b_error_on_a_examples, a_distortion
    (of A's examples), b_distortion.
    """
    models = [m for m in matrix.sources if m in matrix.targets]
    budgets: list[float | None] = []
    for row in matrix.attack_rows():
        if not any(_same_eps(row.eps, e) for e in budgets):
            budgets.append(row.eps)
    pairs = []
    for eps in budgets:
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                row_a, row_b = matrix.row(a, eps), matrix.row(b, eps)
                pairs.append({"a": a, "b": b, "attack": row_a.attack, "eps": eps,
                              "a_error_on_b_examples": row_b.error_rates[a],
                              "b_error_on_a_examples": row_a.error_rates[b],
                              "a_distortion": row_a.distortion, "b_distortion": row_b.distortion})
    return pairs


def universal_transfer(perturbation: np.ndarray, models: dict[str, Classifier], x: np.ndarray,
                       y: np.ndarray, bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, float]:
    """Each model's accuracy on clip(x + v), v one image-shaped (universal) perturbation,
    as Liang et al. measure robustness; v crafted on one model probes the others."""
    x_v = apply_universal(perturbation, x, bounds)
    y = np.asarray(y, np.int64)
    check(y.shape == (len(x_v),), f"`y` must have one label per image ({len(x_v)}), got {list(y.shape)}")
    return {name: metrics.accuracy(model.predict(x_v), y) for name, model in models.items()}
