"""Batch sizes from a memory budget: the footprint of a model's calls is measured (peak resident
memory of a fresh session at two batch sizes), and batches shrink so that a call fits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from infra.settings import Settings
from tests.cuda import requires_cuda
from workers import memory_budget
from workers.memory_budget import Footprint, OverMemoryBudget, peak_of
from workers.runtime import Classifier, RuntimeOptions

pytestmark = pytest.mark.skipif(
    not memory_budget.peak_tracking_available(),
    reason="the process's peak memory is not readable here (/proc/self/clear_refs)")
MiB = 1 << 20
SIZE = 96  # 32 channels of 96 x 96: 1.2 MB per activation and image


def wide_cnn(seed: int) -> bytes:
    """Conv(3->32) ReLU Conv(32->32) ReLU GlobalAveragePool Flatten Gemm(10): big activations."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(0, 0.2, (32, 3, 3, 3)), "b1": np.zeros(32),
        "w2": rng.normal(0, 0.06, (32, 32, 3, 3)), "b2": np.zeros(32),
        "w3": rng.normal(0, 0.2, (10, 32)), "b3": np.zeros(10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def images(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 3, SIZE, SIZE), dtype=np.float32), rng.integers(0, 10, n)


def test_batches_shrink_to_fit_the_budget_and_a_call_stays_within_it():
    model = wide_cnn(seed=1)
    budget = 60 * MiB
    bounded = Classifier(model, RuntimeOptions(batch_size=64, intra_op_threads=1, memory_budget=budget))
    batch = bounded.batch_size("gradient")
    assert 1 <= batch < 64
    footprint = memory_budget._FOOTPRINTS[(bounded.model_hash, None, "gradient", "cpu", 1)]
    assert footprint.per_sample > 2 * SIZE * SIZE * 32 * 4  # at least two stored activations per image
    assert footprint.at(batch) <= budget < footprint.at(batch + 1)
    x, y = images(3 * batch + 1)
    results = {}
    peak = peak_of(lambda: results.update(out=bounded.loss_and_grad(x, y)))  # the session's first calls
    assert peak <= budget, (peak / MiB, budget / MiB)
    free = Classifier(model, RuntimeOptions(batch_size=64, intra_op_threads=1))
    for got, want in zip(results["out"], free.loss_and_grad(x, y), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert free.batch_size("gradient") == 64  # no budget, no bound


def test_a_model_too_large_for_the_budget_at_one_image_is_refused_with_the_setting():
    classifier = Classifier(wide_cnn(seed=2), RuntimeOptions(batch_size=8, intra_op_threads=1,
                                                             memory_budget=1 * MiB))
    with pytest.raises(OverMemoryBudget) as error:
        classifier.loss_and_grad(*images(2))
    assert ("over this worker's memory budget of 1 MB (ROBUSTNESS_WORKER_MEMORY_MB on the server)"
            in str(error.value))


def expand_bomb(side: int) -> bytes:
    """x [N, 1, 4, 4] -> Reshape [N, 16, 1, 1] -> Expand to a stored [1, 16, side, side] -> ReduceMean
    -> MatMul: a model of a few hundred bytes whose calls take 64 x side^2 bytes per image and more."""
    stored = {"column": np.array([-1, 16, 1, 1], np.int64), "big": np.array([1, 16, side, side], np.int64),
              "axes": np.array([2, 3], np.int64), "W": np.ones((16, 3), np.float32)}
    nodes = [helper.make_node("Reshape", ["x", "column"], ["r"]),
             helper.make_node("Expand", ["r", "big"], ["e"]),
             helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(value, name) for name, value in stored.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return model.SerializeToString()


def test_the_probes_of_a_model_whose_one_image_takes_most_of_the_budget_stay_within_it():
    """A 16 MB tensor per image: one image's gradient call takes 85 MB of a 100 MB budget, so no
    larger batch is probed (a probe of 4 took 337 MB)."""
    classifier = Classifier(expand_bomb(512), RuntimeOptions(batch_size=64, intra_op_threads=1,
                                                             memory_budget=100 * MiB))
    batches = {}
    peak = peak_of(lambda: batches.update(gradient=classifier.batch_size("gradient")))
    assert peak <= 100 * MiB, peak / MiB
    assert batches["gradient"] == 1


def test_a_model_whose_largest_tensor_cannot_fit_the_budget_is_refused_before_a_call():
    classifier = Classifier(expand_bomb(1024), RuntimeOptions(batch_size=64, intra_op_threads=1,
                                                              memory_budget=100 * MiB))
    errors = []
    peak = peak_of(lambda: errors.append(pytest.raises(OverMemoryBudget, classifier.batch_size, "gradient")))
    assert peak < 16 * MiB, peak / MiB  # one call would take 337 MB
    assert str(errors[0].value).startswith(
        "the model's tensor 'e' takes 64 MB for one image, so a gradient call on one image takes at least "
        "256 MB, over this worker's memory budget of 100 MB (ROBUSTNESS_WORKER_MEMORY_MB on the server)")


@pytest.mark.parametrize(
    ("base", "per_sample", "budget", "probed", "batch"),
    [
        (10, 40, 100, [1, 2], 2),  # 50 at one image: 2 images take at most 100
        (10, 40, 45, [1], 0),  # one image passes the budget: nothing larger is probed
        (20, 10, 1000, [1, 4], 64),  # resolved at 4, far within the budget
        (30, 0.25, 40, [1], 1),  # unresolved when the budget stops the probes: all of it per sample
        (2, 0.25, 1000, [1, 4, 16, 64], 64),  # growth hidden in the arena's chunks: probes up to the cap
        (2, 0.25, None, [1, 4, 16, 64], 64),  # no budget: as with a large one
    ],
)
def test_no_probe_is_predicted_to_pass_the_budget(base, per_sample, budget, probed, batch):
    """Fake measurements in MB (RESOLUTION is 8 MB): each probe's batch is the largest whose peak,
    scaled from the last as if all of it were per sample, stays within the budget."""
    measured = []

    def measure(size: int) -> int:
        measured.append(size)
        return int((base + per_sample * size) * MiB)

    found = memory_budget.footprint(("fake", base, per_sample, budget), measure, cap=64,
                                    budget=None if budget is None else budget * MiB)
    assert measured == probed
    assert found.batch_within((budget or 1000) * MiB, 64) == batch
    assert all(base + per_sample * size <= (budget or 1000) for size in measured[1:])


@pytest.mark.parametrize(
    ("footprint", "budget", "cap", "want"),
    [
        (Footprint(base=10, per_sample=5), 100, 64, 18),
        (Footprint(base=10, per_sample=5), 100, 8, 8),
        (Footprint(base=10, per_sample=5), 14, 8, 0),
        (Footprint(base=10, per_sample=0), 100, 8, 8),
        (Footprint(base=200, per_sample=0), 100, 8, 0),
    ],
)
def test_the_largest_batch_within_the_budget(footprint, budget, cap, want):
    assert footprint.batch_within(budget, cap) == want


def test_the_worker_budget_is_a_setting_with_a_measured_default(tmp_path):
    assert Settings(data_dir=tmp_path, worker_memory_mb=512).worker_memory_budget == 512 * MiB
    default = Settings(data_dir=tmp_path, worker_concurrency=2).worker_memory_budget
    assert 64 * MiB < default < memory_budget.default_budget(1)


def test_certified_bounds_run_in_batches_within_the_budget():
    """CROWN's coefficients hold K rows of every activation per sample: its calls shrink too, the
    bounds stay those of the unbounded call, and a budget too small for one image makes the
    method unavailable with the reason (the rest of an evaluation runs)."""
    from workers.certify import IntervalBounds, UnsupportedForBounds

    model = wide_cnn(seed=2)
    budget = 200 * MiB
    bounded = IntervalBounds(model, RuntimeOptions(batch_size=32, intra_op_threads=1, memory_budget=budget),
                             method="crown_ibp")
    batch = bounded.batch_size()
    assert 1 <= batch < 32
    x, y = images(2 * batch + 1)
    results = {}
    peak = peak_of(lambda: results.update(out=bounded.certify(x, y, 0.002)))
    assert peak <= budget, (peak / MiB, budget / MiB)
    free = IntervalBounds(model, RuntimeOptions(batch_size=32, intra_op_threads=1), method="crown_ibp")
    assert free.batch_size() == 32
    np.testing.assert_allclose(results["out"].margin_low, free.certify(x, y, 0.002).margin_low, rtol=1e-5,
                               atol=1e-5)
    tiny = IntervalBounds(model, RuntimeOptions(batch_size=32, intra_op_threads=1, memory_budget=2 * MiB),
                          method="crown_ibp")
    with pytest.raises(UnsupportedForBounds, match="over this worker's memory budget of 2 MB"):
        tiny.batch_size()


def fake_nvidia_smi(folder, used_mib: int, free_mib: int):
    """An nvidia-smi that answers the memory query for the device it is asked about and logs it."""
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      f'echo "$@" >> "{folder}/asked"\n'
                      f'echo "{used_mib}, {free_mib}"\n')
    script.chmod(0o755)
    return folder / "asked"


def test_the_gpu_memory_is_read_for_the_device_this_process_sees(tmp_path, monkeypatch):
    asked = fake_nvidia_smi(tmp_path, 1200, 30000)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234,3")  # a worker pinned by --gpus sees one
    assert memory_budget.gpu_memory() == (1200 * MiB, 30000 * MiB)
    assert asked.read_text().split()[-2:] == ["-i", "GPU-1234"]


def test_no_gpu_reading_where_nvidia_smi_is_absent_or_says_nothing_useful(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert memory_budget.gpu_memory() is None
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    assert memory_budget.gpu_memory() is None


@requires_cuda
def test_on_cuda_batches_shrink_to_fit_the_free_gpu_memory(monkeypatch):
    classifier = Classifier(wide_cnn(3), RuntimeOptions(batch_size=256))
    assert classifier.device == "cuda" and memory_budget.gpu_memory() is not None
    free = memory_budget.gpu_memory()[1]
    # a share of the free memory that holds a few images' activations but not 256 of them
    monkeypatch.setattr(memory_budget, "GPU_SHARE", 64 * 2 * 1.2 * MiB / free)
    batch = classifier.batch_size("gradient")
    assert 1 <= batch < 256
    x, y = images(batch + 3)
    assert classifier.loss_and_grad(x, y)[2].shape == x.shape
