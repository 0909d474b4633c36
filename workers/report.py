"""A self-contained HTML report of one evaluation: one file, inline CSS, plots and example
images embedded as base64 PNG, no script and nothing fetched from elsewhere.

    html = render_report(result, examples, model_name="resnet18", dataset_name="cifar10-test")

Sections, each only when its stage ran: the summary (model, dataset, device, clean accuracy,
gates, warnings), accuracy against the budget (one plot per norm, one curve per attack, and a
table of every entry), the distribution of minimal perturbations, example grids in the style
of Goodfellow et al.'s panda figure (original | amplified perturbation | adversarial), the
transfer tables as heatmaps, the defenses (bare, non-adaptive and adaptive accuracy side by
side), Lipschitz bounds per layer and the fooling-image summary.

``examples`` maps an entry label, ``"{attack}@{eps:g}"`` or the attack alone for a minimal
attack (the keys of ``Evaluation.artifacts`` without their ``/x_adv``), to up to 8 samples:
"x" and "x_adv" (in ``spec.input.range``, in ``spec.input.layout``), "y", "clean_pred",
"adv_pred" (int [k]) and "adv_confidence" (float [k]: the softmax probability of adv_pred).
``examples_from_artifacts`` builds them from an evaluation's artifacts and the model.

The size does not grow with the number of samples: plots have a fixed size, and example
images are downscaled to at most EXAMPLE_SIDE pixels and share EXAMPLE_BUDGET bytes evenly
between the attack entries (fewer examples each when they are large; the entries past the
budget are named as left out). Every string from the user goes through Jinja2's
autoescaping; strings drawn in plots are escaped for matplotlib's mathtext.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import overload

import jinja2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import PercentFormatter
from PIL import Image

from schemas.evaluation import AttackResult, EvaluationResult
from schemas.results import CurvePoint, DefenseResult, TransferEntry
from workers.metrics import softmax

EXAMPLES_MAX = 8  # samples per attack entry in the example grid
EXAMPLE_SIDE = 128  # example images larger than this (height or width) are downscaled to it
EXAMPLE_DISPLAY = 96  # CSS pixels an example image is shown at (at least; small images are zoomed)
EXAMPLE_BUDGET = 1_500_000  # bytes of example PNGs in one report, shared between the entries
DPI = 80
_COLORS = [f"C{i}" for i in range(10)]
_LINES = ["-", "--", ":", "-."]
TEMPLATES = Path(__file__).parent / "templates"
_EXAMPLE_KEYS = ("x", "x_adv", "y", "clean_pred", "adv_pred", "adv_confidence")


def render_report(result: EvaluationResult | dict, examples: dict[str, dict] | None = None, *,
                  model_name: str | None = None, dataset_name: str | None = None,
                  evaluation_id: str | None = None) -> str:
    """The HTML report of ``result`` (an EvaluationResult or its JSON document)."""
    if not isinstance(result, EvaluationResult):
        result = EvaluationResult.model_validate(result)
    examples = examples or {}
    context = {
        "summary": _summary(result, model_name, dataset_name, evaluation_id),
        "gates": [_gate(g) for g in result.gates],
        "warnings": list(result.warnings),
        "accuracy": _accuracy_section(result) if result.attacks else None,
        "minimal": _minimal_section(result),
        "examples": _examples_section(result, examples),
        "transfer": [_transfer_entry(t) for t in result.transfer] if result.transfer else None,
        "defenses": [_defense(d) for d in result.defenses] if result.defenses else None,
        "lipschitz": result.lipschitz,
        "certify": result.certify,
        "fooling": result.fooling,
        "spec_json": json.dumps(result.spec.model_dump(mode="json", exclude_defaults=True), indent=2),
    }
    return _environment().get_template("report.html.j2").render(**context)


def select_examples(x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, clean_logits: np.ndarray,
                    adv_logits: np.ndarray, *, k: int = EXAMPLES_MAX) -> dict[str, np.ndarray]:
    """Up to ``k`` samples for the grid, in the form ``render_report`` takes: the samples the
    attack fooled (correct when clean, wrong after) first, then the others, each in order."""
    y = np.asarray(y)
    clean_pred, adv_pred = np.asarray(clean_logits).argmax(1), np.asarray(adv_logits).argmax(1)
    fooled = (clean_pred == y) & (adv_pred != y)
    order = np.concatenate([np.flatnonzero(fooled), np.flatnonzero(~fooled)])[:k]
    confidence = softmax(np.asarray(adv_logits)[order]).max(axis=1)
    return {"x": np.asarray(x)[order], "x_adv": np.asarray(x_adv)[order], "y": y[order].astype(np.int64),
            "clean_pred": clean_pred[order], "adv_pred": adv_pred[order], "adv_confidence": confidence}


def examples_from_artifacts(artifacts: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                            logits: Callable[[np.ndarray], np.ndarray], *, k: int = EXAMPLES_MAX,
                            pool: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """The examples of every "{label}/x_adv" artifact of an evaluation, picked among its first
    ``pool`` samples; ``x``, ``y`` are the evaluated samples and ``logits`` the model."""
    x, y = x[:pool], y[:pool]
    clean_logits = logits(x)
    chosen = {}
    for name, x_adv in artifacts.items():
        if name.endswith("/x_adv"):
            x_adv = x_adv[:pool]
            label = name.removesuffix("/x_adv")
            chosen[label] = select_examples(x, y, x_adv, clean_logits, logits(x_adv), k=k)
    return chosen


def entry_label(entry: AttackResult) -> str:
    """The label of an attack entry in ``examples``: "pgd@0.1", or "deepfool" without a budget."""
    return entry.attack if entry.eps is None else f"{entry.attack}@{entry.eps:g}"


# ---------------------------------------------------------------------------- formatting


@overload
def _float(value: float) -> float: ...
@overload
def _float(value: object) -> float | None: ...
def _float(value) -> float | None:
    """A float from a result value; JSON documents spell infinity "Infinity"."""
    if value is None or isinstance(value, jinja2.Undefined):  # a key an older document lacks
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt_pct(value) -> str:
    """An accuracy or rate as a percentage: 0.2931 -> "29.31%"."""
    value = _float(value)
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def fmt_num(value) -> str:
    """Any other number, four significant digits: 1.46632 -> "1.466"."""
    value = _float(value)
    if value is None or math.isnan(value):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.4g}"


def fmt_eps(value) -> str:
    value = _float(value)
    return "–" if value is None else f"{value:g}"


def fmt_seconds(value) -> str:
    value = _float(value)
    if value is None:
        return "–"
    return f"{value:.1f} s" if value < 120 else f"{int(value // 60)} min {value % 60:.0f} s"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=fmt_pct, num=fmt_num, eps=fmt_eps, seconds=fmt_seconds)
    return env


def _plot_text(text: str) -> str:
    """User text drawn by matplotlib: no mathtext, and a leading "_" would hide a legend entry."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------- summary and gates


