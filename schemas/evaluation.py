"""The evaluation spec and the result document: the contract shared by the CLI, the service
and its clients. ``python -m schemas`` writes their JSON Schemas.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.results import DefenseResult, FoolingSection, LipschitzSection, TransferEntry

Layout = Literal["NCHW", "NHWC"]
NORM_HELP = ("the perturbation's norm: linf or l2 for the built-in attacks (each attack lists its norms; the "
             "engine refuses one it does not have)")
ModelLayout = Literal["auto", "NCHW", "NHWC"]
Verdict = Literal["passed", "failed", "inconclusive"]
TargetMode = Literal["random", "least_likely", "all", "dataset"]
AttackLoss = Literal["auto", "cross_entropy", "margin", "ce", "dlr", "dlr_targeted"]
GateMetric = Literal[
    "clean_accuracy", "robust_accuracy", "success_rate", "mean_l2", "median_l2",
    "mean_linf", "median_linf", "distortion", "rho", "certified_accuracy",
]
CertifyMethod = Literal["ibp", "crown_ibp", "crown", "alpha_crown"]
# free text of a spec, bounded: labels are drawn in the report's plots and tables, whose time grows with them
MAX_NAME = 64  # an attack's or a defense's name
MAX_LABEL = 100  # an entry's label, and what a gate reads it by
MAX_REFERENCE = 4096  # a stored id on the service, a file path (PATH_MAX) for the local CLI
Reference = Annotated[str, Field(max_length=MAX_REFERENCE)]


def _default_methods() -> list[CertifyMethod]:
    return ["ibp"]


class InputSpec(BaseModel):
    """How the dataset's pixels relate to what the model expects."""

    model_config = ConfigDict(extra="forbid")

    range: tuple[float, float] = Field((0.0, 1.0), description=(
        "the pixel range attacks work in: budgets, step sizes and perturbations are in its units "
        "(e.g. [0, 255] for a model fed raw bytes)"))
    mean: list[float] | None = Field(None, description=(
        "normalisation composed into the graph, (x - mean) / std: one value or one per channel"))
    std: list[float] | None = None
    layout: Layout = Field("NCHW", description=(
        "the dataset's image layout. Evaluations run on NCHW pixels: NHWC images are transposed "
        "when loaded, and artifacts are returned in this layout"))
    model_layout: ModelLayout = Field("auto", description=(
        "the layout the model takes: auto reads it from the model's input shape (the one in which "
        "the images fit it, NCHW when both do); NHWC models (tf2onnx, Keras) get a Transpose composed "
        "in front, and per-channel operations use the channel axis of this layout"))
    model_output: str | None = Field(None, min_length=1, max_length=256, description=(
        "the model output read as its scores (logits or probabilities, [N, K]): by default the first "
        "float output; name another where the model returns, say, (features, logits)"))

    @field_validator("range")
    @classmethod
    def _ordered(cls, value):
        if not value[0] < value[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(value)}")
        return value

    @field_validator("std")
    @classmethod
    def _positive(cls, value):
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("std values must be positive")
        return value


LOSS_HELP = (
    "the loss a gradient attack ascends. auto (the default of fgsm, bim, pgd and apgd, and "
    "AutoAttack's APGD-CE): the cross-entropy's ascent direction without the factor that underflows to "
    "exactly 0 once the label wins by a logit margin of about 90 (models fed 0..255 pixels, large "
    "logits, saturated softmax outputs): it takes the cross-entropy's steps wherever those are "
    "informative, and tends to the C&W margin's where they vanish; use it unless a paper's exact "
    "setting is wanted. cross_entropy (fgsm, bim, pgd; ce for apgd): the textbook loss, for comparisons "
    "with other tools; on confident models its gradient vanishes and the evaluation is flagged as masked. "
    "margin (fgsm, bim, pgd): Carlini-Wagner's max_{j != y} z_j - z_y, scale-free in direction. dlr "
    "(apgd): Croce and Hein's difference of logits ratio, invariant to the logits' scale and shift, "
    "3+ classes. dlr_targeted (apgd): APGD-T, the targeted DLR over the top classes, 4+ classes."
)


