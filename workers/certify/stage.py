"""The certify section of an evaluation: per method and budget, how many samples are certified,
broken (misclassified, or fooled by one of the evaluation's attacks at that budget) or unknown."""

from __future__ import annotations

import numpy as np

from schemas.evaluation import CertifySpec
from workers.certify.bounds import IntervalBounds
from workers.certify.ibp import UnsupportedForBounds
from workers.datasets import Images
from workers.runtime import Classifier

_BLOCK = 256  # samples made float at a time


def certify_section(spec: CertifySpec, classifier: Classifier, x: Images, y: np.ndarray,
                    clean_pred: np.ndarray, broken: dict[tuple[str, float], np.ndarray],
                    attacked: dict[tuple[str, float], float], bounds: tuple[float, float]) -> dict:
    """The result's ``certify`` section as a dict. ``broken[(norm, eps)]``: samples an attack
    fooled at that budget; ``attacked[(norm, eps)]``: the attacks' lowest robust accuracy there."""
    entries, unavailable = [], {}
    for method in spec.methods:
        try:
            bounder = IntervalBounds(classifier.model_bytes, classifier.options, method=method)
        except UnsupportedForBounds as exc:
            unavailable[method] = str(exc)
            continue
        for eps in spec.eps:
            certified = np.concatenate([
                bounder.certify(x[start:start + _BLOCK], y[start:start + _BLOCK], eps, bounds).certified
                for start in range(0, len(y), _BLOCK)])
            fooled = (clean_pred != y) | _near(broken, spec.norm, eps, np.zeros(len(y), bool))
            if np.any(certified & fooled):  # a sound bound never certifies what an attack broke
                raise RuntimeError(f"{method} certified {int(np.sum(certified & fooled))} samples that were "
                                   f"broken at eps={eps}: the bounds are unsound")
            entries.append({
                "method": method, "norm": spec.norm, "eps": eps, "samples": len(y),
                "certified_accuracy": float(certified.mean()) if len(y) else 0.0,
                "certified": int(certified.sum()), "broken": int(fooled.sum()),
                "unknown": int(len(y) - certified.sum() - fooled.sum()),
                "attacked_accuracy": _near(attacked, spec.norm, eps, None),
            })
    if not entries:
        return {"available": False, "reason": "; ".join(f"{m}: {r}" for m, r in unavailable.items()),
                "unavailable": unavailable, "entries": []}
    return {"available": True, "reason": None, "unavailable": unavailable, "entries": entries}


def _near(table: dict, norm: str, eps: float, default):
    return next((value for (n, e), value in table.items() if n == norm and abs(e - eps) < 1e-9), default)
