"""Fooling images: unrecognizable inputs that a classifier labels with high confidence.

Nguyen, Yosinski and Clune (2015, "Deep neural networks are easily fooled") evolve images
that a network assigns to a class with over 99% confidence, and also produce them by
gradient ascent; Goodfellow et al. call the same failure the "rubbish class": models that
behave too linearly grow overconfident far from the training data. This is a metric of its
own, not an attack (nothing is perturbed and there is no true label to flip), so nothing
here is registered as one.

- ``fooling_rate_of_noise``: the share of uniform-noise images the model labels with
  maximum softmax confidence >= ``threshold``, and which classes it picks for them.
- ``gradient_ascent_fooling``: start from uniform noise and raise the softmax probability
  of a target class per image (descend the cross-entropy of the target, or ascend its
  logit) with steepest-ascent steps in the Linf (sign) or L2 geometry, clipped to the box,
  until the target reaches ``threshold`` or ``steps`` run out.

Shapes: ``shape`` is one image's shape, e.g. (1, 28, 28); images are float32 [N, *shape].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workers.bound_loop import chunks
from workers.loop_graphs import P, fooling_final_model, fooling_step_model
from workers.metrics import softmax

from .base import AttackModel, Progress, check, check_positive, clip_to_box, get_norm

FOOLING_LOSSES = ("cross_entropy", "logit")


def _check_common(shape: Sequence[int], threshold: float, bounds: tuple[float, float]) -> tuple[int, ...]:
    shape = tuple(shape)
    check(len(shape) >= 1 and all(isinstance(d, int | np.integer) and d > 0 for d in shape),
          f"`shape` must be one image's shape (positive integers), got {shape!r}")
    check(isinstance(threshold, int | float | np.number) and 0 <= threshold <= 1,
          f"`threshold` must be a probability in [0, 1], got {threshold!r}")
    check(bounds[0] < bounds[1], f"`bounds` must satisfy low < high, got {bounds}")
    return tuple(int(d) for d in shape)


def _uniform(rng: np.random.Generator, n: int, shape: tuple[int, ...], bounds) -> np.ndarray:
    return rng.uniform(bounds[0], bounds[1], size=(n, *shape)).astype(np.float32)


def fooling_rate_of_noise(model: AttackModel, shape: Sequence[int], n: int, threshold: float,
                          rng: np.random.Generator, bounds: tuple[float, float] = (0.0, 1.0), *,
                          chunk: int = 1024) -> dict:
    """Label ``n`` uniform-noise images; how many get a confident label, and which.

    Returns {"samples": n, "threshold", "fooling_rate": share with max softmax >= threshold,
    "per_class_counts": [K] confident images per predicted class, "predicted_counts": [K]
    all images per predicted class, "mean_confidence": mean max softmax}.
    """
    shape = _check_common(shape, threshold, bounds)
    check_positive("n", n, integer=True)
    check_positive("chunk", chunk, integer=True)
    k = model.num_classes
    confident = np.zeros(k, np.int64)
    predicted = np.zeros(k, np.int64)
    total_confidence = 0.0
    for start in range(0, n, chunk):
        probs = softmax(model.logits(_uniform(rng, min(chunk, n - start), shape, bounds)))
        label, top = probs.argmax(axis=1), probs.max(axis=1)
        predicted += np.bincount(label, minlength=k)
        confident += np.bincount(label[top >= threshold], minlength=k)
        total_confidence += float(top.sum())
    return {
        "samples": int(n),
        "threshold": float(threshold),
        "fooling_rate": float(confident.sum() / n),
        "per_class_counts": confident.tolist(),
        "predicted_counts": predicted.tolist(),
        "mean_confidence": total_confidence / n,
    }


@dataclass
class FoolingResult:
    """Fooling images made by gradient ascent, one per requested target class."""

    images: np.ndarray  # float32 [N, *shape], inside the bounds
    target_classes: np.ndarray  # int64 [N]
    confidences: np.ndarray  # float64 [N]: softmax probability of the target on the final image
    predicted: np.ndarray  # int64 [N]: the model's label for the final image
    reached: np.ndarray  # bool [N]: labelled as the target with confidence >= threshold
    steps_used: np.ndarray  # int64 [N]: ascent steps taken (0 when the noise already fooled)
    threshold: float

    @property
    def share(self) -> float:
        """The share of images that reached the threshold."""
        return float(self.reached.mean()) if len(self.reached) else 0.0

    def summary(self) -> dict:
        """JSON-ready: samples, threshold, share_reached, mean_confidence, mean_steps, max_steps."""
        n = len(self.reached)
        return {
            "samples": n,
            "threshold": self.threshold,
            "share_reached": self.share,
            "mean_confidence": float(self.confidences.mean()) if n else None,
            "mean_steps": float(self.steps_used.mean()) if n else None,
            "max_steps": int(self.steps_used.max()) if n else None,
        }


def gradient_ascent_fooling(model: AttackModel, target_classes: Sequence[int] | np.ndarray,
                            shape: Sequence[int], steps: int, step_size: float, threshold: float,
                            rng: np.random.Generator, bounds: tuple[float, float] = (0.0, 1.0), *,
                            norm: str = "linf", loss: str = "cross_entropy",
                            progress: Progress | None = None) -> FoolingResult:
    """Raise each target class's confidence from uniform noise; stop images that reach it.

    ``step_size`` is the length of one step in ``norm`` ("linf": a sign step of that size
    per pixel; "l2": that L2 length). ``loss`` "cross_entropy" descends -log softmax_t,
    "logit" ascends the target logit z_t (which need not raise its softmax probability).
    One gradient evaluation per step on the images still below the threshold.
    """
    shape = _check_common(shape, threshold, bounds)
    targets = np.asarray(target_classes)
    check(targets.ndim == 1 and len(targets) > 0 and np.issubdtype(targets.dtype, np.integer),
          f"`target_classes` must be a non-empty list of class indices, got {target_classes!r}")
    check(bool(np.all((targets >= 0) & (targets < model.num_classes))),
          f"`target_classes` must lie in [0, {model.num_classes - 1}]")
    check_positive("steps", steps, integer=True, allow_zero=True)
    check_positive("step_size", step_size)
    check(loss in FOOLING_LOSSES, f"`loss` must be one of {', '.join(FOOLING_LOSSES)}, got {loss!r}")
    geometry = get_norm(norm)
    targets = targets.astype(np.int64)
    n = len(targets)

    images = _uniform(rng, n, shape, bounds)
    confidences = np.zeros(n)
    predicted = np.zeros(n, np.int64)
    reached = np.zeros(n, bool)
    steps_used = np.zeros(n, np.int64)
    if getattr(model, "cheap_loops", False):
        # a workers.runtime.Classifier keeps the images in ONNX Runtime's buffers (on CUDA on the
        # device), a chunk at a time: as fast as the numpy loop on the CPU
        parts = chunks(n, getattr(model, "loop_rows", n))
        for k, rows in enumerate(parts):
            def chunk_progress(done: int, total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * total + done, len(parts) * total)

            out = _bound_ascent(model, images[rows], targets[rows], steps, step_size, threshold, bounds, norm,
                                loss, chunk_progress)
            images[rows], confidences[rows], predicted[rows], reached[rows], steps_used[rows] = out
    else:
        _numpy_ascent(model, images, targets, confidences, predicted, reached, steps_used, steps, step_size,
                      threshold, bounds, geometry, loss, progress)
    return FoolingResult(images=images, target_classes=targets, confidences=confidences,
                         predicted=predicted, reached=reached, steps_used=steps_used,
                         threshold=float(threshold))


def _numpy_ascent(model, images, targets, confidences, predicted, reached, steps_used, steps, step_size,
                  threshold, bounds, geometry, loss, progress) -> None:
    """`gradient_ascent_fooling`'s steps in numpy, filling its arrays in place."""
    active = np.arange(len(images))
    for step in range(steps + 1):
        x, t = images[active], targets[active]
        if step < steps:
            logits, _, grad = model.loss_and_grad(x, t, loss=loss)
        else:
            logits, grad = model.logits(x), None
        probs = softmax(logits)
        confidences[active] = probs[np.arange(len(active)), t]
        predicted[active] = probs.argmax(axis=1)
        done = (predicted[active] == t) & (confidences[active] >= threshold)
        reached[active] = done
        if grad is None or done.all():
            break
        keep = ~done
        ascent = -grad[keep] if loss == "cross_entropy" else grad[keep]
        active = active[keep]
        images[active] = clip_to_box(x[keep] + np.float32(step_size) * geometry.ascent_direction(ascent),
                                     bounds)
        steps_used[active] += 1
        if progress is not None:
            progress(step + 1, steps)


