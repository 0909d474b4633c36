"""ONNX Runtime sessions for one classifier: logits, and losses with input gradients, in batches.

The execution provider is what a session actually got (CUDA when onnxruntime-gpu finds a
usable GPU, else CPU), not what the provider list promises. Gradient graphs and sessions are
built once per model hash, loss and options and shared by every Classifier in the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from workers import memory_budget
from workers.bound_loop import BoundLoop, padded
from workers.errors import first_lines, quoted
from workers.loop_graphs import LoopGraph, pgd_step_model
from workers.loop_graphs import P as LOOP
from workers.memory_budget import MiB
from workers.onnxgrad import InvalidModelError, build_gradient_model, prepare_classifier, weights
from workers.onnxgrad.dtypes import feed_dtype
from workers.onnxgrad.losses import LOSS_INPUTS, LOSSES

log = logging.getLogger("robustness.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# TF32 (on by default in ORT's CUDA provider on Ampere and later) rounds conv and matmul
# inputs to 10 mantissa bits: logits and gradients would drift ~1e-3 from the CPU's. The
# default exhaustive cuDNN search reruns for every new batch shape, and attacks shrink their
# batches sample by sample: on an H100 it made an evaluation 5x slower than on the CPU.
PROVIDER_OPTIONS = {CUDA: {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}}


@dataclass(frozen=True)
class RuntimeOptions:
    batch_size: int = 64  # samples per ONNX Runtime call
    providers: tuple[str, ...] | None = None  # None: CUDA when available, else CPU
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    # worker threads spin while a call lasts (and stop at its end: session.force_spinning_stop, so
    # they never compete with the Python between calls); off, each parallel kernel wakes them from
    # sleep: PGD-10 took 1.11-1.25x longer on the small zoo's MLP and LeNet on 2 CPU threads
    # (measured; ResNet-18's, bound by its convolutions, the same)
    allow_spinning: bool = True
    # bytes one gradient call may take (workers/memory_budget.py): batches shrink to fit; None: no bound
    memory_budget: int | None = None
    # APGD, DeepFool, C&W, Square and L-BFGS as loop graphs on state in ONNX Runtime's buffers
    # (workers/bound_loop.py): None: where the session runs on CUDA (on 2 CPU threads they measured
    # 6-16% slower than their numpy loops on the small zoo, Square 35-75%, L-BFGS 5.5x: the copies
    # they save cost nothing there; FAB and the fooling images run them on the CPU too, see
    # Classifier.cheap_loops); True / False: always / never
    device_loops: bool | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {self.batch_size}")
        if self.intra_op_threads < 0:
            raise ValueError(f"`intra_op_threads` must be >= 0, got {self.intra_op_threads}")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(f"`memory_budget` must be a positive number of bytes, got {self.memory_budget}")


def choose_providers(requested: tuple[str, ...] | None) -> list[str]:
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(f"execution provider(s) {missing} not available; available: {available}")
        return list(requested)
    return [CUDA, CPU] if CUDA in available else [CPU]


class _LruCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get_or_create(self, key, create: Callable):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = create()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# One RunOptions for every run in the process: a worker runs one job at a time, and setting
# ``terminate`` is the only way to stop a call already inside ONNX Runtime (a signal-based
# time limit fires only after the call returns).
_RUN_OPTIONS = ort.RunOptions()
# onnxruntime's run_with_iobinding reads this entry on every call to decide on graph capture, and
# an absent entry costs it a C++ exception: 34 us a call, 9% of a PGD step on the small zoo's MLP.
# -1 is "no capture" (no session here enables CUDA or WebGPU graphs).
_RUN_OPTIONS.add_run_config_entry("gpu_graph_id", "-1")


class RunsInterrupted(RuntimeError):
    """ONNX Runtime calls were stopped by interrupt_runs() (a time limit or a cancel)."""


def interrupt_runs() -> None:
    """Stop the ONNX Runtime calls in progress in this process, and every later one until
    resume_runs(); safe to call from another thread."""
    _RUN_OPTIONS.terminate = True


def resume_runs() -> None:
    _RUN_OPTIONS.terminate = False


# a probe that is expected to fail logs nothing (ONNX Runtime logs a failed node as an error)
_QUIET_RUN_OPTIONS = ort.RunOptions()
_QUIET_RUN_OPTIONS.log_severity_level = 4


def _run(session, outputs, feeds, options=None):
    try:
        return session.run(outputs, feeds, options or _RUN_OPTIONS)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise _failed_run(exc, feeds) from exc


def _run_bound(session, binding) -> None:
    try:
        session.run_with_iobinding(binding, _RUN_OPTIONS)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise _failed_run(exc, None) from exc


# what ONNX Runtime raises for a node that cannot run on its inputs (a Reshape to a size the input's
# does not divide, a MatMul of mismatched sizes), and also for a node that ran out of memory or hit
# a device error, which are told apart by their message
NODE_FAILED = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException)
NODE_FAILURE = re.compile(r"while running (\S+) node\. Name:'(.*?)' Status Message: (.*)", re.DOTALL)
RESOURCE_FAILURE = re.compile(r"allocat|out of memory|bad_alloc|cuda|cudnn|cublas|device", re.IGNORECASE)
# the nodes this service adds (gradient, loop and bound graphs: GraphBuilder's prefixes): one of
# them failing is this service's fault, not the model's
OWN_NODES = ("grad/", "loop/", "ibp/")


def _failed_run(exc: Exception, feeds: dict[str, np.ndarray] | None) -> Exception:
    """What a failed run raises: RunsInterrupted after interrupt_runs(); InvalidModelError (the
    job fails at once) when a node of the model cannot run on these inputs, which would fail
    again; else ONNX Runtime's error as it is (retried)."""
    if _RUN_OPTIONS.terminate:
        return RunsInterrupted("ONNX Runtime calls were interrupted")
    node = NODE_FAILURE.search(str(exc))
    if not isinstance(exc, NODE_FAILED) or node is None or RESOURCE_FAILURE.search(str(exc)):
        return exc
    op_type, name, reason = node.groups()
    if name.startswith(OWN_NODES):
        return exc
    named = f" {name!r}" if name else ""
    shapes = "" if feeds is None else " of shape " + ", ".join(str(list(v.shape)) for v in feeds.values())
    return InvalidModelError(
        f"the model cannot run on the inputs{shapes}: its {op_type} node{named} fails in ONNX Runtime "
        f"({first_lines(reason)}); check that the model runs with onnxruntime on inputs of the "
        "dataset's shape (a model exported for one image size may not run at another: resize the images, "
        "or export the model at their size)")


