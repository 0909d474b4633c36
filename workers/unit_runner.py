"""Running one unit: the clean pass, each attack with its gradient probe, the defenses, or transfer."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from schemas.evaluation import MAIN_MODEL, EvaluationSpec
from workers import metrics
from workers.attack_runs import attack_runs, attack_seed, run_output, unit_targets
from workers.certify.stage import certify_shard
from workers.datasets import DatasetError
from workers.defense_stage import defend
from workers.plan import StageProgress, budget_count, certify_work
from workers.runtime import Classifier
from workers.spec_checks import build_attack
from workers.subject import Subject, compose_for
from workers.transfer import cross_test_pairs, transfer_matrix
from workers.units import RunOutput, UnitOutput, WorkUnit


def run_unit_on(subject: Subject, spec: EvaluationSpec, unit: WorkUnit, report: StageProgress,
                models: dict[str, bytes] | None = None,
                fit_images: dict[str, np.ndarray] | None = None) -> UnitOutput:
    """Run ``unit`` of ``spec``'s plan on ``subject``; ``models`` and ``fit_images`` are the
    other inputs the spec names (see workers.evaluate.evaluate)."""
    started = time.perf_counter()
    classifier = subject.classifier
    if unit.kind == "transfer":
        document: dict[str, Any] | None = transfer_stage(subject, spec, models or {}, report)
        return UnitOutput(unit=unit, clean_logits=None, runs=[], document=document,
                          timing={"transfer": time.perf_counter() - started,
                                  "total": time.perf_counter() - started})
    xs, ys = subject.x[unit.start:unit.stop], subject.y[unit.start:unit.stop]
    timing: dict[str, float] = {}
    clean_logits = None
    if unit.kind == "shard":
        report("clean", 0, len(xs))
        clean_logits = classifier.logits(xs)
        timing["clean"] = time.perf_counter() - started
        report("clean", len(xs), len(xs))
    probe = GradientProbe(classifier, xs, ys, clean_logits)
    runs: list[RunOutput] = []
    for index in unit.attacks:
        targets = unit_targets(spec, index, subject, unit, clean_logits)
        runs += _run_attack(index, classifier, xs, ys, targets, spec, attack_seed(spec, index, unit),
                            report, timing, probe)
    document = None
    if spec.defenses:
        document = {"defenses": defend(subject, spec, unit, runs, clean_logits, models or {},
                                       fit_images or {}, report, timing)}
    certified: dict[str, np.ndarray] = {}
    unavailable: dict[str, str] = {}
    if spec.certify is not None and unit.kind == "shard":
        started_certify = time.perf_counter()
        work = certify_work(spec, len(ys))
        report("certify", 0, work)
        certified, unavailable = certify_shard(spec.certify, classifier, xs, ys,
                                               (spec.input.range[0], spec.input.range[1]))
        timing["certify"] = time.perf_counter() - started_certify
        report("certify", work, work)
    timing["total"] = time.perf_counter() - started
    return UnitOutput(unit=unit, clean_logits=clean_logits, runs=runs, document=document, timing=timing,
                      certified=certified, certify_unavailable=unavailable)


class GradientProbe:
    """Per loss, how many of a unit's correctly classified samples have an all-zero or a
    non-finite input gradient at the clean image: the masking check of the entries of every
    attack that follows that loss (computed once per loss and unit)."""

    def __init__(self, classifier: Classifier, x: np.ndarray, y: np.ndarray, clean_logits: np.ndarray | None):
        self.classifier, self.x, self.y, self.clean_logits = classifier, x, y, clean_logits
        self._counts: dict[str, dict] = {}

    def __call__(self, loss: str) -> dict:
        if loss not in self._counts:
            if self.clean_logits is None:
                self.clean_logits = self.classifier.logits(self.x)
            correct = np.flatnonzero(self.clean_logits.argmax(axis=1) == self.y)
            stats = {"probed": 0, "zero_fraction": 0.0, "nonfinite": 0}
            if len(correct):
                stats = metrics.gradient_stats(
                    self.classifier.loss_and_grad(self.x[correct], self.y[correct], loss=loss)[2])
            self._counts[loss] = {"loss": loss, "probed": stats["probed"],
                                  "zero": round(stats["zero_fraction"] * stats["probed"]),
                                  "nonfinite": stats["nonfinite"]}
        return dict(self._counts[loss])


def transfer_stage(subject: Subject, spec: EvaluationSpec, models: dict[str, bytes],
                   report: StageProgress) -> dict:
    """Every transfer attack's matrix over the sources and targets of ``spec.transfer``."""
    transfer, classifier, x, y = spec.transfer, subject.classifier, subject.x, subject.y
    assert transfer is not None  # plan() makes a transfer unit only for a spec with `transfer`
    missing = sorted(set(transfer.models) - set(models))
    if missing:
        raise ValueError(f"transfer.models: no model bytes were given for {missing}")
    classifiers = {MAIN_MODEL: classifier}
    for name in transfer.models:
        try:
            composed, _ = compose_for(models[name], x.shape[1:], spec, declared="auto")
        except DatasetError as exc:
            raise DatasetError(f"transfer.models.{name}: {exc}") from None
        other = Classifier(composed, classifier.options)
        if list(other.input_shape[1:]) != list(classifier.input_shape[1:]) or \
                other.num_classes != classifier.num_classes:
            raise ValueError(f"transfer.models.{name}: takes {list(other.input_shape[1:])} and has "
                             f"{other.num_classes} classes; the evaluated model takes "
                             f"{list(classifier.input_shape[1:])} with {classifier.num_classes} classes")
        classifiers[name] = other
    low, high = spec.input.range
    bounds = (low, high)
    total = len(x) * len(transfer.names("sources")) * sum(budget_count(a) for a in transfer.attacks)
    done_before = {"": 0}
    entries = []
    for index, attack_spec in enumerate(transfer.attacks):
        attack = build_attack(attack_spec)
        finished: dict[str, int] = {}

        def progress(stage: str, done: int, of: int, finished=finished) -> None:
            finished[stage] = done
            report("transfer", min(total, done_before[""] + sum(finished.values())), total)

        matrix = transfer_matrix(
            classifiers, transfer.names("sources"), transfer.names("targets"), np.asarray(x), y, attack,
            eps=None if attack.minimal else attack_spec.eps, bounds=bounds,
            seed=int(np.random.SeedSequence([spec.seed, 7, index]).generate_state(1)[0]),
            noise_baseline=transfer.noise_baseline, progress=progress)
        done_before[""] += sum(finished.values())
        entries.append({"attack": attack_spec.key, "table": matrix.as_table(),
                        "rows": [row.model_dump() for row in matrix.rows], "clean_error": matrix.clean_error,
                        "cross_pairs": cross_test_pairs(matrix)})
    return json.loads(json.dumps({"entries": entries}, default=lambda value: value.item()))