def _bound_ascent(model, images, targets, steps, step_size, threshold, bounds, norm, loss, progress):
    """`_numpy_ascent` as loop graphs (workers/loop_graphs/gradient_steps.py): one ONNX Runtime
    call per step and batch, one for the last scores; the host reads the [N] active flags after
    each step (to stop when every image reached its target) and the results once."""
    iterate, n = model.input_name, len(images)
    step_graph = model.loop_session(
        ("fooling_step", norm, loss, float(threshold)), loss,
        lambda gradient: fooling_step_model(gradient, iterate, norm, threshold=threshold))
    final = model.loop_session(("fooling_final", float(threshold)), "forward",
                               lambda forward: fooling_final_model(forward, iterate, threshold=threshold))
    loop = model.bound_loop({iterate: images, "labels": targets, P + "active": np.ones(n, bool),
                             P + "reached": np.zeros(n, bool), P + "confidences": np.zeros(n),
                             P + "predicted": np.zeros(n, np.int64), P + "steps_used": np.zeros(n, np.int64)})
    descend = loss == "cross_entropy"  # of the target's cross-entropy; "logit" ascends
    scalars = {P + "step": np.float32(-step_size if descend else step_size), P + "low": np.float32(bounds[0]),
               P + "high": np.float32(bounds[1])}
    for step in range(steps):
        loop.apply(*step_graph, scalars)
        if progress is not None:
            progress(step + 1, steps)
        if not loop.fetch(P + "active").any():
            break
    else:
        loop.apply(*final)
    return tuple(loop.fetch(name) for name in (iterate, P + "confidences", P + "predicted", P + "reached",
                                               P + "steps_used"))
