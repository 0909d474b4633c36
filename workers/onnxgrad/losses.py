"""Per-sample losses on logits z [N, K] and labels y [N], with their gradient d loss / d z.

Each loss is emitted together with its closed-form gradient, so the gradient graph starts
from an exact seed without differentiating through TopK or ArgMax.

- auto: r = log sum_{j != y} exp(z_j - z_y), the log-odds that the model is wrong, with
  gradient softmax over the other classes - onehot(y). Cross-entropy is softplus(r), so this
  is cross-entropy's gradient divided by sigmoid(r): the same direction, without the factor
  that underflows to 0 once the label wins by a logit margin of about 90 (the attacks'
  default loss; see workers/attacks/losses.py).
- cross_entropy: -log softmax(z)_y; gradient softmax(z) - onehot(y), both in a form that
  keeps its precision where softmax(z)_y rounds to 1.
- margin (Carlini-Wagner): max_{j != y} z_j - z_y; gradient onehot(j*) - onehot(y).
- dlr (Croce and Hein 2020, untargeted): -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12),
  pi the classes sorted by logit, descending. Needs K >= 3.
- logit: z_y; gradient onehot(y) (targeted attacks, DeepFool).
- dlr_targeted (APGD-T): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), with a second
  input ``targets``. Needs K >= 4.
- cotangent: <c, z> for a given cotangent c [N, K] (input ``dlogits``), whose gradient is
  J^T c: any linear combination of logits, e.g. z_t - z_y for FAB and DeepFool.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InvalidModelError
from .graph import GraphBuilder

LOSSES = ("auto", "cross_entropy", "margin", "dlr", "logit", "dlr_targeted", "cotangent")
# the extra inputs each loss reads besides the image: name -> (dtype, shape suffix after N)
LOSS_INPUTS = {
    "auto": ("labels",), "cross_entropy": ("labels",), "margin": ("labels",), "dlr": ("labels",),
    "logit": ("labels",),
    "dlr_targeted": ("labels", "targets"), "cotangent": ("dlogits",),
}
MIN_CLASSES = {"dlr": 3, "dlr_targeted": 4}
_LOWEST = float(np.finfo(np.float32).min)


class _Logits:
    def __init__(self, g: GraphBuilder, z: str, labels: str, num_classes: int | None,
                 targets: str | None = None):
        self.g, self.z, self.labels, self.targets = g, z, labels, targets
        depth = g.const(num_classes, np.int64) if num_classes else g.op(
            "Gather", g.shape(z), g.const(1, np.int64))
        self._depth = depth
        self.onehot = self.one_hot(labels)

    def one_hot(self, indices: str) -> str:
        return self.g.op("OneHot", indices, self._depth, self.g.const([0.0, 1.0]), axis=-1)

    def at_label(self) -> str:
        return self.g.reduce("ReduceSum", self.g.op("Mul", self.z, self.onehot), [1], False)

    def best_other(self) -> tuple[str, str]:
        """max_{j != y} z_j and the one-hot of its argmax."""
        g = self.g
        masked = g.op("Where", g.op("Cast", self.onehot, to=9), g.const(_LOWEST), self.z)
        value = g.reduce("ReduceMax", masked, [1], False)
        index = g.op("ArgMax", masked, axis=1, keepdims=0)
        return value, self.one_hot(index)


def _log_odds(t: _Logits) -> tuple[str, str]:
    """r = log sum_{j != y} exp(z_j - z_y) [N, 1] and the softmax over the other classes
    [N, K] (0 at the label), computed from differences so that large logits round only them."""
    g = t.g
    others = g.op("Where", g.op("Cast", t.onehot, to=9), g.const(_LOWEST), t.z)
    top = g.reduce("ReduceMax", others, [1], True)
    shifted = g.op("Exp", g.op("Sub", others, top))  # 0 at the label
    total = g.reduce("ReduceSum", shifted, [1], True)
    at_label = g.reduce("ReduceSum", g.op("Mul", t.z, t.onehot), [1], True)
    # (top - z_y) first: both may be large while r is not
    r = g.op("Add", g.op("Sub", top, at_label), g.op("Log", total))
    return r, g.op("Div", shifted, total)


def _auto(t: _Logits) -> tuple[str, str]:
    r, others = _log_odds(t)
    return t.g.reduce("ReduceSum", r, [1], False), t.g.op("Sub", others, t.onehot)


def _cross_entropy(t: _Logits) -> tuple[str, str]:
    """-log softmax(z)_y = softplus(r), r = log sum_{j != y} exp(z_j - z_y), with gradient
    sigmoid(r) (softmax of the other classes - onehot(y)), sigmoid(r) = exp(r - loss).

    The textbook forms (-log_softmax(z)_y and softmax(z) - onehot) cancel where the label's
    probability rounds to 1, which is most samples of a trained model: their loss comes out
    exactly 0 and their gradient is rounding noise (on the digits CNN, 12% of float32 gradient
    signs disagreed with float64, and the CPU and the GPU disagreed on FGSM's result). This
    form keeps full relative precision until sigmoid(r) underflows (a margin of about 87)."""
    g = t.g
    r, others = _log_odds(t)
    # softplus(r) = max(r, 0) + log1p(exp(-|r|)), log1p by Kahan's u = 1 + a trick (ONNX has no
    # Log1p, and ORT's CUDA Softplus computes log(1 + exp(r)), which rounds small values to 0)
    a = g.op("Exp", g.op("Neg", g.op("Abs", r)))
    u = g.op("Add", a, g.const(1.0))
    du = g.op("Sub", u, g.const(1.0))
    log1p = g.op("Where", g.op("Equal", du, g.const(0.0)), a,
                 g.op("Mul", a, g.op("Div", g.op("Log", u), du)))
    loss = g.op("Add", g.op("Relu", r), log1p)
    weight = g.op("Exp", g.op("Sub", r, loss))
    grad = g.op("Mul", weight, g.op("Sub", others, t.onehot))
    return g.reduce("ReduceSum", loss, [1], False), grad


def _margin(t: _Logits) -> tuple[str, str]:
    g = t.g
    other, other_hot = t.best_other()
    return g.op("Sub", other, t.at_label()), g.op("Sub", other_hot, t.onehot)


def _dlr(t: _Logits) -> tuple[str, str]:
    g = t.g
    other, other_hot = t.best_other()
    top_values, top_indices = g.op("TopK", t.z, g.ints([3]), axis=1, outputs=2)
    first = g.op("Gather", top_values, g.const(0, np.int64), axis=1)
    third = g.op("Gather", top_values, g.const(2, np.int64), axis=1)
    gap = g.op("Sub", t.at_label(), other)  # a = z_y - max_{j != y} z_j
    spread = g.op("Add", g.op("Sub", first, third), g.const(1e-12))  # d
    loss = g.op("Neg", g.op("Div", gap, spread))
    # d(-a/d) = -da/d + a/d^2 dd,  da = e_y - e_j*,  dd = e_pi1 - e_pi3
    d_gap = g.op("Sub", t.onehot, other_hot)
    d_spread = g.op("Sub", t.one_hot(g.op("Gather", top_indices, g.const(0, np.int64), axis=1)),
                    t.one_hot(g.op("Gather", top_indices, g.const(2, np.int64), axis=1)))
    column = [-1, 1]
    inv_spread = g.op("Reshape", g.op("Reciprocal", spread), g.ints(column))
    ratio = g.op("Reshape", g.op("Div", gap, g.op("Mul", spread, spread)), g.ints(column))
    grad = g.op("Add", g.op("Neg", g.op("Mul", d_gap, inv_spread)), g.op("Mul", d_spread, ratio))
    return loss, grad


def _logit(t: _Logits) -> tuple[str, str]:
    return t.at_label(), t.onehot


def _dlr_targeted(t: _Logits) -> tuple[str, str]:
    g = t.g
    assert t.targets is not None
    target_hot = t.one_hot(t.targets)
    at_target = g.reduce("ReduceSum", g.op("Mul", t.z, target_hot), [1], False)
    top_values, top_indices = g.op("TopK", t.z, g.ints([4]), axis=1, outputs=2)

    def pick(tensor: str, k: int) -> str:
        return g.op("Gather", tensor, g.const(k, np.int64), axis=1)

    gap = g.op("Sub", t.at_label(), at_target)  # a = z_y - z_t
    spread = g.op("Add", g.op("Sub", pick(top_values, 0),
                              g.op("Mul", g.op("Add", pick(top_values, 2), pick(top_values, 3)),
                                   g.const(0.5))), g.const(1e-12))  # d
    loss = g.op("Neg", g.op("Div", gap, spread))
    d_gap = g.op("Sub", t.onehot, target_hot)
    half_rest = g.op("Mul", g.op("Add", t.one_hot(pick(top_indices, 2)),
                                 t.one_hot(pick(top_indices, 3))), g.const(0.5))
    d_spread = g.op("Sub", t.one_hot(pick(top_indices, 0)), half_rest)
    column = [-1, 1]
    inv_spread = g.op("Reshape", g.op("Reciprocal", spread), g.ints(column))
    ratio = g.op("Reshape", g.op("Div", gap, g.op("Mul", spread, spread)), g.ints(column))
    grad = g.op("Add", g.op("Neg", g.op("Mul", d_gap, inv_spread)), g.op("Mul", d_spread, ratio))
    return loss, grad


_EMITTERS: dict[str, Callable[[_Logits], tuple[str, str]]] = {
    "auto": _auto,
    "cross_entropy": _cross_entropy,
    "margin": _margin,
    "dlr": _dlr,
    "logit": _logit,
    "dlr_targeted": _dlr_targeted,
}


def emit_loss(
    g: GraphBuilder, loss: str, logits: str, num_classes: int | None, inputs: dict[str, str]
) -> tuple[str, str]:
    """Emit ``loss`` on ``logits``; returns (per-sample loss [N], d loss / d logits [N, K]).

    ``inputs`` maps the loss's extra input names (``LOSS_INPUTS[loss]``) to graph tensors.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    needed = MIN_CLASSES.get(loss, 0)
    if num_classes is not None and num_classes < needed:
        raise InvalidModelError(
            f"the {loss} loss needs at least {needed} classes; the model has {num_classes}")
    if loss == "cotangent":
        cotangent = inputs["dlogits"]
        return g.reduce("ReduceSum", g.op("Mul", logits, cotangent), [1], False), cotangent
    return _EMITTERS[loss](_Logits(g, logits, inputs["labels"], num_classes, inputs.get("targets")))
