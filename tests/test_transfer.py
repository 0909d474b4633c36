"""Cross-model transfer on the digits models: Szegedy et al.'s (2014) table 3 findings, Liang et
al.'s (2017) cross-testing and universal perturbations on other models.

The findings reproduced: minimal adversarial examples fool their own model (the diagonal is
~100%), a clear share of them fool the other models too, and Gaussian noise of the same
average distortion hardly changes any model's error. Models and data: tests/digits.py (fc10
is softmax regression, fc100 and fc200 two hidden layers, cnn a small convnet), the first
200 held-out images.

Margins. Over three training seeds of the four models and three disjoint slices of 200
held-out images (9 tables measured with DeepFool), each row's mean off-diagonal error
exceeded its matched noise row's error on the same models by 0.062 to 0.225 (the cnn row,
whose examples transfer least, gives the smallest gaps), the whole table's by 0.135 to
0.172, and every noise row stayed within a point or two of the clean error. The thresholds
(0.03 per row, 0.08 over the table) leave about twice the binomial standard error of a mean
of three 200-sample error rates (~1.5 points) beneath the smallest gap seen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import digits
from workers import metrics
from workers.attacks.deepfool import DeepFool
from workers.attacks.gradient import FGSM
from workers.attacks.lbfgs import LBFGS
from workers.attacks.noise import GaussianNoise
from workers.attacks.universal import UniversalPerturbation, apply_universal
from workers.runtime import Classifier, RuntimeOptions
from workers.transfer import (
    TransferMatrix,
    attack_seed,
    cross_test_pairs,
    matched_noise,
    noise_seed,
    szegedy_distortion,
    transfer_matrix,
    universal_transfer,
)

NAMES = ["fc10", "fc100", "fc200", "cnn"]
N = 200


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models() -> dict[str, Classifier]:
    options = RuntimeOptions(intra_op_threads=1)
    return {name: Classifier(digits.onnx_bytes(name), options) for name in NAMES}


@pytest.fixture(scope="module")
def data():
    _, _, x, y = digits.digits()
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def deepfool_matrix(models, data) -> TransferMatrix:
    x, y = data
    matrix = transfer_matrix(models, NAMES, NAMES, x, y, DeepFool(), seed=0)
    print(f"\nDeepFool (L2) transfer on {N} held-out digits, error rates:\n{matrix.as_text()}")
    return matrix


def off_diagonal(row, targets) -> float:
    source = row.source if row.source in targets else None
    return float(np.mean([row.error_rates[t] for t in targets if t != source]))


def baseline_of(matrix: TransferMatrix, row):
    (noise,) = [r for r in matrix.noise_rows() if r.baseline_for == row.label]
    return noise


def test_minimal_examples_fool_their_own_model(deepfool_matrix):
    rows = deepfool_matrix.attack_rows()
    assert [r.source for r in rows] == NAMES and all(r.eps is None and r.attack == "deepfool" for r in rows)
    for row in rows:
        assert row.error_rates[row.source] >= 0.95
        assert row.success_on_source >= 0.95


def test_transfer_beats_gaussian_noise_of_the_same_distortion(deepfool_matrix):
    gaps = []
    for row in deepfool_matrix.attack_rows():
        others = [t for t in NAMES if t != row.source]
        noise = baseline_of(deepfool_matrix, row)
        transfer, by_noise = off_diagonal(row, NAMES), np.mean([noise.error_rates[t] for t in others])
        assert transfer >= by_noise + 0.03, (row.label, transfer, by_noise)
        # noise at this distortion leaves every model about as good as clean (Szegedy: 0% to 5%)
        clean = np.mean([deepfool_matrix.clean_error[t] for t in others])
        assert abs(by_noise - clean) <= 0.02
        gaps.append(transfer - by_noise)
    assert np.mean(gaps) >= 0.08


def test_noise_rows_match_each_rows_distortion(deepfool_matrix, models, data):
    x, y = data
    rows, noise_rows = deepfool_matrix.attack_rows(), deepfool_matrix.noise_rows()
    assert [n.baseline_for for n in noise_rows] == [r.label for r in rows]
    for row, noise in zip(rows, noise_rows, strict=True):
        assert noise.attack == "gaussian_noise" and noise.source == f"noise(std={noise.noise_std:.3g})"
        assert noise.distortion == pytest.approx(row.distortion, rel=1e-3)
        # clipping to [0, 1] removes much of the noise on the digits' saturated pixels
        assert noise.noise_std > noise.distortion
        # the baseline is exactly the gaussian_noise attack at eps = sigma with the row's seed
        run = GaussianNoise()(models["fc100"], x, y, eps=noise.noise_std, seed=noise_seed(0, row.label))[0]
        assert float(np.mean(szegedy_distortion(x, run.x_adv))) == pytest.approx(noise.distortion, rel=1e-6)
        assert noise.error_rates["fc100"] == 1 - metrics.accuracy(models["fc100"].predict(run.x_adv), y)


def test_distortion_is_the_metrics_module_s(deepfool_matrix, models, data):
    x, y = data
    for name in ("fc100", "cnn"):
        model = models[name]
        run = DeepFool()(model, x, y, seed=attack_seed(0, name))[0]
        clean_pred = model.predict(x)
        summary = metrics.attack_summary(x, y, clean_pred, run.x_adv, model.logits(run.x_adv), run.success,
                                         num_classes=10)
        fooled = run.success & (clean_pred == y)
        by_hand = np.sqrt(np.mean((run.x_adv.astype(np.float64) - x) ** 2, axis=(1, 2, 3)))[fooled].mean()
        row = deepfool_matrix.row(name)
        assert row.distortion == pytest.approx(summary["distortion"], rel=1e-9)
        assert row.distortion == pytest.approx(by_hand, rel=1e-5)
        # Szegedy's MNIST rows were 0.058 to 0.14; the digits upsampled from 8x8 are similar
        assert 0.02 < row.distortion < 0.1


def test_cross_test_pairs_read_both_directions(deepfool_matrix):
    pairs = cross_test_pairs(deepfool_matrix)
    assert [(p["a"], p["b"]) for p in pairs] == [(a, b) for i, a in enumerate(NAMES) for b in NAMES[i + 1:]]
    for pair in pairs:
        row_a, row_b = deepfool_matrix.row(pair["a"]), deepfool_matrix.row(pair["b"])
        assert pair["a_error_on_b_examples"] == row_b.error_rates[pair["a"]]
        assert pair["b_error_on_a_examples"] == row_a.error_rates[pair["b"]]
        assert (pair["a_distortion"], pair["b_distortion"]) == (row_a.distortion, row_b.distortion)
        assert pair["attack"] == "deepfool" and pair["eps"] is None
    # swapping the order of the sources swaps the roles, not the numbers
    swapped = TransferMatrix(sources=NAMES[::-1], targets=NAMES, rows=deepfool_matrix.rows,
                             clean_error=deepfool_matrix.clean_error)
    flipped = {(p["b"], p["a"]): (p["b_error_on_a_examples"], p["a_error_on_b_examples"])
               for p in cross_test_pairs(swapped)}
    for pair in pairs:
        expected = (pair["a_error_on_b_examples"], pair["b_error_on_a_examples"])
        assert flipped[(pair["a"], pair["b"])] == expected


def test_as_table_has_szegedy_s_layout(deepfool_matrix):
    table = deepfool_matrix.as_table()
    assert table[0] == ["", *NAMES, "av. distortion"]
    assert table[1] == ["clean", *(deepfool_matrix.clean_error[t] for t in NAMES), 0.0]
    assert [r[0] for r in table[2:6]] == NAMES
    assert all(r[0].startswith("Gaussian noise, stddev=") for r in table[6:])
    assert len(table) == 2 + 2 * len(NAMES) and all(len(r) == len(NAMES) + 2 for r in table)


def test_lbfgs_as_in_the_paper(models, data):
    """Szegedy et al.'s own attack on their FC100-100-10 / FC200-200-10 pair and FC10."""
    x, y = data[0][:60], data[1][:60]
    matrix = transfer_matrix(models, ["fc100", "fc200"], ["fc10", "fc100", "fc200"], x, y,
                             LBFGS(search_steps=3), seed=0)
    print(f"\nL-BFGS transfer on 60 held-out digits:\n{matrix.as_text()}")
    for row in matrix.attack_rows():
        assert row.error_rates[row.source] >= 0.95
        noise = baseline_of(matrix, row)
        others = [t for t in matrix.targets if t != row.source]
        # measured gaps 0.19 to 0.33 over two training seeds and 60 or 100 images
        assert off_diagonal(row, matrix.targets) >= np.mean([noise.error_rates[t] for t in others]) + 0.05


