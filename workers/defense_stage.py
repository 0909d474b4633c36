"""The defense stage: per unit, accuracy through each defense, and their tables at the end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from schemas.evaluation import AttackResult, EvaluationSpec
from workers.attack_runs import attack_runs, attack_seed, unit_targets
from workers.datasets import DatasetError, Images, Pixels
from workers.defenses import DEFENSES, DefendedModel, adaptive_model, build_defense
from workers.layout import to_nchw
from workers.plan import StageProgress, stage_work
from workers.runtime import Classifier
from workers.spec_checks import build_attack, defense_class, held_out_shortfall
from workers.subject import Subject
from workers.units import RunOutput, UnitOutput, WorkUnit


def build_defenses(spec: EvaluationSpec, pool: Images, models: dict[str, bytes],
                   fit_images: Mapping[str, Images]) -> dict:
    """The spec's defenses, built and fitted: PCA on the last ``fit_samples`` of the dataset
    (``pool``, NCHW), which must not overlap the samples under evaluation (the first ones), or on
    the images ``fit_images[entry.key]`` of a separate fit dataset (in the dataset's layout);
    an autoencoder's model is ``models[entry.reference_key()]``."""
    shortfall = held_out_shortfall(spec, len(pool))
    if shortfall is not None:
        raise DatasetError(shortfall)
    defenses = {}
    for index, entry in enumerate(spec.defenses):
        params = entry.params()
        if defense_class(entry).needs_model:
            if entry.reference_key() not in models:
                raise ValueError(f"defenses[{index}].model: no model bytes were given for {entry.model!r}")
            params["model"] = models[entry.reference_key()]
        defense = build_defense(entry.name, **params)
        if entry.fit_samples:
            held_out = slice(len(pool) - entry.fit_samples, None)
            defense.fit(pool.rows(held_out) if isinstance(pool, Pixels)
                        else np.asarray(pool[held_out], np.float32))
        if entry.fit_dataset is not None:
            fit = fit_images.get(entry.key)
            if fit is None:
                raise ValueError(f"defenses[{index}].fit_dataset: no images were given for "
                                 f"{entry.fit_dataset!r}")
            fit = to_nchw(fit, spec.input.layout)
            if fit.shape[1:] != pool.shape[1:]:
                raise DatasetError(f"defenses[{index}].fit_dataset: its images are {list(fit.shape[1:])} but "
                                   f"the evaluated ones are {list(pool.shape[1:])} (NCHW)")
            defense.fit(fit if isinstance(fit, Pixels) else np.asarray(fit, np.float32))
        defenses[entry.key] = defense
    return defenses


def defend(subject: Subject, spec: EvaluationSpec, unit: WorkUnit, runs: list[RunOutput],
           clean_logits: np.ndarray | None, models: dict[str, bytes], fit_images: Mapping[str, Images],
           report: StageProgress, timing: dict[str, float]) -> dict:
    """Per defense, per sample: correct through the defense on clean data, on the examples
    crafted on the bare model (non-adaptive), and on examples crafted against the defended
    model (adaptive: composed graph, EOT or BPDA); lists of 0/1 merged in ``finish``."""
    classifier = subject.classifier
    xs, ys = subject.x[unit.start:unit.stop], subject.y[unit.start:unit.stop]
    defenses = build_defenses(spec, subject.pool, models, fit_images)
    out = {}
    for position, entry in enumerate(spec.defenses):
        started = time.perf_counter()
        stage = f"defense:{entry.key}"
        total = stage_work(spec, unit)[stage]
        report(stage, 0, total)
        seed = int(np.random.SeedSequence([spec.seed, 11, position, unit.index]).generate_state(1)[0])
        defended = DefendedModel(classifier, defenses[entry.key], seed=seed)

        def correct(x_: np.ndarray, defended=defended) -> list[int]:
            return (defended.predict(x_) == ys).astype(np.uint8).tolist()

        record: dict[str, Any] = {
            "clean": correct(xs) if unit.kind == "shard" else None,
            "runs": [{"attack": r.attack, "eps": r.eps, "non_adaptive": correct(r.x_adv), "adaptive": None}
                     for r in runs]}
        if entry.adaptive and unit.kind == "shard":
            model = adaptive_model(classifier.model_bytes, defenses[entry.key], options=classifier.options,
                                   samples=entry.eot_samples, seed=seed)
            adaptive_runs = []
            for index in unit.attacks:
                attack_spec = spec.attacks[index]
                adaptive_runs += attack_runs(build_attack(attack_spec), attack_spec, model, xs, ys,
                                              unit_targets(spec, index, subject, unit, clean_logits), spec,
                                              attack_seed(spec, index, unit))
            for run, adaptive in zip(record["runs"], adaptive_runs, strict=True):
                run["adaptive"] = correct(adaptive.x_adv)
        if entry.curve:
            record["curve"] = [_noise_point(classifier, entry, magnitude, xs, ys, runs, unit, seed)
                               for magnitude in entry.curve]
        out[entry.key] = record
        timing[stage] = time.perf_counter() - started
        report(stage, total, total)
    return out


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


def defense_results(spec: EvaluationSpec, outputs: list[UnitOutput],
                    entries: list[AttackResult]) -> list[dict]:
    """Liang et al.'s tables per defense, non-adaptive and adaptive side by side, and their worst
    case per sample: a sample counts as robust only where neither attack's example fools the
    defended model (an attacker sends both), which neither column alone bounds when the adaptive
    attack is the weaker one on some samples (EOT with few draws, BPDA)."""
    results = []
    for entry in spec.defenses:
        records = []
        for output in outputs:
            if output.unit.kind in ("shard", "whole"):
                assert output.document is not None  # run_unit_on writes it for a spec with defenses
                records.append(output.document["defenses"][entry.key])
        clean = [v for r in records if r["clean"] is not None for v in r["clean"]]
        merged: dict[tuple, dict] = {}
        for record in records:
            for run in record["runs"]:
                slot = merged.setdefault((run["attack"], run["eps"]),
                                         {"non_adaptive": [], "adaptive": [], "both": []})
                slot["non_adaptive"] += run["non_adaptive"]
                if run["adaptive"] is not None:
                    slot["adaptive"] += run["adaptive"]
                    slot["both"] += [a & b for a, b in zip(run["non_adaptive"], run["adaptive"], strict=True)]
                else:
                    slot["both"] += run["non_adaptive"]
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
                         "adaptive": adaptive, "worst_case": float(np.mean(slot["both"])),
                         "flagged": flagged})
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
