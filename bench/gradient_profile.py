"""Where a gradient graph's time goes on ONNX Runtime's CPU provider, kernel by kernel.

    .venv/bin/python bench/gradient_profile.py [--models lenet,mobilenet_v2] [--batch 64]
        [--threads 2] [--runs 30] [--top 12] [--zoo small|imagenet]

For each model (from tests.zoo; with --zoo imagenet from tests.imagenet_zoo as
bench/gradients.py names them, e.g. vit_s16@torchscript or vit_s16@dynamo) it profiles the
forward session and the session of build_gradient_model(model, loss="cross_entropy"), both as
bench/gradients.py builds them (spinning off), and splits the gradient session's kernel time,
read from ONNX Runtime's own profile after ONNX Runtime's graph optimizations (blocked layout,
fusions), into

  forward part   nodes the logits depend on: the forward pass inside the gradient graph
  gradient part  everything else (with any node ONNX Runtime inserted unnamed), by
                 operator type (a Conv with a fused activation or a fused Sum input is
                 listed as such: the CPU graph's activation masks are depthwise Convs with
                 a fused Clip or Tanh, see workers/onnxgrad/rules/ramps.py)

with each line's share in units of the standalone forward session's kernel time, so the
rows add up to the gradient/forward ratio that bench/gradients.py times. Profiled kernel times
include ONNX Runtime's per-node profiling overhead, which inflates graphs of many tiny nodes
(a loss on [64, 10] logits); the wall times printed above each table are unprofiled.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench import gradients  # noqa: E402
from bench.gradients import build_ort_gradient, make_batch  # noqa: E402
from bench.zoos import get_zoo  # noqa: E402

DEFAULT_MODELS = ("lenet", "mobilenet_v2")
WARMUP_RUNS = 10


def session(model_bytes: bytes, threads: int, workdir: Path, tag: str,
            profile: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.optimized_model_filepath = str(workdir / f"{tag}.optimized.onnx")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(workdir / tag)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def wall_ms(sess: ort.InferenceSession, outputs: list[str] | None, feeds: dict, runs: int) -> float:
    for _ in range(WARMUP_RUNS):
        sess.run(outputs, feeds)
    start = time.perf_counter()
    for _ in range(runs):
        sess.run(outputs, feeds)
    return (time.perf_counter() - start) / runs * 1e3


def kernel_ms(model_bytes: bytes, outputs: list[str] | None, feeds: dict, args, workdir: Path,
              tag: str) -> tuple[dict[str, float], dict[str, str], onnx.ModelProto]:
    """Mean kernel milliseconds per node over --runs profiled runs after warm-up, each
    node's operator type, and the graph ONNX Runtime ran (its node names are the profile's,
    except for nodes it inserted unnamed, such as the Casts of an expanded CastLike)."""
    sess = session(model_bytes, args.threads, workdir, tag, profile=True)
    for _ in range(WARMUP_RUNS + args.runs):
        sess.run(outputs, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    run_starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    timed_from = run_starts[WARMUP_RUNS]  # profile timestamps: microseconds into the session
    totals: dict[str, float] = collections.defaultdict(float)
    op_types: dict[str, str] = {}
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] >= timed_from):
            node = event["name"].removesuffix("_kernel_time")
            totals[node] += event["dur"] / 1e3 / args.runs
            op_types[node] = event["args"]["op_name"]
    return totals, op_types, onnx.load(workdir / f"{tag}.optimized.onnx")


def forward_nodes(graph: onnx.GraphProto, logits: str) -> set[str]:
    """Names of the nodes the logits depend on."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    stack = [logits]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(node.input)
    return seen


def kind(node: onnx.NodeProto) -> str:
    """Operator type, with a Conv's fused activation and fused Sum input."""
    if node.op_type != "Conv":
        return node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    activation = attrs.get("activation", b"")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    label = "Conv"
    if len(node.input) > 3 and node.input[3]:
        label += "+Sum"
    return label + (f"[{activation}]" if activation else "")


