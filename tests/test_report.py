"""The HTML report: one real evaluation on the demo digits (attacks, a minimal attack, gates,
transfer, defenses, Lipschitz bounds) rendered with its examples; sections follow the stages
that ran, numbers equal the result's, images are PNGs, user strings are escaped, and the
size stays bounded however many entries and examples there are."""

from __future__ import annotations

import base64
import copy
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.evaluation import EvaluationResult, EvaluationSpec
from tests.digits import onnx_bytes
from workers.datasets import load_npz
from workers.evaluate import evaluate
from workers.report import (
    EXAMPLE_SIDE,
    entry_label,
    examples_from_artifacts,
    fmt_num,
    fmt_pct,
    render_report,
)
from workers.runtime import Classifier

ROOT = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SECTIONS = ("gates", "accuracy", "minimal", "examples", "transfer", "defenses", "lipschitz", "fooling")
SPEC = {
    "samples": 40,
    "attacks": [
        {"name": "fgsm", "eps": [0.05, 0.1]},
        {"name": "pgd", "eps": [0.1], "steps": 5},
        {"name": "deepfool"},
    ],
    "gates": [
        {"metric": "clean_accuracy", "min": 0.5},
        {"metric": "robust_accuracy", "attack": "pgd", "eps": 0.1, "min": 0.99},
    ],
    "defenses": [
        {"name": "pca", "variance": 0.99, "fit_samples": 300, "adaptive": False},
        {"name": "gaussian_noise", "sigma": 0.2, "curve": [0.1, 0.3], "eot_samples": 2},
    ],
    "lipschitz": True,
    "fooling": {"samples": 50, "steps": 2},
    "transfer": {"models": {"fc100": "fc100.onnx"}, "attacks": [{"name": "fgsm", "eps": [0.1]}]},
}


@pytest.fixture(scope="module")
def run():
    model = (ROOT / "examples" / "digits-cnn.onnx").read_bytes()
    dataset = load_npz((ROOT / "examples" / "digits-test.npz").read_bytes())
    spec = EvaluationSpec.model_validate(SPEC)
    evaluation = evaluate(model, dataset, spec, models={"fc100": onnx_bytes("fc100")})
    x, y = dataset.x[: SPEC["samples"]], dataset.y[: SPEC["samples"]]
    examples = examples_from_artifacts(evaluation.artifacts, x, y, Classifier(model).logits)
    return evaluation.result, examples


@pytest.fixture(scope="module")
def html(run):
    result, examples = run
    return render_report(
        result, examples, model_name="digits-cnn", dataset_name="digits-test", evaluation_id="ev-1"
    )


