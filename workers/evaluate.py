"""The evaluation engine: a spec, a model and a dataset in; the result document out.

A plain function over arrays and bytes: no Celery, web framework or database here, so the
CLI, the service's workers and tests all call exactly this.

An evaluation is split into units of work (``plan``): shards of ``spec.shard_size`` samples,
each running the clean pass and every per-sample attack on its slice, plus one "whole" unit
for attacks that need every sample at once (universal perturbations). ``run_unit`` runs one
unit, anywhere; its ``UnitOutput`` travels as bytes (``to_bytes``/``from_bytes``);
``finish`` aggregates the outputs into the result. ``evaluate`` does all of it in one
process, with the same result (``timing`` aside) as units run by separate workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from schemas.evaluation import (
    MAIN_MODEL,
    AttackResult,
    AttackSpec,
    EvaluationResult,
    EvaluationSpec,
    GateResult,
    GateSpec,
    overall_verdict,
)
from workers import metrics
from workers.attacks import ATTACKS, Attack
from workers.attacks.fooling import fooling_rate_of_noise, gradient_ascent_fooling
from workers.attacks.targets import attack_every_target, least_likely, random_targets
from workers.datasets import Dataset, DatasetError
from workers.defenses import DEFENSES, DefendedModel, adaptive_model, build_defense
from workers.layout import LayoutError, from_nchw, image_nchw, to_nchw
from workers.lipschitz import lipschitz_bounds
from workers.preprocess import compose_for_images, model_input_shape
from workers.runtime import Classifier, RuntimeOptions
from workers.spec_checks import build_attack, check_spec, defense_class
from workers.transfer import cross_test_pairs, transfer_matrix

# progress(stage, done, total): attacks report between batches of work, so a callback that
# raises EvaluationCancelled (on a cancel request or a deadline) stops the evaluation there.
StageProgress = Callable[[str, int, int], None]


class EvaluationCancelled(Exception):
    """Raised by a progress callback to stop an evaluation between batches."""


class UnitOutputError(Exception):
    """Bytes that are not a serialized UnitOutput: corrupt storage, an internal error."""




@dataclass
class Evaluation:
    result: EvaluationResult
    # "{key}@{eps}/x_adv" (or "{key}/x_adv" for minimal attacks): adversarial examples [N, ...];
    # "{key}@{eps}/{name}": the attack's own arrays, e.g. a universal perturbation
    artifacts: dict[str, np.ndarray] = field(default_factory=dict)
    # "{key}@{eps}" (or "{key}"): a few samples for a report's example grid: "x", "x_adv", "y",
    # "clean_pred", "adv_pred", "adv_confidence"
    examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkUnit:
    """One piece of an evaluation, run by one worker process."""

    index: int  # position in the plan
    start: int  # the selected samples [start, stop)
    stop: int
    attacks: tuple[int, ...]  # indices into spec.attacks
    # "shard": clean pass and per-sample attacks; "whole": attacks that need every sample;
    # "transfer": spec.transfer's attacks (indices into spec.transfer.attacks) on every sample
    kind: str

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass
class RunOutput:
    """One attack at one budget on a unit's samples (arrays [n, ...])."""

    attack: int  # index into spec.attacks
    eps: float | None
    x_adv: np.ndarray
    logits: np.ndarray  # the model's logits at x_adv [n, K]
    success: np.ndarray
    queries: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the attack's extra arrays
    extra: dict[str, Any] = field(default_factory=dict)  # the attack's other extras, JSON values


@dataclass
class UnitOutput:
    """What a unit computed: everything ``finish`` needs, without re-running the model."""

    unit: WorkUnit
    clean_logits: np.ndarray | None  # [n, K]; None for a "whole" unit
    runs: list[RunOutput]
    document: dict[str, Any] | None = None  # JSON results of a unit that is not per-sample (transfer)
    # seconds per stage; not part of the bytes (a redelivered unit must give the same bytes):
    # carry it beside them and hand it back to from_bytes
    timing: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """An .npz without pickles; the same output always gives the same bytes."""
        arrays = {} if self.clean_logits is None else {"clean_logits": self.clean_logits}
        runs = []
        for i, run in enumerate(self.runs):
            arrays.update({f"runs/{i}/{name}": array for name, array in _run_arrays(run).items()})
            runs.append({"attack": run.attack, "eps": run.eps, "extra": run.extra,
                         "arrays": list(run.arrays), "queries": run.queries is not None})
        meta = {"format": _FORMAT, "unit": asdict(self.unit), "runs": runs, "document": self.document}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        return _write_npz(arrays)

    @classmethod
    def from_bytes(cls, data: bytes, *, timing: dict[str, float] | None = None) -> UnitOutput:
        if not data.startswith(b"PK\x03\x04"):
            raise UnitOutputError("not a serialized unit output: not an .npz (zip) archive")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = json.loads(arrays["meta"].tobytes())
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
            unit = WorkUnit(**{**meta["unit"], "attacks": tuple(meta["unit"]["attacks"])})
            runs = [_run_from_arrays(run, arrays, f"runs/{i}/") for i, run in enumerate(meta["runs"])]
            return cls(unit=unit, clean_logits=arrays.get("clean_logits"), runs=runs,
                       document=meta.get("document"), timing=timing or {})
        except KeyError as exc:
            raise UnitOutputError(f"not a serialized unit output: it lacks {exc}") from None
        except (OSError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            raise UnitOutputError(f"not a serialized unit output: {exc}") from None


_FORMAT = "robustness-unit-output/1"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # zip entries otherwise carry the time of writing


def _run_arrays(run: RunOutput) -> dict[str, np.ndarray]:
    arrays = {"x_adv": run.x_adv, "logits": run.logits, "success": run.success}
    if run.queries is not None:
        arrays["queries"] = run.queries
    arrays.update({f"extra/{name}": array for name, array in run.arrays.items()})
    return arrays


def _run_from_arrays(meta: dict, arrays: dict[str, np.ndarray], prefix: str) -> RunOutput:
    return RunOutput(
        attack=meta["attack"], eps=meta["eps"], x_adv=arrays[prefix + "x_adv"],
        logits=arrays[prefix + "logits"], success=arrays[prefix + "success"],
        queries=arrays[prefix + "queries"] if meta["queries"] else None,
        arrays={name: arrays[f"{prefix}extra/{name}"] for name in meta["arrays"]}, extra=meta["extra"])


def _write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), member.getvalue())
    return buffer.getvalue()


