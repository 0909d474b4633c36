"""CROWN-IBP built from the ONNX file: equal to an independent float64 implementation on the
torch modules, sound on sampled and attacked points, never looser than IBP, and a model with an
operator it has no relaxation for is named as unsupported."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import digits
from tests.certify.soundness import assert_above, margins
from tests.zoo import export_onnx
from workers.attacks.gradient import PGD
from workers.certify import IntervalBounds, UnsupportedForBounds
from workers.runtime import Classifier, RuntimeOptions

OPTIONS = RuntimeOptions(batch_size=64, intra_op_threads=1)


def conv_net() -> nn.Sequential:
    """A small conv net with batch norm and a strided conv, seeded (no max-pool: CROWN-IBP has
    no relaxation for it yet)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 14 * 14, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module", params=["fc100", "conv"])
def network(request):
    if request.param == "conv":
        module = conv_net()
        onnx_bytes = export_onnx(module, (1, 28, 28)).SerializeToString()
    else:
        module = digits.trained("fc100")
        onnx_bytes = digits.onnx_bytes("fc100")
    module = copy.deepcopy(module).double().eval()
    return request.param, module, onnx_bytes, IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp")


@pytest.fixture(scope="module")
def data():
    _, _, x, y = digits.digits()
    return x[:80], y[:80]