class AttackSpec(BaseModel):
    """One attack: ``name``, its budgets and its own parameters (checked by the attack)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=MAX_NAME, description="attack name, e.g. fgsm, pgd, deepfool, autoattack")
    eps: list[float] | None = Field(None, description="budgets in pixel units (one or a list)")
    norm: str | None = Field(None, max_length=16, description=NORM_HELP)
    targeted: bool = Field(False, description="a targeted attack with a random target class != label per "
                           "sample, reproducible from the seed (the same as targets: random)")
    targets: TargetMode | None = Field(None, description=(
        "the target classes of a targeted attack: random (as targeted: true); least_likely (the class the "
        "model scores lowest on the clean image); all (the attack once per other class, each sample's "
        "worst case: broken when any run misclassifies it, as AutoAttack's targeted runs); dataset (the "
        "dataset's array t of target labels)"))
    loss: AttackLoss | None = Field(None, description=LOSS_HELP)
    step_size: float | None = Field(None, gt=0, description=(
        "fgsm, bim, pgd: the step in pixel units; give at most one of step_size and rel_step_size"))
    rel_step_size: float | None = Field(None, gt=0, description=(
        "bim, pgd: the step as a fraction of eps, so that one value serves every budget of the entry; "
        "neither given: 2.5 / steps (Madry et al.)"))
    label: str | None = Field(None, max_length=MAX_LABEL,
                              description="a name for this entry in results and gates")

    @model_validator(mode="before")
    @classmethod
    def _scalars_to_lists(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            if "std" in data and "eps" not in data:  # noise baselines are budgeted by their std
                data["eps"] = data.pop("std")
            if isinstance(data.get("eps"), int | float):
                data["eps"] = [data["eps"]]
        return data

    @model_validator(mode="after")
    def _targets_agree(self):
        if self.targets is not None and not self.targeted:
            if "targeted" in self.model_fields_set:
                raise ValueError(f"`targeted: false` contradicts `targets: {self.targets}`; "
                                 "remove `targeted`")
            self.targeted = True  # targets imply a targeted attack (and a dump says so)
        return self

    @field_validator("eps")
    @classmethod
    def _eps_valid(cls, value):
        if value is not None:
            if not value:
                raise ValueError("eps must not be empty")
            if any(not (v >= 0) or v != v or v == float("inf") for v in value):
                raise ValueError("eps values must be finite and >= 0")
        return value

    def params(self) -> dict[str, Any]:
        """The attack-specific parameters (everything but the common fields)."""
        declared = {name: getattr(self, name) for name in ATTACK_PARAMETERS}
        return {**{k: v for k, v in declared.items() if v is not None}, **(self.model_extra or {})}

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def target_mode(self) -> str | None:
        """How the targets are chosen, or None for an untargeted attack."""
        return self.targets or ("random" if self.targeted else None)


ATTACK_PARAMETERS = ("loss", "step_size", "rel_step_size")
MAX_JSON_DEPTH = 32
# I-JSON's (RFC 7493) bound on integers, which every JSON parser holds exactly; far above any bound of
# a parameter, and small enough that each converts to a float or an int64
MAX_JSON_MAGNITUDE = 2**53


def _not_plain_json(value, path: str, depth: int = 0) -> str | None:
    """What in ``value`` (parsed JSON) is not plain: a NaN or infinite number, one past
    MAX_JSON_MAGNITUDE, a NUL in a string or a key, nesting past MAX_JSON_DEPTH; None when all is plain."""
    where = path or "the spec"
    if depth > MAX_JSON_DEPTH:
        return f"{where}: nested more than {MAX_JSON_DEPTH} levels deep"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value} is not a JSON number; give a finite number"
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > MAX_JSON_MAGNITUDE:
        return (f"{where}: a number larger than 2**53 ({MAX_JSON_MAGNITUDE:,}) in magnitude, which no field "
                "accepts; give a smaller one")
    if isinstance(value, str) and "\x00" in value:
        return f"{where}: contains a NUL character (\\u0000), which no field accepts"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                return f"{where}: a key contains a NUL character (\\u0000)"
            problem = _not_plain_json(item, f"{path}.{key}" if path else str(key), depth + 1)
            if problem:
                return problem
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            problem = _not_plain_json(item, f"{path}[{index}]", depth + 1)
            if problem:
                return problem
    return None  # declared here, passed to the attack


class GateSpec(BaseModel):
    """A pass/fail condition on one metric of the result."""

    model_config = ConfigDict(extra="forbid")

    metric: GateMetric
    # attack name or label; None only for clean_accuracy
    attack: str | None = Field(None, max_length=MAX_LABEL)
    eps: float | None = None
    norm: str | None = Field(None, max_length=16, description="the norm of the entry the gate reads")
    min: float | None = None
    max: float | None = None
    baseline: Reference | None = Field(None, description="an earlier evaluation to compare with: its id on "
                                       "the service, or the path of a result JSON file for the local CLI")
    max_drop: float | None = Field(None, ge=0, description="with `baseline`: pass when the value is at "
                                   "least the baseline's value minus max_drop")
    allow_inconclusive: bool = Field(False, description=(
        "a gate whose attack entry carries a gradient-masking warning is inconclusive, not passed; true "
        "accepts such a gate as passed, and the result records that it did"))

    @model_validator(mode="after")
    def _bounded(self):
        if (self.baseline is None) != (self.max_drop is None):
            raise ValueError("`baseline` and `max_drop` go together: give both or neither")
        if self.min is None and self.max is None and self.baseline is None:
            raise ValueError("a gate needs `min` or `max` (or `baseline` with `max_drop`)")
        if self.metric != "clean_accuracy" and self.attack is None:
            raise ValueError(f"a gate on {self.metric} must name its `attack`")
        return self


class FoolingSpec(BaseModel):
    """Fooling images (Nguyen et al. 2015, the "rubbish class"): how confidently the model
    labels uniform noise, and how fast gradient ascent from noise reaches each class."""

    model_config = ConfigDict(extra="forbid")

    samples: int = Field(1000, ge=1, le=100_000, description="uniform-noise images to label")
    threshold: float = Field(0.9, gt=0, lt=1, description=(
        "the softmax confidence that counts as fooled: the share of noise images labelled with at "
        "least this confidence is the fooling rate"))
    steps: int = Field(20, ge=0, le=1000, description=(
        "gradient-ascent steps per class from noise towards that confidence (0: skip the ascent)"))
    step_size: float = Field(0.02, gt=0, description="the ascent's L-inf step, in pixel units")


MAIN_MODEL = "model"  # the evaluated model's name in a transfer spec


class DefenseSpec(BaseModel):
    """A preprocessing defense in front of the model (Liang et al. 2017), with its own
    parameters (checked by the defense), evaluated non-adaptively and adaptively."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=MAX_NAME, description="pca, gaussian_noise, uniform_noise, downsample, "
                                                       "autoencoder, bit_depth, median, jpeg")
    label: str | None = Field(None, max_length=MAX_LABEL, description="a name for this entry in results")
    # PCA: fit on the last `fit_samples` samples of the dataset, held out from the evaluated ones,
    # or on a separate dataset (an .npz path for the local CLI, a dataset id on the service)
    fit_samples: int | None = Field(None, ge=2, le=100_000)
    fit_dataset: Reference | None = None
    # noise defenses: accuracy against the noise magnitude (sigma, or the half-width of a
    # symmetric uniform noise), clean and on each attack's examples crafted on the bare model
    curve: list[float] | None = Field(None, min_length=1, max_length=32)
    model: Reference | None = None  # autoencoder: an .onnx path (local CLI) or a model id (service)
    adaptive: bool = True  # also attack the defended model end to end (composed graph, EOT or BPDA)
    eot_samples: int = Field(8, ge=1, le=256)  # draws per gradient against a random defense

    @property
    def key(self) -> str:
        return self.label or self.name

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def reference_key(self) -> str:
        """Where the engine finds this defense's model bytes (autoencoder)."""
        return f"defense:{self.key}"

    def fit_key(self) -> str:
        """The key under which a job keeps the sha256 of this defense's separate fit dataset."""
        return f"fit:{self.key}"


