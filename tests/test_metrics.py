"""Metrics against numbers worked out by hand on small arrays, and the sanity flags."""

from __future__ import annotations

import numpy as np
import pytest

from workers import metrics
from workers.metrics import (
    accuracy,
    attack_summary,
    gradient_stats,
    minimal_summary,
    perturbation_norms,
    sanity_flags,
)

SUMMARY_KEYS = {
    "samples", "eps", "norm", "robust_accuracy", "success_rate", "mean_l2", "median_l2",
    "mean_linf", "median_linf", "distortion", "rho", "mean_adv_confidence",
    "per_class_robust_accuracy", "mean_queries", "median_queries",
}


def test_accuracy_and_its_refusals():
    assert accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    with pytest.raises(ValueError, match="one shape"):
        accuracy(np.array([0, 1]), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="zero samples"):
        accuracy(np.array([], int), np.array([], int))


def test_perturbation_norms_by_hand():
    x = np.zeros((2, 1, 2, 2), np.float32)
    x_adv = x.copy()
    x_adv[0, 0, 0] = [0.3, -0.4]
    x_adv[1] = 0.1
    norms = perturbation_norms(x, x_adv)
    np.testing.assert_allclose(norms["l2"], [0.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(norms["linf"], [0.4, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        perturbation_norms(x, x_adv[:1])


def _four_samples():
    """y = [0, 1, 2, 1]; sample 3 is misclassified when clean; samples 0 and 2 are fooled."""
    x = np.stack([np.full(4, 0.5), np.full(4, 0.5), np.full(4, 0.25), np.full(4, 0.0)])
    r = np.array([[0.3, 0.4, 0, 0], [0.01, 0, 0, 0], [0.1, -0.1, 0.1, -0.1], [1, 1, 1, 1]])
    y = np.array([0, 1, 2, 1])
    clean_pred = np.array([0, 1, 2, 0])
    adv_logits = np.array([
        [0, np.log(3), 0, 0],  # predicts 1 with probability 3/6
        [0, 5, 0, 0],  # still 1: robust
        [np.log(8), 0, 0, 0],  # predicts 0 with probability 8/11
        [7, 0, 0, 0],  # 0: was already wrong
    ])
    success = np.array([True, False, True, True])
    shape = (4, 1, 2, 2)
    return (x.reshape(shape).astype(np.float32), y, clean_pred,
            (x + r).reshape(shape).astype(np.float32), adv_logits, success)


def test_attack_summary_by_hand():
    x, y, clean_pred, x_adv, adv_logits, success = _four_samples()
    s = attack_summary(x, y, clean_pred, x_adv, adv_logits, success, num_classes=4,
                       queries=np.array([10, 20, 50, 40]), eps=0.5, norm="l2")
    assert set(s) == SUMMARY_KEYS
    assert s["samples"] == 4 and s["eps"] == 0.5 and s["norm"] == "l2"
    assert s["robust_accuracy"] == 0.25  # only sample 1 is still right
    assert s["success_rate"] == pytest.approx(2 / 3)  # among the three clean-correct samples
    # fooled: samples 0 (l2 0.5, linf 0.4) and 2 (l2 0.2, linf 0.1); sample 3 is not a perturbation
    assert s["mean_l2"] == pytest.approx(0.35) and s["median_l2"] == pytest.approx(0.35)
    assert s["mean_linf"] == pytest.approx(0.25) and s["median_linf"] == pytest.approx(0.25)
    assert s["distortion"] == pytest.approx((0.5 / 2 + 0.2 / 2) / 2, rel=1e-6)  # D = 4 pixels
    assert s["rho"] == pytest.approx((0.5 / 1.0 + 0.2 / 0.5) / 2, rel=1e-6)
    assert s["mean_adv_confidence"] == pytest.approx((0.5 + 8 / 11) / 2)
    assert s["per_class_robust_accuracy"] == [0.0, 0.5, 0.0, None]  # class 3 is absent
    assert s["mean_queries"] == 30.0 and s["median_queries"] == 30.0
    assert all(type(v) in (int, float, str, list, type(None)) for v in s.values())


def test_attack_summary_without_successes_or_queries():
    x, y, clean_pred, x_adv, adv_logits, _ = _four_samples()
    s = attack_summary(x, y, clean_pred, x, adv_logits, np.zeros(4, bool), num_classes=4)
    assert set(s) == SUMMARY_KEYS
    assert s["success_rate"] == 0.0 and s["eps"] is None and s["norm"] is None
    for key in ("mean_l2", "median_l2", "mean_linf", "median_linf", "distortion", "rho",
                "mean_adv_confidence", "mean_queries", "median_queries"):
        assert s[key] is None, key
    # nobody classified correctly when clean: no success rate at all
    s = attack_summary(x, y, (y + 1) % 4, x_adv, adv_logits, np.ones(4, bool), num_classes=4)
    assert s["success_rate"] is None and s["mean_l2"] is None
    assert s["robust_accuracy"] == 0.25  # accuracy on x_adv against y, whatever the clean prediction


def test_targeted_summary_counts_robust_accuracy_against_the_true_label():
    x = np.zeros((3, 1, 1, 2), np.float32)
    x_adv = x + np.float32(0.1)
    y = np.array([0, 1, 1])
    targets = np.array([2, 2, 0])
    adv_logits = np.array([[0, 0, 9.0], [9.0, 0, 0], [0, 9.0, 0]])  # target hit, missed but wrong, robust
    success = adv_logits.argmax(1) == targets
    s = attack_summary(x, y, y.copy(), x_adv, adv_logits, success, num_classes=3, targets=targets)
    assert s["success_rate"] == pytest.approx(1 / 3)
    assert s["robust_accuracy"] == pytest.approx(1 / 3)  # sample 1 missed its target but is still wrong
    assert s["rho"] is None  # the only fooled image is all zeros: ||r|| / ||x|| is undefined
    assert s["distortion"] == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        attack_summary(x, y, y, x_adv, adv_logits, success, num_classes=3, targets=targets[:2])


def test_attack_summary_refuses_inconsistent_arrays():
    x, y, clean_pred, x_adv, adv_logits, success = _four_samples()
    with pytest.raises(ValueError, match="adv_logits"):
        attack_summary(x, y, clean_pred, x_adv, adv_logits, success, num_classes=5)
    with pytest.raises(ValueError, match="success"):
        attack_summary(x, y, clean_pred, x_adv, adv_logits, success.astype(int), num_classes=4)
    with pytest.raises(ValueError, match="queries"):
        attack_summary(x, y, clean_pred, x_adv, adv_logits, success, num_classes=4, queries=[1, 2])


def _linf_minimal():
    """Six samples: 0-3 broken at Linf 1/8..4/8 (exact in float32), 4 never broken, 5 wrong when clean."""
    x = np.full((6, 1, 2, 2), 0.5, np.float32)
    x_adv = x.copy()
    for i, size in enumerate([0.125, 0.25, 0.375, 0.5]):
        x_adv[i, 0, 0, 0] += size
        x_adv[i, 0, 1, 1] -= size / 2
    y = np.arange(6) % 3
    clean_pred = y.copy()
    clean_pred[5] = (y[5] + 1) % 3
    success = np.array([True, True, True, True, False, True])
    return x, y, clean_pred, x_adv, success


def test_minimal_summary_by_hand():
    x, y, clean_pred, x_adv, success = _linf_minimal()
    s = minimal_summary(x, y, clean_pred, x_adv, success, norm="linf", eps_grid=[0, 0.2, 0.5, 1.0])
    assert set(s) == {"quantiles", "curve"}
    q = s["quantiles"]
    assert list(q) == ["p5", "p25", "p50", "p75", "p95"]
    # over the five clean-correct samples, sizes [0.125, 0.25, 0.375, 0.5, inf]
    assert q["p5"] == pytest.approx(0.15) and q["p25"] == 0.25
    assert q["p50"] == 0.375 and q["p75"] == 0.5
    assert q["p95"] == float("inf")
    # share of all six that are correct and need more than eps (a size of exactly eps breaks)
    assert [c["eps"] for c in s["curve"]] == [0, 0.2, 0.5, 1.0]
    np.testing.assert_allclose([c["robust_accuracy_upper_bound"] for c in s["curve"]],
                               [5 / 6, 4 / 6, 1 / 6, 1 / 6])


def test_minimal_summary_default_grid_and_l2():
    x, y, clean_pred, x_adv, success = _linf_minimal()
    curve = minimal_summary(x, y, clean_pred, x_adv, success, norm="linf")["curve"]
    eps = [c["eps"] for c in curve]
    assert len(eps) == 20 and eps[0] == 0 and eps[-1] == 0.5  # p95 infinite: largest size
    bounds = [c["robust_accuracy_upper_bound"] for c in curve]
    assert bounds[0] == pytest.approx(5 / 6) and bounds[-1] == pytest.approx(1 / 6)
    assert all(a >= b for a, b in zip(bounds, bounds[1:], strict=False))
    everyone = np.ones(6, bool)
    s = minimal_summary(x, y, clean_pred, x_adv, everyone, norm="l2")
    sizes = perturbation_norms(x, x_adv)["l2"][:5]  # sample 4 unperturbed: size 0
    want = np.percentile(sizes, [5, 25, 50, 75, 95])
    np.testing.assert_allclose(list(s["quantiles"].values()), want, rtol=1e-6)
    assert s["curve"][-1]["eps"] == pytest.approx(want[-1])


def test_minimal_summary_edge_cases():
    x, y, clean_pred, x_adv, _ = _linf_minimal()
    s = minimal_summary(x, y, clean_pred, x_adv, np.zeros(6, bool), norm="linf")
    assert all(v == float("inf") for v in s["quantiles"].values())
    assert s["curve"] == [{"eps": 0.0, "robust_accuracy_upper_bound": 5 / 6}]
    s = minimal_summary(x, y, (y + 1) % 3, x_adv, np.ones(6, bool), norm="linf", eps_grid=[0.1])
    assert all(v is None for v in s["quantiles"].values())
    assert s["curve"] == [{"eps": 0.1, "robust_accuracy_upper_bound": 0.0}]
    with pytest.raises(ValueError, match="norm"):
        minimal_summary(x, y, clean_pred, x_adv, np.ones(6, bool), norm="l1")
    with pytest.raises(ValueError, match="eps_grid"):
        minimal_summary(x, y, clean_pred, x_adv, np.ones(6, bool), norm="l2", eps_grid=[-1.0])


@pytest.mark.parametrize("seed", range(5))
def test_quantile_matches_numpy_on_finite_values(seed):
    values = np.sort(np.random.default_rng(seed).exponential(size=7 + seed))
    for q in metrics.QUANTILES:
        assert metrics._quantile(values, q) == pytest.approx(np.percentile(values, q))


def test_gradient_stats():
    grad = np.random.default_rng(0).standard_normal((4, 2, 2))
    grad[0] = 0
    grad[1, 0, 0] = np.nan
    grad[2, 1, 1] = -np.inf
    grad[3, 0, 1] = np.nan  # a second non-finite entry of sample 3: still one sample
    grad[3, 1, 0] = np.inf
    assert gradient_stats(grad) == {"probed": 4, "zero_fraction": 0.25, "nonfinite": 3}
    assert gradient_stats(np.zeros((3, 5))) == {"probed": 3, "zero_fraction": 1.0, "nonfinite": 0}


def _entry(attack, kind, eps, ra, norm="linf", **more):
    return {"attack": attack, "kind": kind, "eps": eps, "norm": norm, "robust_accuracy": ra, **more}


HEALTHY = [
    _entry("fgsm", "single_step", 0.1, 0.50),
    _entry("pgd", "iterative", 0.1, 0.30, gradient_stats={"zero_fraction": 0.01, "nonfinite": 0}),
    _entry("pgd", "iterative", 0.2, 0.305),  # within one point of the smaller eps
    _entry("pgd", "iterative", 0.05, 0.60),
    _entry("square", "black_box", 0.1, 0.295),  # within a point of the best white-box attack
    _entry("pgd", "iterative", 0.3, 0.80, norm="l2"),  # another norm: not compared with linf
    _entry("gaussian_noise", "noise", 0.1, 0.90, norm=None),
    _entry("gaussian_noise", "noise", 0.3, 0.95, norm=None),  # noise is not aimed: may rise
    _entry("deepfool", "minimal", None, 0.0, norm="l2"),
    _entry("square", "black_box", 0.45, 0.0),  # no white-box attack at this budget
]


def test_sanity_flags_stay_quiet_on_a_consistent_evaluation():
    assert sanity_flags(HEALTHY) == []
    assert sanity_flags([]) == []


@pytest.mark.parametrize("entry, words, affected", [
    (_entry("pgd", "iterative", 0.15, 0.3, gradient_stats={"zero_fraction": 0.75, "nonfinite": 0}),
     ["pgd", "eps=0.15", "zero for 75%"], [10]),
    (_entry("pgd", "iterative", 0.15, 0.3, gradient_stats={"loss": "cross_entropy", "probed": 40,
                                                           "zero_fraction": 0.05, "nonfinite": 0}),
     ["pgd", "eps=0.15", "cross_entropy gradient is zero for 5% of the 40 correctly classified",
      "loss: auto"], [10]),
    (_entry("pgd", "iterative", 0.15, 0.3, gradient_stats={"zero_fraction": 0.0, "nonfinite": 3}),
     ["pgd", "eps=0.15", "3 non-finite"], [10]),
    (_entry("pgd", "iterative", 0.4, 0.32), ["pgd", "eps=0.4", "30.00% at the smaller eps=0.1", "2.00%"],
     [10]),
    # the single-step attack beats the iterative one: the iterative entry's number is in doubt
    (_entry("fgsm", "single_step", 0.2, 0.25), ["pgd", "eps=0.2", "single-step fgsm", "5.50%"], [2]),
    # the black-box attack beats every white-box one: theirs are in doubt
    (_entry("nes", "black_box", 0.1, 0.28), ["nes", "eps=0.1", "every white-box", "2.00%"], [0, 1]),
])
def test_sanity_flags_fire_once_and_name_the_attack_and_the_entries_in_doubt(entry, words, affected):
    warnings = sanity_flags([*HEALTHY, entry])
    assert len(warnings) == 1, warnings
    assert "may be masked" in warnings[0]
    for word in words:
        assert word in warnings[0]
    assert metrics.masking_warnings([*HEALTHY, entry]) == [(warnings[0], affected)]


def test_sanity_flags_compare_against_the_lowest_smaller_budget_in_any_order():
    rising = [_entry("pgd", "iterative", 0.3, 0.312), _entry("pgd", "iterative", 0.2, 0.306),
              _entry("pgd", "iterative", 0.1, 0.30)]
    assert len(sanity_flags(rising)) == 1  # each step under a point, 1.2 points over eps=0.1
    repeated = [_entry("pgd", "iterative", 0.1, 0.30), _entry("pgd", "iterative", 0.1, 0.50)]
    assert sanity_flags(repeated) == []  # equal budgets are not a curve


def test_sanity_flags_refuse_malformed_entries():
    with pytest.raises(ValueError, match="kind"):
        sanity_flags([_entry("pgd", "white_box", 0.1, 0.3)])
    with pytest.raises(ValueError, match="robust_accuracy"):
        sanity_flags([{"attack": "pgd", "kind": "iterative", "eps": 0.1, "norm": "linf"}])


def test_nonfinite_adversarial_examples_discredit_their_entry():
    entry = _entry("pgd", "iterative", 0.15, 0.3, nonfinite_examples=4)
    assert metrics.masking_warnings([*HEALTHY, entry]) == [(
        "pgd (linf, eps=0.15): 4 adversarial examples had NaN or infinite pixels (the attack's arithmetic "
        "overflowed) and were counted as not fooling the model; this robust accuracy cannot be trusted",
        [len(HEALTHY)])]
    assert sanity_flags([*HEALTHY, _entry("pgd", "iterative", 0.15, 0.3, nonfinite_examples=0)]) == []