def _summary(result: EvaluationResult, model_name, dataset_name, evaluation_id) -> dict:
    model_sha, data_sha = result.model.get("sha256", ""), result.dataset.get("sha256", "")
    return {
        "model": model_name or f"sha256 {model_sha[:12]}",
        "model_sha": model_sha[:12] if model_name else None,
        "input_shape": [("N" if i == 0 else "?") if d is None else d  # a symbolic axis
                        for i, d in enumerate(result.model.get("input_shape") or [])] or None,
        "num_classes": result.model.get("num_classes"),
        "dataset": dataset_name or f"sha256 {data_sha[:12]}",
        "dataset_sha": data_sha[:12] if dataset_name else None,
        "samples": result.dataset.get("samples"),
        "evaluation_id": evaluation_id,
        "device": result.device,
        "duration": result.timing.get("total"),
        "clean_accuracy": result.clean_accuracy,
        "verdict": result.verdict if result.gates else None,
        "input_range": list(result.spec.input.range),
        "seed": result.spec.seed,
    }


def _gate(gate) -> dict:
    bounds = []
    if gate.min is not None:
        bounds.append(f"≥ {fmt_num(gate.min)}")
    if gate.max is not None:
        bounds.append(f"≤ {fmt_num(gate.max)}")
    if gate.baseline is not None:
        reference = "" if gate.baseline_value is None else f" ({fmt_num(gate.baseline_value)})"
        bounds.append(f"baseline {gate.baseline}{reference} − {fmt_num(gate.max_drop)}")
    return {"metric": gate.metric, "attack": gate.attack, "eps": gate.eps, "norm": gate.norm,
            "bounds": ", ".join(bounds), "value": gate.value, "passed": gate.passed, "verdict": gate.verdict,
            "accepted_inconclusive": gate.accepted_inconclusive, "reason": gate.reason}


