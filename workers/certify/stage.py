"""The certify section of an evaluation. Each shard bounds its own samples (certify_shard, like
its attacks); finish merges the shards and sets each sample's status per method and budget:
certified, broken (misclassified, or fooled by one of the evaluation's attacks at that budget)
or unknown (certify_section)."""

from __future__ import annotations

import numpy as np

from schemas.evaluation import CertifySpec
from workers.certify.bounds import IntervalBounds
from workers.certify.ibp import UnsupportedForBounds
from workers.datasets import Images
from workers.runtime import Classifier

_BLOCK = 256  # samples made float at a time


def key(method: str, index: int) -> str:
    """How a shard names the certified mask of ``method`` at ``spec.eps[index]``."""
    return f"{method}@{index}"


def certify_shard(spec: CertifySpec, classifier: Classifier, x: Images, y: np.ndarray,
                  bounds: tuple[float, float]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(certified masks by ``key``, why each method that could not run did not)."""
    certified: dict[str, np.ndarray] = {}
    unavailable: dict[str, str] = {}
    for method in spec.methods:
        try:
            bounder = IntervalBounds(classifier.model_bytes, classifier.options, method=method,
                                     norm=spec.norm)
            bounder.batch_size()  # within the worker's memory budget, or unavailable saying so
        except UnsupportedForBounds as exc:
            unavailable[method] = str(exc)
            continue
        for index, eps in enumerate(spec.eps):
            certified[key(method, index)] = np.concatenate([
                bounder.certify(x[start:start + _BLOCK], y[start:start + _BLOCK], eps, bounds).certified
                for start in range(0, len(y), _BLOCK)]) if len(y) else np.zeros(0, bool)
    return certified, unavailable


def certify_section(spec: CertifySpec, shards: list[tuple[dict[str, np.ndarray], dict[str, str]]],
                    y: np.ndarray, clean_pred: np.ndarray, broken: dict[tuple[str, float], np.ndarray],
                    attacked: dict[tuple[str, float], float]) -> dict:
    """The result's ``certify`` section as a dict, from the shards' (masks, unavailable) in plan
    order. ``broken[(norm, eps)]``: samples an attack fooled at that budget; ``attacked[(norm,
    eps)]``: the attacks' lowest robust accuracy there."""
    unavailable: dict[str, str] = {}
    for _, reasons in shards:
        unavailable.update(reasons)
    entries = []
    for method in spec.methods:
        if method in unavailable:
            continue
        for index, eps in enumerate(spec.eps):
            certified = np.concatenate([masks[key(method, index)] for masks, _ in shards])
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
