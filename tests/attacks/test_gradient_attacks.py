"""FGSM, BIM and PGD on the digits models: a behaviour table, and agreement with ART.

Run with -s to see the robust accuracies printed next to ART's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import digits
from tests.attacks.conftest import N, robust_accuracy
from tests.copy_loop import CopyLoop
from workers.attacks.base import ATTACKS, get_norm
from workers.attacks.gradient import BIM, FGSM, PGD

TOLERANCE = 0.01  # robust accuracy, ours vs ART


# id, attack, its norm, budgets (increasing)
TABLE = [
    ("fgsm", lambda: FGSM(), "linf", [0.03, 0.06, 0.12]),
    ("fgsm-margin", lambda: FGSM(loss="margin"), "linf", [0.03, 0.06, 0.12]),
    ("bim-linf", lambda: BIM(steps=5), "linf", [0.03, 0.06, 0.12]),
    ("bim-l2", lambda: BIM(norm="l2", steps=5), "l2", [0.5, 1.0, 2.0]),
    ("pgd-linf", lambda: PGD(steps=5), "linf", [0.03, 0.06, 0.12]),
    ("pgd-linf-margin", lambda: PGD(steps=5, loss="margin", step_size=0.01), "linf", [0.03, 0.06, 0.12]),
    ("pgd-l2", lambda: PGD(norm="l2", steps=5, rel_step_size=0.5), "l2", [0.5, 1.0, 2.0]),
]


@pytest.mark.parametrize("make, norm, budgets", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_inside_the_ball_and_box_and_accuracy_falls_with_eps(make, norm, budgets, classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:100], data[1][:100]
    runs = make()(model, x, y, eps=budgets, seed=0)
    assert [run.eps for run in runs] == budgets
    accuracies = []
    for run in runs:
        size = get_norm(norm).size(run.x_adv - x)
        assert size.max() <= run.eps * (1 + 1e-5) + 1e-6, (run.eps, size.max())
        assert run.x_adv.min() >= 0.0 and run.x_adv.max() <= 1.0 and run.x_adv.dtype == np.float32
        np.testing.assert_array_equal(run.success, model.predict(run.x_adv) != y)
        accuracies.append(robust_accuracy(run))
    assert all(a >= b for a, b in zip(accuracies, accuracies[1:], strict=False)), accuracies
    assert accuracies[-1] < accuracies[0] - 0.2, accuracies


def test_registered_by_name():
    assert ATTACKS["fgsm"] is FGSM and ATTACKS["pgd"] is PGD and ATTACKS["bim"] is BIM
    assert FGSM.norm == "linf" and PGD(norm="l2").norm == "l2" and BIM().random_start is False
    assert all(cls.targeted_capable for cls in (FGSM, PGD, BIM))


@pytest.mark.parametrize("make, eps", [(lambda: PGD(steps=20), 0.2), (lambda: BIM(steps=20), 0.2),
                                       (lambda: PGD(norm="l2", steps=20), 4.0)],
                         ids=["pgd-linf", "bim-linf", "pgd-l2"])
def test_targeted_attacks_reach_their_target(make, eps, classifiers, data):
    model = classifiers("cnn")
    x, y = data[0][:100], data[1][:100]
    targets = (y + 1 + np.arange(len(y)) % 9) % 10
    (run,) = make()(model, x, y, eps=eps, targets=targets, seed=0)
    np.testing.assert_array_equal(run.success, model.predict(run.x_adv) == targets)
    assert run.success.mean() >= 0.8, run.success.mean()


class CountedGradients(CopyLoop):
    gradients = 0

    def loss_and_grad(self, x, labels, loss="auto", targets=None):
        self.gradients += 1
        return super().loss_and_grad(x, labels, loss=loss, targets=targets)


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_takes_one_gradient_for_all_its_budgets_and_gives_each_budget_s_own_images(
        targeted, classifiers, data):
    x, y = data[0][:80], data[1][:80]
    model = classifiers("cnn")
    targets = (y + 3) % 10 if targeted else None
    counted = CountedGradients(model)
    together = FGSM()(counted, x, y, eps=[0.03, 0.06, 0.12], targets=targets)
    assert counted.gradients == 1
    for run in together:
        (alone,) = FGSM()(model, x, y, eps=run.eps, targets=targets)  # the fused step, one budget
        np.testing.assert_array_equal(run.x_adv, alone.x_adv)
        np.testing.assert_array_equal(run.success, alone.success)
    assert together[0].success.mean() <= together[2].success.mean() and together[2].success.any()


def test_targeted_fgsm_descends_the_target_cross_entropy(classifiers, data):
    model = classifiers("fc100")
    x, y = data[0][:100], data[1][:100]
    targets = (y + 3) % 10
    (run,) = FGSM()(model, x, y, eps=0.1, targets=targets, seed=0)
    _, before, _ = model.loss_and_grad(x, targets)
    _, after, _ = model.loss_and_grad(run.x_adv, targets)
    assert np.mean(after < before) >= 0.95
    np.testing.assert_array_equal(run.success, model.predict(run.x_adv) == targets)
    assert run.success.mean() > np.mean(model.predict(x) == targets)


def test_random_targets_are_seeded_and_never_the_label(classifiers, data):
    model = classifiers("cnn")
    x, y = data[0][:100], data[1][:100]
    attack = PGD(steps=20, random_target=True)
    (run,) = attack(model, x, y, eps=0.2, seed=3)
    (again,) = attack(model, x, y, eps=0.2, seed=3)
    targets = run.extra["targets"]
    assert targets.shape == y.shape and np.all(targets != y) and targets.min() >= 0 and targets.max() <= 9
    assert len(np.unique(targets)) == 10
    np.testing.assert_array_equal(targets, again.extra["targets"])
    np.testing.assert_array_equal(run.x_adv, again.x_adv)
    np.testing.assert_array_equal(run.success, model.predict(run.x_adv) == targets)
    assert run.success.mean() >= 0.8
    with pytest.raises(ValueError, match="`random_target`"):
        attack(model, x, y, eps=0.2, targets=targets)


@pytest.mark.parametrize("norm, eps", [("linf", 0.04), ("l2", 0.8)])
def test_restarts_never_do_worse_than_one_run(norm, eps, classifiers, data):
    model = classifiers("fc100")
    x, y = data
    (one,) = PGD(norm=norm, steps=5)(model, x, y, eps=eps, seed=7)
    (three,) = PGD(norm=norm, steps=5, restarts=3)(model, x, y, eps=eps, seed=7)
    assert np.all(three.success[one.success])  # the first restart is the single run
    assert robust_accuracy(three) <= robust_accuracy(one)
    assert get_norm(norm).size(three.x_adv - x).max() <= eps * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("make, kwargs, name", [
    (PGD, {"steps": 0}, "`steps`"),
    (PGD, {"steps": 2.5}, "`steps`"),
    (PGD, {"step_size": -0.1}, "`step_size`"),
    (PGD, {"rel_step_size": 0}, "`rel_step_size`"),
    (PGD, {"step_size": 0.01, "rel_step_size": 0.1}, "`step_size`"),
    (PGD, {"restarts": 0}, "`restarts`"),
    (PGD, {"restarts": 2, "random_start": False}, "`restarts`"),
    (PGD, {"norm": "l1"}, "`norm`"),
    (PGD, {"loss": "hinge"}, "`loss`"),
    (PGD, {"random_start": "yes"}, "`random_start`"),
    (PGD, {"random_target": 1}, "`random_target`"),
    (BIM, {"steps": -1}, "`steps`"),
    (FGSM, {"loss": "dlr"}, "`loss`"),
])
def test_bad_parameters_are_refused_by_name(make, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make(**kwargs)


def test_parameters_are_keyword_only_and_eps_is_checked(classifiers, data):
    with pytest.raises(TypeError):
        PGD("linf")  # type: ignore[misc]
    with pytest.raises(ValueError, match="`eps`"):
        FGSM()(classifiers("fc100"), data[0][:4], data[1][:4], eps=-0.1)


class ExactCrossEntropy(torch.nn.CrossEntropyLoss):
    """Mean cross-entropy as softplus(logsumexp_{j != y} z_j - z_y), whose autograd keeps its
    precision where softmax(z)_y rounds to 1. torch's own backward (softmax - onehot) cancels
    to noise there, on most samples of a trained model, and FGSM's sign follows the noise;
    with this loss ART gets the exact gradients ours does, so the comparison is of the attacks.
    (A CrossEntropyLoss subclass, so that ART passes it integer labels.)"""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        at_label = logits.gather(1, labels[:, None])
        others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -torch.inf)
        return torch.nn.functional.softplus(torch.logsumexp(others, 1, keepdim=True) - at_label).mean()


def art_robust_accuracy(name: str, make_attack, x, y) -> float:
    from art.estimators.classification import PyTorchClassifier

    net = digits.trained(name)
    estimator = PyTorchClassifier(net, ExactCrossEntropy(), input_shape=digits.SHAPE, nb_classes=10,
                                  clip_values=(0.0, 1.0), device_type="cpu")
    adv = make_attack(estimator).generate(x, np.eye(10, dtype=np.float32)[y])
    return float(np.mean(estimator.predict(adv).argmax(1) == y))


# model -> (FGSM budgets, PGD L-inf eps, PGD L2 eps): robust accuracies between ~10% and ~80%
ART_CASES = {"cnn": ([0.05, 0.1], 0.075, 1.0), "fc100": ([0.05, 0.1], 0.05, 1.0)}
PGD_STEPS = 10


@pytest.mark.parametrize("name", list(ART_CASES))
def test_fgsm_and_pgd_agree_with_art(name, classifiers, data):
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    model, (x, y) = classifiers(name), data
    fgsm_budgets, linf_eps, l2_eps = ART_CASES[name]
    rows = []
    for eps, ours in zip(fgsm_budgets, FGSM()(model, x, y, eps=fgsm_budgets, seed=0), strict=True):
        theirs = art_robust_accuracy(name, lambda est, e=eps: FastGradientMethod(est, eps=e, batch_size=N),
                                     x, y)
        rows.append((f"fgsm eps={eps}", robust_accuracy(ours), theirs))
    for norm, eps in (("linf", linf_eps), ("l2", l2_eps)):
        step = 2.5 * eps / PGD_STEPS
        (ours,) = PGD(norm=norm, steps=PGD_STEPS, step_size=step, random_start=False)(model, x, y, eps=eps)
        theirs = art_robust_accuracy(name, lambda est, n=norm, e=eps, s=step: ProjectedGradientDescent(
            est, norm=np.inf if n == "linf" else 2, eps=e, eps_step=s, max_iter=PGD_STEPS, num_random_init=0,
            batch_size=N, verbose=False), x, y)
        rows.append((f"pgd-{norm} eps={eps} steps={PGD_STEPS}", robust_accuracy(ours), theirs))
    print(f"\n{name}: robust accuracy on {N} test digits (ours vs ART)")
    for label, ours, theirs in rows:
        print(f"  {label:28s} ours {ours:.3f}  ART {theirs:.3f}")
    for label, ours, theirs in rows:
        assert 0.05 < theirs < 0.95, (label, theirs)  # informative budgets
        assert abs(ours - theirs) <= TOLERANCE + 1e-9, (label, ours, theirs)