class TransferSpec(BaseModel):
    """Cross-model transfer (Szegedy et al. 2014, Liang et al. 2017): adversarial examples
    crafted white-box on each source model, evaluated on every target model."""

    model_config = ConfigDict(extra="forbid")

    # name -> the model: a file path (local CLI, relative to the spec file) or a model id (service)
    models: dict[str, Reference] = Field(min_length=1, max_length=16)
    # names from `models`, and "model" for the evaluated model; "all": every model
    sources: list[str] | Literal["all"] = "all"
    targets: list[str] | Literal["all"] = "all"
    attacks: list[AttackSpec] = Field(min_length=1, max_length=8)
    noise_baseline: bool = True  # Gaussian-noise rows at each attack row's distortion

    @model_validator(mode="after")
    def _check(self):
        for name in self.models:
            if name == MAIN_MODEL or not name.replace("_", "").replace("-", "").isalnum() or len(name) > 40:
                raise ValueError(f"transfer.models: {name!r} is not a usable name (letters, digits, '-', "
                                 f"'_'; {MAIN_MODEL!r} is the evaluated model)")
        known = [MAIN_MODEL, *self.models]
        for field in ("sources", "targets"):
            names = getattr(self, field)
            if names != "all":
                unknown = [n for n in names if n not in known]
                if unknown or not names:
                    raise ValueError(f"transfer.{field}: {unknown or 'empty'} not among the models {known}")
        return self

    def names(self, field: str) -> list[str]:
        value = getattr(self, field)
        return [MAIN_MODEL, *self.models] if value == "all" else list(value)