def _run_attack(index: int, classifier: Classifier, x: np.ndarray, y: np.ndarray,
                targets: np.ndarray | str | None, spec: EvaluationSpec, seed: int, report: StageProgress,
                timing: dict[str, float], probe: GradientProbe) -> list[RunOutput]:
    attack_spec = spec.attacks[index]
    attack = build_attack(attack_spec)
    stage = attack_spec.key
    total = len(x) * budget_count(attack_spec)
    done_before = [0]

    def attack_progress(done: int, of: int) -> None:
        report(stage, min(total, done_before[0] + done), total)

    report(stage, 0, total)
    started = time.perf_counter()
    gradients = probe(attack.gradient_loss) if attack.gradient_loss else None
    outputs = []
    budgets = attack_spec.eps if not attack.minimal else [None]
    assert budgets is not None  # build_attack refuses an attack that is not minimal without `eps`
    # budget by budget (each reports its progress), or at once where they share work (FGSM)
    groups = [list(budgets)] if attack.shares_budgets else [[eps] for eps in budgets]
    for group in groups:
        some_budgets = attack_spec.model_copy(update={"eps": None if group == [None] else group})
        for run in attack_runs(attack, some_budgets, classifier, x, y, targets, spec, seed, attack_progress):
            # the attack's own logits of x_adv are this classifier's: it attacked this classifier
            logits = classifier.logits(run.x_adv) if run.logits is None else run.logits
            output = run_output(index, run, logits)
            if gradients is not None:
                output.extra["gradient_probe"] = gradients
            outputs.append(output)
        done_before[0] += len(x) * len(group)
        report(stage, done_before[0], total)
    timing[stage] = time.perf_counter() - started
    return outputs