def profile_model(name: str, args) -> dict:
    model = gradients.ZOO.export(name)
    input_name = model.graph.input[0].name
    x, labels = make_batch(name, args.batch)
    forward_bytes = model.SerializeToString()
    grad_bytes = build_ort_gradient(model).SerializeToString()
    forward_feeds = {input_name: x}
    grad_feeds = {input_name: x, "labels": labels}
    grad_outputs = ["grad", "loss"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        walls = {
            "forward": wall_ms(session(forward_bytes, args.threads, workdir, "fwd_wall", False),
                               None, forward_feeds, args.runs),
            "gradient": wall_ms(session(grad_bytes, args.threads, workdir, "grad_wall", False),
                                grad_outputs, grad_feeds, args.runs),
        }
        forward_times, _, _ = kernel_ms(forward_bytes, None, forward_feeds, args, workdir,
                                        "fwd")
        grad_times, op_types, grad_graph = kernel_ms(grad_bytes, grad_outputs, grad_feeds, args, workdir,
                                           "grad")
    in_forward = forward_nodes(grad_graph.graph, "logits")
    kinds = {node.name: kind(node) for node in grad_graph.graph.node if node.name}
    forward_part = sum(t for node, t in grad_times.items() if node in in_forward)
    gradient_part: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for node, t in grad_times.items():
        if node not in in_forward:
            label = kinds.get(node, op_types[node])
            gradient_part[label] += t
            counts[label] += 1
    return {
        "model": name,
        "wall_ms": walls,
        "forward_kernel_ms": sum(forward_times.values()),
        "gradient_kernel_ms": sum(grad_times.values()),
        "forward_part_ms": forward_part,
        "gradient_part_ms": dict(gradient_part),
        "gradient_part_nodes": dict(counts),
    }


def print_profile(result: dict, top: int) -> None:
    walls = result["wall_ms"]
    forward = result["forward_kernel_ms"]
    print(f"\n{result['model']}: wall (unprofiled) forward {walls['forward']:.3f} ms, gradient "
          f"{walls['gradient']:.3f} ms, ratio {walls['gradient'] / walls['forward']:.2f}")
    print(f"kernel sums: forward session {forward:.3f} ms, gradient session "
          f"{result['gradient_kernel_ms']:.3f} ms, ratio {result['gradient_kernel_ms'] / forward:.2f}")
    print(f"  {'part':34s} {'nodes':>5s} {'ms':>9s} {'x fwd':>6s} {'cum x fwd':>9s}")
    cumulative = result["forward_part_ms"]
    print(f"  {'forward part':34s} {'':5s} {cumulative:9.3f} {cumulative / forward:6.2f} "
          f"{cumulative / forward:9.2f}")
    rows = sorted(result["gradient_part_ms"].items(), key=lambda kv: -kv[1])
    rest = rows[top:]
    for label, ms in rows[:top]:
        cumulative += ms
        print(f"  {label:34s} {result['gradient_part_nodes'][label]:5d} {ms:9.3f} "
              f"{ms / forward:6.2f} {cumulative / forward:9.2f}")
    if rest:
        ms = sum(t for _, t in rest)
        cumulative += ms
        nodes = sum(result["gradient_part_nodes"][label] for label, _ in rest)
        print(f"  {f'{len(rest)} other kinds':34s} {nodes:5d} {ms:9.3f} {ms / forward:6.2f} "
              f"{cumulative / forward:9.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated names of the --zoo")
    parser.add_argument("--zoo", choices=("small", "imagenet"), default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed and profiled runs")
    parser.add_argument("--top", type=int, default=12, help="gradient-part rows to list")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    zoo = gradients.ZOO = get_zoo(args.zoo)  # make_batch reads the module's zoo
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in zoo.names]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} in the {args.zoo} zoo; "
                     f"choose from {', '.join(zoo.names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore")
    args = parse_args(argv)
    results = []
    for name in args.models:
        print(f"profiling {name} ...", file=sys.stderr, flush=True)
        results.append(profile_model(name, args))
        print_profile(results[-1], args.top)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
