"""The Classifier on ONNX Runtime's CUDA execution provider gives the CPU's numbers.

These run only where onnxruntime-gpu finds a usable GPU (CI has none: they skip, saying so).
On a GPU machine: `pip install onnxruntime-gpu` in place of onnxruntime, then this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests import zoo
from tests.cuda import requires_cuda
from workers import runtime
from workers.onnxgrad import build_gradient_model
from workers.runtime import Classifier, RuntimeOptions

pytestmark = requires_cuda

MODELS = zoo.MODEL_NAMES
LOSSES = ("auto", "cross_entropy", "margin", "dlr", "logit")


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    model = zoo.export(request.param)
    gpu = Classifier(model, RuntimeOptions(providers=(runtime.CUDA, runtime.CPU)))
    cpu = Classifier(model, RuntimeOptions(providers=(runtime.CPU,)))
    rng = np.random.default_rng(0)
    x = rng.random((16, *zoo.input_shape(request.param)), dtype=np.float32)
    labels = rng.integers(0, zoo.NUM_CLASSES, 16)
    return request.param, gpu, cpu, x, labels


def test_the_classifier_runs_on_the_gpu(pair):
    _, gpu, cpu, _, _ = pair
    assert gpu.device == "cuda" and cpu.device == "cpu"


def _assert_gradients_agree(got: np.ndarray, want: np.ndarray, what) -> None:
    """Per sample, norm-wise, to 1e-4, except at most two samples of the 16: a sample with an
    activation within rounding of a kink (a ReLU at 0, a max-pool near-tie, DLR's sort) may
    take the other branch on one of the two. Measured on an H100: squeezenet's sample 11
    differed by 8e-2 between ORT's CPU and torch's, while ORT's GPU matched torch on both
    devices; vgg's sample 9 differed the same way between torch's CPU and torch's GPU.
    A sample whose gradient is 0 (ops_kitchen's DLR plateaus: exactly 0 on the CPU, about
    4e-9 of the batch's largest on the GPU) is measured against 1e-3 of that largest."""
    scale = 1e-3 * max(float(np.linalg.norm(w)) for w in want)
    errors = [float(np.linalg.norm(g - w)) / max(float(np.linalg.norm(w)), scale)
              for g, w in zip(got, want, strict=True)]
    assert np.median(errors) < 1e-5, (what, errors)
    assert sum(e >= 1e-4 for e in errors) <= 2, (what, errors)


@pytest.mark.parametrize("loss", LOSSES)
def test_losses_and_gradients_match_the_cpu(pair, loss):
    name, gpu, cpu, x, labels = pair
    logits, losses, grad = gpu.loss_and_grad(x, labels, loss=loss)
    want_logits, want_losses, want_grad = cpu.loss_and_grad(x, labels, loss=loss)
    assert _relative(logits, want_logits) < 1e-5, name
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4, atol=1e-5)
    _assert_gradients_agree(grad, want_grad, (name, loss))


def test_logit_vjp_matches_the_cpu(pair):
    name, gpu, cpu, x, _ = pair
    dlogits = np.random.default_rng(1).standard_normal((len(x), gpu.num_classes)).astype(np.float32)
    _, grad = gpu.logits_vjp(x, dlogits)
    _, want = cpu.logits_vjp(x, dlogits)
    _assert_gradients_agree(grad, want, name)


def _cpu_kernels(model_bytes: bytes, feeds: dict, tmp_path: Path) -> list[tuple[str, str, list]]:
    """(node, op type, input and output types) of the kernels ONNX Runtime ran on the CPU in
    one call."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "placement")
    session = ort.InferenceSession(
        model_bytes, options, providers=[(runtime.CUDA, runtime.PROVIDER_OPTIONS[runtime.CUDA]),
                                         runtime.CPU])
    session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    found = []
    for event in events:
        args = event.get("args", {})
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and args.get("provider") == runtime.CPU):
            types = [next(iter(t)) for t in args.get("input_type_shape", [])
                     + args.get("output_type_shape", [])]
            found.append((event["name"].removesuffix("_kernel_time"), args.get("op_name"), types))
    return found


@pytest.mark.parametrize("name", MODELS)
def test_no_float_kernel_of_the_gradient_graph_falls_back_to_the_cpu(name, tmp_path):
    """A float node on the CPU costs two device copies per call; only shape arithmetic
    (int64 in, int64 or bool out) may run there."""
    model = zoo.export(name)
    grad = build_gradient_model(model, "cross_entropy", device="cuda")
    x = np.random.default_rng(0).random((4, *zoo.input_shape(name)), dtype=np.float32)
    feeds = {model.graph.input[0].name: x, "labels": np.arange(4, dtype=np.int64)}
    on_cpu = _cpu_kernels(grad.SerializeToString(), feeds, tmp_path)
    floats = [k for k in on_cpu if any(t not in ("int64", "bool") for t in k[2])]
    assert not floats, floats


def test_a_float16_model_runs_natively_on_the_gpu(tmp_path):
    """Predictions of a float16 model run in float16 on the GPU (no float16 kernel falls back to
    the CPU, which computes some layers in float32) and equal the file's own session on CUDA;
    gradients are the float32 twin's, as on the CPU."""
    from tests.test_model_files import as_half, with_rounded_weights

    model = zoo.export("lenet")
    half = as_half(model)
    x = np.random.default_rng(0).random((16, *zoo.input_shape("lenet")), dtype=np.float32)
    labels = np.arange(16) % zoo.NUM_CLASSES
    gpu = Classifier(half.SerializeToString(), RuntimeOptions(providers=(runtime.CUDA, runtime.CPU)))
    assert gpu.dtype == "float16" and gpu.device == "cuda"
    own = ort.InferenceSession(half.SerializeToString(), providers=[runtime.CUDA])
    expected = own.run(None, {own.get_inputs()[0].name: x.astype(np.float16)})[0].astype(np.float32)
    np.testing.assert_array_equal(gpu.logits(x), expected)
    feeds = {half.graph.input[0].name: x.astype(np.float16)}
    on_cpu = _cpu_kernels(half.SerializeToString(), feeds, tmp_path)
    assert not [k for k in on_cpu if "float16" in k[2]], on_cpu
    twin = Classifier(with_rounded_weights(model).SerializeToString(),
                      RuntimeOptions(providers=(runtime.CPU,)))
    assert _relative(gpu.loss_and_grad(x, labels, "cross_entropy")[2],
                     twin.loss_and_grad(x, labels, "cross_entropy")[2]) < 1e-4