def relu_relaxed(lam: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients [N, R, *shape] through a ReLU with input bounds [N, *shape], and the offset
    [N, R] they gain: alpha x <= relu(x) <= s (x - l), alpha = 1 where u >= -l, else 0."""
    up, down = high.clamp(min=0), low.clamp(max=0)
    slope = up / (up - down).clamp(min=1e-12)
    alpha = ((up + down) >= 0).double()
    positive, negative = lam.clamp(min=0), lam.clamp(max=0)
    offset = (negative * (-slope * down)[:, None]).flatten(2).sum(2)
    return positive * alpha[:, None] + negative * slope[:, None], offset


@torch.no_grad()
def crown_ibp_reference(module: nn.Sequential, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """CROWN-IBP in float64 from the definitions: IBP pre-activation bounds, then linear
    relaxation backwards from the margins; the larger of it and IBP's margin, as the engine."""
    low = torch.from_numpy(np.clip(x - eps, 0, 1)).double()
    high = torch.from_numpy(np.clip(x + eps, 0, 1)).double()
    layers, shapes, relu_bounds = list(module), [], {}
    for index, layer in enumerate(layers[:-1]):
        shapes.append(low.shape[1:])
        if isinstance(layer, nn.ReLU):
            relu_bounds[index] = (low.clone(), high.clone())
        if isinstance(layer, nn.Linear | nn.Conv2d | nn.BatchNorm2d):
            centre, radius = (high + low) / 2, (high - low) / 2
            if isinstance(layer, nn.Linear):
                mid, rad = F.linear(centre, layer.weight, layer.bias), F.linear(radius, layer.weight.abs())
            elif isinstance(layer, nn.Conv2d):
                mid = F.conv2d(centre, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding)
                rad = F.conv2d(radius, layer.weight.abs(), stride=layer.stride, padding=layer.padding)
            else:
                a = layer.weight / torch.sqrt(layer.running_var + layer.eps)
                shift = layer.bias - layer.running_mean * a
                mid = centre * a[:, None, None] + shift[:, None, None]
                rad = radius * a.abs()[:, None, None]
            low, high = mid - rad, mid + rad
        else:
            low, high = layer(low), layer(high)
    n, k = len(y), 10
    labels = torch.from_numpy(y)
    last = layers[-1]  # IBP's margins through the last layer, elided as the engine does
    difference = last.weight[labels][:, None, :] - last.weight[None, :, :]
    centre, radius = (high + low) / 2, (high - low) / 2
    ibp = (torch.einsum("nkd,nd->nk", difference, centre) + (last.bias[labels][:, None] - last.bias[None, :])
           - torch.einsum("nkd,nd->nk", difference.abs(), radius))
    ibp[torch.arange(n), labels] = np.inf
    lam = F.one_hot(labels, k).double()[:, None, :] - torch.eye(k, dtype=torch.float64)[None]  # [N, K, K]
    offset = torch.zeros(n, k, dtype=torch.float64)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        if isinstance(layer, nn.Linear):
            offset += lam @ layer.bias
            lam = lam @ layer.weight
        elif isinstance(layer, nn.Flatten):
            lam = lam.reshape(n, k, *shapes[index])
        elif isinstance(layer, nn.ReLU):
            lam, shift = relu_relaxed(lam, *relu_bounds[index])
            offset += shift
        elif isinstance(layer, nn.BatchNorm2d):
            a = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            c = layer.bias - layer.running_mean * a
            offset += (lam * c[:, None, None]).flatten(2).sum(2)
            lam = lam * a[:, None, None]
        elif isinstance(layer, nn.Conv2d):
            offset += (lam * layer.bias[:, None, None]).flatten(2).sum(2)
            flat = lam.reshape(n * k, *lam.shape[2:])
            size_in = shapes[index][1:]
            out_padding = [size_in[i] - ((flat.shape[2 + i] - 1) * layer.stride[i] - 2 * layer.padding[i]
                                         + layer.kernel_size[i]) for i in range(2)]
            flat = F.conv_transpose2d(flat, layer.weight, stride=layer.stride, padding=layer.padding,
                                      output_padding=out_padding)
            lam = flat.reshape(n, k, *flat.shape[1:])
    lam = lam.reshape(n, k, -1)
    x_low = torch.from_numpy(np.clip(x - eps, 0, 1)).double().reshape(n, -1)
    x_high = torch.from_numpy(np.clip(x + eps, 0, 1)).double().reshape(n, -1)
    centre, radius = (x_high + x_low) / 2, (x_high - x_low) / 2
    crown = torch.einsum("nkd,nd->nk", lam, centre) - torch.einsum("nkd,nd->nk", lam.abs(), radius) + offset
    crown[torch.arange(n), labels] = np.inf
    return np.maximum(crown, ibp).min(dim=1).values.numpy()


@pytest.mark.parametrize("eps", [0.0, 0.005, 0.02])
def test_margins_equal_an_independent_float64_implementation(network, data, eps):
    _, module, _, bounds = network
    x, y = data
    want = crown_ibp_reference(module, x.astype(np.float64), y, eps)
    got = bounds.certify(x, y, eps).margin_low
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("eps", [0.005, 0.02])
def test_sound_and_never_looser_than_ibp(network, data, eps):
    _, _, onnx_bytes, bounds = network
    x, y = data[0][:40], data[1][:40]
    classifier = Classifier(onnx_bytes, OPTIONS)
    crown = bounds.certify(x, y, eps)
    ibp = IntervalBounds(onnx_bytes, OPTIONS).certify(x, y, eps)
    assert np.all(crown.margin_low >= ibp.margin_low)
    slack = 1e-5 * (1 + np.abs(crown.logits_high).max())
    for point in corners_and_attacks(classifier, x, y, eps, seed=0):
        found = margins(classifier.logits(point), y)
        assert np.all(found >= crown.margin_low - slack)
        assert not np.any(crown.certified & (found <= 0))


def corners_and_attacks(classifier, x, y, eps: float, seed: int) -> list[np.ndarray]:
    """20 random corners of the L-inf ball (in the box) and 3 PGD points on the margin loss."""
    rng = np.random.default_rng(seed)
    points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
              for _ in range(20)]
    return points + [PGD(steps=20, loss="margin")(classifier, x, y, eps=[eps], seed=s)[0].x_adv
                     for s in range(3)]


