"""The `robustness` command line.

    robustness evaluate MODEL.onnx DATA.npz --spec SPEC.yaml [--out result.json]
    robustness inspect MODEL.onnx [--check] [--json]
    robustness gradient-model MODEL.onnx --out GRAD.onnx [--loss cross_entropy] [--device cpu]
    robustness submit MODEL.onnx DATA.npz --spec SPEC.yaml --server URL [--wait] [--junit X] [--json Y]
    robustness serve [--host H] [--port P] [--data-dir DIR] [--workers N]
    robustness api | worker | migrate | keys create --tenant NAME

Exit codes: 0 success, 1 a gate failed (evaluate, submit), 2 bad input (the message says what is
wrong and how to fix it), 3 no gate failed but one is inconclusive: its attack showed signs of
gradient masking (evaluate, submit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from workers.onnxgrad import (
    LOSSES,
    GradientBuildError,
    build_gradient_model,
)

MAX_MODEL_BYTES = 2 << 30
# losses of one label per sample: what `inspect --check` can time on a random batch
LABEL_LOSSES = ("auto", "cross_entropy", "margin", "dlr", "logit")
LOSS_HELP = (
    "auto: the cross-entropy's direction without the factor that underflows on confident models "
    "(the attacks' default); cross_entropy; margin: max_{j != y} z_j - z_y (C&W); dlr: Croce and Hein's "
    "difference of logits ratio (3+ classes); logit: z_y"
)
GRADIENT_LOSS_HELP = LOSS_HELP + (
    "; dlr_targeted: APGD-T's targeted DLR, the graph takes a second input `targets` (int64 [N], 4+ "
    "classes); cotangent: <dlogits, z>, the graph takes `dlogits` [N, K] in place of labels and returns "
    "any vector-Jacobian product (DeepFool and FAB use it)"
)


class UsageError(Exception):
    """Bad input from the command line: exit 2 with the message."""


def read_model(path: str) -> bytes:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{path}: no such file")
    if file.stat().st_size > MAX_MODEL_BYTES:
        raise UsageError(f"{path}: larger than 2 GiB; models with external data are not accepted")
    return file.read_bytes()


def inspect_model(data: bytes, loss: str) -> dict:
    from service.validation import inspect_classifier

    found = inspect_classifier(data, loss=loss)
    prepared = found.prepared
    return {
        "input": {"name": prepared.input_name, "shape": list(prepared.input_shape)},
        "classes": prepared.num_classes,
        "opset": prepared.opset,
        "ends_in_softmax": prepared.ends_in_softmax,
        "operators": found.operators,
        "gradients": {"available": found.gradients_available, "unsupported": found.unsupported},
    }


def check_gradients(data: bytes, loss: str, batch: int) -> dict:
    """Time a forward and a gradient call on a random batch (images/s on this machine)."""
    from workers.runtime import Classifier, RuntimeOptions

    classifier = Classifier(data, RuntimeOptions(batch_size=batch))
    dims = [d if isinstance(d, int) else 1 for d in classifier.input_shape[1:]]
    rng = np.random.default_rng(0)
    x = rng.random([batch] + dims, dtype=np.float32)
    labels = rng.integers(0, classifier.num_classes, batch)
    classifier.loss_and_grad(x, labels, loss)  # builds the gradient session
    timings = {}
    for name, call in (("forward", lambda: classifier.logits(x)),
                       ("gradient", lambda: classifier.loss_and_grad(x, labels, loss))):
        call()
        start = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            result = call()
        timings[name] = (time.perf_counter() - start) / repeats
    _, losses, grad = result
    return {
        "device": classifier.device,
        "batch": batch,
        "forward_images_per_s": round(batch / timings["forward"], 1),
        "gradient_images_per_s": round(batch / timings["gradient"], 1),
        "gradient_over_forward_time": round(timings["gradient"] / timings["forward"], 2),
        "mean_loss": float(losses.mean()),
        "mean_gradient_l2": float(np.linalg.norm(grad.reshape(batch, -1), axis=1).mean()),
        "gradient_finite": bool(np.isfinite(grad).all()),
    }


def print_report(report: dict) -> None:
    shape = " x ".join(str(d) for d in report["input"]["shape"])
    print(f"input      {report['input']['name']}  [{shape}]")
    print(f"classes    {report['classes']}")
    print(f"opset      {report['opset']}" + ("  (ends in Softmax: differentiated before it)"
                                             if report["ends_in_softmax"] else ""))
    print(f"operators  {', '.join(f'{k} x{v}' for k, v in report['operators'].items())}")
    grads = report["gradients"]
    if grads["available"]:
        print("gradients  available: every operator on the input -> logits path has a rule")
    else:
        print("gradients  unavailable; only black-box attacks can evaluate this model:")
        for item in grads["unsupported"]:
            print(f"           - {item['op_type']} (node {item['node']}): {item['reason']}")
    check = report.get("check")
    if check:
        print(f"check      {check['device']}, batch {check['batch']}: forward "
              f"{check['forward_images_per_s']} images/s, gradient {check['gradient_images_per_s']} "
              f"images/s ({check['gradient_over_forward_time']}x the forward time); "
              f"mean |grad| {check['mean_gradient_l2']:.4g}, finite: {check['gradient_finite']}")


def cmd_inspect(args) -> int:
    data = read_model(args.model)
    report = inspect_model(data, args.loss)
    if args.check and report["gradients"]["available"]:
        report["check"] = check_gradients(data, args.loss, args.batch)
    lipschitz = None
    if args.lipschitz:
        from workers.lipschitz import lipschitz_bounds

        lipschitz = lipschitz_bounds(data)
        report["lipschitz"] = asdict(lipschitz)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        if lipschitz is not None:
            from workers.lipschitz import format_report

            print("\nLipschitz upper bounds (L2 operator norms per layer; their product bounds the network):")
            print(format_report(lipschitz))
    return 0


def cmd_gradient_model(args) -> int:
    grad_model = build_gradient_model(read_model(args.model), loss=args.loss, device=args.device)
    onnx.save_model(grad_model, args.out)
    print(f"wrote {args.out}: inputs {[i.name for i in grad_model.graph.input]}, "
          f"outputs {[o.name for o in grad_model.graph.output]}")
    return 0


def _run_evaluate(args) -> int:
    from client.evaluate_cli import run_evaluate

    return run_evaluate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="what the service sees in a model, and its gradients")
    inspect.add_argument("model", help="an .onnx image classifier")
    inspect.add_argument("--loss", choices=LABEL_LOSSES, default="auto",
                         help=f"the loss whose gradient is built and timed (default auto): {LOSS_HELP}")
    inspect.add_argument("--check", action="store_true",
                         help="also run and time a gradient on a random batch")
    inspect.add_argument("--batch", type=int, default=64)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--lipschitz", action="store_true",
                         help="also bound the Lipschitz constant per layer and of the network")
    inspect.set_defaults(run=cmd_inspect)
    evaluate = sub.add_parser("evaluate", help="run an evaluation spec on a model and a dataset")
    evaluate.add_argument("model", help="an .onnx image classifier")
    evaluate.add_argument("data", help="an .npz with x (images) and y (labels)")
    evaluate.add_argument("--spec", required=True, help="evaluation spec, YAML or JSON")
    evaluate.add_argument("--out", help="write the result document (JSON) here")
    evaluate.add_argument("--artifacts", help="write arrays (e.g. universal perturbations) to this .npz")
    evaluate.add_argument("--html", help="write a self-contained HTML report here")
    evaluate.set_defaults(run=_run_evaluate)
    grad = sub.add_parser("gradient-model", help="write the gradient ONNX graph of a model")
    grad.add_argument("model")
    grad.add_argument("--out", required=True)
    grad.add_argument("--loss", choices=LOSSES, default="auto",
                      help=f"the loss the graph differentiates (default auto): {GRADIENT_LOSS_HELP}")
    grad.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="the ONNX Runtime provider the graph is for (default cpu)")
    grad.set_defaults(run=cmd_gradient_model)
    from client.submit_cli import add_submit_parser
    from service.runner import add_server_parsers

    add_submit_parser(sub)
    add_server_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch", 1) < 1:
        print("robustness: error: --batch must be a positive integer", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except (UsageError, GradientBuildError, ValueError, OSError) as exc:
        print(f"robustness: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