# ---------------------------------------------------------------------------- accuracy


def _targeted(result: EvaluationResult) -> set[str]:
    return {a.key for a in result.spec.attacks if a.targeted}


def _accuracy_section(result: EvaluationResult) -> dict:
    targeted = _targeted(result)
    groups: dict[str | None, list[AttackResult]] = {}
    for entry in result.attacks:
        groups.setdefault(entry.norm, []).append(entry)
    plots = []
    certified = list(result.certify.entries) if result.certify else []
    for norm, entries in groups.items():
        image = _accuracy_plot(result.clean_accuracy, norm, entries, targeted,
                               [c for c in certified if c.norm == norm])
        if image is not None:
            plots.append({"norm": norm or "noise", "image": image})
    rows = [{"attack": e.attack, "targeted": e.attack in targeted, "kind": e.kind, "norm": e.norm,
             "eps": e.eps, "robust_accuracy": e.robust_accuracy, "success_rate": e.success_rate,
             "mean_l2": e.mean_l2, "mean_linf": e.mean_linf, "distortion": e.distortion,
             "confidence": e.mean_adv_confidence} for e in result.attacks]
    return {"plots": plots, "rows": rows}


# any other norm is shown by its name in capitals
_NORM_NAMES: dict[str | None, str] = {"linf": "L∞", "l2": "L2"}


