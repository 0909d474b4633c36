"""PyTorch's two exporters, the same module: gradient-graph time of the default
(torch.export-based, ``dynamo=True``) export over the TorchScript one, per ImageNet-size zoo
model (tests/imagenet_zoo.py), in interleaved rounds so that a busy spell of a shared machine
falls on both alike.

    .venv/bin/python bench/exporters.py [--models resnet50,vit_s16] [--batch 8] [--threads 2]
        [--rounds 9] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench.zoos import EXPORTERS, ImagenetZoo  # noqa: E402
from workers.onnxgrad import build_gradient_model  # noqa: E402


def gradient_session(zoo: ImagenetZoo, entry: str, threads: int):
    model = zoo.export(entry)
    graph = build_gradient_model(model.SerializeToString(), loss="cross_entropy")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    nodes = collections.Counter(node.op_type for node in graph.graph.node)
    return session, model.graph.input[0].name, sum(nodes.values())


def seconds_per_batch(session, feeds: dict, repeats: int = 3) -> float:
    session.run(["grad"], feeds)
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(["grad"], feeds)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    zoo = ImagenetZoo()
    models = list(dict.fromkeys(name.split("@")[0] for name in zoo.names))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(models))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        sessions = {e: gradient_session(zoo, f"{name}@{e}", args.threads) for e in EXPORTERS}
        x = np.random.default_rng(0).random((args.batch, *zoo.input_shape(name)), dtype=np.float32)
        labels = np.arange(args.batch) % zoo.NUM_CLASSES
        times: dict[str, list[float]] = {exporter: [] for exporter in EXPORTERS}
        for _ in range(args.rounds):
            for exporter, (session, input_name, _) in sessions.items():
                times[exporter].append(seconds_per_batch(session, {input_name: x, "labels": labels}))
        ratio = statistics.median(d / t for d, t in zip(times["dynamo"], times["torchscript"], strict=True))
        row = {"model": name, "ratio_dynamo_over_torchscript": round(ratio, 3),
               **{f"{e}_ms": round(1000 * statistics.median(times[e]), 1) for e in EXPORTERS},
               **{f"{e}_nodes": sessions[e][2] for e in EXPORTERS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