# ---------------------------------------------------------------------------- the plan


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


def _stage_work(spec: EvaluationSpec, unit: WorkUnit) -> dict[str, int]:
    if unit.kind == "transfer":
        sources = len(spec.transfer.names("sources"))
        return {"transfer": unit.samples * sources * sum(_budget_count(a) for a in spec.transfer.attacks)}
    work = {"clean": unit.samples} if unit.kind == "shard" else {}
    for index in unit.attacks:
        work[spec.attacks[index].key] = unit.samples * _budget_count(spec.attacks[index])
    runs = sum(_budget_count(spec.attacks[i]) for i in unit.attacks)
    for defense in spec.defenses:
        adaptive_runs = runs if defense.adaptive and unit.kind == "shard" else 0
        work[f"defense:{defense.key}"] = unit.samples * (1 + runs + adaptive_runs)
    return work


def _budget_count(attack_spec: AttackSpec) -> int:
    return len(attack_spec.eps) if attack_spec.eps else 1  # minimal attacks: one run


def unit_work(spec: EvaluationSpec, unit: WorkUnit) -> int:
    """The progress units of ``unit``: samples times budgets, summed over its stages."""
    return sum(_stage_work(spec, unit).values())


# ---------------------------------------------------------------------------- running


def evaluate(
    model: bytes,
    dataset: Dataset,
    spec: EvaluationSpec,
    *,
    progress: StageProgress | None = None,
    options: RuntimeOptions | None = None,
    baselines: dict[str, EvaluationResult] | None = None,
    models: dict[str, bytes] | None = None,
) -> Evaluation:
    """Run every attack of ``spec`` against ``model`` on ``dataset``; see EvaluationResult.

    ``models`` holds the bytes of the other models ``spec.transfer`` names.
    """
    subject = _prepare(model, dataset, spec, options)
    units = plan(spec, len(dataset.x))
    unit_progress = _job_progress(spec, units, progress or _silent)
    outputs = [_run_unit(subject, spec, unit, unit_progress(unit), models) for unit in units]
    return _finish(subject, model, dataset, spec, outputs, progress or _silent, baselines or {})


def run_unit(model: bytes, dataset: Dataset, spec: EvaluationSpec, unit: WorkUnit, *,
             progress: StageProgress | None = None, options: RuntimeOptions | None = None,
             models: dict[str, bytes] | None = None) -> UnitOutput:
    """Run one unit of ``plan(spec, len(dataset.x))``; progress is reported within the unit."""
    if unit not in plan(spec, len(dataset.x)):
        raise ValueError(f"{unit} is not a unit of this spec's plan for {len(dataset.x)} samples")
    return _run_unit(_prepare(model, dataset, spec, options), spec, unit, progress or _silent, models)


def finish(model: bytes, dataset: Dataset, spec: EvaluationSpec, outputs: list[UnitOutput], *,
           progress: StageProgress | None = None, options: RuntimeOptions | None = None,
           baselines: dict[str, EvaluationResult] | None = None) -> Evaluation:
    """The result of an evaluation from the outputs of all its units (in any order).

    ``baselines`` maps a gate's ``baseline`` to that earlier result.
    """
    subject = _prepare(model, dataset, spec, options)
    return _finish(subject, model, dataset, spec, outputs, progress or _silent, baselines or {})


