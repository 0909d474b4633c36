"""Aggregating the units' outputs into the result document, its artifacts and examples."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from schemas.evaluation import AttackResult, CertifySection, EvaluationResult, EvaluationSpec, overall_verdict
from schemas.results import DefenseResult, FoolingSection, LipschitzSection, TransferEntry
from workers import metrics
from workers.attacks.fooling import fooling_rate_of_noise, gradient_ascent_fooling
from workers.certify.stage import certify_section
from workers.datasets import Dataset, Images
from workers.defense_stage import defense_results
from workers.gates import evaluate_gate
from workers.lipschitz import lipschitz_bounds
from workers.plan import StageProgress, plan
from workers.runtime import Classifier
from workers.spec_checks import build_attack
from workers.subject import Subject, compose_subject, select_samples
from workers.units import RunOutput, UnitOutput


@dataclass
class Evaluation:
    result: EvaluationResult
    # "{key}@{eps}/x_adv" (or "{key}/x_adv" for minimal attacks): adversarial examples [N, ...];
    # "{key}@{eps}/{name}": the attack's own arrays, e.g. a universal perturbation
    artifacts: dict[str, np.ndarray] = field(default_factory=dict)
    # "{key}@{eps}" (or "{key}"): a few samples for a report's example grid: "x", "x_adv", "y",
    # "clean_pred", "adv_pred", "adv_confidence"
    examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def finish_on(subject: Subject, model: bytes, dataset: Dataset, spec: EvaluationSpec,
              outputs: list[UnitOutput], report: StageProgress,
              baselines: dict[str, EvaluationResult]) -> Evaluation:
    started = time.perf_counter()
    classifier, x, y = subject.classifier, subject.x, subject.y
    outputs = _in_plan_order(spec, outputs, len(dataset.x))
    clean_pred = np.concatenate([o.clean_logits for o in outputs if o.unit.kind == "shard"]).argmax(1)

    entries: list[AttackResult] = []
    artifacts: dict[str, np.ndarray] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    broken: dict[tuple[str, float], np.ndarray] = {}  # (norm, eps) -> samples some attack fooled there
    for index, attack_spec in enumerate(spec.attacks):
        attack = build_attack(attack_spec)
        for run in _merged_runs(outputs, index):
            entries.append(_summarise(attack, attack_spec, classifier.num_classes, x, y, clean_pred, run))
            if run.eps is not None and entries[-1].norm is not None:
                budget = (entries[-1].norm, float(run.eps))
                fooled = run.success & (clean_pred == y)
                broken[budget] = broken.get(budget, np.zeros(len(y), bool)) | fooled
            artifacts.update(_artifacts(attack_spec.key, run, subject))
            examples[entry_label(attack_spec.key, run.eps)] = _examples(x, y, clean_pred, run, subject)

    flags = metrics.masking_warnings([
        {"attack": e.attack, "norm": e.norm, "eps": e.eps, "robust_accuracy": e.robust_accuracy,
         "kind": e.kind, "gradient_stats": (e.details or {}).get("gradient_stats"),
         "nonfinite_examples": (e.details or {}).get("nonfinite_examples")}
        for e in entries
    ])
    for message, affected in flags:
        for position in affected:
            entries[position].warnings.append(message)
    warnings = [message for message, _ in flags]
    warnings += [f"{entry_label(e.attack, e.eps)}: {component} skipped: {reason}" for e in entries
                 for component, reason in ((e.details or {}).get("skipped") or {}).items()]
    if classifier.straight_through and any(build_attack(a).needs_gradients for a in spec.attacks):
        warnings.append(
            f"quantized model: gradient attacks followed a straight-through gradient through its "
            f"{classifier.straight_through} quantizer(s) (QuantizeLinear -> DequantizeLinear pairs, "
            "DynamicQuantizeLinear), whose true gradient is zero almost everywhere; their robust "
            "accuracy is an upper bound that may be looser than on a float model: compare with a "
            "gradient-free attack (square)")
    clean_accuracy = metrics.accuracy(clean_pred, y)
    if len(y) >= CHANCE_SAMPLES and clean_accuracy < 1 / classifier.num_classes:
        warnings.append(
            f"clean accuracy {clean_accuracy:.2%} is below chance (1/{classifier.num_classes}): check that "
            "the pixels are what the model was trained on (input.range, mean, std, layout) and that the "
            "output read as its scores holds them (the first float output; input.model_output names another)")
    certify = None
    if spec.certify is not None:
        attacked: dict[tuple[str, float], float] = {}
        for e in entries:
            if e.eps is not None and e.norm is not None:
                budget = (e.norm, float(e.eps))
                attacked[budget] = min(attacked.get(budget, 1.0), e.robust_accuracy)
        shards = [(o.certified, o.certify_unavailable) for o in outputs if o.unit.kind == "shard"]
        certify = CertifySection.model_validate(certify_section(
            spec.certify, shards, y, clean_pred, broken, attacked))
    gates = [evaluate_gate(gate, clean_accuracy, entries, baselines, certify.entries if certify else None)
             for gate in spec.gates]
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
        lipschitz = asdict(lipschitz_bounds(compose_subject(model, x.shape[1:], spec)[0], seed=spec.seed))
        timing["lipschitz"] = time.perf_counter() - started_bounds
        report("lipschitz", 1, 1)
    timing["finish"] = time.perf_counter() - started
    timing["total"] = timing.get("total", 0.0) + timing["finish"]
    verdict = overall_verdict(gates)
    result = EvaluationResult(
        model={"sha256": hashlib.sha256(model).hexdigest(), "input_shape": subject.model_input,
               "layout": subject.model_layout, "num_classes": classifier.num_classes,
               "ends_in_softmax": classifier.ends_in_softmax, "ends_in_sigmoid": classifier.ends_in_sigmoid,
               "fixed_batch": classifier.fixed_batch,
               "dtype": classifier.dtype, "output_squeezed_from": _shape(classifier.squeezed_from),
               "binary": classifier.binary, "straight_through": classifier.straight_through},
        dataset={"samples": len(x), "source_dtype": dataset.source_dtype, "classes": dataset.classes,
                 "sha256": _dataset_digest(dataset, spec)},
        spec=spec, device=classifier.device, clean_accuracy=clean_accuracy, attacks=entries,
        warnings=warnings, gates=gates, passed=verdict == "passed", verdict=verdict,
        # the sections are built as JSON dicts: validated here as pydantic would validate them
        fooling=None if fooling is None else FoolingSection.model_validate(fooling),
        transfer=_transfer_entries(outputs),
        lipschitz=None if lipschitz is None else LipschitzSection.model_validate(lipschitz),
        defenses=([DefenseResult.model_validate(d) for d in defense_results(spec, outputs, entries)]
                  if spec.defenses else None),
        certify=certify,
        timing={k: round(v, 3) for k, v in timing.items()},
    )
    return Evaluation(result=result, artifacts=artifacts, examples=examples)


def _in_plan_order(spec: EvaluationSpec, outputs: list[UnitOutput], num_samples: int) -> list[UnitOutput]:
    ordered = sorted(outputs, key=lambda o: o.unit.index)
    expected = plan(spec, num_samples)
    if [o.unit for o in ordered] != expected:
        raise ValueError(f"the outputs are of units {[o.unit for o in ordered]}, but this spec's plan "
                         f"for {num_samples} samples is {expected}")
    return ordered


def _transfer_entries(outputs: list[UnitOutput]) -> list[TransferEntry] | None:
    """The transfer unit's entries, or None without a transfer unit."""
    for output in outputs:
        if output.unit.kind == "transfer":
            assert output.document is not None  # run_unit_on gives a transfer unit its document
            return [TransferEntry.model_validate(e) for e in output.document["entries"]]
    return None


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
        extra={key: _merge_extra(key, [p.extra.get(key, _ABSENT_EXTRA.get(key)) for p in parts], sizes)
               for key in dict.fromkeys(key for p in parts for key in p.extra)})


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
# probes' counts and the non-finite examples add up.
_MERGE_EXTRA = {"robust_accuracy": _sample_mean, "fooling_rate": _sample_mean,
                "passes": lambda values, sizes: max(values), "gradient_probe": _probe_sum,
                "nonfinite_examples": lambda values, sizes: sum(values)}