class CertifySpec(BaseModel):
    """Certified robustness: a sound lower bound on robust accuracy per budget, from bound
    graphs built from the model (workers/certify/), beside the attacks' upper bounds."""

    model_config = ConfigDict(extra="forbid")

    methods: list[CertifyMethod] = Field(default_factory=_default_methods, min_length=1, max_length=4,
                                         description=(
                                             "ibp: interval bound propagation; crown_ibp: linear relaxation "
                                             "backwards from the margins over IBP's intermediate bounds; "
                                             "crown: full CROWN, intermediate bounds by linear "
                                             "relaxation too (small layers; IBP's elsewhere); "
                                             "alpha_crown: crown_ibp with its ReLU slopes optimised"))
    eps: list[float] = Field(min_length=1, max_length=32, description="budgets in `norm`, in pixel units")
    norm: Literal["linf", "l2"] = Field("linf", description=(
        "l2: bounded through the box around the ball (ibp) and the ball's dual norm (crown_ibp)"))

    @field_validator("eps")
    @classmethod
    def _budgets(cls, values: list[float]) -> list[float]:
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"certify.eps values must be finite and >= 0, got {values}")
        return values


class EvaluationSpec(BaseModel):
    """What to evaluate: input conventions, how many samples, which attacks, which gates."""

    model_config = ConfigDict(extra="forbid")

    input: InputSpec = Field(default_factory=InputSpec)
    samples: int | Literal["all"] = Field("all", description="the first N samples, or all")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1, le=4096)
    shard_size: int = Field(250, ge=1, le=100_000, description=(
        "samples per shard, the unit of work of one worker process. Each shard's attacks draw their "
        "randomness from (seed, attack, shard), so results depend on shard_size; the same spec gives "
        "the same result locally and on the service"))
    attacks: list[AttackSpec] = Field(default_factory=list, max_length=64)
    gates: list[GateSpec] = Field(default_factory=list, max_length=256)
    fooling: FoolingSpec | None = Field(None, description=(
        "fooling images (Nguyen et al. 2015): how confidently the model labels uniform noise, and how fast "
        "gradient ascent from noise reaches each class"))
    transfer: TransferSpec | None = None
    lipschitz: bool = False  # per-layer Lipschitz upper bounds and their product (Szegedy et al.)
    defenses: list[DefenseSpec] = Field(default_factory=list, max_length=16)
    certify: CertifySpec | None = Field(None, description=(
        "certified accuracy per budget (a lower bound on robust accuracy) beside the attacks' (an upper "
        "bound); gates read it as metric certified_accuracy with `attack` the method (ibp)"))

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data):
        """No NaN or infinity in any number and no NUL in any string, named by their path: JSON
        has no such numbers (Python's parser takes them anyway), and PostgreSQL stores no NUL."""
        problem = _not_plain_json(data, "")
        if problem:
            raise ValueError(problem)
        return data

    @field_validator("samples")
    @classmethod
    def _positive_samples(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("samples must be a positive integer or 'all'")
        return value

    @model_validator(mode="after")
    def _check_attacks_and_gates(self):
        """What the spec alone shows; the engine checks it against its registries
        (workers/spec_checks.py: known attacks and defenses, their parameters)."""
        for what, entries in (("attacks", self.attacks), ("defenses", self.defenses)):
            keys = [entry.key for entry in entries]
            duplicates = {k for k in keys if keys.count(k) > 1}
            if duplicates:
                raise ValueError(f"{what} {sorted(duplicates)} appear twice; give each a distinct `label`")
        keys = [a.key for a in self.attacks]
        methods = self.certify.methods if self.certify is not None else []
        for index, gate in enumerate(self.gates):
            if gate.metric == "certified_accuracy":
                if gate.attack not in methods:
                    raise ValueError(f"gates[{index}]: certified_accuracy reads a `certify` method as its "
                                     f"`attack`; {gate.attack!r} is not among certify.methods {methods}")
            elif gate.attack is not None and gate.attack not in keys:
                raise ValueError(f"gates[{index}].attack: {gate.attack!r} is not among the attacks "
                                 f"{keys}")
        return self


# ---------------------------------------------------------------------------- results


class AttackResult(BaseModel):
    """Metrics of one attack at one budget."""

    model_config = ConfigDict(ser_json_inf_nan="strings")  # an unbroken sample: "Infinity"

    attack: str
    name: str
    kind: str  # single_step, iterative, black_box, noise, minimal, universal
    norm: str | None = None
    eps: float | None = None
    samples: int
    robust_accuracy: float
    success_rate: float | None = None
    mean_l2: float | None = None
    median_l2: float | None = None
    mean_linf: float | None = None
    median_linf: float | None = None
    distortion: float | None = None
    rho: float | None = None
    mean_adv_confidence: float | None = None
    per_class_robust_accuracy: list[float | None] | None = None
    mean_queries: float | None = None
    median_queries: float | None = None
    minimal: dict[str, Any] | None = None  # quantiles and the accuracy-versus-eps curve
    details: dict[str, Any] | None = None  # attack-specific extras (e.g. per-component results)
    # signs that this entry's number overstates robustness (gradient masking): a gate that reads
    # the entry is inconclusive while any is present
    warnings: list[str] = Field(default_factory=list)


class GateResult(BaseModel):
    metric: str
    attack: str | None
    eps: float | None
    norm: str | None
    min: float | None
    max: float | None
    baseline: str | None = None
    max_drop: float | None = None
    value: float | None
    baseline_value: float | None = None  # the same metric in the baseline evaluation
    passed: bool  # the verdict is passed (an accepted inconclusive gate included)
    # passed; failed; inconclusive: the bounds hold but the entry carries a masking warning
    verdict: Verdict | None = None
    allow_inconclusive: bool = False
    # true when the gate passed only because allow_inconclusive accepted an inconclusive verdict
    accepted_inconclusive: bool = False
    reason: str | None = None
    warnings: list[str] = Field(default_factory=list)  # the entry's masking warnings

    @model_validator(mode="after")
    def _verdict_of_older_results(self):
        if self.verdict is None:  # a result written before verdicts existed
            self.verdict = "passed" if self.passed else "failed"
        return self


class CertifiedEntry(BaseModel):
    """One certification method at one budget: the bracket certified <= true <= attacked."""

    method: str
    norm: str
    eps: float
    samples: int
    certified_accuracy: float  # share of samples no image of the ball misclassifies (a lower bound)
    certified: int
    broken: int  # misclassified, or an attack of the evaluation found an adversarial example at this eps
    unknown: int
    attacked_accuracy: float | None = None  # the lowest robust accuracy of the attacks at this eps and norm


class CertifySection(BaseModel):
    available: bool  # some method ran
    reason: str | None = None  # why none did, e.g. an operator without a bound rule
    unavailable: dict[str, str] = Field(default_factory=dict)  # method -> why it did not run
    entries: list[CertifiedEntry] = Field(default_factory=list)


class EvaluationResult(BaseModel):
    """The result document. Everything but ``timing`` is a deterministic function of the
    model, the data, the spec and the seed (on a given device)."""

    model: dict[str, Any]
    dataset: dict[str, Any]
    spec: EvaluationSpec
    device: str
    clean_accuracy: float
    attacks: list[AttackResult]
    warnings: list[str]
    gates: list[GateResult]
    passed: bool  # every gate passed
    # failed when a gate failed, else inconclusive when a gate is, else passed
    verdict: Verdict | None = None
    fooling: FoolingSection | None = None  # noise fooling rate and gradient-ascent summary
    # per transfer attack: Szegedy-style table (rows: sources and noise baselines; columns:
    # targets; error rates and average distortion) and Liang et al.'s cross-testing pairs
    transfer: list[TransferEntry] | None = None
    # upper bounds of the L2 Lipschitz constant per layer (node, op, method, bound) and of the
    # network, in pixel space (normalisation included), when spec.lipschitz
    lipschitz: LipschitzSection | None = None
    # per defense: clean accuracy through it, and per attack and budget the bare model's robust
    # accuracy, the defended model's on examples crafted on the bare model (non-adaptive) and
    # on examples crafted against the defense itself (adaptive: composed graph, EOT or BPDA)
    defenses: list[DefenseResult] | None = None
    certify: CertifySection | None = None  # certified accuracy per method and budget, when spec.certify
    # seconds of work summed over the units (not wall time when they run in parallel): "clean", one
    # entry per attack key, "fooling", "finish" and their "total"
    timing: dict[str, float]

    @model_validator(mode="after")
    def _verdict_of_older_results(self):
        if self.verdict is None:  # a result written before verdicts existed
            self.verdict = overall_verdict(self.gates)
        return self


def overall_verdict(gates: list[GateResult]) -> Verdict:
    """failed when a gate failed, else inconclusive when one is, else passed."""
    verdicts = {g.verdict for g in gates}
    return "failed" if "failed" in verdicts else "inconclusive" if "inconclusive" in verdicts else "passed"