def test_max_pooling_is_bounded_soundly_and_tighter_than_ibp(data):
    """The digits CNN (two max-pools): corners of the ball and PGD points stay above the bound."""
    onnx_bytes = digits.onnx_bytes("cnn")
    x, y = data[0][:40], data[1][:40]
    classifier = Classifier(onnx_bytes, OPTIONS)
    eps = 0.01
    crown = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps)
    ibp = IntervalBounds(onnx_bytes, OPTIONS).certify(x, y, eps)
    assert np.all(crown.margin_low >= ibp.margin_low) and crown.certified.sum() > ibp.certified.sum() + 10
    rng = np.random.default_rng(2)
    points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
              for _ in range(20)]
    points += [PGD(steps=20, loss=loss)(classifier, x, y, eps=[eps], seed=4)[0].x_adv
               for loss in ("cross_entropy", "margin")]
    assert_above(classifier, points, y, crown.margin_low)


class MaxOfPairs(nn.Module):
    """An MLP whose hidden units are maxed in pairs (ReduceMax): monotone, so IBP bounds it;
    CROWN-IBP has no relaxation for ReduceMax."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.head = nn.Linear(784, 20), nn.Linear(10, 10)

    def forward(self, x):
        return self.head(self.hidden(torch.flatten(x, 1)).view(-1, 10, 2).amax(2))


def test_an_operator_without_a_relaxation_is_named():
    onnx_bytes = export_onnx(MaxOfPairs().eval(), (1, 28, 28)).SerializeToString()
    IntervalBounds(onnx_bytes, OPTIONS)  # IBP bounds a max: it is monotone
    with pytest.raises(UnsupportedForBounds,
                       match=r"crown_ibp: operator ReduceMax .* has no linear relaxation"):
        IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp")


class Residual(nn.Module):
    """conv, then a residual block, then global average pooling: the ResNet pattern."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.branch(h))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_residual_blocks_and_global_pooling_are_bounded_soundly(data):
    onnx_bytes = export_onnx(Residual().eval(), (1, 28, 28)).SerializeToString()
    x, y = data[0][:30], data[1][:30]
    classifier = Classifier(onnx_bytes, OPTIONS)
    y = classifier.predict(x)  # the untrained net's own labels: margins start positive
    eps = 0.002
    crown = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps)
    ibp = IntervalBounds(onnx_bytes, OPTIONS).certify(x, y, eps)
    assert np.all(crown.margin_low >= ibp.margin_low) and crown.certified.sum() > ibp.certified.sum()
    rng = np.random.default_rng(1)
    points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1) for _ in range(30)]
    assert_above(classifier, points, y, crown.margin_low)


@pytest.mark.parametrize("activation", [nn.Sigmoid, nn.Tanh, lambda: nn.LeakyReLU(0.1), nn.Softplus],
                         ids=["sigmoid", "tanh", "leaky_relu", "softplus"])
def test_s_shaped_and_leaky_activations_are_bounded_soundly(activation, data):
    torch.manual_seed(7)
    module = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), activation(), nn.Linear(64, 32), activation(),
                           nn.Linear(32, 10)).eval()
    onnx_bytes = export_onnx(module, (1, 28, 28)).SerializeToString()
    x = data[0][:40]
    classifier = Classifier(onnx_bytes, OPTIONS)
    y = classifier.predict(x)
    for eps in (0.002, 0.02, 0.1):  # one-sided bounds at first, straddling 0 later
        crown = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps)
        ibp = IntervalBounds(onnx_bytes, OPTIONS).certify(x, y, eps)
        assert np.all(crown.margin_low >= ibp.margin_low)
        if eps == 0.002:  # one-sided bounds: the chords and tangents beat the intervals
            assert crown.margin_low.mean() > ibp.margin_low.mean()
        rng = np.random.default_rng(3)
        points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
                  for _ in range(15)]
        points += [np.clip(x + rng.uniform(-eps, eps, x.shape).astype(np.float32), 0, 1)
                   for _ in range(15)]
        points.append(PGD(steps=20, loss="margin")(classifier, x, y, eps=[eps], seed=0)[0].x_adv)
        assert_above(classifier, points, y, crown.margin_low)


