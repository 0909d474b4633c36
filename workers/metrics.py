"""Robustness metrics from arrays: accuracy, perturbation sizes, attack and minimal-perturbation
summaries, and AutoAttack-style sanity checks. Pure numpy; nothing here calls a model.

Conventions (x float [N, ...], y int [N], logits [N, K]):

- Robust accuracy is accuracy on ``x_adv`` with respect to the true labels ``y``, over all N
  samples, for targeted and untargeted attacks alike.
- The success rate and every perturbation statistic are taken over the samples the attack
  had to fool: those classified correctly when clean. A clean-misclassified sample counts as
  neither a success nor a perturbation.
- Szegedy et al.'s (2014) average distortion is the root mean square of the perturbation per
  pixel, sqrt(mean(r^2)) = ||r||_2 / sqrt(D), averaged over successful samples; DeepFool's
  (Moosavi-Dezfooli et al. 2016) robustness rho is the mean of ||r||_2 / ||x||_2 over them.
- Results are Python floats (JSON-ready); None where a statistic has no samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KINDS = ("single_step", "iterative", "black_box", "noise", "minimal", "universal")
WHITE_BOX = ("single_step", "iterative")
QUANTILES = (5, 25, 50, 75, 95)
TOLERANCE = 0.01  # one point of accuracy: differences below it are noise, not evidence


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def _labels(name: str, value, n: int) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != (n,) or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"`{name}` must be integers of shape [{n}], got {value.dtype} {list(value.shape)}")
    return value


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """The share of ``pred`` equal to ``y``."""
    pred, y = np.asarray(pred), np.asarray(y)
    if pred.shape != y.shape or pred.ndim != 1:
        raise ValueError(f"`pred` and `y` must be [N] arrays of one shape, got {list(pred.shape)} "
                         f"and {list(y.shape)}")
    if not len(y):
        raise ValueError("accuracy of zero samples is undefined")
    return float(np.mean(pred == y))


def perturbation_norms(x: np.ndarray, x_adv: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample L2 and Linf norms of ``x_adv - x`` (float64 [N] each)."""
    x, x_adv = np.asarray(x), np.asarray(x_adv)
    if x.shape != x_adv.shape or x.ndim < 1:
        raise ValueError(f"`x` and `x_adv` must have one shape, got {list(x.shape)} and {list(x_adv.shape)}")
    r = _flat(x_adv.astype(np.float64) - x.astype(np.float64))
    linf = np.abs(r).max(axis=1) if r.shape[1] else np.zeros(len(r))
    return {"l2": np.linalg.norm(r, axis=1), "linf": linf}


