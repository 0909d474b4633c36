"""Does a submitted spec fit the stored model and dataset? Checked before anything is queued
(after workers/spec_checks.py has checked it against the registries): a mismatch found here
is a 422 now, not a failed job later."""

from __future__ import annotations

from schemas.evaluation import AttackSpec, EvaluationSpec
from workers.attacks import ATTACKS
from workers.errors import InvalidSpecError
from workers.image_folders import class_list_mismatch
from workers.layout import LayoutError, image_nchw, model_layout
from workers.onnxgrad.losses import MIN_CLASSES
from workers.spec_checks import held_out_shortfall


def needs_gradients(attack: AttackSpec) -> bool:
    return ATTACKS[attack.name].model_calls != ("logits",)


BLACK_BOX = sorted(name for name, cls in ATTACKS.items() if cls.model_calls == ("logits",))


def _check_classes(spec: EvaluationSpec, classes: int, dataset: dict) -> None:
    mismatch = dataset.get("classes") and class_list_mismatch(
        len(dataset["classes"]), classes, "classes" in (dataset.get("processing") or {}))
    if mismatch:
        raise InvalidSpecError(mismatch)
    if (dataset.get("target_classes") or 0) > classes:
        raise InvalidSpecError(
            f"the dataset's target labels t go up to {dataset['target_classes'] - 1} but the model has "
            f"{classes} classes (0 to {classes - 1}); fix t, or upload the dataset without it"
        )
    if dataset["num_classes"] > classes:
        old_record = dataset.get("targets") and dataset.get("target_classes") is None  # t's not told apart
        labels = "labels y (or target labels t)" if old_record else "labels"
        raise InvalidSpecError(
            f"the dataset has {labels} up to {dataset['num_classes'] - 1} but the model has {classes} "
            f"classes (0 to {classes - 1})"
        )
    for loss, fewest in MIN_CLASSES.items():
        wanting = [a.key for a in spec.attacks if a.loss == loss]
        if wanting and classes < fewest:
            raise InvalidSpecError(
                f"{', '.join(wanting)}: loss {loss} needs at least {fewest} classes and the model has "
                f"{classes}; use loss auto or ce")


def check_fit(spec: EvaluationSpec, model: dict, dataset: dict) -> None:
    try:
        image = image_nchw(dataset["shape"], spec.input.layout)
        layout = model_layout(model["input_shape"], image, spec.input.model_layout)
    except LayoutError as exc:
        raise InvalidSpecError(f"the dataset's images ({dataset['shape']}, input.layout "
                               f"{spec.input.layout}) do not fit the model: {exc}") from None
    # the stored class count is the first float output's: another output's is checked when the job runs
    if spec.input.model_output is None:
        _check_classes(spec, model["num_classes"], dataset)
    channels = image[0] if len(image) == 3 else None
    for name in ("mean", "std"):
        values = getattr(spec.input, name)
        if values is not None and len(values) not in (1, channels or len(values)):
            raise InvalidSpecError(
                f"input.{name} has {len(values)} values; give 1 or one per channel ({channels}, on the "
                f"channel axis of the {layout} model)"
            )
    shortfall = held_out_shortfall(spec, dataset["samples"])
    if shortfall is not None:
        raise InvalidSpecError(shortfall)
    wanting = [a.key for a in spec.attacks if a.target_mode == "dataset"]
    if wanting and not dataset.get("targets"):
        raise InvalidSpecError(
            f"{', '.join(wanting)}: targets: dataset needs target labels in the dataset; upload an .npz "
            "with an array t (one target class per image, != y)"
        )
    if not model["gradients_available"]:
        needs = [a.key for a in spec.attacks if needs_gradients(a)]
        if spec.fooling is not None and spec.fooling.steps:
            needs.append("fooling.steps")
        if needs:
            ops = sorted({n["op_type"] for n in model["unsupported"]})
            raise InvalidSpecError(
                f"{', '.join(needs)} need gradients, which this model does not have (no "
                f"gradient rule for {', '.join(ops)}); use black-box attacks "
                f"({', '.join(BLACK_BOX)})"
            )