def test_alpha_crown_optimises_the_slopes_soundly(data):
    onnx_bytes = digits.onnx_bytes("fc100")
    x, y = data[0][:40], data[1][:40]
    classifier = Classifier(onnx_bytes, OPTIONS)
    alpha = IntervalBounds(onnx_bytes, OPTIONS, method="alpha_crown")
    crown = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp")
    for eps in (0.01, 0.03):
        optimised, fixed = alpha.certify(x, y, eps), crown.certify(x, y, eps)
        assert np.all(optimised.margin_low >= fixed.margin_low - 1e-6)
        assert optimised.margin_low.mean() > fixed.margin_low.mean() + 0.005  # the slopes moved
        rng = np.random.default_rng(5)
        points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
                  for _ in range(20)]
        points.append(PGD(steps=30, loss="margin")(classifier, x, y, eps=[eps], seed=2)[0].x_adv)
        assert_above(classifier, points, y, optimised.margin_low)


def test_alpha_crown_through_max_pooling_and_what_it_refuses(data):
    onnx_bytes = digits.onnx_bytes("cnn")  # max-pool's relaxation scatters: ScatterElements' gradient
    x, y = data[0][:30], data[1][:30]
    optimised = IntervalBounds(onnx_bytes, OPTIONS, method="alpha_crown").certify(x, y, 0.01)
    fixed = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, 0.01)
    assert np.all(optimised.margin_low >= fixed.margin_low - 1e-6)
    assert optimised.margin_low.mean() > fixed.margin_low.mean()
    classifier = Classifier(onnx_bytes, OPTIONS)
    point = PGD(steps=30, loss="margin")(classifier, x, y, eps=[0.01], seed=2)[0].x_adv
    assert_above(classifier, [point], y, optimised.margin_low)


def test_alpha_crown_under_an_l2_budget_optimises_the_ball_bound_soundly(data):
    onnx_bytes = digits.onnx_bytes("fc100")
    x, y = data[0][:40], data[1][:40]
    optimised = IntervalBounds(onnx_bytes, OPTIONS, method="alpha_crown", norm="l2").certify(x, y, 0.5)
    fixed = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp", norm="l2").certify(x, y, 0.5)
    assert np.all(optimised.margin_low >= fixed.margin_low - 1e-5)
    assert optimised.margin_low.mean() > fixed.margin_low.mean()
    classifier = Classifier(onnx_bytes, OPTIONS)
    points = l2_sphere_points(x, 0.5, seed=4)
    points += [PGD(steps=30, norm="l2", loss="margin")(classifier, x, y, eps=[0.5], seed=s)[0].x_adv
               for s in range(2)]
    assert_above(classifier, points, y, optimised.margin_low)


