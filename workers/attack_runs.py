"""Running one attack entry on a model: its targets, its seed, every target in turn."""

from __future__ import annotations

import json

import numpy as np

from schemas.evaluation import AttackSpec, EvaluationSpec
from workers.attacks import Attack
from workers.attacks.targets import attack_every_target, least_likely, random_targets
from workers.datasets import DatasetError
from workers.subject import Subject
from workers.units import RunOutput, WorkUnit


def unit_targets(spec: EvaluationSpec, index: int, subject: Subject, unit: WorkUnit,
                 clean_logits: np.ndarray | None) -> np.ndarray | str | None:
    """The unit's target classes for attack ``index``: None (untargeted), an array, or "all".

    Random targets are drawn over all selected samples, so that they do not depend on the
    sharding; the least likely class is the clean logits' argmin.
    """
    mode = spec.attacks[index].target_mode
    if mode is None or mode == "all":
        return mode
    if mode == "random":
        y = subject.y
        return random_targets(np.random.default_rng([spec.seed, index]), y,
                              subject.classifier.num_classes)[unit.start:unit.stop]
    if mode == "dataset":
        if subject.t is None:
            raise DatasetError(f"attacks[{index}] ({spec.attacks[index].key}) has targets: dataset, but the "
                               "dataset has no target labels; add an array t (one class per image) to the "
                               ".npz")
        return subject.t[unit.start:unit.stop]
    if clean_logits is None:
        clean_logits = subject.classifier.logits(subject.x[unit.start:unit.stop])
    return least_likely(clean_logits)


def attack_seed(spec: EvaluationSpec, index: int, unit: WorkUnit) -> int:
    """Independent, reproducible randomness for each attack in each unit."""
    state = np.random.SeedSequence([spec.seed, index, unit.index]).generate_state(1, np.uint64)
    return int(state[0])


def attack_runs(attack: Attack, attack_spec: AttackSpec, model, x: np.ndarray, y: np.ndarray,
                targets: np.ndarray | str | None, spec: EvaluationSpec, seed: int,
                progress=None) -> list:
    """One AttackRun per budget of the entry, every target in turn for ``targets: all``."""
    eps = None if attack.minimal else attack_spec.eps
    low, high = spec.input.range
    bounds = (low, high)
    if isinstance(targets, str):  # "all"
        return attack_every_target(attack, model, x, y, eps=eps, bounds=bounds, seed=seed, progress=progress)
    return attack(model, x, y, eps=eps, targets=targets, bounds=bounds, seed=seed, progress=progress)


def run_output(index: int, run, logits: np.ndarray) -> RunOutput:
    arrays = {k: _plain(v) for k, v in run.extra.items() if isinstance(v, np.ndarray)}
    others = {k: v for k, v in run.extra.items() if not isinstance(v, np.ndarray)}
    # through JSON here too, so that evaluate() sees exactly what from_bytes() gives the service
    extra = json.loads(json.dumps(others, default=lambda value: value.item()))
    return RunOutput(attack=index, eps=run.eps, x_adv=run.x_adv, logits=logits, success=run.success,
                     queries=run.queries, arrays=arrays, extra=extra)


def _plain(array: np.ndarray) -> np.ndarray:
    """Arrays of Python strings (e.g. AutoAttack's broken_by) as numpy strings: no pickles."""
    return array.astype(str) if array.dtype == object else array
