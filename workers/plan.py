"""The plan of an evaluation: its units of work, and the progress of a job over them."""

from __future__ import annotations

from collections.abc import Callable

from schemas.evaluation import AttackSpec, EvaluationSpec
from workers.attacks import ATTACKS
from workers.units import WorkUnit

# progress(stage, done, total): attacks report between batches of work, so a callback that
# raises EvaluationCancelled (on a cancel request or a deadline) stops the evaluation there.
StageProgress = Callable[[str, int, int], None]


class EvaluationCancelled(Exception):
    """Raised by a progress callback to stop an evaluation between batches."""


def plan(spec: EvaluationSpec, num_samples: int) -> list[WorkUnit]:
    """The units of an evaluation of the first ``spec.samples`` of ``num_samples`` samples."""
    n = num_samples if spec.samples == "all" else min(spec.samples, num_samples)
    whole = tuple(i for i, a in enumerate(spec.attacks) if ATTACKS[a.name].whole_dataset)
    per_sample = tuple(i for i in range(len(spec.attacks)) if i not in whole)
    units = [WorkUnit(index, start, min(start + spec.shard_size, n), per_sample, "shard")
             for index, start in enumerate(range(0, n, spec.shard_size))]
    if whole and n:
        units.append(WorkUnit(len(units), 0, n, whole, "whole"))
    if spec.transfer is not None and n:
        units.append(WorkUnit(len(units), 0, n, tuple(range(len(spec.transfer.attacks))), "transfer"))
    return units


def stage_work(spec: EvaluationSpec, unit: WorkUnit) -> dict[str, int]:
    if unit.kind == "transfer":
        transfer = spec.transfer
        assert transfer is not None  # plan() makes a transfer unit only for a spec with `transfer`
        sources = len(transfer.names("sources"))
        return {"transfer": unit.samples * sources * sum(budget_count(a) for a in transfer.attacks)}
    work = {"clean": unit.samples} if unit.kind == "shard" else {}
    for index in unit.attacks:
        work[spec.attacks[index].key] = unit.samples * budget_count(spec.attacks[index])
    runs = sum(budget_count(spec.attacks[i]) for i in unit.attacks)
    for defense in spec.defenses:
        adaptive_runs = runs if defense.adaptive and unit.kind == "shard" else 0
        work[f"defense:{defense.key}"] = unit.samples * (1 + runs + adaptive_runs)
    if spec.certify is not None and unit.kind == "shard":
        work["certify"] = certify_work(spec, unit.samples)
    return work


def certify_work(spec: EvaluationSpec, samples: int) -> int:
    assert spec.certify is not None
    return samples * len(spec.certify.methods) * len(spec.certify.eps)


def budget_count(attack_spec: AttackSpec) -> int:
    return len(attack_spec.eps) if attack_spec.eps else 1  # minimal attacks: one run


def unit_work(spec: EvaluationSpec, unit: WorkUnit) -> int:
    """The progress units of ``unit``: samples times budgets, summed over its stages."""
    return sum(stage_work(spec, unit).values())


def job_progress(spec: EvaluationSpec, units: list[WorkUnit], report: StageProgress):
    """Per-unit callbacks that report each stage over the whole job; call it in unit order."""
    totals: dict[str, int] = {}
    for unit in units:
        for stage, work in stage_work(spec, unit).items():
            totals[stage] = totals.get(stage, 0) + work
    done_before = dict.fromkeys(totals, 0)

    def for_unit(unit: WorkUnit) -> StageProgress:
        offsets = dict(done_before)
        for stage, work in stage_work(spec, unit).items():
            done_before[stage] += work
        return lambda stage, done, total: report(stage, offsets[stage] + done, totals[stage])

    return for_unit


def silent(stage: str, done: int, total: int) -> None:
    pass