# what ONNX Runtime raises for a model it cannot load (not for a device or memory failure)
MODEL_REFUSED = (ort_errors.InvalidGraph, ort_errors.InvalidArgument, ort_errors.InvalidProtobuf,
                 ort_errors.NotImplemented, ort_errors.Fail)


def runtime_refusal(exc: Exception) -> InvalidModelError:
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    return InvalidModelError(f"ONNX Runtime {ort.__version__} cannot load the model: {first}; check that it "
                             "runs with onnxruntime.InferenceSession, or export it again")


_GRADIENT_MODELS = _LruCache(32)
LOOP_BATCHES = 8  # gradient batches per bound loop (Classifier.loop_rows)
_SESSIONS = _LruCache(16)
_logged_devices: set[str] = set()


def new_session(model_bytes: bytes, options: RuntimeOptions):
    """An ONNX Runtime session with ``options``' threads and providers (not cached)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning",
                                "1" if options.allow_spinning else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1")  # ORT spins on after run() else
    so.log_severity_level = 3
    weights.configure_session(so, model_bytes)
    providers = [(p, PROVIDER_OPTIONS[p]) if p in PROVIDER_OPTIONS else p
                 for p in choose_providers(options.providers)]
    try:
        session = ort.InferenceSession(model_bytes, so, providers=providers)
    except MODEL_REFUSED as exc:  # the model's fault; a device failure stays ours
        raise InvalidModelError(
            f"ONNX Runtime {ort.__version__} cannot load the model: {str(exc).splitlines()[0][:300]}; "
            "check that it runs with onnxruntime.InferenceSession, or export it again"
        ) from None
    device = "cuda" if session.get_providers()[0] == CUDA else "cpu"
    if device not in _logged_devices:
        _logged_devices.add(device)
        log.info("runtime.device %s providers=%s", device, session.get_providers())
    return session


def session_peak(model_bytes: bytes, options: RuntimeOptions, feeds: dict[str, np.ndarray]) -> int:
    """Bytes by which a fresh session of ``model_bytes`` raises the process's peak memory over
    two runs on ``feeds`` (the second is its steady state: memory_budget.py)."""
    def twice() -> None:
        session = new_session(model_bytes, options)
        _run(session, None, feeds)
        _run(session, None, feeds)

    return memory_budget.peak_of(twice)


def session_device_peak(model_bytes: bytes, options: RuntimeOptions, feeds: dict[str, np.ndarray]) -> int:
    """Bytes of GPU memory a fresh CUDA session of ``model_bytes`` holds after two runs on
    ``feeds``: its arena keeps what the runs needed at their peak (memory_budget.gpu_memory)."""
    before = memory_budget.gpu_memory()
    session = new_session(model_bytes, options)
    _run(session, None, feeds)
    _run(session, None, feeds)
    after = memory_budget.gpu_memory()
    del session
    return 0 if before is None or after is None else max(0, after[0] - before[0])


def _session(key: tuple, model_bytes: Callable[[], bytes], options: RuntimeOptions):
    return _SESSIONS.get_or_create(key + (options,), lambda: new_session(model_bytes(), options))


def clear_caches() -> None:
    _GRADIENT_MODELS.clear()
    _SESSIONS.clear()


class Classifier:
    """An ONNX image classifier on ONNX Runtime, with exact input gradients.

    ``x`` arrays are float32 in the model's input layout, labels int64 [N]. Every method
    works in batches of ``batch_size`` (options.batch_size, or fewer within
    options.memory_budget) and returns arrays for the whole input. A model exported with a
    fixed batch size that its graph depends on (a constant concatenated along the batch axis,
    say) runs in batches of exactly that size, the last one padded: slower, but what the
    upload promised (``fixed_batch`` says so). A dynamically quantized model, whose
    DynamicQuantizeLinear takes its range from the whole batch, runs one image per call
    (``fixed_batch`` 1): its logits of an image are then those of the image alone.
    """

    def __init__(self, model: bytes | onnx.ModelProto, options: RuntimeOptions | None = None,
                 output_name: str | None = None):
        self.options = options or RuntimeOptions()
        raw = model if isinstance(model, bytes) else model.SerializeToString()
        self.model_hash = hashlib.sha256(raw).hexdigest()
        self._output_name = output_name
        prepared = prepare_classifier(raw, output_name)
        self.input_name = prepared.input_name
        self.input_shape = prepared.input_shape
        self.ends_in_softmax = prepared.ends_in_softmax
        self.ends_in_sigmoid = prepared.ends_in_sigmoid
        self.dtype = prepared.dtype  # float16 / bfloat16: predictions in it, gradients of its float32 twin
        self.squeezed_from = prepared.squeezed_from  # the output's own shape, when [N, K, 1, 1] or such
        self.binary = prepared.binary  # one score read as two classes: "sigmoid" or "logit"
        self.straight_through = prepared.straight_through  # QDQ pairs differentiated straight through
        self._raw = raw
        # (name, bytes) of the model's largest tensor for one image: a model whose one image cannot fit
        # a budget with it is refused before a call is measured (_check_largest_tensor)
        self._largest_tensor = memory_budget.largest_sample_tensor(prepared.model.graph)
        forward = self._forward_model(prepared)
        self._feed_dtype = feed_dtype(forward, prepared.input_name)  # float16 for a float16 model
        self._forward_bytes = forward.SerializeToString()
        self._forward = _session((self.model_hash, output_name, "forward"),
                                 lambda: self._forward_bytes, self.options)
        self.fixed_batch: int | None = None
        if prepared.couples_batch:
            self.fixed_batch = 1
            log.info("runtime.fixed_batch %s: a DynamicQuantizeLinear takes its range from the whole "
                     "batch; running one image per call", self.model_hash[:12])
        elif prepared.fixed_batch is not None and not self._batch_is_free(prepared.fixed_batch):
            self.fixed_batch = prepared.fixed_batch
            log.info("runtime.fixed_batch %s: the graph depends on its batch size %d; running "
                     "batches of exactly that size", self.model_hash[:12], self.fixed_batch)
        self._batch_sizes: dict[str, int] = {}  # "forward" / "gradient" -> samples per call
        self.num_classes = prepared.num_classes or int(self.logits(self._probe(1)).shape[1])
        self.device = "cuda" if self._forward.get_providers()[0] == CUDA else "cpu"
        # whether attacks should run their loops as loop graphs (`bound_loop`), see RuntimeOptions
        self.device_loops = (self.device == "cuda" if self.options.device_loops is None
                             else self.options.device_loops)
        # FAB's and the fooling images' loop graphs took 0.62-1.0x their numpy loops' time on
        # 2 CPU threads too (small zoo, measured), so they run unless device_loops is False
        self.cheap_loops = self.options.device_loops is not False

    @property
    def model_bytes(self) -> bytes:
        """The model this classifier runs, as given (e.g. with preprocessing composed in)."""
        return self._raw

    @staticmethod
    def _forward_model(prepared) -> onnx.ModelProto:
        """The prepared model with the differentiated scores as its only output (a half-precision
        model: itself, with a float32 interface)."""
        if prepared.forward is not None:
            return prepared.forward
        model = prepared.model
        if model.graph.output[0].name != prepared.logits_name:
            model = onnx.ModelProto()
            model.CopyFrom(prepared.model)
            del model.graph.output[:]
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                prepared.logits_name, onnx.TensorProto.FLOAT, None))
        return model

    def _batch_is_free(self, fixed: int) -> bool:
        """Whether the model, exported with batch size ``fixed``, runs other batch sizes."""
        try:
            probe = {self.input_name: self._probe(fixed + 1)}
            outputs = _run(self._forward, None, probe, _QUIET_RUN_OPTIONS)[0]
        except RunsInterrupted:
            raise
        except Exception:  # ONNX Runtime raises its own exception types
            return False
        return outputs.shape[0] == fixed + 1

    def _probe(self, n: int) -> np.ndarray:
        dims = [d if isinstance(d, int) else 1 for d in self.input_shape[1:]]
        return np.zeros([n] + dims, self._feed_dtype)

    def _gradient_bytes(self, loss: str) -> bytes:
        check_loss(loss)
        key = (self.model_hash, self._output_name, loss, self.device)
        return _GRADIENT_MODELS.get_or_create(key, lambda: build_gradient_model(
            self._raw, loss, self._output_name, device=self.device).SerializeToString())

    def _gradient_session(self, loss: str):
        key = (self.model_hash, self._output_name, loss, self.device)
        grad_bytes = self._gradient_bytes(loss)
        return _session(key + ("gradient",), lambda: grad_bytes, self.options)

    def batch_size(self, kind: str = "gradient") -> int:
        """Samples per call: the options' batch size, or fewer where a ``kind`` call ("forward"
        or "gradient") of that many would take more than ``options.memory_budget`` (measured once
        per model and process)."""
        if kind not in self._batch_sizes:
            self._batch_sizes[kind] = self._budgeted_batch(kind)
        return self._batch_sizes[kind]

    def _budgeted_batch(self, kind: str) -> int:
        """The batch within the host budget (options.memory_budget) and, on CUDA, within
        GPU_SHARE of the GPU memory free now; each footprint measured once per model."""
        cap = batch = self.options.batch_size
        if self.fixed_batch:
            return cap

        def feeds(size: int) -> dict[str, np.ndarray]:
            images = self._probe(size)
            if kind == "gradient":
                return {self.input_name: images.astype(np.float32), "labels": np.zeros(size, np.int64)}
            return {self.input_name: images}

        def model() -> bytes:
            return self._gradient_bytes("auto") if kind == "gradient" else self._forward_bytes

        key = (self.model_hash, self._output_name, kind, self.device, self.options.intra_op_threads)
        budget = self.options.memory_budget
        if budget is not None and memory_budget.peak_tracking_available():
            what = "memory budget of {mb:.0f} MB (ROBUSTNESS_WORKER_MEMORY_MB on the server)"
            self._check_largest_tensor(kind, budget, what)
            footprint = memory_budget.footprint(
                key, lambda size: session_peak(model(), self.options, feeds(size)), cap, budget)
            batch = min(batch, self._within(kind, footprint, budget, cap, "", what))
        gpu = memory_budget.gpu_memory() if self.device == "cuda" else None
        if gpu is not None:
            budget = int(gpu[1] * memory_budget.GPU_SHARE)
            what = "free GPU memory ({mb:.0f} MB usable)"
            self._check_largest_tensor(kind, budget, what)
            footprint = memory_budget.footprint(
                key + ("gpu",), lambda size: session_device_peak(model(), self.options, feeds(size)), cap,
                budget)
            batch = min(batch, self._within(kind, footprint, budget, cap, " of free GPU memory", what))
        return batch

    def _check_largest_tensor(self, kind: str, budget: int, what: str) -> None:
        """Refuse a model whose ``kind`` call on one image must pass ``budget``: a session's steady state
        holds a run's largest tensor twice (memory_budget.py), a gradient call its gradient as well."""
        name, size = self._largest_tensor
        least = size * (4 if kind == "gradient" else 2)
        if least > budget:
            raise memory_budget.OverMemoryBudget(
                f"the model's tensor {quoted(name)} takes {size / MiB:.0f} MB for one image, so a {kind} "
                f"call on one image takes at least {least / MiB:.0f} MB, over this worker's "
                f"{what.format(mb=budget / MiB)}; run it on a worker with more memory, or evaluate a smaller "
                "input size")

    def _within(self, kind: str, footprint: memory_budget.Footprint, budget: int, cap: int, of: str,
                what: str) -> int:
        """The largest batch within ``budget`` bytes (``of``: what they are, for the log; ``what``:
        the budget's name for the refusal, formatted with its MB), at most ``cap``."""
        batch = footprint.batch_within(budget, cap)
        if batch < 1:
            raise memory_budget.OverMemoryBudget(
                f"a {kind} call on one image takes {footprint.at(1) / MiB:.0f} MB, over this worker's "
                f"{what.format(mb=budget / MiB)}; run it on a worker with more memory, or evaluate a "
                "smaller input size")
        if batch < cap:
            log.info("runtime.batch %s %s: %d instead of %d within %.0f MB%s (%.1f MB per sample)",
                     self.model_hash[:12], kind, batch, cap, budget / MiB, of, footprint.per_sample / MiB)
        return batch

    def check_inputs(self, x: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        expected = self.input_shape[1:]
        if x.ndim != len(self.input_shape) or any(
            isinstance(d, int) and d != got for d, got in zip(expected, x.shape[1:], strict=True)
        ):
            raise InvalidModelError(
                f"inputs have shape {list(x.shape)}; the model expects [N, {', '.join(map(str, expected))}]"
            )
        if labels is None:
            return (x,)
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers of shape [{x.shape[0]}], got {labels.dtype} "
                             f"{list(labels.shape)}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], "
                             f"got [{labels.min()}, {labels.max()}]")
        return x, labels.astype(np.int64)

    def _run_batches(self, session, outputs: list[str] | None, feeds: dict[str, np.ndarray],
                     kind: str = "forward", constants: dict[str, np.ndarray] | None = None
                     ) -> list[np.ndarray] | None:
        """``session``'s outputs over every row of ``feeds``, in batches (``constants`` go with
        every batch whole); None for no rows."""
        n = len(next(iter(feeds.values())))
        step = self.fixed_batch or self.batch_size(kind)
        if 0 < n <= step and not self.fixed_batch:  # one batch: no slices, no concatenation
            return list(_run(session, outputs, {**feeds, **(constants or {})}))
        parts = []
        for start in range(0, n, step):
            stop = min(start + step, n)
            batch = {name: value[start:stop] for name, value in feeds.items()}
            if self.fixed_batch and stop - start < step:
                batch = {name: padded(value, step) for name, value in batch.items()}
            results = _run(session, outputs, {**batch, **(constants or {})})
            parts.append([out[:stop - start] for out in results])
        return [np.concatenate(column) for column in zip(*parts, strict=True)] if parts else None

    def logits(self, x: np.ndarray) -> np.ndarray:
        (x,) = self.check_inputs(x)
        feeds = {self.input_name: x.astype(self._feed_dtype, copy=False)}
        outputs = self._run_batches(self._forward, None, feeds)
        if not outputs:
            return np.zeros((0, self.num_classes), np.float32)
        return outputs[0].astype(np.float32, copy=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, loss: str = "auto",
                      targets: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits [N, K], per-sample loss [N], d loss[i] / d x[i] shaped like x).

        ``targets`` (int [N]) is required by ``dlr_targeted`` and ignored otherwise.
        """
        check_loss(loss)
        if loss == "cotangent":
            raise ValueError("use logits_vjp() for cotangent gradients")
        x, labels = self.check_inputs(x, labels)
        feeds = {"labels": labels}
        if "targets" in LOSS_INPUTS[loss]:
            if targets is None:
                raise ValueError(f"the {loss} loss needs `targets`")
            feeds["targets"] = self.check_inputs(x, targets)[1]
        return self._run_gradient(loss, x, feeds)

    def logits_vjp(self, x: np.ndarray, dlogits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, K], J^T dlogits shaped like x): the gradient of <dlogits[i], z(x[i])>."""
        (x,) = self.check_inputs(x)
        dlogits = np.asarray(dlogits, np.float32)
        if dlogits.shape != (len(x), self.num_classes):
            raise ValueError(f"dlogits must have shape [{len(x)}, {self.num_classes}], "
                             f"got {list(dlogits.shape)}")
        logits, _, grad = self._run_gradient("cotangent", x, {"dlogits": dlogits})
        return logits, grad

    def pgd_step(self, x_adv: np.ndarray, x: np.ndarray, labels: np.ndarray, *, norm: str, loss: str,
                 step: float, eps: float, bounds: tuple[float, float]) -> np.ndarray:
        """One projected-gradient step (``norm`` "linf" or "l2") in one ONNX Runtime call per
        batch: clip(x + project(x_adv + step * ascent(d loss / d x_adv) - x, eps), *bounds), in
        the float32 operations and order of the numpy step (workers/attacks/gradient.py), so the
        result is the same to the bit. A negative ``step`` descends (a targeted attack)."""
        x_adv, labels = self.check_inputs(x_adv, labels)
        (x,) = self.check_inputs(x)
        session, graph = self._pgd_session(norm, loss)
        (output,) = graph.writes
        feeds = {self.input_name: x_adv, LOOP + "x": x, "labels": labels}
        outputs = self._run_batches(session, [output], feeds, kind="gradient",
                                    constants=_pgd_scalars(step, eps, bounds))
        return np.zeros_like(x_adv) if outputs is None else outputs[0]

    def pgd_steps(self, x_adv: np.ndarray, x: np.ndarray, labels: np.ndarray, *, norm: str, steps: int,
                  loss: str, step: float, eps: float, bounds: tuple[float, float],
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
        """``steps`` calls of `pgd_step`, with the iterates kept in ONNX Runtime's own buffers
        between steps (a `BoundLoop`): each batch's clean images, labels and iterates are placed
        on the session's device once, each step's output buffer is the next step's input, and
        the host receives x_adv once, after the last step. On CUDA no byte crosses between host
        and device during the steps (the copy loop crosses four arrays per batch and step); on
        the CPU the result is the same to the bit as the copy loop's. ``progress(i)`` runs after
        step i."""
        x_adv, labels = self.check_inputs(x_adv, labels)
        (x,) = self.check_inputs(x)
        if len(x_adv) == 0 or steps <= 0:
            return x_adv.copy()
        session, graph = self._pgd_session(norm, loss)
        loop = self.bound_loop({self.input_name: x_adv, LOOP + "x": x, "labels": labels})
        scalars = _pgd_scalars(step, eps, bounds)
        for i in range(steps):
            loop.apply(session, graph, scalars)
            if progress is not None:
                progress(i + 1)
        return loop.fetch(self.input_name)

    def _pgd_session(self, norm: str, loss: str):
        return self.loop_session(("pgd", norm), loss,
                                 lambda gradient: pgd_step_model(gradient, self.input_name, norm))

    @property
    def loop_rows(self) -> int:
        """At most how many samples one bound loop holds: LOOP_BATCHES gradient batches, so that an
        attack's state on the device grows with the batch the memory budget allows, not with the
        shard (the attacks run larger inputs a chunk at a time)."""
        return (self.fixed_batch or self.batch_size("gradient")) * LOOP_BATCHES

    def bound_loop(self, arrays: dict[str, np.ndarray]) -> BoundLoop:
        """Per-sample ``arrays`` placed on this classifier's device, in its gradient batches,
        for loop graphs (`loop_session`) to read and replace without copies to the host."""
        return BoundLoop(arrays, device=self.device, batch=self.fixed_batch or self.batch_size("gradient"),
                         pad=bool(self.fixed_batch), run=_run_bound)

    def loop_session(self, kind: tuple, base: str | None, build: Callable[[Any], LoopGraph]
                     ) -> tuple[ort.InferenceSession, LoopGraph]:
        """The session of ``build(model)`` for the ``base`` model: the gradient model of that
        loss, "forward" (the forward model) or None (a graph of its own: ``build(None)``);
        built once per model, base, device and ``kind``."""
        key = (self.model_hash, self._output_name, base, self.device, "loop", *kind)

        def create() -> tuple[bytes, LoopGraph]:
            if base is None:
                graph = build(None)
            else:
                model = self._forward_bytes if base == "forward" else self._gradient_bytes(base)
                graph = build(onnx.load_from_string(model))
            return graph.model.SerializeToString(), dataclasses.replace(graph, model=onnx.ModelProto())

        model_bytes, graph = _GRADIENT_MODELS.get_or_create(key, create)
        return _session(key, lambda: model_bytes, self.options), graph

    def _run_gradient(self, loss: str, x: np.ndarray, feeds: dict[str, np.ndarray]):
        outputs = self._run_batches(self._gradient_session(loss), ["logits", "loss", "grad"],
                                    {self.input_name: x, **feeds}, kind="gradient")
        if outputs is None:
            return (np.zeros((0, self.num_classes), np.float32), np.zeros(0, np.float32),
                    np.zeros_like(x))
        return tuple(outputs)


def _pgd_scalars(step: float, eps: float, bounds: tuple[float, float]) -> dict[str, np.ndarray]:
    values = {"step": step, "eps": eps, "low": bounds[0], "high": bounds[1]}
    return {LOOP + name: np.array(value, np.float32) for name, value in values.items()}


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
