"""The server-side commands of `robustness`: the engine on this machine (evaluate, inspect,
gradient-model) and the service's processes (serve, api, worker, migrate, keys; service/runner.py).

They need the server install (pip install '.[server]'); client/cli.py registers them when it
is there. Heavy modules are imported when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from client.errors import CommandError
from client.present import ProgressBar, exit_code, print_result
from client.spec_file import format_validation_error, load_spec
from client.submit_cli import add_image_processing_arguments, declared_classes
from schemas.evaluation import EvaluationResult, EvaluationSpec
from service.runner import add_server_parsers

MAX_MODEL_BYTES = 64 << 30  # the engine's own cap on a model and its data files
# losses of one label per sample: what `inspect --check` can time on a random batch
LABEL_LOSSES = ("auto", "cross_entropy", "margin", "dlr", "logit")
GRADIENT_LOSSES = (*LABEL_LOSSES, "dlr_targeted", "cotangent")  # workers.onnxgrad.LOSSES
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


def read_model(path: str) -> bytes:
    """The model at ``path`` with its external data files next to it (PyTorch's default exporter
    writes model.onnx.data), or a .zip / .tar.gz bundle: one self-contained model, or past
    protobuf's 2 GiB the model whose large tensors stay in those files (the weights folder,
    workers/onnxgrad/weights.py, becomes the model's own folder or the unpacked bundle's)."""
    from workers.onnxgrad import weights
    from workers.onnxgrad.external import PathFile, assemble_file

    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{path}: no such file")
    data, outside = assemble_file(file, MAX_MODEL_BYTES)
    if not outside:
        return data
    if all(isinstance(f, PathFile) and f.path.parent == file.parent for f in outside.values()):
        folder = file.parent.resolve()
    else:  # members of an archive
        folder = Path(tempfile.mkdtemp(prefix="robustness-weights-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for name, member in outside.items():
            (folder / name).write_bytes(member.read(0, member.size))
    if weights.folder() not in (None, folder):
        raise CommandError(f"{path}: a second model over 2 GiB with its data files in another folder; put "
                           "the large models' data files in one folder")
    weights.set_folder(folder)
    return data


def inspect_model(data: bytes, loss: str) -> dict:
    from service.model_admission import inspect_classifier
    from workers.onnxgrad.graph import opset_of
    from workers.onnxgrad.prepare import load_model, scores_output

    found = inspect_classifier(data, loss=loss)
    prepared = found.prepared
    source = load_model(data)
    return {
        "exported_opset": opset_of(source),  # as the upload's answer gives it
        "input": {"name": prepared.input_name, "shape": list(prepared.input_shape)},
        "outputs": [o.name for o in source.graph.output], "scores_output": scores_output(source.graph),
        "classes": prepared.num_classes,
        "binary": prepared.binary,
        "opset": prepared.opset,
        "ends_in_softmax": prepared.ends_in_softmax,
        "ends_in_sigmoid": prepared.ends_in_sigmoid,
        "operators": found.operators,
        "gradients": {"available": found.gradients_available, "unsupported": found.unsupported,
                      "probed_side": found.probed_side,
                      "straight_through": prepared.straight_through if found.gradients_available else 0},
    }


def check_gradients(data: bytes, loss: str, batch: int) -> dict:
    """Time a forward and a gradient call on a random batch (images/s on this machine)."""
    import numpy as np

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
        "mean_loss": float(losses.astype(np.float64).mean()),
        "mean_gradient_l2": float(np.linalg.norm(grad.reshape(batch, -1).astype(np.float64), axis=1).mean()),
        "gradient_finite": bool(np.isfinite(grad).all()),
    }


def print_report(report: dict) -> None:
    shape = " x ".join(str(d) for d in report["input"]["shape"])
    print(f"input      {report['input']['name']}  [{shape}]")
    if len(report["outputs"]) > 1:
        print(f"output     {report['scores_output']}  (read as the scores: the first float output of "
              f"{', '.join(report['outputs'])}); a spec's input.model_output names another")
    print(f"classes    {report['classes']}" + {
        "sigmoid": "  (one score, a Sigmoid's probability: class 1 where it is > 0.5; logits [-z/2, z/2] "
                   "of the score z before it)",
        "hard_sigmoid": "  (one score, a HardSigmoid's probability: class 1 where it is > 0.5; logits "
                        "[-s/2, s/2] of its affine input minus 0.5, s)",
        "logit": "  (one score z, read as a logit: class 1 where z > 0; logits [-z/2, z/2])",
    }.get(report.get("binary") or "", ""))
    converted = f" (run as {report['opset']})" if report["opset"] != report["exported_opset"] else ""
    print(f"opset      {report['exported_opset']}{converted}" + (
        "  (ends in Softmax: differentiated before it)" if report["ends_in_softmax"] else
        "  (ends in a Sigmoid per class: differentiated before it)" if report.get("ends_in_sigmoid") else ""))
    print(f"operators  {', '.join(f'{k} x{v}' for k, v in report['operators'].items())}")
    grads = report["gradients"]
    if grads["available"] and grads.get("probed_side"):
        side = grads["probed_side"]
        print(f"gradients  available at a fixed image size: every operator on the input -> logits path has "
              f"a rule once the symbolic image axes are pinned (checked at {side}x{side}; an evaluation "
              "pins them to its dataset's image size)")
    elif grads["available"]:
        print("gradients  available: every operator on the input -> logits path has a rule")
    else:
        print("gradients  unavailable; only black-box attacks can evaluate this model:")
        for item in grads["unsupported"]:
            print(f"           - {item['op_type']} (node {item['node']}): {item['reason']}")
    if grads.get("straight_through"):
        print(f"           straight through {grads['straight_through']} quantizer(s) (QuantizeLinear -> "
              "DequantizeLinear pairs, DynamicQuantizeLinear): a quantized model's true gradient is zero "
              "almost everywhere; attacks follow 1 inside each quantized range, 0 where it clamps "
              "(PyTorch's fake_quantize, BPDA)")
    check = report.get("check")
    if check:
        print(f"check      {check['device']}, batch {check['batch']}: forward "
              f"{check['forward_images_per_s']} images/s, gradient {check['gradient_images_per_s']} "
              f"images/s ({check['gradient_over_forward_time']}x the forward time); "
              f"mean |grad| {check['mean_gradient_l2']:.4g}, finite: {check['gradient_finite']}")
        if check["mean_gradient_l2"] == 0:
            print("warning    the gradient is zero at every probe image: gradient attacks would find "
                  "nothing to follow and report the clean accuracy as robust; check the model's output "
                  "(its logits, not a thresholded or constant score)")


def cmd_inspect(args) -> int:
    data = read_model(args.model)
    report = inspect_model(data, args.loss)
    if args.check and report["gradients"]["available"]:
        side = report["gradients"]["probed_side"]
        if side:  # timed at the size the gradients were checked at, not at 1x1 pixels
            from service.model_admission import with_image_side

            data = with_image_side(data, side).SerializeToString()
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
    import onnx

    from workers.onnxgrad import build_gradient_model, weights

    grad_model = build_gradient_model(read_model(args.model), loss=args.loss, device=args.device)
    folder = weights.folder()
    if weights.has_external(grad_model) and folder is not None and Path(args.out).resolve().parent != folder:
        files = ", ".join(weights.locations(grad_model))
        raise CommandError(f"{args.model} keeps its weights in {files}, which the gradient model reads "
                           f"beside itself: write it into {folder} (--out)")
    onnx.save_model(grad_model, args.out)
    print(f"wrote {args.out}: inputs {[i.name for i in grad_model.graph.input]}, "
          f"outputs {[o.name for o in grad_model.graph.output]}")
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from workers.dataset_files import load_dataset_file
    from workers.evaluate import evaluate
    from workers.image_folders import ImageProcessing

    spec = load_spec(args.spec)
    model = read_model(args.model)
    data_path = Path(args.data)
    if not data_path.is_file():
        raise CommandError(f"{args.data}: no such file")
    processing = ImageProcessing.parse(args.resize, args.center_crop, args.color,
                                       declared_classes(args.classes))
    dataset = load_dataset_file(data_path, spec.input.range, processing=processing)
    baselines = load_baselines(spec)
    models, fit_images = load_inputs(spec, Path(args.spec).parent)
    bar = ProgressBar()
    try:
        evaluation = evaluate(model, dataset, spec, progress=bar, baselines=baselines, models=models,
                              fit_images=fit_images)
    finally:
        bar.close()
    result = evaluation.result
    print_result(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result.model_dump(mode="json"), indent=2))
    if args.html:
        from workers.report import render_report

        Path(args.html).write_text(
            render_report(
                result, evaluation.examples, model_name=Path(args.model).name, dataset_name=data_path.name
            )
        )
    # the attacks' own arrays (e.g. universal perturbations), not the adversarial examples:
    # those are a copy of the data per attack and budget
    arrays = {k: v for k, v in evaluation.artifacts.items() if not k.endswith("/x_adv")}
    if args.artifacts and arrays:
        np.savez_compressed(args.artifacts, allow_pickle=False, **arrays)
    return exit_code(result.verdict)


def load_inputs(spec: EvaluationSpec, base: Path) -> tuple[dict, dict]:
    """The other inputs a spec names, as evaluate() takes them: (models, fit_images). Locally
    the other models (`transfer.models`, an autoencoder defense's `model`) are .onnx paths, and
    a PCA's `fit_dataset` an .npz or image zip path, relative to the spec file."""
    from workers.dataset_files import load_dataset_file

    wanted = {}
    if spec.transfer is not None:
        wanted.update({name: (f"transfer.models.{name}", ref) for name, ref in spec.transfer.models.items()})
    for index, defense in enumerate(spec.defenses):
        if defense.model is not None:
            wanted[defense.reference_key()] = (f"defenses[{index}].model", defense.model)
    models, fit_images = {}, {}
    for key, (field, reference) in wanted.items():
        path = Path(reference) if Path(reference).is_absolute() else base / reference
        if not path.is_file():
            raise CommandError(
                f"{field}: {reference}: no such model file (paths are relative to the spec file)"
            )
        models[key] = read_model(str(path))
    for index, defense in enumerate(spec.defenses):
        if defense.fit_dataset is not None:
            path = Path(defense.fit_dataset)
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise CommandError(
                    f"defenses[{index}].fit_dataset: {defense.fit_dataset}: no such .npz file "
                    "(paths are relative to the spec file)"
                )
            fit_images[defense.key] = load_dataset_file(path, spec.input.range).x
    return models, fit_images


def load_baselines(spec: EvaluationSpec) -> dict[str, EvaluationResult]:
    """Locally a gate's `baseline` is the path of an earlier result document (--out)."""
    return {gate.baseline: load_result(gate.baseline) for gate in spec.gates if gate.baseline is not None}


def load_result(path: str) -> EvaluationResult:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"{path}: no such baseline result file (write one with evaluate --out)")
    try:
        return EvaluationResult.model_validate_json(file.read_bytes())
    except ValidationError as exc:
        raise CommandError(f"{path}: not a result document ({format_validation_error(exc)})") from None