class _Tables(HTMLParser):
    """The text of every table cell, per table, per section id."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, list[list[list[str]]]] = {}
        self.section = None
        self.cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("section", "header"):
            self.section = attrs.get("id")
        elif tag == "table":
            self.sections.setdefault(self.section, []).append([])
        elif tag == "tr":
            self.sections[self.section][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.sections[self.section][-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def tables(html: str) -> dict[str, list[list[list[str]]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.sections


def section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}">')
    return html[start : html.index("</section>", start)]


def bare(result: EvaluationResult) -> dict:
    """The result as if only the per-sample attacks had run, without gates or minimal attacks."""
    document = result.model_dump(mode="json")
    document["attacks"] = [a for a in document["attacks"] if a["kind"] != "minimal"]
    document["spec"]["attacks"] = [a for a in document["spec"]["attacks"] if a["name"] != "deepfool"]
    document["spec"].update(transfer=None, defenses=[], lipschitz=False, gates=[], fooling=None)
    document.update(transfer=None, defenses=None, lipschitz=None, gates=[], fooling=None)
    return document


def test_every_stage_that_ran_has_its_section_and_no_other(run, html):
    result, _ = run
    present = {s for s in SECTIONS if f'id="{s}"' in html}
    assert present == set(SECTIONS)
    fooling = section(html, "fooling")
    assert fmt_pct(result.fooling.noise.fooling_rate) in fooling and "Gradient ascent from noise" in fooling
    stripped = render_report(bare(result))
    assert {s for s in SECTIONS if f'id="{s}"' in stripped} == {"accuracy"}
    assert 'href="#transfer"' not in stripped and "Lipschitz" not in stripped
    assert render_report(bare(result)) == stripped  # deterministic: no timestamps or versions in the PNGs


def test_the_numbers_are_the_results(run, html):
    result, _ = run
    assert fmt_pct(0.2931) == "29.31%" and fmt_num(1.46632) == "1.466" and fmt_num(float("inf")) == "∞"
    assert f'id="clean-accuracy"><strong>{fmt_pct(result.clean_accuracy)}</strong>' in html
    found = tables(html)
    gates = found["gates"][0][1:]
    assert [(row[0], row[5], row[6]) for row in gates] == [
        (g.metric, fmt_num(g.value), "PASSED" if g.passed else "FAILED") for g in result.gates
    ]
    assert gates[1][6] == "FAILED" and "FAILED" in html.split('id="gates"')[0]  # the verdict in the header
    entries = found["accuracy"][0][1:]
    assert [row[:5] for row in entries] == [
        [e.attack, e.kind, e.norm or "–", "–" if e.eps is None else f"{e.eps:g}", fmt_pct(e.robust_accuracy)]
        for e in result.attacks
    ]
    minimal = found["minimal"][0][1]
    quantiles = result.attacks[-1].minimal["quantiles"]
    assert minimal[:7] == ["deepfool", "l2", *(fmt_num(quantiles[f"p{q}"]) for q in (5, 25, 50, 75, 95))]
    transfer = result.transfer[0].table
    shown = found["transfer"][0]
    assert shown[0] == [str(h) for h in transfer[0]]
    assert [row[1:-1] for row in shown[1:]] == [[fmt_pct(v) for v in row[1:-1]] for row in transfer[1:]]
    for defense, table in zip(result.defenses, found["defenses"], strict=True):
        assert [row[2:] for row in table[1:]] == [
            [fmt_pct(r.bare), fmt_pct(r.non_adaptive), fmt_pct(r.adaptive), fmt_pct(r.worst_case)]
            for r in defense.attacks
        ]
    flagged = sum(r.flagged for d in result.defenses for r in d.attacks)
    assert html.count('<tr class="flagged">') == flagged
    bound = result.lipschitz.network_bound
    assert f'<strong id="network-bound">{fmt_num(bound)}</strong>' in html
    assert len(found["lipschitz"][0]) == 1 + len(result.lipschitz.layers)


def test_every_image_is_an_embedded_png_and_nothing_is_fetched(html):
    sources = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(sources) > 10
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            assert image.width > 0 and image.height > 0
    assert "http://" not in html and "https://" not in html and "<script" not in html
    # the only <link> is an empty inline favicon, so a browser does not ask the server for one
    links = re.findall(r"<link[^>]*>", html)
    assert links == ['<link rel="icon" href="data:,">'] and "@import" not in html


def test_the_example_grid_shows_original_perturbation_and_adversarial_per_example(run, html):
    result, examples = run
    grid = section(html, "examples")
    labels = [entry_label(e) for e in result.attacks]
    assert set(examples) == set(labels) and all(len(examples[k]["y"]) == 8 for k in labels)
    cards = grid.split('<div class="example">')[1:]
    assert len(cards) == 8 * len(labels)
    for card in cards:
        assert re.findall(r'alt="(\w+)"', card) == ["original", "perturbation", "adversarial"]
    # the first example of pgd: its perturbation image is x_adv - x around mid-grey, scaled to the range
    sample = examples["pgd@0.1"]
    first = grid.split("<h3>pgd")[1].split('<div class="example">')[1]
    original, perturbation, adversarial = (
        np.asarray(Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))), np.float64)
        for s in re.findall(r'src="([^"]+)"', first)
    )
    np.testing.assert_allclose(original / 255, sample["x"][0, 0], atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(adversarial / 255, sample["x_adv"][0, 0], atol=0.5 / 255 + 1e-6)
    r = sample["x_adv"][0, 0].astype(np.float64) - sample["x"][0, 0]
    np.testing.assert_allclose(perturbation / 255, 0.5 + 0.5 * r / np.abs(r).max(), atol=0.5 / 255 + 1e-6)
    assert f"true {sample['y'][0]} · pred {sample['clean_pred'][0]}" in first
    assert f"{fmt_pct(sample['adv_confidence'][0])}" in first


def test_nhwc_colour_examples_are_shown_in_colour_and_downscaled(run):
    result, _ = run
    document = result.model_dump(mode="json")
    document["spec"]["input"]["layout"] = "NHWC"
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 200, 150, 3)).astype(np.float32)
    sample = {
        "x": x,
        "x_adv": np.clip(x + 0.03, 0, 1),
        "y": np.array([1, 2]),
        "clean_pred": np.array([1, 2]),
        "adv_pred": np.array([3, 2]),
        "adv_confidence": np.array([0.9, 0.6]),
    }
    html = render_report(document, {"fgsm@0.1": sample})
    grid = section(html, "examples")
    sources = re.findall(r'src="([^"]+)"', grid)
    assert len(sources) == 6
    for source in sources:
        image = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert image.mode == "RGB" and image.size == (round(150 * EXAMPLE_SIDE / 200), EXAMPLE_SIDE)
    assert "true 1 · pred 1" in grid  # no class names: the indices
    # an image zip's class names (which its labels index) name the classes, with the index as a title
    document["dataset"]["classes"] = [f"class_{k}" for k in range(document["model"]["num_classes"])]
    grid = section(render_report(document, {"fgsm@0.1": sample}), "examples")
    assert 'true <span title="class 1">class_1</span> · pred <span title="class 1">class_1</span>' in grid
    assert '<span class="failed"><span title="class 3">class_3</span></span>' in grid
    document["dataset"]["classes"] = ["too", "few"]  # not the model's classes: indices again
    assert "true 1 · pred 1" in section(render_report(document, {"fgsm@0.1": sample}), "examples")
    with pytest.raises(ValueError, match="adv_pred"):
        render_report(document, {"fgsm@0.1": {k: v for k, v in sample.items() if k != "adv_pred"}})


def test_user_strings_are_escaped(run):
    result, examples = run
    document = result.model_dump(mode="json")
    for entry in document["attacks"]:
        if entry["attack"] == "pgd":
            entry["attack"] = XSS
    for spec_attack in document["spec"]["attacks"]:
        if spec_attack["name"] == "pgd":
            spec_attack["label"] = XSS
    document["spec"]["gates"][1]["attack"] = document["gates"][1]["attack"] = XSS
    document["defenses"][0]["defense"] = XSS
    document["defenses"][1]["curve"][0]["attacks"][0]["attack"] = XSS
    document["lipschitz"]["layers"][0]["node"] = XSS
    document["warnings"] = [XSS]
    document["dataset"]["classes"] = [XSS] * document["model"]["num_classes"]
    document["attacks"][0]["attack"] = "_fgsm $\\frac{$"  # no mathtext in plots, nor a hidden legend entry
    examples = {**examples, f"{XSS}@0.1": examples["pgd@0.1"]}
    html = render_report(document, examples, model_name=XSS, dataset_name=XSS, evaluation_id=XSS)
    assert XSS not in html and "<script" not in html
    assert html.count(ESCAPED) >= 10
    assert f"<title>Robustness report: {ESCAPED}</title>" in html
    assert f"<h3>{ESCAPED} " in section(html, "examples")  # the grid of the renamed attack is there


def test_the_size_is_bounded_by_the_plots_and_the_example_budget(run):
    result, _ = run
    document = copy.deepcopy(result.model_dump(mode="json"))
    template = next(a for a in document["attacks"] if a["attack"] == "pgd")
    document["attacks"] = [
        {**template, "attack": f"pgd{i}", "eps": eps, "norm": ("linf", "l2")[i % 2]}
        for i in range(12)
        for eps in (0.01, 0.02, 0.05, 0.1, 0.2)
    ] + [a for a in document["attacks"] if a["kind"] == "minimal"]
    rng = np.random.default_rng(0)
    digits = {
        entry_label(EvaluationResult.model_validate(document).attacks[i]): {
            "x": rng.uniform(0, 1, (8, 1, 28, 28)),
            "x_adv": rng.uniform(0, 1, (8, 1, 28, 28)),
            "y": np.arange(8),
            "clean_pred": np.arange(8),
            "adv_pred": np.arange(8)[::-1],
            "adv_confidence": np.full(8, 0.5),
        }
        for i in range(len(document["attacks"]))
    }
    html = render_report(document, digits)
    assert len(html) < 3_000_000
    assert section(html, "examples").count('<div class="example">') == 8 * len(digits)  # all of them fit
    # incompressible 224x224 colour images: each entry gets fewer examples, the last ones none
    shape = (8, 3, 224, 224)
    large = {
        label: {**sample, "x": rng.uniform(0, 1, shape), "x_adv": rng.uniform(0, 1, shape)}
        for label, sample in list(digits.items())[:20]
    }
    html = render_report(document, large)
    assert len(html) < 3_000_000
    grid = section(html, "examples")
    assert "Left out to keep the report small: " in grid
    shown = (r"\(linf\)</span>\s*<span class=\"muted\">&nbsp;"
             r"\(\d+ of 8 examples shown, to keep the report small\)")
    assert re.search(shown, grid)  # set apart from the budget before it
    assert 0 < grid.count('<div class="example">') < 8 * len(large)


def test_an_inconclusive_gate_shows_as_such_with_its_reason(run):
    result, examples = run
    document = result.model_dump(mode="json")
    masked = "pgd (linf, eps=0.1): the cross_entropy gradient is zero for 91% of the 35 correctly classified"
    gate, allowed = copy.deepcopy(document["gates"][1]), copy.deepcopy(document["gates"][1])
    gate.update(min=0.0, passed=False, verdict="inconclusive", reason=f"inconclusive: {masked}",
                warnings=[masked])
    allowed.update(min=0.0, passed=True, verdict="passed", allow_inconclusive=True,
                   accepted_inconclusive=True, warnings=[masked],
                   reason=f"accepted as inconclusive (allow_inconclusive): {masked}")
    document.update(gates=[document["gates"][0], gate, allowed], passed=False, verdict="inconclusive")
    html = render_report(EvaluationResult.model_validate(document), examples)
    rows = tables(html)["gates"][0][1:]
    assert [row[6] for row in rows] == ["PASSED", "INCONCLUSIVE", "PASSED (inconclusive, allowed)"]
    assert rows[1][7].startswith("inconclusive: pgd (linf, eps=0.1)")
    header = html.split('id="gates"')[0]
    assert "INCONCLUSIVE" in header and "FAILED" not in header
