"""Request and response models of the HTTP API (``/v1``), shared by the gateway and clients."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, Field

from schemas.evaluation import EvaluationSpec

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Error(BaseModel):
    type: str  # a stable, snake_case kind: not_found, invalid_model, too_many_jobs ...
    detail: str  # what is wrong and how to fix it
    # only on an unexpected error (500): the id the gateway's log carries it under
    request_id: str | None = Field(None, exclude_if=lambda value: value is None)


class ModelInput(BaseModel):
    name: str
    shape: list[int | None]  # None: a symbolic dimension (the batch)


class UnsupportedNode(BaseModel):
    op_type: str
    node: str
    reason: str


class GradientVerdict(BaseModel):
    available: bool  # False: only black-box attacks (square, noise) can run
    unsupported: list[UnsupportedNode] = []
    # a model with symbolic image axes (H, W): its gradient graph was built with them pinned to
    # this side; every evaluation differentiates it at its dataset's image size
    probed_side: int | None = None
    # a quantized model: its quantizers on the image's path (QDQ pairs, DynamicQuantizeLinear), whose
    # gradient is taken straight through (1 inside the quantized range, 0 where it clamps), as
    # PyTorch's fake_quantize and BPDA take it; the true gradient is zero almost everywhere
    straight_through: int = 0


class ModelPublic(BaseModel):
    id: str
    name: str
    sha256: str
    size: int
    created_at: str
    input: ModelInput
    # "image_to_image": one output shaped like its input (an autoencoder): a defense's model, not
    # evaluated itself (no classes, no attacks)
    kind: Literal["classifier", "image_to_image"] = "classifier"
    num_classes: int | None
    opset: int
    gradients: GradientVerdict
    attacks: Literal["all", "black_box_only", "none"]
    # float16 / bfloat16: predictions run in it; gradients are its float32 twin's
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    output_squeezed_from: list[int | None] | None = None  # logits [N, K, 1, 1] or [N, 1, K], squeezed
    # one score per image read as two classes (logits [-z/2, z/2]; class 1: z > 0): z before a
    # final "sigmoid" (class 1 where the model's probability is > 0.5), or the output as a "logit"
    binary: Literal["sigmoid", "hard_sigmoid", "logit"] | None = None
    # a model not stored as sent (a bundle, or sent with data files): upload_digest of what was sent
    source_sha256: str | None = None


def upload_digest(file_sha256: str, data_files: dict[str, str]) -> str:
    """What names a model upload as sent, for ``GET /v1/models?source_sha256=``: the file's sha256
    (a .onnx, or a .zip / .tar.gz bundle), or, with data files (name -> sha256), the sha256 of
    "onnx-upload-v1", the file's sha256 and each file's name and sha256, sorted by name, one per
    line. Client and server compute it alike, so a re-upload is found before it is sent."""
    if not data_files:
        return file_sha256
    lines = ["onnx-upload-v1", file_sha256] + [f"{name} {data_files[name]}" for name in sorted(data_files)]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


class DatasetPublic(BaseModel):
    id: str
    name: str
    sha256: str
    size: int
    format: Literal["npz", "png-zip", "image-zip"]  # image-zip: processed at upload, stored as a uint8 .npz
    samples: int
    shape: list[int]  # one image, as stored
    source_dtype: str
    num_classes: int  # the largest label + 1; an image zip's: its classes
    classes: list[str] | None = None  # an image zip's class names in label order: declared, or its folders
    targets: bool = False  # the .npz has target labels t (for an attack's targets: dataset)
    processing: dict | None = None  # an image zip's declared resize, center_crop, color and classes
    images: dict[str, int] | None = None  # an image zip's images by format (png, jpeg)
    source_sha256: str | None = None  # an image-zip's upload, before processing
    created_at: str


class EvaluationCreate(EvaluationSpec):
    """An evaluation spec plus what it evaluates."""

    model_id: str = Field(max_length=40)
    dataset_id: str = Field(max_length=40)


class Progress(BaseModel):
    stage: str | None  # queued, an attack's key, aggregating
    done: int
    total: int
    eta_seconds: float | None


class JobError(BaseModel):
    code: str  # invalid_input, time_limit, worker_lost, internal_error, cancelled
    message: str


class EvaluationPublic(BaseModel):
    id: str
    model_id: str
    dataset_id: str
    state: JobState
    progress: Progress
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: JobError | None
    passed: bool | None  # every gate passed (once succeeded)
    # once succeeded: failed when a gate failed, else inconclusive when a gate's attack showed
    # signs of gradient masking, else passed
    verdict: Literal["passed", "failed", "inconclusive"] | None = None
    shards: int
    # the estimated model calls x samples (a forward, or forward and backward, pass of one
    # sample each); what the service's bounds and quotas count; None for jobs from before it
    cost: int | None = None


class Artifact(BaseModel):
    name: str
    size: int


class ModelList(BaseModel):
    items: list[ModelPublic]
    count: int


class DatasetList(BaseModel):
    items: list[DatasetPublic]
    count: int


class EvaluationList(BaseModel):
    items: list[EvaluationPublic]
    count: int


class ArtifactList(BaseModel):
    items: list[Artifact]
    count: int