class ClipConcatPool(nn.Module):
    """ReLU6 and hardtanh (Clip), a channel Concat of two branches, an average pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.left, self.right = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(1, 4, 5, padding=2)
        self.head = nn.Linear(10 * 7 * 7, 10)

    def forward(self, x):
        h = torch.cat([F.relu6(self.left(x) * 3), F.hardtanh(self.right(x) * 3)], dim=1)
        return self.head(torch.flatten(F.avg_pool2d(h, 4), 1))


def test_clip_concat_and_average_pooling_are_bounded_soundly(data):
    onnx_bytes = export_onnx(ClipConcatPool().eval(), (1, 28, 28)).SerializeToString()
    x = data[0][:40]
    classifier = Classifier(onnx_bytes, OPTIONS)
    y = classifier.predict(x)
    for eps in (0.005, 0.02, 0.1):  # pieces, one kink crossed, both
        crown = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps)
        ibp = IntervalBounds(onnx_bytes, OPTIONS).certify(x, y, eps)
        assert np.all(crown.margin_low >= ibp.margin_low)
        rng = np.random.default_rng(6)
        points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
                  for _ in range(20)]
        points.append(PGD(steps=20, loss="margin")(classifier, x, y, eps=[eps], seed=0)[0].x_adv)
        assert_above(classifier, points, y, crown.margin_low)
    assert crown.certified.mean() > ibp.certified.mean()


class PaddedPool(nn.Module):
    """A conv, an average pool with padding (count_include_pad as given), a linear head: with
    no activation, CROWN's bound of each margin over the box is its exact minimum."""

    def __init__(self, count_include_pad: bool, relu: bool = False, ceil_mode: bool = False):
        super().__init__()
        torch.manual_seed(4)
        self.conv, self.relu = nn.Conv2d(1, 4, 3, padding=1), relu
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=count_include_pad,
                                 ceil_mode=ceil_mode)
        side = 15 if ceil_mode else 14
        self.head = nn.Linear(4 * side * side, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.head(torch.flatten(self.pool(torch.relu(h) if self.relu else h), 1))


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_padded_average_pooling_is_bounded_exactly_where_the_network_is_linear(data, count_include_pad):
    module = PaddedPool(count_include_pad).eval()
    onnx_bytes = export_onnx(module, (1, 28, 28)).SerializeToString()
    x, eps = data[0][:12], 0.03
    y = Classifier(onnx_bytes, OPTIONS).predict(x)
    bound = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps).margin_low
    exact = module.double()
    low, high = np.clip(x - eps, 0, 1).astype(np.float64), np.clip(x + eps, 0, 1).astype(np.float64)
    want = []
    for i in range(len(x)):  # margin_j(x) = c_j . x + d_j: its minimum over the box, then over j
        centre = torch.tensor((low[i] + high[i]) / 2)[None].requires_grad_()
        logits = exact(centre)[0]
        worst = np.inf
        for j in range(10):
            if j == y[i]:
                continue
            (c,) = torch.autograd.grad(logits[y[i]] - logits[j], centre, retain_graph=True)
            radius = np.abs(c.numpy()[0]) * (high[i] - low[i]) / 2
            worst = min(worst, float((logits[y[i]] - logits[j]).detach()) - radius.sum())
        want.append(worst)
    np.testing.assert_allclose(bound, want, rtol=1e-4, atol=1e-4)


def _affine_minimum(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """The exact minimum over the box of each margin of a network that is affine in its input,
    its coefficients read by ONNX Runtime one input element at a time (a unit step from the
    centre: exact for an affine map, up to float32 rounding)."""
    classifier = Classifier(onnx_bytes, OPTIONS)
    low, high = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    want = []
    for i in range(len(x)):
        centre = ((low[i] + high[i]) / 2).astype(np.float32)
        steps = np.repeat(centre[None], centre.size + 1, axis=0).reshape(centre.size + 1, -1)
        steps[1:] += np.eye(centre.size, dtype=np.float32)
        logits = classifier.logits(steps.reshape(-1, *centre.shape)).astype(np.float64)
        margins = logits[:, y[i]][:, None] - logits  # [D + 1, K]
        coefficients = margins[1:] - margins[0]  # [D, K]
        spread = np.abs(coefficients).T @ ((high[i] - low[i]) / 2).reshape(-1)
        worst = margins[0] - spread
        worst[y[i]] = np.inf
        want.append(worst.min())
    return np.array(want)


@pytest.mark.parametrize("variant", ["ceil_mode", "ceil_mode_with_pads_counted", "same_upper"])
def test_ceil_mode_and_same_average_pooling_are_bounded_exactly_where_the_network_is_linear(data, variant):
    """The relaxation of an average pool is the gradient builder's adjoint, with ONNX Runtime's
    divisors for ceil_mode's overhanging windows and for SAME padding."""
    module = PaddedPool(variant == "ceil_mode_with_pads_counted", ceil_mode=variant != "same_upper").eval()
    model = export_onnx(module, (1, 28, 28))
    if variant == "same_upper":  # 28 -> 14 with one row and column of padding at the end only
        pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
        kept = [a for a in pool.attribute if a.name not in ("pads", "auto_pad")]
        del pool.attribute[:]
        pool.attribute.extend(kept + [onnx.helper.make_attribute("auto_pad", "SAME_UPPER")])
    onnx_bytes = model.SerializeToString()
    x, eps = data[0][:6], 0.03
    y = Classifier(onnx_bytes, OPTIONS).predict(x)
    bound = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps).margin_low
    np.testing.assert_allclose(bound, _affine_minimum(onnx_bytes, x, y, eps), rtol=1e-4, atol=1e-4)