def add_server_commands(commands) -> None:
    """Register the engine's local commands and the service's processes on the CLI's subparsers."""
    inspect = commands.add_parser("inspect", help="what the service sees in a model, and its gradients")
    inspect.add_argument("model", help="an .onnx image classifier")
    inspect.add_argument("--loss", choices=LABEL_LOSSES, default="auto",
                         help=f"the loss whose gradient is built and timed (default auto): {LOSS_HELP}")
    inspect.add_argument("--check", action="store_true",
                         help="also run and time a gradient on a random batch")
    inspect.add_argument("--batch", type=_positive_int, default=64)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--lipschitz", action="store_true",
                         help="also bound the Lipschitz constant per layer and of the network")
    inspect.set_defaults(run=cmd_inspect)
    evaluate = commands.add_parser("evaluate", help="run an evaluation spec on a model and a dataset")
    evaluate.add_argument("model", help="an .onnx image classifier")
    evaluate.add_argument("data", help="an .npz with x (images) and y (labels), or a .zip of PNG / JPEG "
                          "class folders")
    add_image_processing_arguments(evaluate)
    evaluate.add_argument("--spec", required=True, help="evaluation spec, YAML or JSON")
    evaluate.add_argument("--out", help="write the result document (JSON) here")
    evaluate.add_argument("--artifacts", help="write arrays (e.g. universal perturbations) to this .npz")
    evaluate.add_argument("--html", help="write a self-contained HTML report here")
    evaluate.set_defaults(run=cmd_evaluate)
    grad = commands.add_parser("gradient-model", help="write the gradient ONNX graph of a model")
    grad.add_argument("model")
    grad.add_argument("--out", required=True)
    grad.add_argument("--loss", choices=GRADIENT_LOSSES, default="auto",
                      help=f"the loss the graph differentiates (default auto): {GRADIENT_LOSS_HELP}")
    grad.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="the ONNX Runtime provider the graph is for (default cpu)")
    grad.set_defaults(run=cmd_gradient_model)
    add_server_parsers(commands)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
