"""The attack loop with I/O binding (Classifier.linf_steps: the iterates stay in ONNX Runtime's
buffers from step to step, the host sees x_adv once) gives the copy loop's adversarial
examples (Classifier.linf_step once per step, every array through numpy) to the bit, on every
model of the small zoo; on CUDA the same code keeps the loop on the device."""

from __future__ import annotations

import numpy as np
import pytest

from tests import zoo
from tests.cuda import requires_cuda
from tests.fixed_batch import expand_to_batch_of_two
from workers.runtime import Classifier, RunsInterrupted, RuntimeOptions, interrupt_runs, resume_runs

ZOO = ["mlp", "lenet", "vgg", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet", "vit",
       "ops_kitchen"]


def _images(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *zoo.input_shape(name)), dtype=np.float32), rng.integers(0, 10, n)


def _copy_loop(classifier, x_adv, x, y, steps, **step):
    for _ in range(steps):
        x_adv = classifier.linf_step(x_adv, x, y, **step)
    return x_adv


@pytest.mark.parametrize("name", ZOO)
def test_the_bound_loop_equals_the_copy_loop_to_the_bit(name):
    options = RuntimeOptions(batch_size=8, intra_op_threads=1)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    x, y = _images(name, 19)  # three batches, the last one short
    start = np.clip(x + np.random.default_rng(1).uniform(-0.03, 0.03, x.shape).astype(np.float32), 0, 1)
    before = start.copy()
    step = dict(loss="auto", step=0.01, eps=0.03, bounds=(0.0, 1.0))
    seen = []
    bound = classifier.linf_steps(start, x, y, steps=4, progress=seen.append, **step)
    np.testing.assert_array_equal(bound, _copy_loop(classifier, start, x, y, 4, **step))
    np.testing.assert_array_equal(start, before)  # the caller's array is never a buffer of the loop
    assert seen == [1, 2, 3, 4] and not np.array_equal(bound, start)


def test_a_fixed_batch_model_is_padded_as_the_copy_loop_pads_it():
    # Expand to a constant batch of 2 (tests/test_runtime.py): runs two samples at a time
    rng = np.random.default_rng(0)
    model, _, _ = expand_to_batch_of_two(rng)
    classifier = Classifier(model, RuntimeOptions(batch_size=64))
    assert classifier.fixed_batch == 2
    x, y = rng.random((5, 4), dtype=np.float32), np.array([0, 1, 2, 1, 0])
    step = dict(loss="cross_entropy", step=-0.01, eps=0.05, bounds=(0.0, 1.0))  # targeted: descends
    np.testing.assert_array_equal(classifier.linf_steps(x, x, y, steps=3, **step),
                                  _copy_loop(classifier, x, x, y, 3, **step))


def test_a_cancel_interrupts_the_bound_loop():
    classifier = Classifier(zoo.export("mlp").SerializeToString(), RuntimeOptions(batch_size=4))
    x, y = _images("mlp", 12)
    try:
        with pytest.raises(RunsInterrupted):
            classifier.linf_steps(x, x, y, steps=50, loss="auto", step=0.01, eps=0.1, bounds=(0.0, 1.0),
                                  progress=lambda i: interrupt_runs() if i == 2 else None)
    finally:
        resume_runs()


@requires_cuda
@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_on_cuda_the_bound_loop_equals_the_copy_loop(name):
    classifier = Classifier(zoo.export(name).SerializeToString(), RuntimeOptions(batch_size=8))
    assert classifier.device == "cuda"
    x, y = _images(name, 19)
    step = dict(loss="auto", step=0.01, eps=0.03, bounds=(0.0, 1.0))
    np.testing.assert_array_equal(classifier.linf_steps(x, x, y, steps=4, **step),
                                  _copy_loop(classifier, x, x, y, 4, **step))
