"""The evaluation engine: a spec, a model and a dataset in; the result document out.

A plain function over arrays and bytes: no Celery, web framework or database here, so the
CLI, the service's workers and tests all call exactly this.

An evaluation is split into units of work (``plan``): shards of ``spec.shard_size`` samples,
each running the clean pass and every per-sample attack on its slice, plus one "whole" unit
for attacks that need every sample at once (universal perturbations). ``run_unit`` runs one
unit, anywhere; its ``UnitOutput`` travels as bytes (``to_bytes``/``from_bytes``);
``finish`` aggregates the outputs into the result. ``evaluate`` does all of it in one
process, with the same result (``timing`` aside) as units run by separate workers.

The parts, one module each: workers/plan.py (the units and the job's progress),
workers/units.py (a unit and its output as bytes), workers/subject.py (the model composed with
its preprocessing and the samples as NCHW), workers/unit_runner.py (running a unit),
workers/attack_runs.py (one attack entry: targets, seeds), workers/defense_stage.py (the
defenses), workers/aggregate.py (the result, artifacts and examples) and workers/gates.py.
"""

from __future__ import annotations

import numpy as np

from schemas.evaluation import EvaluationResult, EvaluationSpec
from workers.aggregate import Evaluation, finish_on
from workers.datasets import Dataset
from workers.plan import StageProgress, job_progress, plan, silent
from workers.runtime import RuntimeOptions
from workers.subject import prepare
from workers.unit_runner import run_unit_on
from workers.units import UnitOutput, WorkUnit

__all__ = ["Evaluation", "evaluate", "finish", "run_unit"]


def evaluate(
    model: bytes,
    dataset: Dataset,
    spec: EvaluationSpec,
    *,
    progress: StageProgress | None = None,
    options: RuntimeOptions | None = None,
    baselines: dict[str, EvaluationResult] | None = None,
    models: dict[str, bytes] | None = None,
    fit_images: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """Run every attack of ``spec`` against ``model`` on ``dataset``; see EvaluationResult.

    The other inputs a spec names: ``models`` holds the bytes of the models of
    ``spec.transfer`` (by their names) and of autoencoder defenses (by
    ``DefenseSpec.reference_key()``); ``fit_images`` the images of each defense fitted on a
    separate dataset (by the defense's key), in the dataset's layout. ``baselines`` maps a
    gate's ``baseline`` to that earlier result.
    """
    subject = prepare(model, dataset, spec, options)
    units = plan(spec, len(dataset.x))
    unit_progress = job_progress(spec, units, progress or silent)
    outputs = [run_unit_on(subject, spec, unit, unit_progress(unit), models, fit_images) for unit in units]
    return finish_on(subject, model, dataset, spec, outputs, progress or silent, baselines or {})


def run_unit(model: bytes, dataset: Dataset, spec: EvaluationSpec, unit: WorkUnit, *,
             progress: StageProgress | None = None, options: RuntimeOptions | None = None,
             models: dict[str, bytes] | None = None,
             fit_images: dict[str, np.ndarray] | None = None) -> UnitOutput:
    """Run one unit of ``plan(spec, len(dataset.x))``; progress is reported within the unit."""
    if unit not in plan(spec, len(dataset.x)):
        raise ValueError(f"{unit} is not a unit of this spec's plan for {len(dataset.x)} samples")
    subject = prepare(model, dataset, spec, options)
    return run_unit_on(subject, spec, unit, progress or silent, models, fit_images)


def finish(model: bytes, dataset: Dataset, spec: EvaluationSpec, outputs: list[UnitOutput], *,
           progress: StageProgress | None = None, options: RuntimeOptions | None = None,
           baselines: dict[str, EvaluationResult] | None = None) -> Evaluation:
    """The result of an evaluation from the outputs of all its units (in any order).

    ``baselines`` maps a gate's ``baseline`` to that earlier result.
    """
    subject = prepare(model, dataset, spec, options)
    return finish_on(subject, model, dataset, spec, outputs, progress or silent, baselines or {})
