"""DeepFool, Carlini-Wagner L2, L-BFGS and universal perturbations on the digits models.

Behaviour (labels flip, perturbations beat FGSM's, targets reached, the box and the ball
hold, universal perturbations transfer) and agreement with ART on the same trained torch
models and images. Run with ``-s`` to see the figures compared.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import onnx
import pytest
import torch
from scipy.optimize import Bounds, minimize

from tests import digits
from workers.attacks.base import ATTACKS
from workers.attacks.cw import CarliniWagnerL2
from workers.attacks.deepfool import DeepFool
from workers.attacks.gradient import FGSM
from workers.attacks.lbfgs import LBFGS, minimise
from workers.attacks.universal import UniversalPerturbation, apply_universal
from workers.runtime import Classifier

art = pytest.importorskip("art")
from art.attacks.evasion import CarliniL2Method  # noqa: E402
from art.attacks.evasion import DeepFool as ArtDeepFool  # noqa: E402
from art.attacks.evasion import UniversalPerturbation as ArtUniversal  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

FGSM_EPS = np.round(np.arange(0.01, 0.51, 0.01), 2)


@pytest.fixture(scope="module")
def fc100() -> Classifier:
    return Classifier(digits.onnx_bytes("fc100"))


def correct(model: Classifier, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` held-out images that ``model`` classifies correctly."""
    _, _, x, y = digits.digits()
    keep = np.flatnonzero(model.predict(x) == y)[:n]
    return x[keep], y[keep]


def l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm((a.astype(np.float64) - b).reshape(len(a), -1), axis=1)


def linf(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b).reshape(len(a), -1).max(axis=1)


def art_classifier(name: str, box: bool = True) -> PyTorchClassifier:
    return PyTorchClassifier(digits.trained(name), loss=torch.nn.CrossEntropyLoss(), input_shape=digits.SHAPE,
                             nb_classes=10, clip_values=(0.0, 1.0) if box else None)


