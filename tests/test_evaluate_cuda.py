"""A whole evaluation on the CUDA execution provider gives the CPU's results.

Runs only where onnxruntime-gpu finds a usable GPU (CI has none: it skips, saying so).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from schemas.evaluation import EvaluationSpec
from tests import digits
from tests.cuda import requires_cuda
from workers import runtime
from workers.datasets import load_npz
from workers.evaluate import evaluate
from workers.runtime import RuntimeOptions

pytestmark = requires_cuda

SAMPLES = 100
SPEC = {
    "samples": SAMPLES,
    "seed": 5,
    "attacks": [
        {"name": "fgsm", "eps": [0.05, 0.1, 0.2]},
        {"name": "pgd", "norm": "linf", "eps": [0.1], "steps": 20, "rel_step_size": 0.1},
        {"name": "pgd", "norm": "l2", "eps": [1.0], "steps": 20, "rel_step_size": 0.1,
         "label": "pgd_l2"},
        {"name": "apgd", "norm": "linf", "eps": [0.1], "steps": 20},
        {"name": "deepfool", "max_iter": 30},
        {"name": "cw_l2", "max_iter": 100, "binary_search_steps": 4},
        {"name": "gaussian_noise", "std": [0.1, 0.3]},
    ],
}


@pytest.fixture(scope="module")
def results():
    _, _, x, y = digits.digits()
    buffer = io.BytesIO()
    np.savez(buffer, x=np.round(x * 255).astype(np.uint8), y=y)
    dataset = load_npz(buffer.getvalue())
    spec = EvaluationSpec.model_validate(SPEC)
    model = digits.onnx_bytes("cnn")
    found = {}
    for device, providers in (("cuda", (runtime.CUDA, runtime.CPU)), ("cpu", (runtime.CPU,))):
        runtime.clear_caches()
        found[device] = evaluate(model, dataset, spec,
                                 options=RuntimeOptions(providers=providers)).result
    runtime.clear_caches()
    return found


def test_clean_accuracy_is_the_same(results):
    assert results["cuda"].clean_accuracy == results["cpu"].clean_accuracy > 0.9


def test_every_attack_finds_the_same_robust_accuracy(results):
    """Within one sample: an exact-float32 gradient may still take the other side of a kink
    on one device (see test_runtime_cuda), and a sign or a step can follow it."""
    pairs = list(zip(results["cuda"].attacks, results["cpu"].attacks, strict=True))
    assert [(g.attack, g.eps) for g, _ in pairs] == [(c.attack, c.eps) for _, c in pairs]
    for gpu, cpu in pairs:
        assert abs(gpu.robust_accuracy - cpu.robust_accuracy) <= 1 / SAMPLES + 1e-9, (gpu, cpu)
    exact = sum(g.robust_accuracy == c.robust_accuracy for g, c in pairs)
    assert exact >= len(pairs) - 1, pairs


def test_minimal_perturbations_agree(results):
    for gpu, cpu in zip(results["cuda"].attacks, results["cpu"].attacks, strict=True):
        if gpu.kind == "minimal" and gpu.median_l2 is not None:
            assert gpu.median_l2 == pytest.approx(cpu.median_l2, rel=0.02), (gpu.attack, gpu, cpu)
