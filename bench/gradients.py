"""Benchmark input-gradient graphs on ONNX Runtime against torch and onnx-ad.

    .venv/bin/python bench/gradients.py [--models mlp,lenet,resnet18,mobilenet_v2]
        [--batch 64] [--threads 2] [--repeats N] [--warmup N] [--json PATH] [--no-memory]
        [--provider cpu|cuda] [--zoo small|imagenet]

Per model (from tests.zoo, exported with a symbolic batch axis; with --zoo imagenet from
tests.imagenet_zoo, each exported by both PyTorch exporters: resnet50@dynamo, the default
torch.export-based exporter with external data, and resnet50@torchscript; bench/zoos.py) it
measures images/s of

  ort_fwd           the exported model on an ORT CPU session
  ort_fwd_nospin    the same with session.intra_op.allow_spinning = "0"
  ort_grad          workers.onnxgrad.build_gradient_model(model, loss="cross_entropy"),
                    feeding (input, labels), fetching grad and loss
  ort_grad_nospin   the same without spinning
  torch_fwd         torch eager forward under no_grad
  torch_fwd_bwd     torch forward + torch.autograd.grad of the summed cross-entropy w.r.t.
                    the input only (parameters frozen)
  onnx_ad           onnx-ad 0.3.0's reverse-mode graph of the model with the same
                    cross-entropy appended (batch pinned, opset 17), seeded with ones

and the ratios ORT grad time / ORT forward time, torch fwd+bwd time / torch forward time
(torch's own price of an input gradient, in forwards), ORT grad / torch fwd+bwd throughput
and ORT grad / onnx-ad throughput. Before timing, each gradient is checked against torch's on
one batch, per sample (a float32 gradient may legitimately differ on a sample whose ReLU
pre-activation sits within rounding of zero; float64 torch differs there too).

Peak memory: every variant is run again in a fresh subprocess, which records its resident
set after the imports and inputs are ready, resets the kernel's high-water mark there
(/proc/self/clear_refs), builds the session or model, runs it, and reports the peak
increase in MB. All timings are taken in this one process, timed with time.perf_counter:
after warm-up runs, --rounds rounds each time every variant in turn (a short pause, WARM_SECONDS
of untimed calls, then the median of --repeats repeats), and each variant's figure is its
median round, so a slow spell of a shared machine falls on all variants alike.

With --provider cuda (onnxruntime-gpu and a CUDA build of torch) every variant runs on the
GPU: ORT on the CUDA execution provider with the gradient graph built for device="cuda", torch
on the "cuda" device, both in exact float32 (TF32 off, so the checks keep their tolerance),
ORT with its default exhaustive cuDNN algorithm search and torch with cudnn.benchmark: at one
fixed batch shape both pick their fastest kernels (the runtime searches by heuristic instead,
because attacks keep changing the batch shape). The two _nospin variants are replaced by

  ort_fwd_device    ort_fwd with input and outputs kept on the GPU (IO binding), like torch's
  ort_grad_device   the same for the gradient graph

so the plain ort_ variants are what the service's Classifier pays (numpy in, numpy out) and
the _device ones compare with torch on equal terms. Each ORT graph is also profiled once to
count its nodes per execution provider (a node that falls back to the CPU costs two copies).
GPU memory is also read in the subprocess: what the device holds after the runs, over the
CUDA context (ORT's arena and torch's caching allocator keep their peak).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.load import ForeignLoad  # noqa: E402
from bench.zoos import ZOOS, get_zoo  # noqa: E402
from tests.onnx_ad_reference import build_onnx_ad_gradient  # noqa: E402

ZOO = get_zoo("small")  # main() sets --zoo's
ZOO_NAME = ["small"]  # its name, for the memory probe's subprocess
# the second ORT forward and gradient variants: without spinning threads on the CPU, with
# device-resident inputs and outputs on CUDA
SECOND_VARIANT = {"cpu": "nospin", "cuda": "device"}
CUDA = "CUDAExecutionProvider"
CUDA_OPTIONS = {"use_tf32": "0"}  # exact float32, like the CPU and like torch below


def variants(provider: str = "cpu") -> tuple[str, ...]:
    second = SECOND_VARIANT[provider]
    return ("ort_fwd", f"ort_fwd_{second}", "ort_grad", f"ort_grad_{second}",
            "torch_fwd", "torch_fwd_bwd", "onnx_ad")


VARIANTS = variants("cpu")
SAMPLE_RTOL = 1e-4  # per-sample max |diff| / max |torch grad| for a sample to count as a match
CHECK_MIN_FRACTION = 0.9  # of the samples, for a gradient check to pass


# --------------------------------------------------------------------------------------------
# Inputs and graphs


def make_batch(name: str, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *ZOO.input_shape(name)), dtype=np.float32)
    labels = rng.integers(0, ZOO.NUM_CLASSES, size=batch, dtype=np.int64)
    return x, labels


def build_ort_gradient(model: onnx.ModelProto, provider: str = "cpu") -> onnx.ModelProto:
    from workers.onnxgrad import build_gradient_model

    return build_gradient_model(model, loss="cross_entropy", device=provider)


def _refusal(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------------------------
# Runners: each returns a zero-argument callable running one batch, and the expected outputs


def ort_session(model_bytes: bytes, threads: int, spinning: bool, provider: str = "cpu",
                profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = "/tmp/bench_gradients_placement"
    if provider == "cpu":
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(
        model_bytes, options, providers=[(CUDA, CUDA_OPTIONS), "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA:
        raise RuntimeError(f"the CUDA execution provider did not load; got {session.get_providers()}")
    return session


def device_runner(session: ort.InferenceSession, feeds: dict, outputs: list[str],
                  device: str = "cuda"):
    """run() on inputs copied to the device once, with outputs left there; returns the
    binding (copy_outputs_to_cpu() fetches them)."""
    values = {name: ort.OrtValue.ortvalue_from_numpy(value, device, 0)
              for name, value in feeds.items()}
    binding = session.io_binding()
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, device)

    def run():
        session.run_with_iobinding(binding)
        return binding

    run.keep_alive = values
    return run


def placement(session_bytes: bytes, feeds: dict, threads: int, provider: str) -> dict:
    """Kernel runs per execution provider in one profiled call, and the CPU ones' op types."""
    session = ort_session(session_bytes, threads, True, provider, profile=True)
    session.run(None, feeds)
    path = session.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        Path(path).unlink(missing_ok=True)
    counts: dict[str, int] = {}
    cpu_ops: dict[str, int] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        where = args.get("provider", "?").removesuffix("ExecutionProvider")
        counts[where] = counts.get(where, 0) + 1
        if where == "CPU":
            op = args.get("op_name", "?")
            cpu_ops[op] = cpu_ops.get(op, 0) + 1
    return {"nodes": counts, "cpu_ops": cpu_ops}