def test_padded_average_pooling_after_relus_is_sound_and_tighter_than_ibp(data):
    onnx_bytes = export_onnx(PaddedPool(False, relu=True).eval(), (1, 28, 28)).SerializeToString()
    classifier = Classifier(onnx_bytes, OPTIONS)
    x = data[0][:40]
    y = classifier.predict(x)
    eps = 0.02
    crown = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp").certify(x, y, eps)
    ibp = IntervalBounds(onnx_bytes, OPTIONS).certify(x, y, eps)
    assert np.all(crown.margin_low >= ibp.margin_low) and crown.margin_low.mean() > ibp.margin_low.mean()
    rng = np.random.default_rng(8)
    points = [np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape).astype(np.float32), 0, 1)
              for _ in range(20)]
    points.append(PGD(steps=20, loss="margin")(classifier, x, y, eps=[eps], seed=0)[0].x_adv)
    assert_above(classifier, points, y, crown.margin_low)


# ------------------------------------------------------------------ full CROWN


@torch.no_grad()
def _relaxed_backward(layers: list, lam: torch.Tensor, relu_bounds: dict, n: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """(coefficients on the image [N, R, D], offset [N, R]) of lam . (output of ``layers``) by
    the CROWN relaxations backwards (Flatten, Linear, ReLU only: an MLP)."""
    offset = torch.zeros(n, lam.shape[1], dtype=torch.float64)
    for index in reversed(range(len(layers))):
        layer = layers[index]
        if isinstance(layer, nn.Linear):
            offset += lam @ layer.bias
            lam = lam @ layer.weight
        elif isinstance(layer, nn.ReLU):
            lam, shift = relu_relaxed(lam, *relu_bounds[index])
            offset += shift
        else:
            assert isinstance(layer, nn.Flatten)
    return lam, offset


@torch.no_grad()
def full_crown_reference(module: nn.Sequential, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """Full CROWN in float64 from the definitions, on an MLP: each ReLU's input bounded by the
    relaxations backwards from it (with the bounds found before it), intersected with IBP's, as
    the engine does; then the margins as CROWN-IBP, the larger of it and IBP's margin kept."""
    n, k = len(y), 10
    x_low = torch.from_numpy(np.clip(x - eps, 0, 1)).double().reshape(n, -1)
    x_high = torch.from_numpy(np.clip(x + eps, 0, 1)).double().reshape(n, -1)
    centre, radius = (x_high + x_low) / 2, (x_high - x_low) / 2

    def lowest(lam, offset):
        spread = torch.einsum("nrd,nd->nr", lam.abs(), radius)
        return torch.einsum("nrd,nd->nr", lam, centre) - spread + offset

    layers = list(module)
    low, high, relu_bounds = x_low, x_high, {}
    for index, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.ReLU):
            m = low.shape[1]
            both = torch.cat([torch.eye(m), -torch.eye(m)]).double()[None].expand(n, -1, -1)
            bound = lowest(*_relaxed_backward(layers[:index], both, relu_bounds, n))
            low, high = torch.maximum(low, bound[:, :m]), torch.minimum(high, -bound[:, m:])
            relu_bounds[index] = (low.clone(), high.clone())
        if isinstance(layer, nn.Linear):  # IBP onwards, from the tightened bounds
            mid, rad = (high + low) / 2, (high - low) / 2
            low = F.linear(mid, layer.weight, layer.bias) - F.linear(rad, layer.weight.abs())
            high = F.linear(mid, layer.weight, layer.bias) + F.linear(rad, layer.weight.abs())
        else:
            low, high = layer(low), layer(high)
    labels = torch.from_numpy(y)
    last = layers[-1]
    difference = last.weight[labels][:, None, :] - last.weight[None, :, :]
    mid, rad = (high + low) / 2, (high - low) / 2
    ibp = (torch.einsum("nkd,nd->nk", difference, mid) + (last.bias[labels][:, None] - last.bias[None, :])
           - torch.einsum("nkd,nd->nk", difference.abs(), rad))
    spec = F.one_hot(labels, k).double()[:, None, :] - torch.eye(k, dtype=torch.float64)[None]
    crown = lowest(*_relaxed_backward(layers, spec, relu_bounds, n))
    margins = torch.maximum(crown, ibp)
    margins[torch.arange(n), labels] = np.inf
    return margins.min(dim=1).values.numpy()


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.03])
def test_full_crown_equals_an_independent_float64_implementation(data, eps):
    module = copy.deepcopy(digits.trained("fc100")).double().eval()
    x, y = data
    want = full_crown_reference(module, x.astype(np.float64), y, eps)
    got = IntervalBounds(digits.onnx_bytes("fc100"), OPTIONS, method="crown").certify(x, y, eps).margin_low
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("eps", [0.01, 0.03])
def test_full_crown_is_sound_and_never_looser_than_crown_ibp(network, data, eps):
    """On the conv net its conv layers are past the size bound (interval bounds stand there) and
    the bound still never loosens; on fc100 every layer is tightened and more samples certify."""
    name, _, onnx_bytes, crown_ibp = network
    x, y = data[0][:40], data[1][:40]
    full = IntervalBounds(onnx_bytes, OPTIONS, method="crown").certify(x, y, eps)
    partial = crown_ibp.certify(x, y, eps)
    assert np.all(full.margin_low >= partial.margin_low - 1e-5 * (1 + np.abs(partial.margin_low).max()))
    if name == "fc100" and eps == 0.03:
        assert full.certified.sum() > partial.certified.sum()
    classifier = Classifier(onnx_bytes, OPTIONS)
    assert_above(classifier, corners_and_attacks(classifier, x, y, eps, seed=1), y, full.margin_low,
                 slack=1e-5 * (1 + np.abs(full.logits_high).max()))


def test_full_crown_under_an_l2_budget_is_sound(data):
    x, y = data[0][:40], data[1][:40]
    onnx_bytes = digits.onnx_bytes("fc100")
    full = IntervalBounds(onnx_bytes, OPTIONS, method="crown", norm="l2").certify(x, y, 0.5)
    partial = IntervalBounds(onnx_bytes, OPTIONS, method="crown_ibp", norm="l2").certify(x, y, 0.5)
    assert np.all(full.margin_low >= partial.margin_low - 1e-5)
    classifier = Classifier(onnx_bytes, OPTIONS)
    assert_above(classifier, l2_sphere_points(x, 0.5, seed=2), y, full.margin_low, slack=1e-4)


def l2_sphere_points(x: np.ndarray, radius: float, seed: int, count: int = 20) -> list[np.ndarray]:
    """``count`` random points at L2 distance ``radius`` from each image, clipped to the box."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(count):
        step = rng.standard_normal(x.shape).astype(np.float32)
        step *= radius / np.linalg.norm(step.reshape(len(x), -1), axis=1).reshape(-1, *[1] * (x.ndim - 1))
        points.append(np.clip(x + step, 0, 1))
    return points