def test_fgsm_gives_one_row_per_source_and_budget(models, data):
    x, y = data
    matrix = transfer_matrix(models, NAMES, NAMES, x, y, FGSM(), eps=[0.05, 0.1], seed=3)
    print(f"\nFGSM transfer at eps 0.05 and 0.1:\n{matrix.as_text()}")
    rows = matrix.attack_rows()
    assert [(r.source, r.eps) for r in rows] == [(s, e) for s in NAMES for e in (0.05, 0.1)]
    assert len(matrix.noise_rows()) == len(rows)
    for source in NAMES:
        small, large = matrix.row(source, 0.05), matrix.row(source, 0.1)
        # sqrt(mean(r^2)) <= max|r| = eps; clipped saturated pixels make it smaller
        assert 0 < small.distortion < large.distortion <= 0.1 + 1e-6 and small.distortion <= 0.05 + 1e-6
        for target in NAMES:
            assert large.error_rates[target] >= small.error_rates[target]
        for row in (small, large):
            noise = baseline_of(matrix, row)
            assert off_diagonal(row, NAMES) >= np.mean(
                [noise.error_rates[t] for t in NAMES if t != source]) + 0.05
    assert len(cross_test_pairs(matrix)) == 2 * 6
    # deterministic given the seed; another seed changes only the noise (FGSM draws nothing)
    again = transfer_matrix(models, NAMES, NAMES, x, y, FGSM(), eps=[0.05, 0.1], seed=3)
    assert again.as_table() == matrix.as_table()
    other = transfer_matrix(models, NAMES, NAMES, x, y, FGSM(), eps=[0.05, 0.1], seed=4)
    assert other.as_table()[:2 + len(rows)] == matrix.as_table()[:2 + len(rows)]
    assert [r.noise_std for r in other.noise_rows()] != [r.noise_std for r in matrix.noise_rows()]