class Prepared:
    """Everything a variant needs before its session or model is built (serialized graphs,
    inputs), so the memory probe can take its baseline after this."""

    def __init__(self, name: str, batch: int, threads: int, need: set[str],
                 provider: str = "cpu") -> None:
        self.name = name
        self.batch = batch
        self.threads = threads
        self.provider = provider
        self.torch_device = "cuda" if provider == "cuda" else "cpu"
        self.x, self.labels = make_batch(name, batch)
        model = ZOO.export(name)
        self.input_name = model.graph.input[0].name
        self.forward_bytes = model.SerializeToString()
        self.grad_bytes: bytes | None = None
        self.grad_error: str | None = None
        self.onnx_ad_bytes: bytes | None = None
        self.onnx_ad_error: str | None = None
        self.build_seconds: dict[str, float] = {}
        if any(v.startswith("ort_grad") for v in need):
            start = time.perf_counter()
            try:
                self.grad_bytes = build_ort_gradient(model, provider).SerializeToString()
                self.build_seconds["ort_grad"] = time.perf_counter() - start
            except Exception as exc:  # the builder may not exist yet, or refuse the model
                self.grad_error = "error: " + _refusal(exc)
        if "onnx_ad" in need:
            start = time.perf_counter()
            try:
                self.onnx_ad_bytes = build_onnx_ad_gradient(model, batch).SerializeToString()
                self.build_seconds["onnx_ad"] = time.perf_counter() - start
            except Exception as exc:
                self.onnx_ad_error = "refused: " + _refusal(exc)
        del model
        gc.collect()

    def error(self, variant: str) -> str | None:
        if variant.startswith("ort_grad"):
            return self.grad_error
        if variant == "onnx_ad":
            return self.onnx_ad_error
        return None

    def runner(self, variant: str):
        """(run, fetch): run() executes one batch; fetch() returns (loss, grad) or logits."""
        threads, provider = self.threads, self.provider
        if variant.startswith(("ort_fwd", "ort_grad")):
            forward = variant.startswith("ort_fwd")
            session = ort_session(self.forward_bytes if forward else self.grad_bytes, threads,
                                  not variant.endswith("_nospin"), provider)
            feeds = {self.input_name: self.x} if forward else {
                self.input_name: self.x, "labels": self.labels}
            outputs = [o.name for o in session.get_outputs()][:1] if forward else ["grad", "loss"]
            if variant.endswith("_device"):
                return device_runner(session, feeds, outputs)
            return lambda: session.run(outputs, feeds)
        if variant == "onnx_ad":
            session = ort_session(self.onnx_ad_bytes, threads, True, provider)
            feeds = {
                self.input_name: self.x,
                "labels": self.labels,
                "adj_loss": np.ones((self.batch, 1), np.float32),
            }
            adjoint = "adj_" + self.input_name
            return lambda: session.run([adjoint, "loss"], feeds)
        if variant in ("torch_fwd", "torch_fwd_bwd"):
            torch.set_num_threads(threads)
            device = self.torch_device
            model = ZOO.make_model(self.name).to(device)
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            x = torch.from_numpy(self.x).to(device)
            labels = torch.from_numpy(self.labels).to(device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            if variant == "torch_fwd":

                def forward():
                    with torch.no_grad():
                        logits = model(x)
                    sync()
                    return logits

                return forward

            def forward_backward():
                xg = x.detach().requires_grad_(True)
                losses = F.cross_entropy(model(xg), labels, reduction="none")
                (grad,) = torch.autograd.grad(losses.sum(), xg)
                sync()
                return grad, losses.detach()

            return forward_backward
        raise ValueError(f"unknown variant {variant!r}")


# --------------------------------------------------------------------------------------------
# Checks and timing


def torch_reference(name: str, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    model = ZOO.make_model(name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    xg = torch.from_numpy(x).requires_grad_(True)
    logits = model(xg)
    losses = F.cross_entropy(logits, torch.from_numpy(labels), reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), xg)
    return logits.detach().numpy(), losses.detach().numpy(), grad.numpy()


def compare_gradient(grad: np.ndarray, loss: np.ndarray, reference: tuple) -> dict:
    _, ref_loss, ref_grad = reference
    grad = grad.reshape(ref_grad.shape)
    scale = float(np.abs(ref_grad).max()) or 1.0
    per_sample = np.abs(grad - ref_grad).reshape(len(ref_grad), -1).max(axis=1) / scale
    matched = int((per_sample <= SAMPLE_RTOL).sum())
    loss_err = float(np.abs(np.asarray(loss).reshape(-1) - ref_loss).max())
    return {
        "ok": bool(matched >= CHECK_MIN_FRACTION * len(per_sample) and loss_err < 1e-3),
        "samples_matched": matched,
        "samples": len(per_sample),
        "median_rel_err": float(np.median(per_sample)),
        "max_rel_err": float(per_sample.max()),
        "max_loss_err": loss_err,
    }


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def check(prepared: Prepared, variant: str, run, reference: tuple) -> dict:
    outputs = run()
    if isinstance(outputs, ort.IOBinding):
        outputs = outputs.copy_outputs_to_cpu()
    if variant.startswith("ort_fwd") or variant == "torch_fwd":
        logits = _numpy(outputs[0] if isinstance(outputs, list) else outputs)
        err = float(np.abs(logits - reference[0]).max() / (np.abs(reference[0]).max() or 1.0))
        return {"ok": bool(err < 1e-4), "max_rel_err": err}
    grad, loss = (_numpy(value) for value in outputs)
    if variant == "onnx_ad":
        grad = grad[..., 0]  # trailing seed axis
    return compare_gradient(grad, loss, reference)


MIN_REPEAT_SECONDS = 0.05  # a fast model is called several times per timed repeat


def median_seconds(run, warmup: int, repeats: int) -> float:
    """Median seconds per call: warm-up calls, then `repeats` timed repeats, each of enough
    back-to-back calls to last MIN_REPEAT_SECONDS (one call for anything slower)."""
    start = time.perf_counter()
    for _ in range(max(1, warmup)):
        run()
    per_call = (time.perf_counter() - start) / max(1, warmup)
    calls = max(1, int(MIN_REPEAT_SECONDS / max(per_call, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


BUSY = 0.05  # foreign CPU share above which a timing counts as disturbed
SETTLE_SECONDS = 0.3  # lets the previous variant's spinning worker threads (ORT, OpenMP) park
# after the pause, a variant runs untimed this long: the first calls after an idle spell run
# up to a third slower on this VM (all variants alike), and an attack calls its gradient
# back to back, so the timings are of the steady state
WARM_SECONDS = 0.1


def warm_up(run, seconds: float) -> None:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()


def measure_interleaved(runs: dict, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """variant -> (median seconds over rounds, worst foreign CPU share of the rounds kept).

    Every round times each variant once (the median of --repeats repeats), in turn, so a
    slow spell of a shared machine lands on all variants alike and the ratios between
    them hold. Rounds in which another process took more than BUSY of the CPU are dropped
    while undisturbed ones remain; up to --retries extra rounds replace dropped ones.
    """
    for run in runs.values():
        for _ in range(max(1, args.warmup)):
            run()
    kept: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    dropped: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    extra = max(0, args.retries)
    round_number = 0
    while round_number < args.rounds + extra:
        round_number += 1
        for name, run in runs.items():
            time.sleep(SETTLE_SECONDS)
            warm_up(run, WARM_SECONDS)
            with ForeignLoad() as load:
                seconds = median_seconds(run, 0, args.repeats)
            (kept if load.fraction <= BUSY else dropped)[name].append((seconds, load.fraction))
        if round_number >= args.rounds and all(len(k) >= args.rounds for k in kept.values()):
            break
        if round_number >= args.rounds and extra:
            time.sleep(args.retry_pause)
    result = {}
    for name in runs:
        samples = kept[name] or dropped[name]
        result[name] = (statistics.median(t for t, _ in samples), max(f for _, f in samples))
    return result


# --------------------------------------------------------------------------------------------
# Memory probe (child process)


def _rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kb() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _gpu_used_mb() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def memory_child(name: str, variant: str, batch: int, threads: int, runs: int,
                 provider: str = "cpu") -> dict:
    prepared = Prepared(name, batch, threads, {variant}, provider)
    if prepared.error(variant):
        return {"error": prepared.error(variant)}
    if provider == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context belongs to the baseline
        gpu_baseline = _gpu_used_mb()
    gc.collect()
    baseline = _rss_kb()
    reset = _reset_peak()
    before = _peak_kb()
    run = prepared.runner(variant)
    for _ in range(runs):
        run()
    peak = _peak_kb()
    # without a reset the high-water mark may predate the baseline (imports): report it anyway
    result = {
        "baseline_mb": baseline / 1024,
        "peak_mb": peak / 1024,
        "increase_mb": (peak - (baseline if reset else before)) / 1024,
        "peak_reset": reset,
    }
    if provider == "cuda":
        # ORT's arena and torch's caching allocator keep what they reserved at the peak
        result["gpu_increase_mb"] = _gpu_used_mb() - gpu_baseline
    return result


def measure_memory(name: str, variant: str, batch: int, threads: int, provider: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--zoo",
        ZOO_NAME[0],
        "--_memory-child",
        f"{name}:{variant}",
        "--batch",
        str(batch),
        "--threads",
        str(threads),
        "--provider",
        provider,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"child exited {done.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------
# Driver


def bench_model(name: str, args: argparse.Namespace) -> dict:
    all_variants = variants(args.provider)
    prepared = Prepared(name, args.batch, args.threads, set(all_variants), args.provider)
    reference = torch_reference(name, prepared.x, prepared.labels)
    result: dict = {
        "model": name,
        "batch": args.batch,
        "threads": args.threads,
        "provider": args.provider,
        "onnx_bytes": len(prepared.forward_bytes),
        "build_seconds": prepared.build_seconds,
        "variants": {},
    }
    if args.provider != "cpu":
        feeds = {prepared.input_name: prepared.x}
        result["placement"] = {"forward": placement(
            prepared.forward_bytes, feeds, args.threads, args.provider)}
        if prepared.grad_bytes is not None:
            result["placement"]["gradient"] = placement(
                prepared.grad_bytes, dict(feeds, labels=prepared.labels), args.threads,
                args.provider)
    runs = {}
    for variant in all_variants:
        entry: dict = {}
        result["variants"][variant] = entry
        if prepared.error(variant):
            entry["error"] = prepared.error(variant)
            continue
        try:
            runs[variant] = prepared.runner(variant)
            entry["check"] = check(prepared, variant, runs[variant], reference)
        except Exception as exc:
            runs.pop(variant, None)
            entry["error"] = "error: " + _refusal(exc)
            if args.verbose:
                traceback.print_exc()
    for variant, (seconds, foreign) in measure_interleaved(runs, args).items():
        entry = result["variants"][variant]
        entry["foreign_cpu"] = foreign
        entry["seconds"] = seconds
        entry["images_per_s"] = args.batch / seconds
        if args.verbose:
            print(f"  {name:>14} {variant:<16} {entry}", file=sys.stderr, flush=True)
    runs.clear()
    gc.collect()

    v = result["variants"]

    def ratio(numerator: str, denominator: str) -> float | None:
        a, b = v[numerator].get("seconds"), v[denominator].get("seconds")
        return None if a is None or b is None else a / b

    # time ratio: grad / forward (lower is better); throughput ratios: denominator / numerator
    second = SECOND_VARIANT[args.provider]
    result["ratios"] = {
        "ort_grad_over_fwd_time": ratio("ort_grad", "ort_fwd"),
        f"ort_grad_over_fwd_time_{second}": ratio(f"ort_grad_{second}", f"ort_fwd_{second}"),
        # torch's own input-gradient cost in forwards: what the 2.5 target is calibrated on
        "torch_fwd_bwd_over_fwd_time": ratio("torch_fwd_bwd", "torch_fwd"),
        "ort_grad_vs_torch_fwd_bwd_throughput": ratio("torch_fwd_bwd", "ort_grad"),
        "ort_grad_vs_onnx_ad_throughput": ratio("onnx_ad", "ort_grad"),
    }
    if second != "nospin":
        result["ratios"]["ort_grad_device_vs_torch_fwd_bwd_throughput"] = ratio(
            "torch_fwd_bwd", "ort_grad_device")
    if args.memory:
        for variant in all_variants:
            if "error" in v[variant]:
                continue
            v[variant]["memory"] = measure_memory(name, variant, args.batch, args.threads,
                                                  args.provider)
            if args.verbose:
                print(f"  {name:>14} {variant:<16} memory {v[variant]['memory']}", file=sys.stderr)
    return result


def _cell(entry: dict, key: str = "images_per_s", fmt: str = "{:.0f}") -> str:
    if "error" in entry:
        return entry["error"].split(":")[0]  # "refused" / "error"
    value = entry.get(key)
    if value is None:
        return "-"
    return fmt.format(value) + ("*" if entry.get("foreign_cpu", 0.0) > BUSY else "")


def _check_cell(entry: dict) -> str:
    c = entry.get("check")
    if c is None:
        return "-"
    if "samples" in c:
        flag = "ok" if c["ok"] else "MISMATCH"
        return f"{flag} {c['samples_matched']}/{c['samples']} {c['median_rel_err']:.0e}"
    return ("ok " if c["ok"] else "MISMATCH ") + f"{c['max_rel_err']:.0e}"


def print_report(results: list[dict], args: argparse.Namespace) -> None:
    short = {
        "ort_fwd": "ort fwd",
        "ort_fwd_nospin": "fwd nospin",
        "ort_grad": "ort grad",
        "ort_grad_nospin": "grad nospin",
        "ort_fwd_device": "fwd on-dev",
        "ort_grad_device": "grad on-dev",
        "torch_fwd": "torch fwd",
        "torch_fwd_bwd": "torch f+b",
        "onnx_ad": "onnx-ad",
    }
    names = variants(args.provider)
    width = max([14] + [len(r["model"]) + 2 for r in results])  # zoo names run to 30 characters
    second = SECOND_VARIANT[args.provider]
    where = "CUDA execution provider" if args.provider == "cuda" else "CPU"
    if args.provider == "cuda":
        where += f" on {torch.cuda.get_device_name()}"
    print(f"\nimages/s, batch {args.batch}, {args.threads} threads, {where}, "
          f"median of {args.rounds} interleaved rounds")
    header = f"{'model':<{width}}" + "".join(f"{short[v]:>13}" for v in names)
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['model']:<{width}}" + "".join(f"{_cell(r['variants'][v]):>13}" for v in names))

    if any(r["variants"][v].get("foreign_cpu", 0.0) > BUSY for r in results for v in names):
        print(f"* other processes used over {BUSY:.0%} of the CPUs during that timing")

    print("\nratios (target: grad vs torch >= 1.2, the ORT gradient's throughput over torch eager's "
          "forward + input backward; grad/fwd time is for information)")
    on_device = second == "device"
    header = (f"{'model':<{width}}{'grad/fwd t':>12}{'(' + ('on-dev' if on_device else second) + ')':>10}"
              f"{'torch f+b/f':>13}{'vs torch':>10}" + (f"{'(on-dev)':>10}" if on_device else "")
              + f"{'vs onnx-ad':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        q = r["ratios"]

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        print(
            f"{r['model']:<{width}}{fmt(q['ort_grad_over_fwd_time']):>12}"
            f"{fmt(q[f'ort_grad_over_fwd_time_{second}']):>10}"
            f"{fmt(q['torch_fwd_bwd_over_fwd_time']):>13}"
            f"{fmt(q['ort_grad_vs_torch_fwd_bwd_throughput']):>10}"
            + (f"{fmt(q['ort_grad_device_vs_torch_fwd_bwd_throughput']):>10}" if on_device else "")
            + f"{fmt(q['ort_grad_vs_onnx_ad_throughput']):>12}"
        )

    if any("placement" in r for r in results):
        print("\nkernels per execution provider in one call (op types that ran on the CPU)")
        for r in results:
            for graph, found in r.get("placement", {}).items():
                nodes = ", ".join(f"{n} {p}" for p, n in sorted(found["nodes"].items()))
                cpu = ", ".join(f"{op} x{n}" for op, n in sorted(found["cpu_ops"].items()))
                print(f"{r['model']:<{width}}{graph:<10}{nodes}" + (f" ({cpu})" if cpu else ""))

    print("\ngradient/forward checks against torch (grads: samples matched, median rel err)")
    for r in results:
        cells = [f"{short[v]}: {_check_cell(r['variants'][v])}" for v in names]
        print(f"{r['model']:<{width}}" + "; ".join(cells))

    tables = [("increase_mb", "peak resident-set increase, MB (fresh subprocess per variant)")]
    if args.provider == "cuda":
        tables.append(("gpu_increase_mb", "GPU memory held after the runs, MB, over the CUDA "
                       "context (ORT's arena and torch's cache keep their peak)"))
    for key, title in tables if args.memory else ():
        print(f"\n{title}")
        header = f"{'model':<{width}}" + "".join(f"{short[v]:>13}" for v in names)
        print(header)
        print("-" * len(header))
        for r in results:
            cells = []
            for v in names:
                entry = r["variants"][v]
                memory = entry.get("memory", {})
                if "error" in entry or "error" in memory:
                    cells.append((entry.get("error") or memory.get("error")).split(":")[0])
                else:
                    cells.append(f"{memory.get(key, float('nan')):.0f}")
            print(f"{r['model']:<{width}}" + "".join(f"{c:>13}" for c in cells))

    problems = [
        (r["model"], v, r["variants"][v]["error"])
        for r in results
        for v in names
        if "error" in r["variants"][v]
    ]
    if problems:
        print("\nnot measured:")
        seen = set()
        for model, variant, error in problems:
            variant = variant.removesuffix(f"_{second}")
            if (model, variant, error) not in seen:
                seen.add((model, variant, error))
                print(f"  {model} {variant}: {error}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="small",
                        help="imagenet: ImageNet-size models, each from both PyTorch exporters")
    parser.add_argument("--models", help="comma-separated names (default: the zoo's usual ones)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per round")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds; each variant's figure is its median round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-time a variant when other processes used over 5%% of the CPUs meanwhile",
    )
    parser.add_argument("--retry-pause", type=float, default=10.0, help="seconds between tries")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--provider", choices=sorted(SECOND_VARIANT), default="cpu",
                        help="cuda: ORT's CUDA execution provider and torch on the GPU")
    parser.add_argument("--memory-runs", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    zoo = get_zoo(args.zoo)
    args.models = [m.strip() for m in (args.models or ",".join(zoo.default)).split(",") if m.strip()]
    unknown = [m for m in args.models if m not in zoo.names]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} in the {args.zoo} zoo; "
                     f"choose from {', '.join(zoo.names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore")
    global ZOO
    args = parse_args(argv)
    ZOO, ZOO_NAME[0] = get_zoo(args.zoo), args.zoo
    torch.set_num_threads(args.threads)
    if args.provider == "cuda":
        if CUDA not in ort.get_available_providers() or not torch.cuda.is_available():
            print("--provider cuda needs onnxruntime-gpu and a CUDA build of torch with a GPU; "
                  f"ONNX Runtime offers {ort.get_available_providers()}, torch sees "
                  f"{torch.cuda.device_count()} GPU(s)", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True  # torch's counterpart of ORT's algorithm search
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.memory_child:
        name, variant = args.memory_child.split(":")
        result = memory_child(name, variant, args.batch, args.threads, args.memory_runs,
                              args.provider)
        print(json.dumps(result))
        return 0
    info = {
        "provider": args.provider,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "cpu_count": os.cpu_count(),
    }
    try:
        import onnx_ad

        info["onnx_ad"] = onnx_ad.__version__
    except ImportError:
        info["onnx_ad"] = None
    info["loadavg_start"] = os.getloadavg()
    if info["loadavg_start"][0] > 0.5:
        print(
            f"warning: load average {info['loadavg_start'][0]:.2f} before starting; "
            "other processes on this machine will skew the timings",
            file=sys.stderr,
        )
    results = []
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args))
    info["loadavg_end"] = os.getloadavg()
    print_report(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"info": info, "args": _jsonable(vars(args)), "results": results}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def _jsonable(mapping: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in mapping.items()}


if __name__ == "__main__":
    sys.exit(main())
