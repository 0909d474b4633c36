"""Benchmark certified bounds: the time of interval bound propagation (workers/certify) against
the model's own forward pass, on the small zoo, in this one process.

    .venv/bin/python bench/certify.py [--models mlp,lenet,resnet18,mobilenet_v2] [--batch 64]
        [--threads 2] [--rounds 5] [--eps 1/255] [--json PATH]

Per model (tests.zoo, exported with a symbolic batch axis, seeded weights) it times, on the
same --batch random images, Classifier.logits (the forward pass) and IntervalBounds.certify
with each method (ibp: lower and upper bounds of every layer, the margins through the last
layer; crown_ibp: that, then the linear relaxation backwards from the margins; crown: full CROWN,
every relaxed operator's input bounded backwards too where small enough), in interleaved rounds,
and prints the median times and their ratio, and the share of samples certified at
--eps (of a model with random weights: a check that the bounds ran, not a robustness figure).
With --auto-lirpa it also times auto_LiRPA 0.3, the reference verifier, on the same module, box
and margins (installed with --no-deps by the test command; tests/certify/auto_lirpa.py gives
back the three torch and numpy APIs it imports) and prints its time over ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ibp", "crown_ibp", "crown")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests import zoo  # noqa: E402
from workers import memory_budget  # noqa: E402
from workers.certify import IntervalBounds, UnsupportedForBounds  # noqa: E402
from workers.runtime import Classifier, RuntimeOptions  # noqa: E402

MIN_SECONDS = 0.5


def timed(call) -> float:
    """Seconds per call: calls repeated for at least MIN_SECONDS."""
    call()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < MIN_SECONDS or count == 0:
        call()
        count += 1
    return elapsed / count


def bench(name: str, args) -> dict:
    model = zoo.export(name).SerializeToString()
    options = RuntimeOptions(batch_size=args.batch, intra_op_threads=args.threads,
                             memory_budget=memory_budget.default_budget(1))  # as a worker bounds them
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *zoo.input_shape(name)), dtype=np.float32)
    classifier = Classifier(model, options)
    y = classifier.predict(x)
    result: dict = {"model": name}
    forward = [timed(lambda: classifier.logits(x)) for _ in range(args.rounds)]
    result["forward_ms"] = round(statistics.median(forward) * 1e3, 3)
    reference = their_bounds(name, x, y, args.eps) if args.auto_lirpa else None
    for method in METHODS:
        try:
            bounds = IntervalBounds(model, options, method=method)
        except UnsupportedForBounds as exc:
            result[method] = {"unsupported": str(exc)}
            continue
        theirs = None if reference is None else reference(method)
        times = []
        for _ in range(args.rounds):  # interleaved with the forward pass and auto_LiRPA
            forward_time = timed(lambda: classifier.logits(x))
            ours = timed(lambda: bounds.certify(x, y, args.eps))  # noqa: B023
            times.append((ours, forward_time, timed(theirs) if theirs is not None else None))
        result[method] = {
            "ms": round(statistics.median(t for t, _, _ in times) * 1e3, 3),
            "over_forward": round(statistics.median(t / f for t, f, _ in times), 2),
            "certified_at_eps": float(bounds.certify(x, y, args.eps).certified.mean()),
            "batch": bounds.batch_size(),  # samples per call within the memory budget
        }
        if theirs is not None:
            result[method]["auto_lirpa_over_ours"] = round(statistics.median(a / t for t, _, a in times), 2)
    return result


def their_bounds(name: str, x: np.ndarray, y: np.ndarray, eps: float):
    """method -> a call of auto_LiRPA's bounds of the same margins on the same module and box, or
    None where auto_LiRPA cannot parse the module."""
    import torch

    from tests.certify.auto_lirpa import load

    lirpa = load()
    try:
        module = lirpa.BoundedModule(zoo.make_model(name).eval(), torch.zeros(1, *x.shape[1:]))
    except Exception as exc:  # its parser's own errors
        print(f"auto_LiRPA cannot parse {name}: {str(exc)[:100]}")
        return lambda method: None
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    ball = lirpa.PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(images - eps).clamp(0, 1),
                                    x_U=(images + eps).clamp(0, 1))
    bounded = lirpa.BoundedTensor(images, ball)
    k = zoo.NUM_CLASSES
    spec = torch.nn.functional.one_hot(labels, k).float()[:, None, :] - torch.eye(k)[None]
    names = {"ibp": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN"}
    return lambda method: lambda: module.compute_bounds(x=(bounded,), C=spec, method=names[method])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,lenet,resnet18,mobilenet_v2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--eps", type=lambda s: float(Fraction(s)), default=1 / 255)
    parser.add_argument("--json")
    parser.add_argument("--auto-lirpa", action="store_true",
                        help="also time auto_LiRPA 0.3 on the same batch (tests/certify/auto_lirpa.py); "
                        "its CROWN on resnet18 at batch 64 passed 24 GB here and was killed: use it with "
                        "--models mlp,lenet")
    args = parser.parse_args()
    if args.auto_lirpa:
        import torch

        torch.set_num_threads(args.threads)
    results = [bench(name.strip(), args) for name in args.models.split(",") if name.strip()]
    print(f"interval bounds vs forward, batch {args.batch}, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'model':14s} {'method':10s} {'forward ms':>11s} {'bounds ms':>10s} {'x forward':>10s} "
          f"{'certified':>10s} {'batch':>6s}")
    for r in results:
        for method in METHODS:
            m = r[method]
            if "unsupported" in m:
                print(f"{r['model']:14s} {method:10s} unsupported: {m['unsupported'][:70]}")
                continue
            ratio = m.get("auto_lirpa_over_ours")
            theirs = f" auto_LiRPA {ratio:.2f}x ours" if ratio is not None else ""
            print(f"{r['model']:14s} {method:10s} {r['forward_ms']:11.3f} {m['ms']:10.3f} "
                  f"{m['over_forward']:10.2f} {m['certified_at_eps']:10.3f} {m['batch']:6d}{theirs}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
