"""What every unit evaluates: the model composed with its preprocessing, and the samples as NCHW."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas.evaluation import EvaluationSpec
from workers.datasets import Dataset, DatasetError, Images, Pixels
from workers.image_folders import class_list_mismatch
from workers.layout import LayoutError, from_nchw, image_nchw, to_nchw
from workers.preprocess import compose_for_images, model_input_shape, with_scores_output
from workers.runtime import Classifier, RuntimeOptions
from workers.spec_checks import check_spec


@dataclass
class Subject:
    """The evaluated model and samples as every unit sees them: images NCHW (workers/layout.py)."""

    classifier: Classifier  # the model with normalisation (and an NHWC model's Transpose) composed
    x: Images  # the selected samples, NCHW (uint8 images stay uint8 until a batch is taken)
    y: np.ndarray
    t: np.ndarray | None  # the dataset's target labels of the selected samples (targets: dataset)
    pool: Images  # every sample of the dataset, NCHW (PCA's held-out fit samples)
    layout: str  # the dataset's layout: artifacts and examples go back to it
    model_layout: str  # the layout the model takes
    model_input: list  # the model's own input shape (None for a symbolic axis)

    def to_dataset_layout(self, array: np.ndarray) -> np.ndarray:
        """An array of NCHW images (or one image [C, H, W]) in the dataset's layout."""
        if array.ndim == 3 and array.shape == self.x.shape[1:] and self.x.ndim == 4:
            return from_nchw(array[None], self.layout)[0]
        if array.ndim == 4 and array.shape[1:] == self.x.shape[1:]:
            return from_nchw(array, self.layout)
        return array


def compose_for(model: bytes, image: Sequence[int], spec: EvaluationSpec,
                declared: str | None = None) -> tuple[Any, str]:
    """``model`` with the spec's normalisation composed, taking NCHW pixels of shape ``image``,
    and its own layout: ``declared``, by default the spec's input.model_layout."""
    try:
        return compose_for_images(model, image, mean=spec.input.mean, std=spec.input.std,
                                  layout=spec.input.model_layout if declared is None else declared)
    except LayoutError as exc:
        raise DatasetError(str(exc)) from None


def compose_subject(model: bytes, image: Sequence[int], spec: EvaluationSpec) -> tuple[Any, str]:
    """The evaluated model composed (compose_for), with input.model_output as its first output."""
    composed, layout = compose_for(model, image, spec)
    return with_scores_output(composed, spec.input.model_output), layout


def prepare(model: bytes, dataset: Dataset, spec: EvaluationSpec,
            options: RuntimeOptions | None) -> Subject:
    check_spec(spec)
    x, y = select_samples(dataset.x, dataset.y, spec.samples)
    if not len(x):
        raise DatasetError("the dataset holds no samples")
    try:
        image = image_nchw(x.shape[1:], spec.input.layout)
    except LayoutError as exc:
        raise DatasetError(str(exc)) from None
    composed, layout = compose_subject(model, image, spec)
    classifier = Classifier(composed, options or RuntimeOptions(batch_size=spec.batch_size))
    x = to_nchw(x, spec.input.layout)
    t = None if dataset.t is None else np.asarray(select_samples(dataset.t, dataset.y, spec.samples)[0])
    _check_fit(x, y, t, classifier, dataset)
    return Subject(classifier, x, y, t, to_nchw(dataset.x, spec.input.layout), spec.input.layout, layout,
                    [None] + model_input_shape(model)[1:])


def select_samples(x: Images, y: np.ndarray, samples) -> tuple[Images, np.ndarray]:
    if samples == "all":
        return x, y
    return (x.rows(slice(None, samples)) if isinstance(x, Pixels) else x[:samples]), y[:samples]


def _check_fit(x: Images, y: np.ndarray, t: np.ndarray | None, classifier: Classifier,
               dataset: Dataset) -> None:
    expected = classifier.input_shape[1:]
    if x.ndim != len(classifier.input_shape) or any(
        isinstance(e, int) and e != g for e, g in zip(expected, x.shape[1:], strict=True)
    ):
        raise DatasetError(f"images are {list(x.shape[1:])} (NCHW) but the model (after input.layout) "
                           f"expects [{', '.join(map(str, expected))}]; check input.layout")
    mismatch = dataset.classes and class_list_mismatch(len(dataset.classes), classifier.num_classes,
                                                       dataset.classes_declared)
    if mismatch:
        raise DatasetError(mismatch)
    for name, labels in (("labels", y), ("target labels t", t)):
        if labels is not None and labels.size and labels.max() >= classifier.num_classes:
            raise DatasetError(f"{name} go up to {int(labels.max())} but the model has "
                               f"{classifier.num_classes} classes")
