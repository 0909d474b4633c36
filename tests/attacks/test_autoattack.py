"""APGD, FAB, Square and AutoAttack on the digits models, checked against torchattacks.

Everything runs on fc100, which trains in seconds (the CNN is covered by the gradient-attack
tests). Run with -s to see the robust accuracies printed next to torchattacks'.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from tests import digits
from tests.attacks.conftest import N, robust_accuracy
from workers.attacks.apgd import APGD, APGDT
from workers.attacks.autoattack import AutoAttack
from workers.attacks.base import ATTACKS, get_norm
from workers.attacks.fab import FAB, project_onto_hyperplane
from workers.attacks.square import Square

TOLERANCE = 0.01  # robust accuracy, ours vs torchattacks


def torchattacks_robust_accuracy(name: str, attack_class, x, y, **kwargs) -> float:
    import torchattacks

    net = digits.trained(name)
    adv = getattr(torchattacks, attack_class)(net, **kwargs)(torch.tensor(x), torch.tensor(y))
    with torch.no_grad():
        return float(np.mean(net(adv).argmax(1).numpy() == y))


TA_NORM = {"linf": "Linf", "l2": "L2"}


APGD_CASES = [("fc100", "linf", 0.05), ("fc100", "linf", 0.07), ("fc100", "l2", 1.0), ("fc100", "l2", 1.5)]


@pytest.mark.parametrize("name, norm, eps", APGD_CASES)
def test_apgd_ce_agrees_with_torchattacks(name, norm, eps, classifiers, data):
    # 50 iterations and 2 restarts on both sides (the paper: 100 and 1): the restarts settle
    # the random-start noise of about one sample in 200 that a single run shows
    x, y = data
    (ours,) = APGD(norm=norm, loss="ce", steps=50, restarts=2)(classifiers(name), x, y, eps=eps, seed=0)
    theirs = torchattacks_robust_accuracy(name, "APGD", x, y, norm=TA_NORM[norm], eps=eps, steps=50,
                                          n_restarts=2, loss="ce", seed=0)
    print(f"\nAPGD-CE {name} {norm} eps={eps}, {N} digits: ours {robust_accuracy(ours):.3f}  "
          f"torchattacks {theirs:.3f}")
    assert 0.1 < theirs < 0.9
    assert abs(robust_accuracy(ours) - theirs) <= TOLERANCE + 1e-9
    assert get_norm(norm).size(ours.x_adv - x).max() <= eps * (1 + 1e-5) + 1e-6


def test_autoattack_standard_agrees_with_torchattacks(classifiers, data):
    # L-inf on fc100 keeps Square's 5000 queries affordable on both sides (L2, eps 1.0, agrees as
    # well, 0.580 and 0.580, but takes twice as long). torchattacks' AutoAttack runs APGD, APGD-T
    # and FAB-T with their default 10 iterations (the paper: 100), so ours does too.
    norm, eps = "linf", 0.05
    x, y = data
    (ours,) = AutoAttack(norm=norm, version="standard", steps=10)(classifiers("fc100"), x, y, eps=eps, seed=0)
    theirs = torchattacks_robust_accuracy("fc100", "AutoAttack", x, y, norm=TA_NORM[norm], eps=eps,
                                          version="standard", n_classes=10, seed=0)
    stages = ", ".join(f"{k} {v:.3f}" for k, v in ours.extra["robust_accuracy"].items())
    print(f"\nAutoAttack fc100 {norm} eps={eps}, {N} digits: ours {robust_accuracy(ours):.3f} ({stages})  "
          f"torchattacks {theirs:.3f}")
    assert 0.1 < theirs < 0.9
    assert abs(robust_accuracy(ours) - theirs) <= TOLERANCE + 1e-9
    accuracies = list(ours.extra["robust_accuracy"].values())
    assert list(ours.extra["robust_accuracy"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for a, b in zip(accuracies, accuracies[1:], strict=False))
    assert accuracies[-1] == robust_accuracy(ours)
    assert set(ours.extra["broken_by"][ours.success]) <= {"clean", "apgd-ce", "apgd-t", "fab-t", "square"}
    assert np.all(ours.extra["broken_by"][~ours.success] == "")
    assert get_norm(norm).size(ours.x_adv - x).max() <= eps * (1 + 1e-5) + 1e-6
    np.testing.assert_array_equal(ours.success, classifiers("fc100").predict(ours.x_adv) != y)


@pytest.mark.parametrize("norm, eps, queries", [("linf", 0.1, 300), ("l2", 2.5, 300)])
def test_square_keeps_to_its_query_budget_and_eps(norm, eps, queries, classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:64], data[1][:64]
    (run,) = Square(norm=norm, queries=queries)(model, x, y, eps=eps, seed=0)
    assert run.queries.dtype == np.int64 and run.queries.min() >= 1 and run.queries.max() <= queries
    assert np.all(run.queries[~run.success] == queries)  # robust samples use the whole budget
    assert run.queries[run.success].mean() < queries / 2  # broken samples stop early
    assert get_norm(norm).size(run.x_adv - x).max() <= eps * (1 + 1e-5) + 1e-6
    assert run.x_adv.min() >= 0.0 and run.x_adv.max() <= 1.0
    np.testing.assert_array_equal(run.success, model.predict(run.x_adv) != y)
    assert 0.1 < robust_accuracy(run) < np.mean(model.predict(x) == y) - 0.2


def test_square_targeted_and_without_gradients(classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:32], data[1][:32]

    class LogitsOnly:  # no gradient methods: Square must not need them
        num_classes = model.num_classes
        logits = staticmethod(model.logits)

    targets = (y + 1) % 10
    (run,) = Square(queries=400)(LogitsOnly(), x, y, eps=0.15, targets=targets, seed=1)
    np.testing.assert_array_equal(run.success, model.predict(run.x_adv) == targets)
    assert run.success.mean() > 0.5 and run.queries.max() <= 400


@pytest.mark.parametrize("norm, eps", [("linf", 0.07), ("l2", 1.5)])
def test_fab_finds_smaller_perturbations_than_apgd(norm, eps, classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:100], data[1][:100]
    (fab,) = FAB(norm=norm, multi_targeted=True, steps=20)(model, x, y, eps=eps, seed=0)
    (apgd,) = APGD(norm=norm, steps=20)(model, x, y, eps=eps, seed=0)
    size = get_norm(norm).size
    fab_size, apgd_size = size(fab.x_adv - x), size(apgd.x_adv - x)
    both = fab.success & apgd.success & (model.predict(x) == y)
    print(f"\nFAB-T vs APGD-CE fc100 {norm} eps={eps}: robust {robust_accuracy(fab):.3f} vs "
          f"{robust_accuracy(apgd):.3f}; median size on {both.sum()} broken by both "
          f"{np.median(fab_size[both]):.4f} vs {np.median(apgd_size[both]):.4f}")
    assert both.sum() >= 30
    assert fab_size.max() <= eps * (1 + 1e-5) + 1e-6
    assert np.mean(fab_size[both] <= apgd_size[both] + 1e-6) >= 0.9
    assert np.median(fab_size[both]) < 0.9 * np.median(apgd_size[both])
    assert abs(robust_accuracy(fab) - robust_accuracy(apgd)) <= 0.05
    np.testing.assert_array_equal(fab.success, model.predict(fab.x_adv) != y)
    distance = fab.extra["distance"]
    np.testing.assert_allclose(distance[both], fab_size[both], rtol=1e-5)


def test_untargeted_fab_and_targeted_runs(classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:50], data[1][:50]
    (untargeted,) = FAB(steps=10)(model, x, y, eps=0.1, seed=0)
    assert robust_accuracy(untargeted) < 0.5
    assert np.all(untargeted.extra["distance"][untargeted.success] <= 0.1 + 1e-6)
    targets = (y + 1) % 10
    for attack in (FAB(steps=20), APGD(loss="dlr_targeted", steps=20), APGD(loss="ce", steps=20)):
        (run,) = attack(model, x, y, eps=0.2, targets=targets, seed=0)
        np.testing.assert_array_equal(run.success, model.predict(run.x_adv) == targets)
        assert run.success.mean() >= 0.7, (attack.name, run.success.mean())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_is_the_minimal_step_to_the_hyperplane_in_the_box(norm):
    rng = np.random.default_rng(0)
    for _ in range(40):
        dim = int(rng.integers(2, 10))
        t, w = rng.random((1, dim)), rng.standard_normal((1, dim))
        b = w @ t[0] + rng.uniform(-0.5, 0.5, size=1)
        d = project_onto_hyperplane(t, w, b, (0.0, 1.0), norm)[0].astype(np.float64)
        assert np.all(t[0] + d >= -1e-6) and np.all(t[0] + d <= 1 + 1e-6)
        # the reference: min ||d|| subject to <w, d> = b - <w, t> and the box, as a linear or
        # quadratic program (L2: the squared norm is minimised by the same point)
        gap = b[0] - w[0] @ t[0]
        box = list(zip(-t[0], 1 - t[0], strict=True))
        if norm == "linf":  # variables (d, r): min r, -r <= d_i <= r
            eye, ones = np.eye(dim), np.ones((dim, 1))
            res = linprog(np.r_[np.zeros(dim), 1.0], A_ub=np.block([[eye, -ones], [-eye, -ones]]),
                          b_ub=np.zeros(2 * dim), A_eq=np.r_[w[0], 0.0][None], b_eq=[gap],
                          bounds=box + [(0, None)])
            if res.status == 2:  # out of reach: d saturates the box towards the plane
                assert abs(w[0] @ d) <= abs(gap)
                continue
            assert abs(w[0] @ d - gap) < 1e-4 and np.abs(d).max() <= res.fun + 1e-5
        else:
            plane = {"type": "eq", "fun": lambda v, w=w[0], gap=gap: w @ v - gap}
            res = minimize(lambda v: v @ v, np.zeros(dim), jac=lambda v: 2 * v, method="SLSQP", bounds=box,
                           constraints=[plane], options={"ftol": 1e-12})
            if not res.success or abs(w[0] @ res.x - gap) > 1e-6:
                continue
            assert abs(w[0] @ d - gap) < 1e-4 and np.linalg.norm(d) <= np.sqrt(res.fun) + 1e-5


def test_registered_and_seeded(classifiers, data):
    assert ATTACKS["apgd"] is APGD and ATTACKS["apgd-t"] is APGDT and ATTACKS["fab"] is FAB
    assert ATTACKS["square"] is Square and ATTACKS["autoattack"] is AutoAttack
    assert not AutoAttack.targeted_capable and APGD.targeted_capable
    model = classifiers("fc100")
    x, y = data[0][:32], data[1][:32]
    for attack in (APGD(steps=5), APGDT(steps=5, n_target_classes=2), Square(queries=50)):
        first, second = attack(model, x, y, eps=0.05, seed=4)[0], attack(model, x, y, eps=0.05, seed=4)[0]
        np.testing.assert_array_equal(first.x_adv, second.x_adv)


@pytest.mark.parametrize("make, kwargs, name", [
    (APGD, {"loss": "hinge"}, "`loss`"),
    (APGD, {"steps": 0}, "`steps`"),
    (APGD, {"restarts": 0}, "`restarts`"),
    (APGD, {"rho": 1.5}, "`rho`"),
    (APGD, {"norm": "l1"}, "`norm`"),
    (APGD, {"n_target_classes": 0}, "`n_target_classes`"),
    (FAB, {"alpha_max": 2}, "`alpha_max`"),
    (FAB, {"beta": 0}, "`beta`"),
    (FAB, {"eta": -1}, "`eta`"),
    (FAB, {"multi_targeted": "yes"}, "`multi_targeted`"),
    (Square, {"queries": 0}, "`queries`"),
    (Square, {"p_init": 0}, "`p_init`"),
    (AutoAttack, {"version": "plus"}, "`version`"),
    (AutoAttack, {"square_queries": -5}, "`square_queries`"),
])
def test_bad_parameters_are_refused_by_name(make, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(**kwargs)


def test_untargeted_losses_refuse_targets(classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(ValueError, match="`loss`"):
        APGD(loss="dlr")(model, x, y, eps=0.1, targets=(y + 1) % 10)
    with pytest.raises(ValueError, match="targeted"):
        AutoAttack()(model, x, y, eps=0.1, targets=(y + 1) % 10)
