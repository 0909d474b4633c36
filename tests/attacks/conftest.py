"""Fixtures shared by the attack tests: digits test images and classifiers, one torch thread."""

from __future__ import annotations

import pytest
import torch

from tests import digits
from workers.runtime import Classifier, RuntimeOptions

OPTIONS = RuntimeOptions(intra_op_threads=1)
N = 200  # test images compared with the reference implementations


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The references run beside other jobs on two cores: keep PyTorch to one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    _, _, x, y = digits.digits()
    return x[:N], y[:N]


@pytest.fixture(scope="module")
def classifiers():
    cache = {}

    def get(name: str) -> Classifier:
        if name not in cache:
            cache[name] = Classifier(digits.onnx_bytes(name), OPTIONS)
        return cache[name]

    return get


def robust_accuracy(run) -> float:
    return float(1 - run.success.mean())
