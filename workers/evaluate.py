"""The evaluation engine: a spec, a model and a dataset in; the result document out.

A plain function over arrays and bytes: no Celery, web framework or database here, so the
CLI, the service's workers and tests all call exactly this.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from schemas.evaluation import (
    AttackResult,
    AttackSpec,
    EvaluationResult,
    EvaluationSpec,
    GateResult,
    GateSpec,
    build_attack,
)
from workers import metrics
from workers.attacks import Attack
from workers.attacks.base import random_targets
from workers.attacks.fooling import fooling_rate_of_noise, gradient_ascent_fooling
from workers.datasets import Dataset, DatasetError
from workers.preprocess import compose_preprocessing
from workers.runtime import Classifier, RuntimeOptions

# progress(stage, done, total): attacks report between batches of work, so a callback that
# raises EvaluationCancelled (on a cancel request or a deadline) stops the evaluation there.
StageProgress = Callable[[str, int, int], None]


class EvaluationCancelled(Exception):
    """Raised by a progress callback to stop an evaluation between batches."""

_KINDS = {"fgsm": "single_step", "square": "black_box", "gaussian_noise": "noise",
          "uniform_noise": "noise", "universal": "universal"}
_GRADIENT_STATS_SAMPLES = 256


@dataclass
class Evaluation:
    result: EvaluationResult
    artifacts: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. universal perturbations


def attack_kind(attack: Attack) -> str:
    if attack.minimal:
        return "minimal"
    return _KINDS.get(attack.name, "iterative")


def _select(x: np.ndarray, y: np.ndarray, samples) -> tuple[np.ndarray, np.ndarray]:
    if samples == "all":
        return x, y
    return x[:samples], y[:samples]


def evaluate(
    model: bytes,
    dataset: Dataset,
    spec: EvaluationSpec,
    *,
    progress: StageProgress | None = None,
    options: RuntimeOptions | None = None,
) -> Evaluation:
    """Run every attack of ``spec`` against ``model`` on ``dataset``; see EvaluationResult."""
    started = time.perf_counter()
    composed = compose_preprocessing(model, mean=spec.input.mean, std=spec.input.std,
                                     layout=spec.input.layout)
    options = options or RuntimeOptions(batch_size=spec.batch_size)
    classifier = Classifier(composed, options)
    x, y = _select(dataset.x, dataset.y, spec.samples)
    _check_fit(x, y, classifier)
    report = progress or (lambda stage, done, total: None)

    report("clean", 0, len(x))
    clean_logits = classifier.logits(x)
    clean_pred = clean_logits.argmax(1)
    report("clean", len(x), len(x))
    probe = slice(0, min(len(x), _GRADIENT_STATS_SAMPLES))
    grad_stats = metrics.gradient_stats(classifier.loss_and_grad(x[probe], y[probe])[2])

    entries: list[AttackResult] = []
    artifacts: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    for index, attack_spec in enumerate(spec.attacks):
        attack = build_attack(attack_spec)
        # reproducible from the seed and the attack's position in the spec
        targets = (random_targets(np.random.default_rng([spec.seed, index]), y, classifier.num_classes)
                   if attack_spec.targeted else None)
        runs = _run_attack(attack, attack_spec, classifier, x, y, targets, spec, report, timing)
        for run in runs:
            entry, arrays = _summarise(attack, attack_spec, classifier, x, y, clean_pred, targets, run,
                                       grad_stats)
            entries.append(entry)
            for name, array in arrays.items():
                eps_tag = f"@{run.eps:g}" if run.eps is not None else ""
                artifacts[f"{attack_spec.key}{eps_tag}/{name}"] = array

    warnings = metrics.sanity_flags([
        {"attack": e.attack, "norm": e.norm, "eps": e.eps, "robust_accuracy": e.robust_accuracy,
         "kind": e.kind, "gradient_stats": (e.details or {}).get("gradient_stats")}
        for e in entries
    ])
    clean_accuracy = metrics.accuracy(clean_pred, y)
    gates = [evaluate_gate(gate, clean_accuracy, entries) for gate in spec.gates]
    fooling = None
    if spec.fooling is not None:
        report("fooling", 0, 1)
        started_fooling = time.perf_counter()
        fooling = fooling_summary(classifier, spec, x.shape[1:])
        timing["fooling"] = time.perf_counter() - started_fooling
        report("fooling", 1, 1)
    timing["total"] = time.perf_counter() - started
    result = EvaluationResult(
        model={"sha256": hashlib.sha256(model).hexdigest(), "input_shape": list(classifier.input_shape),
               "num_classes": classifier.num_classes, "ends_in_softmax": classifier.ends_in_softmax},
        dataset={"samples": len(x), "source_dtype": dataset.source_dtype,
                 "sha256": _array_digest(x, y)},
        spec=spec, device=classifier.device, clean_accuracy=clean_accuracy, attacks=entries,
        warnings=warnings, gates=gates, passed=all(g.passed for g in gates), fooling=fooling,
        timing={k: round(v, 3) for k, v in timing.items()},
    )
    return Evaluation(result=result, artifacts=artifacts)


def fooling_summary(classifier: Classifier, spec: EvaluationSpec, shape) -> dict:
    """Noise labelled with confidence, and gradient ascent from noise to every class."""
    options = spec.fooling
    bounds = tuple(spec.input.range)
    noise = fooling_rate_of_noise(classifier, shape, options.samples, options.threshold,
                                  np.random.default_rng([spec.seed, 1]), bounds)
    summary = {"noise": noise}
    if options.steps:
        ascent = gradient_ascent_fooling(
            classifier, np.arange(classifier.num_classes), shape, options.steps, options.step_size,
            options.threshold, np.random.default_rng([spec.seed, 2]), bounds)
        summary["gradient_ascent"] = ascent.summary()
    return summary


def _check_fit(x: np.ndarray, y: np.ndarray, classifier: Classifier) -> None:
    expected = classifier.input_shape[1:]
    if x.ndim != len(classifier.input_shape) or any(
        isinstance(e, int) and e != g for e, g in zip(expected, x.shape[1:], strict=True)
    ):
        raise DatasetError(f"images are {list(x.shape[1:])} but the model (after input.layout) "
                           f"expects [{', '.join(map(str, expected))}]; check input.layout")
    if y.size and y.max() >= classifier.num_classes:
        raise DatasetError(f"labels go up to {int(y.max())} but the model has "
                           f"{classifier.num_classes} classes")


def _run_attack(attack: Attack, attack_spec: AttackSpec, classifier, x, y, targets, spec, report,
                timing):
    stage = attack_spec.key
    total = len(x) * (len(attack_spec.eps) if attack_spec.eps else 1)
    done_before = [0]

    def attack_progress(done: int, of: int) -> None:
        report(stage, min(total, done_before[0] + done), total)

    report(stage, 0, total)
    started = time.perf_counter()
    runs = []
    budgets = attack_spec.eps if not attack.minimal else [None]
    for eps in budgets:
        runs += attack(classifier, x, y, eps=eps, targets=targets, bounds=tuple(spec.input.range),
                       seed=spec.seed, progress=attack_progress)
        done_before[0] += len(x)
        report(stage, done_before[0], total)
    timing[stage] = time.perf_counter() - started
    return runs


def _summarise(attack, attack_spec, classifier, x, y, clean_pred, targets, run, grad_stats):
    adv_logits = classifier.logits(run.x_adv)
    norm = attack_spec.norm or attack.norm
    summary = metrics.attack_summary(
        x, y, clean_pred, run.x_adv, adv_logits, run.success, num_classes=classifier.num_classes,
        targets=targets, queries=run.queries, eps=run.eps, norm=norm)
    kind = attack_kind(attack)
    minimal = None
    if attack.minimal:
        minimal = metrics.minimal_summary(x, y, clean_pred, run.x_adv, run.success, norm=norm or "l2")
    details = {k: v for k, v in run.extra.items() if not isinstance(v, np.ndarray)} or {}
    if kind in ("single_step", "iterative", "minimal", "universal"):
        details["gradient_stats"] = grad_stats
    arrays = {k: v for k, v in run.extra.items() if isinstance(v, np.ndarray)}
    fields = {k: v for k, v in summary.items() if k in AttackResult.model_fields}
    fields.update(attack=attack_spec.key, name=attack.name, kind=kind, minimal=minimal,
                  details=details or None)
    return AttackResult(**fields), arrays


def evaluate_gate(gate: GateSpec, clean_accuracy: float, entries: list[AttackResult]) -> GateResult:
    """Find the metric a gate names and compare it with its bounds.

    Without ``eps`` the gate reads the entry with the largest budget (the hardest test).
    """
    base = gate.model_dump()
    if gate.metric == "clean_accuracy":
        value = clean_accuracy
    else:
        matching = [e for e in entries if e.attack == gate.attack
                    and (gate.eps is None or (e.eps is not None and abs(e.eps - gate.eps) < 1e-9))
                    and (gate.norm is None or e.norm == gate.norm)]
        if not matching:
            return GateResult(**base, value=None, passed=False,
                              reason=f"no result of {gate.attack} at eps={gate.eps} norm={gate.norm}")
        entry = max(matching, key=lambda e: e.eps if e.eps is not None else 0.0)
        value = getattr(entry, gate.metric)
        if value is None:
            return GateResult(**base, value=None, passed=False,
                              reason=f"{gate.metric} is not available for {gate.attack}")
    passed = (gate.min is None or value >= gate.min) and (gate.max is None or value <= gate.max)
    return GateResult(**base, value=value, passed=passed)


def _array_digest(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