# extras a shard may lack, and what that means
_ABSENT_EXTRA = {"nonfinite_examples": 0}


def _merge_extra(key: str, values: list, sizes: list[int]):
    if key in _MERGE_EXTRA:
        return _MERGE_EXTRA[key](values, sizes)
    if all(v == values[0] for v in values):
        return values[0]
    raise ValueError(f"the attack extra {key!r} differs between shards and has no rule to merge it; "
                     "add one to _MERGE_EXTRA")


EXAMPLES = 8  # per attack entry, for reports
CHANCE_SAMPLES = 20  # fewer samples may miss chance by bad luck


def entry_label(key: str, eps: float | None) -> str:
    return key + (f"@{eps:g}" if eps is not None else "")


def _examples(x: Images, y: np.ndarray, clean_pred: np.ndarray, run: RunOutput,
              subject: Subject) -> dict[str, np.ndarray]:
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


def _artifacts(key: str, run: RunOutput, subject: Subject) -> dict[str, np.ndarray]:
    prefix = entry_label(key, run.eps)
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
    assert options is not None  # called only for a spec with `fooling`
    low, high = spec.input.range
    bounds = (low, high)
    noise = fooling_rate_of_noise(classifier, shape, options.samples, options.threshold,
                                  np.random.default_rng([spec.seed, 1]), bounds)
    summary = {"noise": noise}
    if options.steps:
        ascent = gradient_ascent_fooling(
            classifier, np.arange(classifier.num_classes), shape, options.steps, options.step_size,
            options.threshold, np.random.default_rng([spec.seed, 2]), bounds)
        summary["gradient_ascent"] = ascent.summary()
    return summary


def _shape(shape) -> list | None:
    return None if shape is None else [d if isinstance(d, int) else str(d) for d in shape]


def _dataset_digest(dataset: Dataset, spec: EvaluationSpec) -> str:
    """The file's hash, as the API and the CLI show it; for arrays made in memory, theirs."""
    return dataset.sha256 or _array_digest(*select_samples(dataset.x, dataset.y, spec.samples))


def _array_digest(x: Images, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