def _accuracy_plot(clean: float, norm: str | None, entries: list[AttackResult], targeted: set[str],
                   certified: list | None = None):
    """Robust accuracy against the budget per attack; with ``certified`` entries, each method's
    certified accuracy too, and the band between it and the attacks' lowest accuracy, where the
    true robust accuracy lies."""
    figure = Figure(figsize=(7, 3.8))
    ax = figure.add_subplot()
    curves: dict[str, list[tuple[float, float]]] = {}
    for entry in entries:
        if entry.eps is not None:
            curves.setdefault(entry.attack, [(0.0, clean)]).append((entry.eps, entry.robust_accuracy))
    drawn = 0
    for key, points in curves.items():
        eps, accuracy = zip(*sorted(points), strict=True)
        label = key + (" (targeted)" if key in targeted else "")
        ax.plot(eps, accuracy, marker="o", markersize=4, label=_plot_text(label), color=_COLORS[drawn % 10],
                linestyle=_LINES[drawn // 10 % 4])
        drawn += 1
    for entry in entries:
        curve = (entry.minimal or {}).get("curve")
        if entry.eps is None and curve:
            curve_eps = [_float(p["eps"]) for p in curve]
            bound = [_float(p["robust_accuracy_upper_bound"]) for p in curve]
            ax.plot(curve_eps, bound, linestyle="--", color=_COLORS[drawn % 10],
                    label=_plot_text(f"{entry.attack} (minimal: upper bound)"))
            drawn += 1
    methods: dict[str, list] = {}
    for entry in certified or []:
        methods.setdefault(entry.method, []).append(entry)
    for method, found in methods.items():
        bounds = sorted(found, key=lambda c: c.eps)
        color = _COLORS[drawn % 10]
        ax.plot([c.eps for c in bounds], [c.certified_accuracy for c in bounds], marker="s", markersize=4,
                linestyle=":", color=color, label=_plot_text(f"{method} (certified: lower bound)"))
        bracketed = [c for c in bounds if c.attacked_accuracy is not None]
        if bracketed:
            ax.fill_between([c.eps for c in bracketed], [c.certified_accuracy for c in bracketed],
                            [c.attacked_accuracy for c in bracketed], color=color, alpha=0.12,
                            label=_plot_text("true robust accuracy lies here"))
        drawn += 1
    if not drawn:
        return None
    shown = _NORM_NAMES.get(norm, (norm or "").upper())
    ax.set_xlabel(f"ε ({shown}, pixel units)" if norm else "noise magnitude (std)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(f"{shown} budget" if norm else "random noise")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=1 + drawn // 16)
    return _png(figure)


# ---------------------------------------------------------------------------- minimal perturbations


def _minimal_section(result: EvaluationResult) -> dict | None:
    entries = [e for e in result.attacks if e.kind == "minimal" and e.minimal]
    if not entries:
        return None
    rows = []
    for entry in entries:
        assert entry.minimal is not None  # kept above only with a minimal section
        quantiles = entry.minimal.get("quantiles") or {}
        rows.append({"attack": entry.attack, "norm": entry.norm,
                     "quantiles": [quantiles.get(k) for k in ("p5", "p25", "p50", "p75", "p95")],
                     "mean_l2": entry.mean_l2, "median_l2": entry.median_l2, "mean_linf": entry.mean_linf,
                     "rho": entry.rho, "success_rate": entry.success_rate})
    norms: dict[str | None, list[AttackResult]] = {}
    for entry in entries:
        norms.setdefault(entry.norm, []).append(entry)
    plots = [image for norm, group in norms.items() if (image := _quantile_plot(norm, group))]
    return {"rows": rows, "plots": plots}


def _quantile_plot(norm: str | None, entries: list[AttackResult]) -> str | None:
    """Box and whiskers per attack: p5 and p95 whiskers, p25 to p75 box, the median."""
    stats: list[tuple[str, list[float]]] = []
    for entry in entries:
        assert entry.minimal is not None  # _minimal_section passes only entries with a minimal section
        q = entry.minimal.get("quantiles") or {}
        read = [_float(q.get(k)) for k in ("p5", "p25", "p50", "p75", "p95")]
        known = [v for v in read if v is not None]
        if len(known) == len(read):  # all five quantiles are known
            stats.append((entry.attack, known))
    if not stats:
        return None
    finite = [v for _, values in stats for v in values if math.isfinite(v)]
    top = (max(finite) if finite else 1.0) * 1.1 or 1.0
    figure = Figure(figsize=(7, 0.9 + 0.5 * len(stats)))
    ax = figure.add_subplot()
    for row, (_, values) in enumerate(stats):
        p5, p25, p50, p75, p95 = (min(v, top) for v in values)
        ax.plot([p5, p95], [row, row], color="0.3", linewidth=1)
        ax.plot([p5, p5], [row - 0.15, row + 0.15], color="0.3", linewidth=1)
        ax.add_patch(_box(p25, p75, row))
        ax.plot([p50, p50], [row - 0.25, row + 0.25], color="black", linewidth=2)
        if math.isinf(values[-1]):
            ax.annotate("∞", (top, row), xytext=(3, 0), textcoords="offset points", va="center")
        else:
            ax.plot([p95, p95], [row - 0.15, row + 0.15], color="0.3", linewidth=1)
    ax.set_yticks(range(len(stats)), [_plot_text(name) for name, _ in stats])
    ax.set_ylim(-0.6, len(stats) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.05)
    ax.set_xlabel(f"minimal perturbation ({'L∞' if norm == 'linf' else 'L2'}, pixel units): "
                  "5th, 25th, 50th, 75th, 95th percentiles")
    ax.grid(axis="x", alpha=0.3)
    return _png(figure)


def _box(low: float, high: float, row: int) -> Rectangle:
    return Rectangle((low, row - 0.25), high - low, 0.5, facecolor="#9ecae1", edgecolor="0.2")


# ---------------------------------------------------------------------------- examples


def _examples_section(result: EvaluationResult, examples: dict[str, dict]) -> dict | None:
    """The grids, within EXAMPLE_BUDGET: each entry gets an even share of what is left (at
    least one example while the budget lasts); the entries past the budget are named."""
    low, high = result.spec.input.range
    layout = result.spec.input.layout
    pending = [(entry, label) for entry in result.attacks if examples.get(label := entry_label(entry))]
    names = result.dataset.get("classes")  # an image zip's class names, which its labels index
    if not isinstance(names, list) or len(names) != result.model.get("num_classes"):
        names = None
    budget = EXAMPLE_BUDGET * 4 // 3  # base64 of the PNG bytes
    grids, left_out, spent = [], [], 0
    for index, (entry, label) in enumerate(pending):
        sample = examples[label]
        share = (budget - spent) / (len(pending) - index)
        rows: list[dict] = []
        size = 0
        for row in _example_rows(label, sample, low, high, layout, names):
            cost = sum(len(image["src"]) for image in row["images"])
            if size + cost > share and (rows or spent + cost > budget):
                break
            rows.append(row)
            size += cost
        if not rows:
            left_out.append(label)
            continue
        spent += size
        grids.append({"label": label, "attack": entry.attack, "eps": entry.eps, "norm": entry.norm,
                      "kind": entry.kind, "rows": rows, "given": min(EXAMPLES_MAX, len(sample["x"]))})
    if not pending:
        return None
    return {"grids": grids, "left_out": left_out}


def _example_rows(label: str, sample: dict, low: float, high: float, layout: str,
                  names: list[str] | None = None) -> Iterator[dict]:
    """One example after the other (encoding is the costly part: the caller stops when full).
    Classes are shown by ``names`` where given (``class`` maps each to its name and index)."""
    missing = [k for k in _EXAMPLE_KEYS if k not in sample]
    if missing:
        raise ValueError(f"examples[{label!r}] lacks {missing}")
    x = np.asarray(sample["x"], np.float64)[:EXAMPLES_MAX]
    x_adv = np.asarray(sample["x_adv"], np.float64)[:EXAMPLES_MAX]
    if x.ndim != 4 or x.shape != x_adv.shape:
        raise ValueError(f"examples[{label!r}]: `x` and `x_adv` must be [k, C, H, W] (or [k, H, W, C] "
                         f"for NHWC) of one shape, got {list(x.shape)} and {list(x_adv.shape)}")
    if layout == "NCHW":
        x, x_adv = x.transpose(0, 2, 3, 1), x_adv.transpose(0, 2, 3, 1)
    for i in range(len(x)):
        r = x_adv[i] - x[i]
        peak = float(np.abs(r).max())
        shown = 0.5 + 0.5 * r / peak if peak > 0 else np.full_like(r, 0.5)
        y, clean_pred = int(sample["y"][i]), int(sample["clean_pred"][i])
        adv_pred = int(sample["adv_pred"][i])
        yield {
            "y": y, "clean_pred": clean_pred, "adv_pred": adv_pred,
            "class": {k: {"index": k, "name": names[k] if names else None}
                      for k in (y, clean_pred, adv_pred)},
            "confidence": float(sample["adv_confidence"][i]),
            "fooled": int(sample["adv_pred"][i]) != int(sample["y"][i]),
            "linf": peak, "l2": float(np.linalg.norm(r)),
            "amplification": 0.5 * (high - low) / peak if peak > 0 else None,
            "images": [_image((x[i] - low) / (high - low), "original"), _image(shown, "perturbation"),
                       _image((x_adv[i] - low) / (high - low), "adversarial")],
        }


def _image(unit: np.ndarray, alt: str) -> dict:
    """An [H, W, C] image in [0, 1] as an embedded PNG, at most EXAMPLE_SIDE pixels a side."""
    pixels = np.round(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] != 3 else Image.fromarray(pixels, "RGB")
    if max(image.size) > EXAMPLE_SIDE:
        scale = EXAMPLE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BOX)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    zoom = max(1, math.ceil(EXAMPLE_DISPLAY / max(image.size)))
    return {"src": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
            "width": image.width * zoom, "height": image.height * zoom, "pixelated": zoom > 1, "alt": alt}


# ---------------------------------------------------------------------------- transfer


def _transfer_entry(entry: TransferEntry) -> dict:
    header, *rows = entry.table
    targets = [str(t) for t in header[1:-1]]
    names = [str(row[0]) for row in rows]
    errors = np.array([[np.nan if v is None else float(v) for v in row[1:-1]] for row in rows], np.float64)
    distortion = [_float(row[-1]) for row in rows]
    kinds = ["clean"] + ["noise" if row.is_baseline else "source" for row in entry.rows]  # the table's rows
    table = [{"name": name, "errors": list(errors[i]), "distortion": distortion[i], "kind": kinds[i]}
             for i, name in enumerate(names)]
    return {"attack": entry.attack, "targets": targets, "rows": table,
            "image": _heatmap(names, targets, errors, distortion), "pairs": entry.cross_pairs}


def _heatmap(names: list[str], targets: list[str], errors: np.ndarray, distortion: list) -> str:
    figure = Figure(figsize=(1.8 + 1.0 * len(targets) + 1.2, 0.8 + 0.4 * len(names)))
    ax = figure.add_subplot()
    ax.imshow(np.ma.masked_invalid(100 * errors), cmap="Reds", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(errors):
        text = "–" if np.isnan(value) else f"{100 * value:.1f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9,
                color="white" if not np.isnan(value) and value > 0.6 else "black")
    for i, value in enumerate(distortion):
        ax.text(len(targets) - 0.35, i, fmt_num(value), ha="left", va="center", fontsize=9)
    ax.text(len(targets) - 0.35, -0.75, "av. distortion", ha="left", va="bottom", fontsize=9)
    ax.set_xticks(range(len(targets)), [_plot_text(t) for t in targets])
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(names)), [_plot_text(n) for n in names])
    ax.set_xlabel("error % on the target model", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _png(figure)


# ---------------------------------------------------------------------------- defenses and the rest


def _defense(entry: DefenseResult) -> dict:
    return {**dict(entry), "params_text": ", ".join(f"{k}={v}" for k, v in entry.params.items()),
            "curve_image": _noise_curve(entry.defense, entry.curve) if entry.curve else None}


def _noise_curve(key: str, curve: list[CurvePoint]) -> str:
    figure = Figure(figsize=(7, 3.8))
    ax = figure.add_subplot()
    magnitudes = [_float(p.magnitude) for p in curve]
    ax.plot(magnitudes, [_float(p.clean_accuracy) for p in curve], marker="o", color="black",
            linewidth=2, label="clean")
    lines: dict[tuple[str, float | None], list[float]] = {}
    for point in curve:
        for run in point.attacks:
            lines.setdefault((run.attack, run.eps), []).append(_float(run.accuracy))
    attacks = list(dict.fromkeys(attack for attack, _ in lines))  # one colour per attack, a dash per eps
    budgets = {attack: sorted(e for a, e in lines if a == attack and e is not None) for attack in attacks}
    for (attack, eps), accuracy in lines.items():
        if len(accuracy) == len(magnitudes):
            name = attack + ("" if eps is None else f" @ {eps:g}")
            style = 0 if eps is None else budgets[attack].index(eps)
            ax.plot(magnitudes, accuracy, marker=".", linewidth=1, label=_plot_text(name),
                    color=_COLORS[attacks.index(attack) % 10], linestyle=_LINES[style % 4])
    ax.set_xlabel("noise magnitude")
    ax.set_ylabel("accuracy through the defense")
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.set_title(_plot_text(f"{key}: accuracy against the noise magnitude (non-adaptive)"), fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=1 + len(lines) // 18)
    return _png(figure)
