"""Checks of a submitted spec against the stored model and dataset, before anything is
queued: a mismatch found here is a 422 now, not a failed job later."""

from __future__ import annotations

from schemas.evaluation import EvaluationSpec
from service.errors import InvalidSpec

BLACK_BOX = {"square", "gaussian_noise", "uniform_noise"}


def expected_image_shape(model_shape: list, layout: str) -> list:
    """One image as the dataset must hold it: the model's [C, H, W] (or [H, W, C] for NHWC)."""
    image = list(model_shape[1:])
    if layout == "NHWC" and len(image) == 3:
        image = [image[1], image[2], image[0]]
    return image


def check_spec(spec: EvaluationSpec, model: dict, dataset: dict) -> None:
    expected = expected_image_shape(model["input_shape"], spec.input.layout)
    shape = dataset["shape"]
    if len(shape) != len(expected) or any(
        e is not None and e != s for e, s in zip(expected, shape, strict=False)
    ):
        hint = "; set input.layout to NHWC" if sorted(map(str, shape)) == sorted(map(str, expected)) else ""
        raise InvalidSpec(
            f"the dataset's images are {shape} but the model expects "
            f"{[e if e is not None else '?' for e in expected]} (input.layout "
            f"{spec.input.layout}){hint}"
        )
    if dataset["num_classes"] > model["num_classes"]:
        raise InvalidSpec(
            f"the dataset has labels up to {dataset['num_classes'] - 1} but the model has "
            f"{model['num_classes']} classes"
        )
    channels = model["input_shape"][1] if len(model["input_shape"]) == 4 else None
    for name in ("mean", "std"):
        values = getattr(spec.input, name)
        if values is not None and len(values) not in (1, channels or len(values)):
            raise InvalidSpec(
                f"input.{name} has {len(values)} values; give 1 or one per channel ({channels})"
            )
    if not model["gradients_available"]:
        needs = [a.key for a in spec.attacks if a.name not in BLACK_BOX]
        if spec.fooling is not None and spec.fooling.steps:
            needs.append("fooling.steps")
        if needs:
            ops = sorted({n["op_type"] for n in model["unsupported"]})
            raise InvalidSpec(
                f"{', '.join(needs)} need gradients, which this model does not have (no "
                f"gradient rule for {', '.join(ops)}); use black-box attacks "
                f"({', '.join(sorted(BLACK_BOX))})"
            )