def attack_summary(x: np.ndarray, y: np.ndarray, clean_pred: np.ndarray, x_adv: np.ndarray,
                   adv_logits: np.ndarray, success: np.ndarray, *, num_classes: int,
                   targets: np.ndarray | None = None, queries: np.ndarray | None = None,
                   eps: float | None = None, norm: str | None = None) -> dict:
    """The metrics of one attack at one budget (see the module docstring for conventions).

    Keys: samples, eps, norm, robust_accuracy, success_rate, mean_l2, median_l2, mean_linf,
    median_linf, distortion, rho, mean_adv_confidence, per_class_robust_accuracy,
    mean_queries, median_queries. ``success`` is the attack's own verdict (misclassified, or
    classified as ``targets``); ``targets`` is accepted for the record and checked for shape.
    """
    x = np.asarray(x)
    n = len(x)
    if not n:
        raise ValueError("an attack summary needs at least one sample")
    y = _labels("y", y, n)
    clean_pred = _labels("clean_pred", clean_pred, n)
    success = np.asarray(success)
    if success.shape != (n,) or success.dtype != bool:
        raise ValueError(f"`success` must be bool of shape [{n}], got {success.dtype} {list(success.shape)}")
    adv_logits = np.asarray(adv_logits)
    if adv_logits.shape != (n, num_classes):
        raise ValueError(f"`adv_logits` must have shape [{n}, {num_classes}], got {list(adv_logits.shape)}")
    if targets is not None:
        _labels("targets", targets, n)
    if queries is not None:
        queries = np.asarray(queries)
        if queries.shape != (n,):
            raise ValueError(f"`queries` must have shape [{n}], got {list(queries.shape)}")

    adv_pred = adv_logits.argmax(axis=1)
    correct = clean_pred == y
    fooled = correct & success
    norms = perturbation_norms(x, x_adv)
    l2, linf = norms["l2"][fooled], norms["linf"][fooled]
    pixels = int(np.prod(x.shape[1:]))
    x_l2 = np.linalg.norm(_flat(x.astype(np.float64)), axis=1)[fooled]
    nonzero = x_l2 > 0  # rho is undefined for an all-zero image
    confidence = softmax(adv_logits[fooled]).max(axis=1) if fooled.any() else np.zeros(0)
    per_class = [float(np.mean(adv_pred[y == k] == k)) if np.any(y == k) else None
                 for k in range(num_classes)]
    spent = np.zeros(0) if queries is None else queries[fooled].astype(np.float64)
    return {
        "samples": n,
        "eps": None if eps is None else float(eps),
        "norm": norm,
        "robust_accuracy": float(np.mean(adv_pred == y)),
        "success_rate": float(np.mean(success[correct])) if correct.any() else None,
        "mean_l2": _mean(l2),
        "median_l2": _median(l2),
        "mean_linf": _mean(linf),
        "median_linf": _median(linf),
        "distortion": _mean(l2 / np.sqrt(pixels)),
        "rho": _mean(l2[nonzero] / x_l2[nonzero]),
        "mean_adv_confidence": _mean(confidence),
        "per_class_robust_accuracy": per_class,
        "mean_queries": _mean(spent),
        "median_queries": _median(spent),
    }


def _quantile(sorted_values: np.ndarray, q: float) -> float:
    """numpy's linear quantile, also where the upper neighbour is infinite (numpy gives nan)."""
    position = q / 100 * (len(sorted_values) - 1)
    low, high = int(np.floor(position)), int(np.ceil(position))
    a, b = sorted_values[low], sorted_values[high]
    fraction = position - low
    if fraction == 0 or a == b:
        return float(a)
    return float("inf") if np.isinf(b) else float(a + fraction * (b - a))


