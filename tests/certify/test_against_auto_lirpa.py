"""Our bounds against auto_LiRPA's (Xu et al. 2020, the reference implementation of IBP,
CROWN-IBP and CROWN) on the digits MLP and CNN: the lower bounds of the margins z_y - z_j, per
sample, over the same L-inf boxes (clipped to [0, 1]).

IBP and CROWN-IBP agree to float32 rounding on both networks, and full CROWN on the MLP. On the
CNN our full CROWN keeps interval bounds where a tensor's CROWN coefficients would pass
workers.certify.crown.FULL_CROWN_ELEMENTS per sample (its conv layers), so there it may be looser
than auto_LiRPA's, never tighter than CROWN-IBP's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import digits
from tests.certify.auto_lirpa import auto_lirpa
from workers.certify import IntervalBounds
from workers.runtime import RuntimeOptions

OPTIONS = RuntimeOptions(batch_size=64, intra_op_threads=1)
METHODS = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}


@pytest.fixture(scope="module")
def data():
    _, _, x, y = digits.digits()
    return x[:40], y[:40]


def their_margins(name: str, x: np.ndarray, y: np.ndarray, eps: float, method: str) -> np.ndarray:
    lirpa = auto_lirpa()
    module = lirpa.BoundedModule(digits.trained(name).eval(), torch.zeros(1, 1, 28, 28))
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    ball = lirpa.PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(images - eps).clamp(0, 1),
                                    x_U=(images + eps).clamp(0, 1))
    spec = torch.nn.functional.one_hot(labels, 10).float()[:, None, :] - torch.eye(10)[None]
    low, _ = module.compute_bounds(x=(lirpa.BoundedTensor(images, ball),), C=spec, method=method)
    low = low.detach().numpy().astype(np.float64)
    low[np.arange(len(y)), y] = np.inf
    return low.min(axis=1)


@pytest.mark.parametrize("name", ["fc100", "cnn"])
@pytest.mark.parametrize("eps", [0.005, 0.02])
@pytest.mark.parametrize("method", list(METHODS))
def test_margins_match_auto_lirpa(name, eps, method, data):
    x, y = data
    theirs = their_margins(name, x, y, eps, METHODS[method])
    ours = IntervalBounds(digits.onnx_bytes(name), OPTIONS, method=method).certify(x, y, eps).margin_low
    tolerance = 1e-4 * (1 + np.abs(theirs).max())
    if name == "cnn" and method == "crown":
        assert np.all(ours <= theirs + tolerance)  # conv layers past the size bound: IBP's bounds there
        partial = IntervalBounds(digits.onnx_bytes(name), OPTIONS, method="crown_ibp").certify(x, y, eps)
        assert np.all(ours >= partial.margin_low - tolerance)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=tolerance)