def test_sources_need_not_be_targets(models, data):
    x, y = data[0][:40], data[1][:40]
    matrix = transfer_matrix(models, ["fc100"], ["fc10", "cnn"], x, y, FGSM(), eps=0.1,
                             noise_baseline=False)
    (row,) = matrix.rows
    assert set(row.error_rates) == {"fc10", "cnn"} and set(matrix.clean_error) == {"fc10", "cnn"}
    assert row.success_on_source is not None and cross_test_pairs(matrix) == []


def test_progress_reports_each_source(models, data):
    x, y = data[0][:20], data[1][:20]
    seen = []
    transfer_matrix(models, ["fc10", "fc100"], ["fc10"], x, y, FGSM(), eps=[0.1, 0.2],
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert {s for s, _, _ in seen} == {"fc10", "fc100"}
    assert seen[0] == ("fc10", 0, 40) and seen[-1] == ("fc100", 40, 40)
    assert all(0 <= done <= total == 40 for _, done, total in seen)


def test_invalid_arguments_are_named(models, data):
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(ValueError, match="`sources` names models not in `models`"):
        transfer_matrix(models, ["resnet"], NAMES, x, y, DeepFool())
    with pytest.raises(ValueError, match="`targets` names a model twice"):
        transfer_matrix(models, ["fc10"], ["fc10", "fc10"], x, y, DeepFool())
    with pytest.raises(ValueError, match="`targets` must name at least one model"):
        transfer_matrix(models, ["fc10"], [], x, y, DeepFool())
    with pytest.raises(ValueError, match="takes no `eps`"):
        transfer_matrix(models, ["fc10"], ["fc10"], x, y, DeepFool(), eps=0.1)
    with pytest.raises(ValueError, match="needs `eps`"):
        transfer_matrix(models, ["fc10"], ["fc10"], x, y, FGSM())


def test_matched_noise_reaches_the_distortion_or_its_cap():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(16, 1, 8, 8)).astype(np.float32)
    z = rng.standard_normal(size=x.shape, dtype=np.float32)
    for target in (0.01, 0.1, 0.3):
        sigma, x_noise, measured = matched_noise(x, z, target, (0.0, 1.0))
        assert measured == pytest.approx(target, rel=1e-4)
        assert float(np.mean(szegedy_distortion(x, x_noise))) == measured
        assert x_noise.min() >= 0 and x_noise.max() <= 1 and sigma > 0
    cap = float(np.mean(szegedy_distortion(x, np.where(z > 0, 1.0, 0.0).astype(np.float32))))
    _, _, measured = matched_noise(x, z, 0.9, (0.0, 1.0))  # beyond what the box allows
    assert measured == pytest.approx(cap, rel=1e-3)
    assert matched_noise(x, z, 0.0, (0.0, 1.0))[0] == 0.0


def test_universal_perturbation_transfers_more_than_noise_of_its_norm(models):
    """Liang et al.'s measure: each model's accuracy on universally perturbed held-out data."""
    x_train, y_train, x_test, y_test = digits.digits()
    run = UniversalPerturbation(max_passes=4)(models["fc100"], x_train[:200], y_train[:200], eps=0.2)[0]
    v = run.extra["perturbation"]
    noise = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
    noise *= np.linalg.norm(v) / np.linalg.norm(noise)
    x, y = x_test[:300], y_test[:300]
    clean = universal_transfer(np.zeros_like(v), models, x, y)
    perturbed = universal_transfer(v, models, x, y)
    noisy = universal_transfer(noise, models, x, y)
    print(f"\nuniversal (fc100, linf 0.2, L2 {np.linalg.norm(v):.2f}) accuracy on 300 held-out digits: "
          + ", ".join(f"{n} {clean[n]:.3f} -> {perturbed[n]:.3f} (noise {noisy[n]:.3f})" for n in NAMES))
    for name in NAMES:
        assert clean[name] == pytest.approx(metrics.accuracy(models[name].predict(x), y))
        # measured margins 0.32 to 0.74 over two training seeds (fc10 the smallest)
        assert perturbed[name] <= noisy[name] - 0.2, name
    assert perturbed["fc100"] == metrics.accuracy(models["fc100"].predict(apply_universal(v, x)), y)