def _silent(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class _Subject:
    """The evaluated model and samples as every unit sees them: images NCHW (workers/layout.py)."""

    classifier: Classifier  # the model with normalisation (and an NHWC model's Transpose) composed
    x: np.ndarray  # the selected samples, NCHW
    y: np.ndarray
    t: np.ndarray | None  # the dataset's target labels of the selected samples (targets: dataset)
    pool: np.ndarray  # every sample of the dataset, NCHW (PCA's held-out fit samples)
    layout: str  # the dataset's layout: artifacts and examples go back to it
    model_layout: str  # the layout the model takes
    model_input: list  # the model's own input shape (None for a symbolic axis)

    def to_dataset_layout(self, array: np.ndarray) -> np.ndarray:
        """An array of NCHW images (or one image [C, H, W]) in the dataset's layout."""
        if array.ndim == 3 and array.shape == self.x.shape[1:] and self.x.ndim == 4:
            return from_nchw(array[None], self.layout)[0]
        if array.ndim == 4 and array.shape[1:] == self.x.shape[1:]:
            return from_nchw(array, self.layout)
        return array


def compose_for(model: bytes, image: Sequence[int], spec: EvaluationSpec,
                declared: str | None = None) -> tuple[Any, str]:
    """``model`` with the spec's normalisation composed, taking NCHW pixels of shape ``image``,
    and its own layout: ``declared``, by default the spec's input.model_layout."""
    try:
        return compose_for_images(model, image, mean=spec.input.mean, std=spec.input.std,
                                  layout=spec.input.model_layout if declared is None else declared)
    except LayoutError as exc:
        raise DatasetError(str(exc)) from None


def _prepare(model: bytes, dataset: Dataset, spec: EvaluationSpec,
             options: RuntimeOptions | None) -> _Subject:
    check_spec(spec)
    x, y = _select(dataset.x, dataset.y, spec.samples)
    if not len(x):
        raise DatasetError("the dataset holds no samples")
    try:
        image = image_nchw(x.shape[1:], spec.input.layout)
    except LayoutError as exc:
        raise DatasetError(str(exc)) from None
    composed, layout = compose_for(model, image, spec)
    classifier = Classifier(composed, options or RuntimeOptions(batch_size=spec.batch_size))
    x = to_nchw(x, spec.input.layout)
    t = None if dataset.t is None else _select(dataset.t, dataset.y, spec.samples)[0]
    _check_fit(x, y, t, classifier)
    return _Subject(classifier, x, y, t, to_nchw(dataset.x, spec.input.layout), spec.input.layout, layout,
                    [None] + model_input_shape(model)[1:])


def _select(x: np.ndarray, y: np.ndarray, samples) -> tuple[np.ndarray, np.ndarray]:
    if samples == "all":
        return x, y
    return x[:samples], y[:samples]


def _check_fit(x: np.ndarray, y: np.ndarray, t: np.ndarray | None, classifier: Classifier) -> None:
    expected = classifier.input_shape[1:]
    if x.ndim != len(classifier.input_shape) or any(
        isinstance(e, int) and e != g for e, g in zip(expected, x.shape[1:], strict=True)
    ):
        raise DatasetError(f"images are {list(x.shape[1:])} (NCHW) but the model (after input.layout) "
                           f"expects [{', '.join(map(str, expected))}]; check input.layout")
    for name, labels in (("labels", y), ("target labels t", t)):
        if labels is not None and labels.size and labels.max() >= classifier.num_classes:
            raise DatasetError(f"{name} go up to {int(labels.max())} but the model has "
                               f"{classifier.num_classes} classes")


def _job_progress(spec: EvaluationSpec, units: list[WorkUnit], report: StageProgress):
    """Per-unit callbacks that report each stage over the whole job; call it in unit order."""
    totals: dict[str, int] = {}
    for unit in units:
        for stage, work in _stage_work(spec, unit).items():
            totals[stage] = totals.get(stage, 0) + work
    done_before = dict.fromkeys(totals, 0)

    def for_unit(unit: WorkUnit) -> StageProgress:
        offsets = dict(done_before)
        for stage, work in _stage_work(spec, unit).items():
            done_before[stage] += work
        return lambda stage, done, total: report(stage, offsets[stage] + done, totals[stage])

    return for_unit


def _targets(spec: EvaluationSpec, index: int, subject: _Subject, unit: WorkUnit,
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


def _attack_seed(spec: EvaluationSpec, index: int, unit: WorkUnit) -> int:
    """Independent, reproducible randomness for each attack in each unit."""
    state = np.random.SeedSequence([spec.seed, index, unit.index]).generate_state(1, np.uint64)
    return int(state[0])


def _run_unit(subject: _Subject, spec: EvaluationSpec, unit: WorkUnit, report: StageProgress,
              models: dict[str, bytes] | None = None) -> UnitOutput:
    started = time.perf_counter()
    classifier = subject.classifier
    if unit.kind == "transfer":
        document = _transfer(subject, spec, models or {}, report)
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
    probe = _GradientProbe(classifier, xs, ys, clean_logits)
    runs: list[RunOutput] = []
    for index in unit.attacks:
        targets = _targets(spec, index, subject, unit, clean_logits)
        runs += _run_attack(index, classifier, xs, ys, targets, spec, _attack_seed(spec, index, unit),
                            report, timing, probe)
    document = None
    if spec.defenses:
        document = {"defenses": _defend(subject, spec, unit, runs, clean_logits, models or {}, report,
                                        timing)}
    timing["total"] = time.perf_counter() - started
    return UnitOutput(unit=unit, clean_logits=clean_logits, runs=runs, document=document, timing=timing)


class _GradientProbe:
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


def _transfer(subject: _Subject, spec: EvaluationSpec, models: dict[str, bytes],
              report: StageProgress) -> dict:
    """Every transfer attack's matrix over the sources and targets of ``spec.transfer``."""
    transfer, classifier, x, y = spec.transfer, subject.classifier, subject.x, subject.y
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
    total = len(x) * len(transfer.names("sources")) * sum(_budget_count(a) for a in transfer.attacks)
    done_before = {"": 0}
    entries = []
    for index, attack_spec in enumerate(transfer.attacks):
        attack = build_attack(attack_spec)
        finished: dict[str, int] = {}

        def progress(stage: str, done: int, of: int, finished=finished) -> None:
            finished[stage] = done
            report("transfer", min(total, done_before[""] + sum(finished.values())), total)

        matrix = transfer_matrix(
            classifiers, transfer.names("sources"), transfer.names("targets"), x, y, attack,
            eps=None if attack.minimal else attack_spec.eps, bounds=tuple(spec.input.range),
            seed=int(np.random.SeedSequence([spec.seed, 7, index]).generate_state(1)[0]),
            noise_baseline=transfer.noise_baseline, progress=progress)
        done_before[""] += sum(finished.values())
        entries.append({"attack": attack_spec.key, "table": matrix.as_table(),
                        "rows": [asdict(row) for row in matrix.rows], "clean_error": matrix.clean_error,
                        "cross_pairs": cross_test_pairs(matrix)})
    return json.loads(json.dumps({"entries": entries}, default=lambda value: value.item()))


def build_defenses(spec: EvaluationSpec, pool: np.ndarray, models: dict, selected: int) -> dict:
    """The spec's defenses, built and fitted: PCA on the last ``fit_samples`` of the dataset
    (``pool``, NCHW), which must not overlap the ``selected`` samples under evaluation, or on
    the images ``models[entry.fit_key()]`` of a separate fit dataset (in the dataset's layout)."""
    defenses = {}
    for index, entry in enumerate(spec.defenses):
        params = entry.params()
        if defense_class(entry).needs_model:
            if entry.reference_key() not in models:
                raise ValueError(f"defenses[{index}].model: no model bytes were given for {entry.model!r}")
            params["model"] = models[entry.reference_key()]
        defense = build_defense(entry.name, **params)
        if entry.fit_samples:
            if selected + entry.fit_samples > len(pool):
                raise DatasetError(f"defenses[{index}].fit_samples: the dataset has {len(pool)} samples; "
                                   f"{selected} are evaluated and {entry.fit_samples} more are needed to fit "
                                   f"{entry.name} on held-out data; lower `samples` or `fit_samples`")
            defense.fit(np.asarray(pool[len(pool) - entry.fit_samples:], np.float32))
        if entry.fit_dataset is not None:
            fit = models.get(entry.fit_key())
            if fit is None:
                raise ValueError(f"defenses[{index}].fit_dataset: no images were given for "
                                 f"{entry.fit_dataset!r}")
            fit = to_nchw(fit, spec.input.layout)
            if fit.shape[1:] != pool.shape[1:]:
                raise DatasetError(f"defenses[{index}].fit_dataset: its images are {list(fit.shape[1:])} but "
                                   f"the evaluated ones are {list(pool.shape[1:])} (NCHW)")
            defense.fit(np.asarray(fit, np.float32))
        defenses[entry.key] = defense
    return defenses


def _defend(subject: _Subject, spec: EvaluationSpec, unit: WorkUnit, runs: list[RunOutput],
            clean_logits: np.ndarray | None, models: dict[str, bytes], report: StageProgress,
            timing: dict[str, float]) -> dict:
    """Per defense, per sample: correct through the defense on clean data, on the examples
    crafted on the bare model (non-adaptive), and on examples crafted against the defended
    model (adaptive: composed graph, EOT or BPDA); lists of 0/1 merged in ``finish``."""
    classifier = subject.classifier
    xs, ys = subject.x[unit.start:unit.stop], subject.y[unit.start:unit.stop]
    defenses = build_defenses(spec, subject.pool, models, len(subject.y))
    out = {}
    for position, entry in enumerate(spec.defenses):
        started = time.perf_counter()
        stage = f"defense:{entry.key}"
        total = _stage_work(spec, unit)[stage]
        report(stage, 0, total)
        seed = int(np.random.SeedSequence([spec.seed, 11, position, unit.index]).generate_state(1)[0])
        defended = DefendedModel(classifier, defenses[entry.key], seed=seed)

        def correct(x_: np.ndarray, defended=defended) -> list[int]:
            return (defended.predict(x_) == ys).astype(np.uint8).tolist()

        record = {"clean": correct(xs) if unit.kind == "shard" else None,
                  "runs": [{"attack": r.attack, "eps": r.eps, "non_adaptive": correct(r.x_adv),
                            "adaptive": None} for r in runs]}
        if entry.adaptive and unit.kind == "shard":
            model = adaptive_model(classifier.model_bytes, defenses[entry.key], options=classifier.options,
                                   samples=entry.eot_samples, seed=seed)
            adaptive_runs = []
            for index in unit.attacks:
                attack_spec = spec.attacks[index]
                adaptive_runs += _attack_runs(build_attack(attack_spec), attack_spec, model, xs, ys,
                                              _targets(spec, index, subject, unit, clean_logits), spec,
                                              _attack_seed(spec, index, unit))
            for run, adaptive in zip(record["runs"], adaptive_runs, strict=True):
                run["adaptive"] = correct(adaptive.x_adv)
        if entry.curve:
            record["curve"] = [_noise_point(classifier, entry, magnitude, xs, ys, runs, unit, seed)
                               for magnitude in entry.curve]
        out[entry.key] = record
        timing[stage] = time.perf_counter() - started
        report(stage, total, total)
    return out


def _attack_runs(attack: Attack, attack_spec: AttackSpec, model, x: np.ndarray, y: np.ndarray,
                 targets: np.ndarray | str | None, spec: EvaluationSpec, seed: int,
                 progress=None) -> list:
    """One AttackRun per budget of the entry, every target in turn for ``targets: all``."""
    eps = None if attack.minimal else attack_spec.eps
    bounds = tuple(spec.input.range)
    if isinstance(targets, str):  # "all"
        return attack_every_target(attack, model, x, y, eps=eps, bounds=bounds, seed=seed, progress=progress)
    return attack(model, x, y, eps=eps, targets=targets, bounds=bounds, seed=seed, progress=progress)


def _run_attack(index: int, classifier: Classifier, x: np.ndarray, y: np.ndarray,
                targets: np.ndarray | str | None, spec: EvaluationSpec, seed: int, report: StageProgress,
                timing: dict[str, float], probe: _GradientProbe) -> list[RunOutput]:
    attack_spec = spec.attacks[index]
    attack = build_attack(attack_spec)
    stage = attack_spec.key
    total = len(x) * _budget_count(attack_spec)
    done_before = [0]

    def attack_progress(done: int, of: int) -> None:
        report(stage, min(total, done_before[0] + done), total)

    report(stage, 0, total)
    started = time.perf_counter()
    gradients = probe(attack.gradient_loss) if attack.gradient_loss else None
    outputs = []
    budgets = attack_spec.eps if not attack.minimal else [None]
    for eps in budgets:
        one_budget = attack_spec.model_copy(update={"eps": None if eps is None else [eps]})
        for run in _attack_runs(attack, one_budget, classifier, x, y, targets, spec, seed, attack_progress):
            output = _run_output(index, run, classifier.logits(run.x_adv))
            if gradients is not None:
                output.extra["gradient_probe"] = gradients
            outputs.append(output)
        done_before[0] += len(x)
        report(stage, done_before[0], total)
    timing[stage] = time.perf_counter() - started
    return outputs


def _run_output(index: int, run, logits: np.ndarray) -> RunOutput:
    arrays = {k: _plain(v) for k, v in run.extra.items() if isinstance(v, np.ndarray)}
    others = {k: v for k, v in run.extra.items() if not isinstance(v, np.ndarray)}
    # through JSON here too, so that evaluate() sees exactly what from_bytes() gives the service
    extra = json.loads(json.dumps(others, default=lambda value: value.item()))
    return RunOutput(attack=index, eps=run.eps, x_adv=run.x_adv, logits=logits, success=run.success,
                     queries=run.queries, arrays=arrays, extra=extra)


def _plain(array: np.ndarray) -> np.ndarray:
    """Arrays of Python strings (e.g. AutoAttack's broken_by) as numpy strings: no pickles."""
    return array.astype(str) if array.dtype == object else array


# ---------------------------------------------------------------------------- aggregating


def _finish(subject: _Subject, model: bytes, dataset: Dataset, spec: EvaluationSpec,
            outputs: list[UnitOutput], report: StageProgress,
            baselines: dict[str, EvaluationResult]) -> Evaluation:
    started = time.perf_counter()
    classifier, x, y = subject.classifier, subject.x, subject.y
    outputs = _in_plan_order(spec, outputs, len(dataset.x))
    clean_pred = np.concatenate([o.clean_logits for o in outputs if o.unit.kind == "shard"]).argmax(1)

    entries: list[AttackResult] = []
    artifacts: dict[str, np.ndarray] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    for index, attack_spec in enumerate(spec.attacks):
        attack = build_attack(attack_spec)
        for run in _merged_runs(outputs, index):
            entries.append(_summarise(attack, attack_spec, classifier.num_classes, x, y, clean_pred, run))
            artifacts.update(_artifacts(attack_spec.key, run, subject))
            examples[_entry_label(attack_spec.key, run.eps)] = _examples(x, y, clean_pred, run, subject)

    flags = metrics.masking_warnings([
        {"attack": e.attack, "norm": e.norm, "eps": e.eps, "robust_accuracy": e.robust_accuracy,
         "kind": e.kind, "gradient_stats": (e.details or {}).get("gradient_stats")}
        for e in entries
    ])
    for message, affected in flags:
        for position in affected:
            entries[position].warnings.append(message)
    warnings = [message for message, _ in flags]
    warnings += [f"{_entry_label(e.attack, e.eps)}: {component} skipped: {reason}" for e in entries
                 for component, reason in ((e.details or {}).get("skipped") or {}).items()]
    clean_accuracy = metrics.accuracy(clean_pred, y)
    gates = [evaluate_gate(gate, clean_accuracy, entries, baselines) for gate in spec.gates]
    timing = _summed_timing(outputs)
    fooling = None
    if spec.fooling is not None:
        report("fooling", 0, 1)
        started_fooling = time.perf_counter()
        fooling = fooling_summary(classifier, spec, x.shape[1:])
        timing["fooling"] = time.perf_counter() - started_fooling
        report("fooling", 1, 1)
    lipschitz = None
    if spec.lipschitz:
        report("lipschitz", 0, 1)
        started_bounds = time.perf_counter()
        lipschitz = asdict(lipschitz_bounds(compose_for(model, x.shape[1:], spec)[0], seed=spec.seed))
        timing["lipschitz"] = time.perf_counter() - started_bounds
        report("lipschitz", 1, 1)
    timing["finish"] = time.perf_counter() - started
    timing["total"] = timing.get("total", 0.0) + timing["finish"]
    verdict = overall_verdict(gates)
    result = EvaluationResult(
        model={"sha256": hashlib.sha256(model).hexdigest(), "input_shape": subject.model_input,
               "layout": subject.model_layout, "num_classes": classifier.num_classes,
               "ends_in_softmax": classifier.ends_in_softmax, "fixed_batch": classifier.fixed_batch},
        dataset={"samples": len(x), "source_dtype": dataset.source_dtype,
                 "sha256": _array_digest(*_select(dataset.x, dataset.y, spec.samples))},
        spec=spec, device=classifier.device, clean_accuracy=clean_accuracy, attacks=entries,
        warnings=warnings, gates=gates, passed=verdict == "passed", verdict=verdict, fooling=fooling,
        transfer=next((o.document["entries"] for o in outputs if o.unit.kind == "transfer"), None),
        lipschitz=lipschitz,
        defenses=_defense_results(spec, outputs, entries) if spec.defenses else None,
        timing={k: round(v, 3) for k, v in timing.items()},
    )
    return Evaluation(result=result, artifacts=artifacts, examples=examples)


def _noise_point(classifier: Classifier, entry, magnitude: float, xs, ys, runs: list[RunOutput],
                 unit: WorkUnit, seed: int) -> dict:
    """Per sample: correct through the noise defense at ``magnitude``, clean and non-adaptive."""
    params = defense_class(entry).at_magnitude(entry.params(), magnitude)
    defended = DefendedModel(classifier, build_defense(entry.name, **params), seed=seed)

    def correct(x_: np.ndarray) -> list[int]:
        return (defended.predict(x_) == ys).astype(np.uint8).tolist()

    return {"magnitude": magnitude, "clean": correct(xs) if unit.kind == "shard" else None,
            "runs": [correct(r.x_adv) for r in runs]}


ADAPTIVE_GAP = 0.1  # adaptive accuracy this far below the non-adaptive one is flagged


def _defense_results(spec: EvaluationSpec, outputs: list[UnitOutput],
                     entries: list[AttackResult]) -> list[dict]:
    """Liang et al.'s tables per defense, non-adaptive and adaptive side by side."""
    results = []
    for entry in spec.defenses:
        records = [o.document["defenses"][entry.key] for o in outputs if o.unit.kind in ("shard", "whole")]
        clean = [v for r in records if r["clean"] is not None for v in r["clean"]]
        merged: dict[tuple, dict] = {}
        for record in records:
            for run in record["runs"]:
                slot = merged.setdefault((run["attack"], run["eps"]), {"non_adaptive": [], "adaptive": []})
                slot["non_adaptive"] += run["non_adaptive"]
                if run["adaptive"] is not None:
                    slot["adaptive"] += run["adaptive"]
        rows, warnings = [], []
        for (index, eps), slot in sorted(merged.items(), key=lambda item: (item[0][0], item[0][1] or 0.0)):
            key = spec.attacks[index].key
            bare = next((e.robust_accuracy for e in entries if e.attack == key and e.eps == eps), None)
            non_adaptive = float(np.mean(slot["non_adaptive"]))
            adaptive = float(np.mean(slot["adaptive"])) if slot["adaptive"] else None
            flagged = adaptive is not None and adaptive < non_adaptive - ADAPTIVE_GAP
            if flagged:
                budget = "" if eps is None else f" at eps={eps:g}"
                warnings.append(f"{entry.key}: {key}{budget} crafted against the defense brings accuracy to "
                                f"{adaptive:.3f}, from {non_adaptive:.3f} non-adaptive: the non-adaptive "
                                "number overstates its robustness")
            rows.append({"attack": key, "eps": eps, "bare": bare, "non_adaptive": non_adaptive,
                         "adaptive": adaptive, "flagged": flagged})
        result = {"defense": entry.key, "name": entry.name, "params": entry.params(),
                  "adaptive_method": _adaptive_method(entry) if entry.adaptive else None,
                  "clean_accuracy": float(np.mean(clean)), "attacks": rows, "warnings": warnings}
        if entry.curve:
            result["curve"] = _merged_curve(spec, entry, records)
        results.append(result)
    return results


def _adaptive_method(entry) -> str:
    """How the adaptive attacker differentiates through the defense (see adaptive_model)."""
    defense = DEFENSES[entry.name]
    if defense.random:
        return f"expectation over transformation ({entry.eot_samples} draws per gradient)"
    if defense.differentiable:
        return "exact gradients of the defense composed with the model in one ONNX graph"
    return "BPDA: the defense on the forward pass, the identity on the backward pass (not differentiable)"


def _merged_curve(spec: EvaluationSpec, entry, records: list[dict]) -> list[dict]:
    """Accuracy against the noise magnitude: clean, and per attack run (non-adaptive)."""
    curve = []
    for point, magnitude in enumerate(entry.curve):
        clean = [v for r in records if r["curve"][point]["clean"] is not None
                 for v in r["curve"][point]["clean"]]
        merged: dict[tuple, list] = {}
        for record in records:
            for run, correct in zip(record["runs"], record["curve"][point]["runs"], strict=True):
                merged.setdefault((run["attack"], run["eps"]), []).extend(correct)
        ordered = sorted(merged.items(), key=lambda item: (item[0][0], item[0][1] or 0.0))
        curve.append({"magnitude": magnitude, "clean_accuracy": float(np.mean(clean)), "attacks": [
            {"attack": spec.attacks[index].key, "eps": eps, "accuracy": float(np.mean(values))}
            for (index, eps), values in ordered]})
    return curve


def _in_plan_order(spec: EvaluationSpec, outputs: list[UnitOutput], num_samples: int) -> list[UnitOutput]:
    ordered = sorted(outputs, key=lambda o: o.unit.index)
    expected = plan(spec, num_samples)
    if [o.unit for o in ordered] != expected:
        raise ValueError(f"the outputs are of units {[o.unit for o in ordered]}, but this spec's plan "
                         f"for {num_samples} samples is {expected}")
    return ordered


def _summed_timing(outputs: list[UnitOutput]) -> dict[str, float]:
    timing: dict[str, float] = {}
    for output in outputs:
        for stage, seconds in output.timing.items():
            timing[stage] = timing.get(stage, 0.0) + seconds
    return timing


def _merged_runs(outputs: list[UnitOutput], index: int) -> list[RunOutput]:
    """The runs of attack ``index`` over all samples, one per budget, in unit order."""
    units = [o for o in outputs if o.unit.kind != "transfer" and index in o.unit.attacks]
    per_unit = [[run for run in o.runs if run.attack == index] for o in units]
    sizes = [o.unit.samples for o in units]
    return [_merge_runs(parts, sizes) for parts in zip(*per_unit, strict=True)]


def _merge_runs(parts: Sequence[RunOutput], sizes: list[int]) -> RunOutput:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return RunOutput(
        attack=first.attack, eps=first.eps,
        x_adv=np.concatenate([p.x_adv for p in parts]), logits=np.concatenate([p.logits for p in parts]),
        success=np.concatenate([p.success for p in parts]),
        queries=None if first.queries is None else np.concatenate([p.queries for p in parts]),
        arrays={name: np.concatenate([p.arrays[name] for p in parts]) for name in first.arrays},
        extra={key: _merge_extra(key, [p.extra[key] for p in parts], sizes) for key in first.extra})


def _sample_mean(values: list, sizes: list[int]):
    """The mean over all samples of a per-shard mean (or of each entry of per-shard dicts)."""
    if isinstance(values[0], dict):
        return {key: _sample_mean([v[key] for v in values], sizes) for key in values[0]}
    return math.fsum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)


def _probe_sum(values: list, sizes: list[int]) -> dict:
    """Gradient probes of one loss over several shards: their counts add up."""
    return {"loss": values[0]["loss"], **{key: sum(v[key] for v in values) for key in ("probed", "zero",
                                                                                       "nonfinite")}}


# How the attacks' non-array extras combine across shards, by name: AutoAttack's robust accuracy
# after each component and a universal perturbation's fooling rate are means over the samples;
# passes (a whole-set attack's, merged only for completeness) take the largest; the gradient
# probes' counts add up.
_MERGE_EXTRA = {"robust_accuracy": _sample_mean, "fooling_rate": _sample_mean,
                "passes": lambda values, sizes: max(values), "gradient_probe": _probe_sum}


def _merge_extra(key: str, values: list, sizes: list[int]):
    if key in _MERGE_EXTRA:
        return _MERGE_EXTRA[key](values, sizes)
    if all(v == values[0] for v in values):
        return values[0]
    raise ValueError(f"the attack extra {key!r} differs between shards and has no rule to merge it; "
                     "add one to _MERGE_EXTRA")


EXAMPLES = 8  # per attack entry, for reports


def _entry_label(key: str, eps: float | None) -> str:
    return key + (f"@{eps:g}" if eps is not None else "")


def _examples(x: np.ndarray, y: np.ndarray, clean_pred: np.ndarray, run: RunOutput,
              subject: _Subject) -> dict[str, np.ndarray]:
    """The first samples the model got right and the attack fooled (then the others), in the
    dataset's layout."""
    fooled = np.flatnonzero((clean_pred == y) & run.success)
    rest = np.setdiff1d(np.arange(len(y)), fooled)
    chosen = np.concatenate([fooled, rest])[:EXAMPLES]
    shifted = run.logits[chosen] - run.logits[chosen].max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return {"x": subject.to_dataset_layout(x[chosen]), "x_adv": subject.to_dataset_layout(run.x_adv[chosen]),
            "y": y[chosen], "clean_pred": clean_pred[chosen],
            "adv_pred": probabilities.argmax(axis=1), "adv_confidence": probabilities.max(axis=1)}


def _artifacts(key: str, run: RunOutput, subject: _Subject) -> dict[str, np.ndarray]:
    prefix = _entry_label(key, run.eps)
    return {f"{prefix}/{name}": subject.to_dataset_layout(array)
            for name, array in {"x_adv": run.x_adv, **run.arrays}.items()}


def _summarise(attack, attack_spec, num_classes, x, y, clean_pred, run: RunOutput) -> AttackResult:
    norm = attack_spec.norm or attack.norm
    targets = run.arrays.get("targets")
    summary = metrics.attack_summary(
        x, y, clean_pred, run.x_adv, run.logits, run.success, num_classes=num_classes,
        targets=None if targets is None or targets.dtype.kind not in "iu" else targets,
        queries=run.queries, eps=run.eps, norm=norm)
    minimal = None
    if attack.minimal:
        minimal = metrics.minimal_summary(x, y, clean_pred, run.x_adv, run.success, norm=norm or "l2")
    details = dict(run.extra)
    probe = details.pop("gradient_probe", None)
    if probe is not None:
        probed = probe["probed"]
        details["gradient_stats"] = {"loss": probe["loss"], "probed": probed,
                                     "zero_fraction": probe["zero"] / probed if probed else 0.0,
                                     "nonfinite": probe["nonfinite"]}
    if attack_spec.target_mode is not None:
        details["targets"] = attack_spec.target_mode
    fields = {k: v for k, v in summary.items() if k in AttackResult.model_fields}
    fields.update(attack=attack_spec.key, name=attack.name, kind=attack.kind, minimal=minimal,
                  details=details or None)
    return AttackResult(**fields)


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


# ---------------------------------------------------------------------------- gates


def evaluate_gate(gate: GateSpec, clean_accuracy: float, entries: list[AttackResult],
                  baselines: dict[str, EvaluationResult] | None = None) -> GateResult:
    """Find the metric a gate names and compare it with its bounds and its baseline.

    Without ``eps`` the gate reads the entry with the largest budget (the hardest test). With
    ``baseline`` it passes when the value is at least the baseline's value less ``max_drop``.
    A gate that would pass on an entry carrying a masking warning is inconclusive (masking
    overstates robustness, so a failure stands): passed only with ``allow_inconclusive``.
    """
    base = gate.model_dump()
    value, reason, entry = _gate_value(gate, clean_accuracy, entries)
    if value is None:
        return GateResult(**base, value=None, passed=False, verdict="failed", reason=reason)
    passed = (gate.min is None or value >= gate.min) and (gate.max is None or value <= gate.max)
    reference = None
    if gate.baseline is not None:
        baseline = (baselines or {}).get(gate.baseline)
        if baseline is None:
            return GateResult(**base, value=value, passed=False, verdict="failed",
                              reason=f"the baseline {gate.baseline!r} is not available")
        reference, reason, _ = _gate_value(gate, baseline.clean_accuracy, baseline.attacks)
        if reference is None:
            return GateResult(**base, value=value, passed=False, verdict="failed",
                              reason=f"baseline {gate.baseline!r}: {reason}")
        kept = value >= reference - gate.max_drop - 1e-9  # float rounding of the difference
        reason = None if kept else (f"{gate.metric} dropped by {reference - value:.4g} from the baseline's "
                                    f"{reference:.4g}, more than max_drop {gate.max_drop:g}")
        passed = passed and kept
    found = {"value": value, "baseline_value": reference}
    warnings = list(entry.warnings) if entry is not None else []
    if not passed:
        return GateResult(**base, **found, passed=False, verdict="failed", reason=reason, warnings=warnings)
    if not warnings:
        return GateResult(**base, **found, passed=True, verdict="passed")
    more = f" (and {len(warnings) - 1} more warning{'s' * (len(warnings) > 2)})" if len(warnings) > 1 else ""
    if gate.allow_inconclusive:
        return GateResult(**base, **found, passed=True, verdict="passed", accepted_inconclusive=True,
                          reason=f"accepted as inconclusive (allow_inconclusive): {warnings[0]}{more}",
                          warnings=warnings)
    return GateResult(**base, **found, passed=False, verdict="inconclusive",
                      reason=f"inconclusive: {warnings[0]}{more}", warnings=warnings)


def _gate_value(gate: GateSpec, clean_accuracy: float, entries: list[AttackResult]
                ) -> tuple[float | None, str | None, AttackResult | None]:
    """The value of the gate's metric in a result and the entry it comes from, or None and why not."""
    if gate.metric == "clean_accuracy":
        return clean_accuracy, None, None
    matching = [e for e in entries if e.attack == gate.attack
                and (gate.eps is None or (e.eps is not None and abs(e.eps - gate.eps) < 1e-9))
                and (gate.norm is None or e.norm == gate.norm)]
    if not matching:
        return None, f"no result of {gate.attack} at eps={gate.eps} norm={gate.norm}", None
    entry = max(matching, key=lambda e: e.eps if e.eps is not None else 0.0)
    value = getattr(entry, gate.metric)
    if value is None:
        return None, f"{gate.metric} is not available for {gate.attack}", entry
    return value, None, entry


def _array_digest(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
