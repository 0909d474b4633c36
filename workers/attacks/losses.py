"""The attacks' losses on logits, in numpy float64: their values and d loss / d logits.

The gradient graphs (``workers.onnxgrad.losses``) compute the same losses inside ONNX
Runtime; these are what attacks use to compare iterates by their logits alone (PGD's
restarts), and what a model written to ``AttackModel`` can use to implement
``loss_and_grad`` from its own ``logits_vjp``.

Losses (z the logits [N, K], y the labels, t the targets):

- ``auto``: r = log sum_{j != y} exp(z_j - z_y), the log-odds that the model is wrong.
  Cross-entropy is softplus(r), so the gradient of r is cross-entropy's gradient divided by
  sigmoid(r) > 0: the same ascent direction, without the factor that underflows to exactly 0
  in float32 once the label wins by a logit margin of about 90 (a model fed 0..255 pixels,
  logits scaled up, a saturated softmax). As that margin grows, the softmax over the other
  classes concentrates on the runner-up and the gradient tends to the C&W margin's. Sign and
  normalised steps (FGSM, PGD, APGD) are the cross-entropy's wherever its float32 gradient is
  informative; comparisons of loss values agree too, softplus being increasing.
- ``cross_entropy``: -log softmax(z)_y = softplus(r).
- ``margin``: max_{j != y} z_j - z_y (Carlini and Wagner).
- ``dlr``: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12) (Croce and Hein), K >= 3.
- ``dlr_targeted``: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), K >= 4.
- ``logit``: z_y.
"""

from __future__ import annotations

import numpy as np

LOSSES = ("auto", "cross_entropy", "margin", "dlr", "dlr_targeted", "logit")


def _others(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    masked = z.copy()
    masked[np.arange(len(z)), labels] = -np.inf
    return masked


def _onehot(indices: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[indices]


def loss_and_dlogits(logits: np.ndarray, labels: np.ndarray, loss: str,
                     targets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(loss [N], d loss / d logits [N, K]), both float64."""
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    n, k = z.shape
    rows = np.arange(n)
    at_label = z[rows, labels]
    onehot = _onehot(labels, k)
    if loss in ("auto", "cross_entropy"):
        others = _others(z, labels)
        top = others.max(axis=1)
        shifted = np.exp(others - top[:, None])
        total = shifted.sum(axis=1)
        r = (top - at_label) + np.log(total)
        direction = shifted / total[:, None] - onehot
        if loss == "auto":
            return r, direction
        loss_value = np.logaddexp(0.0, r)  # softplus(r)
        return loss_value, np.exp(r - loss_value)[:, None] * direction  # sigmoid(r) = exp(r - softplus(r))
    if loss == "logit":
        return at_label, onehot
    if loss == "margin":
        best = _others(z, labels).argmax(axis=1)
        return z[rows, best] - at_label, _onehot(best, k) - onehot
    ranked = np.argsort(-z, axis=1, kind="stable")
    if loss == "dlr":
        if k < 3:
            raise ValueError(f"the dlr loss needs at least 3 classes, got {k}")
        best = _others(z, labels).argmax(axis=1)
        gap = at_label - z[rows, best]
        spread = z[rows, ranked[:, 0]] - z[rows, ranked[:, 2]] + 1e-12
        d_gap = onehot - _onehot(best, k)
        d_spread = _onehot(ranked[:, 0], k) - _onehot(ranked[:, 2], k)
    else:  # dlr_targeted
        if targets is None:
            raise ValueError("the dlr_targeted loss needs `targets`")
        if k < 4:
            raise ValueError(f"the dlr_targeted loss needs at least 4 classes, got {k}")
        targets = np.asarray(targets, np.int64)
        gap = at_label - z[rows, targets]
        spread = z[rows, ranked[:, 0]] - 0.5 * (z[rows, ranked[:, 2]] + z[rows, ranked[:, 3]]) + 1e-12
        d_gap = onehot - _onehot(targets, k)
        d_spread = _onehot(ranked[:, 0], k) - 0.5 * (_onehot(ranked[:, 2], k) + _onehot(ranked[:, 3], k))
    value = -gap / spread
    return value, -d_gap / spread[:, None] + (gap / spread**2)[:, None] * d_spread


def loss_values(logits: np.ndarray, labels: np.ndarray, loss: str,
                targets: np.ndarray | None = None) -> np.ndarray:
    """The per-sample loss [N] (float64)."""
    return loss_and_dlogits(logits, labels, loss, targets)[0]