@contextlib.contextmanager
def one_torch_thread():
    """ART runs many tiny torch calls; on small shared machines torch's thread pool makes them
    several times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fgsm_minimal(model: Classifier, x: np.ndarray, y: np.ndarray, success_rate: float):
    """FGSM over an eps grid: per sample the example at the smallest eps that flips it
    (x_adv, fooled), and the one eps whose success rate first reaches ``success_rate`` with the
    mean L2 of its successful perturbations (None, nan if no eps of the grid reaches it)."""
    runs = FGSM()(model, x, y, eps=FGSM_EPS)
    x_adv, fooled = x.copy(), np.zeros(len(x), bool)
    for run in runs:
        first = run.success & ~fooled
        x_adv[first], fooled = run.x_adv[first], fooled | run.success
    equal = next((r for r in runs if r.success.mean() >= success_rate), None)
    if equal is None:
        return x_adv, fooled, None, float("nan")
    return x_adv, fooled, equal.eps, float(l2(equal.x_adv, x)[equal.success].mean())


def check_minimal_run(model: Classifier, x, y, run, targets=None) -> None:
    assert run.eps is None and run.x_adv.shape == x.shape and run.x_adv.dtype == np.float32
    assert run.x_adv.min() >= 0.0 and run.x_adv.max() <= 1.0
    predicted = model.predict(run.x_adv)
    expected = predicted == targets if targets is not None else predicted != y
    np.testing.assert_array_equal(run.success, expected)
    np.testing.assert_array_equal(run.x_adv[~run.success], x[~run.success])


# ---------------------------------------------------------------- behaviour


def quick_cw(**kwargs) -> CarliniWagnerL2:
    return CarliniWagnerL2(binary_search_steps=5, max_iter=100, initial_const=1.0, learning_rate=0.05,
                           **kwargs)


def quick_lbfgs() -> LBFGS:
    return LBFGS(search_steps=6, max_iter=50)


# attack, and the largest ratio of its mean perturbation to per-sample minimal FGSM's: in L-inf,
# FGSM's own geometry, DeepFool only has to be smaller; in L2 clearly smaller
MINIMAL = {
    "deepfool_l2": (DeepFool, 0.8),
    "deepfool_linf": (lambda: DeepFool(norm="linf"), 1.0),
    "cw_l2": (quick_cw, 0.8),
    "lbfgs": (quick_lbfgs, 0.8),
}


@pytest.mark.parametrize("key", list(MINIMAL))
def test_minimal_attacks_flip_labels_with_less_than_fgsm(fc100, key):
    x, y = correct(fc100, 40)
    make, ratio = MINIMAL[key]
    run = make()(fc100, x, y)[0]
    check_minimal_run(fc100, x, y, run)
    assert run.success.mean() >= 0.95
    fgsm_x, fgsm_fooled, equal_eps, equal_l2 = fgsm_minimal(fc100, x, y, run.success.mean())
    both = run.success & fgsm_fooled
    size = linf if key == "deepfool_linf" else l2
    ours, theirs = size(run.x_adv, x)[both].mean(), size(fgsm_x, x)[both].mean()
    print(f"\n{key}: success {run.success.mean():.3f}, mean {size.__name__} {ours:.3f}; per-sample minimal "
          f"FGSM: success {fgsm_fooled.mean():.3f}, mean {size.__name__} {theirs:.3f} on the {both.sum()} "
          f"both fool; FGSM at one eps reaching the same success: eps {equal_eps}, mean l2 {equal_l2:.3f}")
    assert both.sum() >= 0.8 * len(x)
    assert ours < ratio * theirs


@pytest.mark.parametrize("attack", [quick_cw(), quick_lbfgs()], ids=["cw_l2", "lbfgs"])
def test_targeted_attacks_reach_their_targets(fc100, attack):
    x, y = correct(fc100, 20)
    targets = (y + np.random.default_rng(1).integers(1, 10, size=len(y))) % 10
    run = attack(fc100, x, y, targets=targets)[0]
    check_minimal_run(fc100, x, y, run, targets)
    assert run.success.mean() >= 0.95
    nearest = DeepFool()(fc100, x, y)[0]  # the nearest wrong class is never farther than a random one
    targeted_l2 = l2(run.x_adv, x)[run.success].mean()
    nearest_l2 = l2(nearest.x_adv, x)[nearest.success].mean()
    print(f"\n{attack.name} targeted: success {run.success.mean():.3f}, mean L2 {targeted_l2:.3f} "
          f"(untargeted DeepFool {nearest_l2:.3f})")
    assert targeted_l2 > nearest_l2


@pytest.mark.parametrize("const", [0.05, 1.0])
def test_our_box_constrained_lbfgs_minimises_as_well_as_scipys(fc100, const):
    # the reference: scipy's L-BFGS-B (Fortran, Byrd-Lu-Nocedal-Zhu) on the same objective, one
    # sample at a time; ours is a projected L-BFGS batched over the samples
    x, y = correct(fc100, 20)
    goal = (y + 3) % 10
    c = np.full(len(x), const)
    ours = minimise(fc100, x, x, goal, c, (0.0, 1.0), 100)

    def objective(model, xi, v, gi, ci):
        _, loss, grad = model.loss_and_grad(v.reshape(xi.shape).astype(np.float32), gi, loss="cross_entropy")
        r = v.reshape(len(xi), -1) - xi.reshape(len(xi), -1)
        value = ci * np.einsum("ij,ij->i", r, r) + loss.astype(np.float64)
        return value, 2 * ci[:, None] * r + grad.reshape(len(xi), -1).astype(np.float64)

    scipy_points = []
    for i in range(len(x)):
        part = slice(i, i + 1)

        def fun(v, part=part):
            value, grad = objective(fc100, x[part], v, goal[part], c[part])
            return float(value.sum()), grad.ravel()

        result = minimize(fun, x[part].astype(np.float64).ravel(), jac=True, method="L-BFGS-B",
                          bounds=Bounds(0.0, 1.0), options={"maxiter": 100})
        scipy_points.append(result.x.astype(np.float32).reshape(x[0].shape))
    theirs = np.stack(scipy_points)
    ours_value, _ = objective(fc100, x, ours.astype(np.float64), goal, c)
    theirs_value, _ = objective(fc100, x, theirs.astype(np.float64), goal, c)
    print(f"\nc={const}: objective ours {ours_value.mean():.5f}, scipy {theirs_value.mean():.5f}; "
          f"ours lower on {np.mean(ours_value <= theirs_value):.2f} of the samples")
    assert ours.min() >= 0 and ours.max() <= 1
    assert ours_value.mean() <= theirs_value.mean() * 1.01
    assert np.all(ours_value <= theirs_value * 1.05 + 1e-4)


def pixel_model(model: bytes) -> bytes:
    """``model`` fed pixels in [0, 255]: a Div by 255 in front of it (as many zoo files expect)."""
    graph = onnx.load_from_string(model)
    image = graph.graph.input[0].name
    for node in graph.graph.node:
        node.input[:] = ["unit" if name == image else name for name in node.input]
    graph.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(255), "full_scale"))
    graph.graph.node.insert(0, onnx.helper.make_node("Div", [image, "full_scale"], ["unit"]))
    return graph.SerializeToString()


@pytest.mark.parametrize("attack", [CarliniWagnerL2(binary_search_steps=5, max_iter=100),
                                    LBFGS(search_steps=6, max_iter=50)], ids=["cw_l2", "lbfgs"])
def test_the_default_constants_serve_a_model_of_0_to_255_pixels(fc100, attack):
    # the constants are in units of a [0, 1] box: fed 255 x the pixels, the same model gets the
    # same search (C&W: the same iterates, Adam being blind to the objective's scale; L-BFGS-B
    # is not, so about the same sizes); unscaled, C&W's default found nothing on such models
    x, y = correct(fc100, 20)
    pixels = Classifier(pixel_model(digits.onnx_bytes("fc100")))
    unit = attack(fc100, x, y)[0]
    wide = attack(pixels, 255 * x, y, bounds=(0.0, 255.0))[0]
    np.testing.assert_array_equal(wide.success, pixels.predict(wide.x_adv) != y)
    assert wide.x_adv.min() >= 0 and wide.x_adv.max() <= 255
    assert wide.success.mean() >= 0.95 and unit.success.mean() >= 0.95
    both = unit.success & wide.success
    ratio = l2(wide.x_adv, 255 * x)[both].mean() / (255 * l2(unit.x_adv, x)[both].mean())
    assert abs(ratio - 1) < (0.01 if attack.name == "cw_l2" else 0.1)
    same_const = np.isclose(wide.extra["const"][both], unit.extra["const"][both], rtol=1e-6)
    assert same_const.all() if attack.name == "cw_l2" else same_const.mean() >= 0.8


def test_cw_confidence_buys_margin(fc100):
    x, y = correct(fc100, 20)
    kappa = 5.0
    run = quick_cw(confidence=kappa)(fc100, x, y)[0]
    assert run.success.mean() >= 0.95
    z = fc100.logits(run.x_adv[run.success]).astype(np.float64)
    rows = np.arange(len(z))
    at_label = z[rows, y[run.success]]
    z[rows, y[run.success]] = -np.inf
    assert np.all(z.max(axis=1) - at_label >= kappa - 1e-3)


def test_already_misclassified_samples_cost_nothing(fc100):
    _, _, x, y = digits.digits()
    wrong = np.flatnonzero(fc100.predict(x) != y)[:3]
    for attack in (DeepFool(), CarliniWagnerL2(binary_search_steps=2, max_iter=20)):
        run = attack(fc100, x[wrong], y[wrong])[0]
        assert run.success.all()
        assert l2(run.x_adv, x[wrong]).max() < 1e-3


# ---------------------------------------------------------------- universal perturbations


def test_universal_fooling_grows_with_eps_and_respects_the_bound(fc100):
    x, y = digits.digits()[:2]
    x, y = x[:120], y[:120]
    runs = UniversalPerturbation(max_passes=4)(fc100, x, y, eps=[0.0, 0.05, 0.1, 0.2])
    rates = [run.extra["fooling_rate"] for run in runs]
    print(f"\nuniversal linf fooling rates at eps 0, 0.05, 0.1, 0.2: {np.round(rates, 3).tolist()}")
    assert rates[0] == 0.0 and rates[1] < rates[2] < rates[3] and rates[3] >= 0.6
    for run in runs:
        v = run.extra["perturbation"]
        assert v.shape == x.shape[1:] and np.abs(v).max() <= run.eps + 1e-6
        np.testing.assert_array_equal(run.x_adv, apply_universal(v, x))
        np.testing.assert_array_equal(run.success, fc100.predict(run.x_adv) != y)
    l2_run = UniversalPerturbation(norm="l2", max_passes=2)(fc100, x, y, eps=3.0)[0]
    assert np.linalg.norm(l2_run.extra["perturbation"]) <= 3.0 + 1e-4
    assert l2_run.extra["fooling_rate"] > 0.2


def test_universal_perturbation_transfers_to_held_out_data_and_another_model(fc100):
    x_train, y_train, x_test, _ = digits.digits()
    run = UniversalPerturbation(max_passes=4)(fc100, x_train[:200], y_train[:200], eps=0.2)[0]
    v = run.extra["perturbation"]
    noise = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
    noise *= np.linalg.norm(v) / np.linalg.norm(noise)
    held_out = x_test[:200]
    cnn = Classifier(digits.onnx_bytes("cnn"))
    for name, model, margin in (("fc100", fc100, 0.4), ("cnn", cnn, 0.15)):
        clean = model.predict(held_out)
        fooled = np.mean(model.predict(apply_universal(v, held_out)) != clean)
        by_noise = np.mean(model.predict(apply_universal(noise, held_out)) != clean)
        print(f"\nuniversal (fc100, eps 0.2, L2 {np.linalg.norm(v):.2f}) on held-out data, {name}: "
              f"fooling rate {fooled:.3f}; Gaussian noise of the same L2: {by_noise:.3f}")
        assert fooled > by_noise + margin


def test_apply_universal_checks_shapes():
    x = np.full((4, 1, 28, 28), 0.5, np.float32)
    v = np.full((1, 28, 28), 0.7, np.float32)
    out = apply_universal(v, x)
    assert out.shape == x.shape and out.max() == 1.0
    np.testing.assert_array_equal(apply_universal(v[None], x), out)
    np.testing.assert_allclose(apply_universal(v, x, bounds=(-5.0, 5.0)), 1.2, rtol=1e-6)
    with pytest.raises(ValueError, match="perturbation"):
        apply_universal(np.zeros((28, 28), np.float32), x)


# ---------------------------------------------------------------- agreement with ART


def test_deepfool_agrees_with_art(fc100):
    x, y = correct(fc100, 60)
    ours = DeepFool(overshoot=0.02, max_iter=50, candidates=10)(fc100, x, y)[0]
    with one_torch_thread():
        reference = ArtDeepFool(art_classifier("fc100"), max_iter=50, epsilon=0.02, nb_grads=10,
                                batch_size=64, verbose=False).generate(x)
    ref_success = fc100.predict(reference) != y
    ours_l2, ref_l2 = l2(ours.x_adv, x)[ours.success].mean(), l2(reference, x)[ref_success].mean()
    print(f"\nDeepFool L2 on {len(x)} digits (fc100): ours success {ours.success.mean():.3f}, mean L2 "
          f"{ours_l2:.4f}; ART success {ref_success.mean():.3f}, mean L2 {ref_l2:.4f} "
          f"({100 * (ours_l2 / ref_l2 - 1):+.1f}%)")
    assert ours.success.mean() >= ref_success.mean() - 0.02
    assert abs(ours_l2 / ref_l2 - 1) < 0.05


def test_cw_l2_agrees_with_art(fc100):
    x, y = correct(fc100, 30)
    params = {"confidence": 0.0, "binary_search_steps": 5, "max_iter": 50, "initial_const": 1.0,
              "learning_rate": 0.01}
    ours = CarliniWagnerL2(**params)(fc100, x, y)[0]
    with one_torch_thread():
        reference = CarliniL2Method(art_classifier("fc100"), **params, batch_size=64,
                                    verbose=False).generate(x, y)
    ref_success = fc100.predict(reference) != y
    ours_l2, ref_l2 = l2(ours.x_adv, x)[ours.success].mean(), l2(reference, x)[ref_success].mean()
    print(f"\nC&W L2 on {len(x)} digits (fc100, {params}): ours success {ours.success.mean():.3f}, mean L2 "
          f"{ours_l2:.4f}; ART success {ref_success.mean():.3f}, mean L2 {ref_l2:.4f} "
          f"({100 * (ours_l2 / ref_l2 - 1):+.1f}%)")
    assert abs(ours.success.mean() - ref_success.mean()) <= 0.1
    assert abs(ours_l2 / ref_l2 - 1) < 0.1


def test_universal_fooling_rate_comparable_to_art(fc100):
    """Without a binding box the two implementations run the same algorithm (see universal.py
    on ART's clipping, which weakens its perturbations on digits); ART keeps its last v."""
    _, _, x, y = digits.digits()
    x, y = x[:80], y[:80]
    wide = (-100.0, 100.0)
    ours = UniversalPerturbation(max_passes=3, batch_size=1)(fc100, x, y, eps=0.2, bounds=wide)[0]
    random.seed(0)
    deepfool = {"epsilon": 0.02, "max_iter": 50, "nb_grads": 10, "verbose": False}
    reference = ArtUniversal(art_classifier("fc100", box=False), attacker="deepfool",
                             attacker_params=deepfool, delta=0.2, max_iter=3, eps=0.2, norm=np.inf,
                             verbose=False)
    with one_torch_thread():
        reference.generate(x)
    ours_rate, ref_rate = ours.extra["fooling_rate"], reference.fooling_rate
    print(f"\nuniversal Linf eps 0.2 on {len(x)} digits (fc100, no box): ours fooling rate {ours_rate:.3f} "
          f"after {ours.extra['passes']} passes, ART {ref_rate:.3f}")
    assert ours_rate >= ref_rate - 0.15


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("cls, kwargs, name", [
    (DeepFool, {"norm": "l1"}, "norm"),
    (DeepFool, {"overshoot": -0.1}, "overshoot"),
    (DeepFool, {"max_iter": 0}, "max_iter"),
    (DeepFool, {"max_iter": 2.5}, "max_iter"),
    (DeepFool, {"candidates": 1}, "candidates"),
    (CarliniWagnerL2, {"confidence": -1.0}, "confidence"),
    (CarliniWagnerL2, {"learning_rate": 0.0}, "learning_rate"),
    (CarliniWagnerL2, {"max_iter": 0}, "max_iter"),
    (CarliniWagnerL2, {"binary_search_steps": 0}, "binary_search_steps"),
    (CarliniWagnerL2, {"initial_const": -1e-3}, "initial_const"),
    (CarliniWagnerL2, {"abort_early": "yes"}, "abort_early"),
    (LBFGS, {"initial_const": 0.0}, "initial_const"),
    (LBFGS, {"search_steps": 0}, "search_steps"),
    (LBFGS, {"max_iter": -5}, "max_iter"),
    (UniversalPerturbation, {"norm": "l0"}, "norm"),
    (UniversalPerturbation, {"target_fooling_rate": 1.5}, "target_fooling_rate"),
    (UniversalPerturbation, {"target_fooling_rate": 0.0}, "target_fooling_rate"),
    (UniversalPerturbation, {"max_passes": 0}, "max_passes"),
    (UniversalPerturbation, {"batch_size": 0}, "batch_size"),
    (UniversalPerturbation, {"candidates": 1}, "candidates"),
])
def test_bad_parameters_raise_naming_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**kwargs)


def test_call_shape_is_enforced(fc100):
    x, y = correct(fc100, 2)
    assert {"deepfool", "cw_l2", "lbfgs", "universal"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="eps"):
        DeepFool()(fc100, x, y, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        UniversalPerturbation()(fc100, x, y)
    with pytest.raises(ValueError, match="targeted"):
        DeepFool()(fc100, x, y, targets=(y + 1) % 10)
    with pytest.raises(ValueError, match="targeted"):
        UniversalPerturbation()(fc100, x, y, eps=0.1, targets=(y + 1) % 10)