def minimal_summary(x: np.ndarray, y: np.ndarray, clean_pred: np.ndarray, x_adv: np.ndarray,
                    success: np.ndarray, *, norm: str, eps_grid: Sequence[float] | None = None) -> dict:
    """Quantiles of the minimal perturbation and the accuracy-versus-eps curve it implies.

    The minimal perturbation of a clean-correct sample is its size in ``norm`` ("l2" or
    "linf") when the attack succeeded, else infinite; quantiles ("p5" ... "p95", floats,
    ``inf`` possible) are taken over the clean-correct samples (None when there are none).
    ``curve``: for each eps, the share of all N samples classified correctly and with a
    minimal perturbation > eps, an upper bound on robust accuracy at eps. The default grid
    is 20 points from 0 to the 95th percentile (to the largest finite size when that is
    infinite).
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"`norm` must be 'l2' or 'linf', got {norm!r}")
    x = np.asarray(x)
    n = len(x)
    if not n:
        raise ValueError("a minimal-perturbation summary needs at least one sample")
    y = _labels("y", y, n)
    clean_pred = _labels("clean_pred", clean_pred, n)
    success = np.asarray(success)
    if success.shape != (n,) or success.dtype != bool:
        raise ValueError(f"`success` must be bool of shape [{n}], got {success.dtype} {list(success.shape)}")
    correct = clean_pred == y
    size = np.where(success, perturbation_norms(x, x_adv)[norm], np.inf)[correct]
    ordered = np.sort(size)
    quantiles = {f"p{q}": (_quantile(ordered, q) if len(ordered) else None) for q in QUANTILES}
    if eps_grid is None:
        top = quantiles["p95"] or 0.0
        if np.isinf(top):
            finite = ordered[np.isfinite(ordered)]
            top = float(finite[-1]) if len(finite) else 0.0
        grid = np.linspace(0.0, top, 20) if top > 0 else np.zeros(1)
    else:
        grid = np.asarray(eps_grid, np.float64)
        if grid.ndim != 1 or not len(grid) or not np.all(np.isfinite(grid) & (grid >= 0)):
            raise ValueError("`eps_grid` must be a non-empty list of finite values >= 0")
    curve = [{"eps": float(e), "robust_accuracy_upper_bound": float(np.sum(size > e) / n)} for e in grid]
    return {"quantiles": quantiles, "curve": curve}


def gradient_stats(grad: np.ndarray) -> dict:
    """Of the samples of ``grad`` [N, ...]: "probed" (N), "zero_fraction" (the share whose
    gradient is all zeros) and "nonfinite" (how many hold a NaN or an infinity)."""
    flat = _flat(np.asarray(grad))
    finite = np.isfinite(flat).all(axis=1)
    zero = finite & ~flat.any(axis=1)
    return {"probed": len(flat), "zero_fraction": float(np.mean(zero)) if len(flat) else 0.0,
            "nonfinite": int(np.count_nonzero(~finite))}


def _describe(entry: dict) -> str:
    norm = f"{entry['norm']}, " if entry.get("norm") else ""
    eps = entry.get("eps")
    return f"{entry['attack']} ({norm}eps={'none' if eps is None else f'{eps:g}'})"


def _key(value) -> float | None:
    return None if value is None else round(float(value), 12)


def _gradient_warnings(entry: dict) -> list[str]:
    stats = entry.get("gradient_stats") or {}
    loss = f" {stats['loss']}" if stats.get("loss") else ""
    probed = stats.get("probed")
    among = f" of the {probed} correctly classified samples probed" if probed else ""
    warnings = []
    if entry.get("nonfinite_examples"):
        warnings.append(f"{_describe(entry)}: {entry['nonfinite_examples']} adversarial examples had NaN or "
                        "infinite pixels (the attack's arithmetic overflowed) and were counted as not "
                        "fooling the model; this robust accuracy cannot be trusted")
    if stats.get("nonfinite", 0) > 0:
        warnings.append(f"{_describe(entry)}: {stats['nonfinite']} non-finite{loss} gradients{among}; "
                        "the evaluation may be masked (the attack followed broken gradients)")
    if stats.get("zero_fraction", 0.0) > TOLERANCE:
        hint = ("; loss: auto (the default) keeps the cross-entropy's direction where it underflows"
                if stats.get("loss") == "cross_entropy" else "")
        warnings.append(f"{_describe(entry)}: the{loss} gradient is zero for {stats['zero_fraction']:.0%}"
                        f"{among}; the evaluation may be masked (vanishing or shattered gradients){hint}")
    return warnings


def masking_warnings(results: Sequence[dict]) -> list[tuple[str, list[int]]]:
    """Signs that an evaluation may be masked, in the spirit of AutoAttack's checks, each with
    the indices of the entries whose robust accuracy it puts in doubt.

    Each entry has ``attack``, ``norm``, ``eps``, ``robust_accuracy``, ``kind`` (one of
    ``KINDS``) and optionally ``gradient_stats`` (see gradient_stats; "loss" names the loss
    probed) and ``nonfinite_examples`` (adversarial examples with NaN or infinite pixels,
    counted as failures). Flags, with the entries they discredit:
    - any non-finite adversarial example: that entry;
    - zero gradients for more than a point of the samples probed, or non-finite ones: that entry;
    - robust accuracy rising by more than a point as eps grows, for one attack and norm (noise
      and minimal entries excepted: noise is not aimed): the entry at the larger eps;
    - a single-step attack more than a point below an iterative one at the same eps and norm:
      the iterative entry (it is stuck);
    - a black-box attack more than a point below every white-box one at the same budget: the
      white-box entries (their gradients mislead them).
    """
    entries = []
    for index, entry in enumerate(results):
        missing = [k for k in ("attack", "norm", "eps", "robust_accuracy", "kind") if k not in entry]
        if missing:
            raise ValueError(f"results[{index}] lacks {', '.join(missing)}")
        if entry["kind"] not in KINDS:
            raise ValueError(f"results[{index}].kind must be one of {', '.join(KINDS)}, "
                             f"got {entry['kind']!r}")
        entries.append(entry)
    flags: list[tuple[str, list[int]]] = []

    for index, entry in enumerate(entries):
        flags += [(warning, [index]) for warning in _gradient_warnings(entry)]

    scored = [(i, e) for i, e in enumerate(entries) if e["robust_accuracy"] is not None]
    curves: dict[tuple, list[tuple[int, dict]]] = {}
    for i, e in scored:
        if e["kind"] not in ("noise", "minimal") and e["eps"] is not None:
            curves.setdefault((e["attack"], e["norm"]), []).append((i, e))
    for curve in curves.values():
        curve.sort(key=lambda item: float(item[1]["eps"]))
        best: dict | None = None  # the lowest robust accuracy at a strictly smaller eps
        pending: dict | None = None
        for position, (i, e) in enumerate(curve):
            if position and _key(e["eps"]) != _key(curve[position - 1][1]["eps"]):
                best = pending
            if best is not None and e["robust_accuracy"] > best["robust_accuracy"] + TOLERANCE:
                flags.append((
                    f"{_describe(e)}: robust accuracy {e['robust_accuracy']:.2%} is higher than "
                    f"{best['robust_accuracy']:.2%} at the smaller eps={float(best['eps']):g}, so at least "
                    f"{e['robust_accuracy'] - best['robust_accuracy']:.2%} of the samples resisted only this "
                    "run; a stronger budget should never help the model, so the evaluation may be masked",
                    [i]))
            if pending is None or e["robust_accuracy"] < pending["robust_accuracy"]:
                pending = e

    by_budget: dict[tuple, list[tuple[int, dict]]] = {}
    for i, e in scored:
        if e["eps"] is not None:
            by_budget.setdefault((_key(e["eps"]), e["norm"]), []).append((i, e))
    for group in by_budget.values():
        single = [(i, e) for i, e in group if e["kind"] == "single_step"]
        iterative = [(i, e) for i, e in group if e["kind"] == "iterative"]
        white = [(i, e) for i, e in group if e["kind"] in WHITE_BOX]
        for _, s in single:
            for i, it in iterative:
                if s["robust_accuracy"] < it["robust_accuracy"] - TOLERANCE:
                    flags.append((
                        f"{_describe(it)}: the iterative attack leaves {it['robust_accuracy']:.2%} robust "
                        f"accuracy, above the single-step {s['attack']}'s {s['robust_accuracy']:.2%} at the "
                        f"same budget ({it['robust_accuracy'] - s['robust_accuracy']:.2%} of the samples); "
                        "the evaluation may be masked (the iterative attack is stuck)", [i]))
        if not white:
            continue
        strongest = min(e["robust_accuracy"] for _, e in white)
        for _, b in group:
            if b["kind"] == "black_box" and b["robust_accuracy"] < strongest - TOLERANCE:
                flags.append((
                    f"{_describe(b)}: the black-box attack leaves {b['robust_accuracy']:.2%} robust "
                    f"accuracy, below every white-box attack at the same budget (best {strongest:.2%}, "
                    f"{strongest - b['robust_accuracy']:.2%} of the samples); the evaluation may be masked "
                    "(gradients mislead the white-box attacks)", [i for i, _ in white]))
    return flags


def sanity_flags(results: Sequence[dict]) -> list[str]:
    """The messages of ``masking_warnings``."""
    return [message for message, _ in masking_warnings(results)]
