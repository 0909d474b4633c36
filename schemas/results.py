"""The typed sections of a result document besides the attack entries and gates: fooling
images, Lipschitz bounds, transfer tables and defenses. Field order is the document's order;
an optional key that a section leaves out when it does not apply is excluded when None, so the
document reads as it did before these were typed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


def _absent_when_none(value) -> bool:
    return value is None


# ---------------------------------------------------------------------------- fooling


class NoiseFooling(BaseModel):
    """How confidently the model labels uniform noise."""

    samples: int
    threshold: float
    fooling_rate: float  # the share labelled with softmax confidence >= threshold
    per_class_counts: list[int]  # confident images per predicted class
    predicted_counts: list[int]  # all images per predicted class
    mean_confidence: float | None


class AscentFooling(BaseModel):
    """Gradient ascent from noise towards each class."""

    samples: int  # classes tried
    threshold: float
    share_reached: float  # the share of classes that reached the threshold
    mean_confidence: float | None
    mean_steps: float | None
    max_steps: int | None


class FoolingSection(BaseModel):
    noise: NoiseFooling
    gradient_ascent: AscentFooling | None = Field(None, exclude_if=_absent_when_none)  # steps > 0


# ---------------------------------------------------------------------------- Lipschitz bounds


class LayerBound(BaseModel):
    node: str  # node name, or "<op_type>#<index>" when unnamed
    op_type: str
    kind: str  # linear, pointwise, scale, pooling, normalization, identity, softmax, add, concat
    norm: float  # upper bound on this layer's L2 operator norm (per input branch for add)
    method: str  # "svd", "lanczos", "power_iteration(n iters)", "closed_form", "sum_rule", ...


class LipschitzSection(BaseModel):
    layers: list[LayerBound]  # the nodes on the path from the input to the logits, in order
    network_bound: float | None  # None when some layer is unsupported
    unsupported: list[str] = Field(default_factory=list)  # "<node> (<op>): why"
    output: str = ""  # the tensor bounded: the logits (before a final Softmax)
    norm: str = "l2"


# ---------------------------------------------------------------------------- transfer


NOISE_ATTACK = "gaussian_noise"  # a transfer row's attack when it is a Gaussian-noise baseline


class TransferRow(BaseModel):
    """Examples crafted on ``source`` (or matched noise), and every target's error on them."""

    source: str  # the model the examples were crafted on, or "noise(...)" for a baseline
    attack: str | None  # the attack's name, NOISE_ATTACK for a baseline
    eps: float | None
    distortion: float | None  # Szegedy's average distortion; None: nothing fooled
    error_rates: dict[str, float]  # target -> 1 - accuracy on these examples
    success_on_source: float | None  # the attack's success rate on its own model (None for noise)
    noise_std: float | None = None  # a baseline's sigma
    baseline_for: str | None = None  # a baseline's matched attack row, by its label

    @property
    def is_baseline(self) -> bool:
        return self.attack == NOISE_ATTACK

    @property
    def label(self) -> str:
        """The row's name in a table: "fc100", "fc100 (eps=0.1)", "Gaussian noise, stddev=0.05"."""
        if self.is_baseline:
            return f"Gaussian noise, stddev={self.noise_std:.3g}"
        return self.source if self.eps is None else f"{self.source} (eps={self.eps:g})"


class CrossPair(BaseModel):
    """Liang et al.'s cross-testing of two models at one budget."""

    a: str
    b: str
    attack: str | None
    eps: float | None
    a_error_on_b_examples: float
    b_error_on_a_examples: float
    a_distortion: float | None
    b_distortion: float | None


class TransferEntry(BaseModel):
    """One transfer attack's table (Szegedy et al.'s layout) and its rows and pairs."""

    attack: str
    # a header ["", *targets, "av. distortion"], a "clean" row, then one row per entry of
    # ``rows``: [label, *error rates, distortion]
    table: list[list[str | float | None]]
    rows: list[TransferRow]
    clean_error: dict[str, float]
    cross_pairs: list[CrossPair]


# ---------------------------------------------------------------------------- defenses


class DefenseRow(BaseModel):
    """One attack and budget through a defense."""

    attack: str
    eps: float | None
    bare: float | None  # the undefended model's robust accuracy
    non_adaptive: float  # the defended model on examples crafted on the bare model
    adaptive: float | None  # ... on examples crafted against the defense (None: not run)
    # per sample, correct on both kinds of examples (on the non-adaptive ones where the adaptive
    # attack did not run): the defense's robust accuracy against this attack (None: a result
    # from before this field)
    worst_case: float | None = None
    flagged: bool  # adaptive more than ADAPTIVE_GAP below non-adaptive


class CurveAttack(BaseModel):
    attack: str
    eps: float | None
    accuracy: float


class CurvePoint(BaseModel):
    """Accuracy through a noise defense at one magnitude, clean and per attack (non-adaptive)."""

    magnitude: float
    clean_accuracy: float
    attacks: list[CurveAttack]


class DefenseResult(BaseModel):
    """Liang et al.'s table for one defense: clean accuracy through it and, per attack and
    budget, the bare, non-adaptive and adaptive robust accuracies."""

    defense: str  # the entry's key (label or name)
    name: str
    params: dict[str, Any]
    adaptive_method: str | None
    clean_accuracy: float
    attacks: list[DefenseRow]
    warnings: list[str]
    curve: list[CurvePoint] | None = Field(None, exclude_if=_absent_when_none)  # noise defenses' curve
