"""What every attack shares: the model it needs, the result it returns, norms, validation.

Call shape (after Foolbox 3): ``attack(model, x, y, eps=[...], targets=None, bounds=(0, 1),
seed=0)`` returns one :class:`AttackRun` per budget, so one call yields a whole robustness
curve; minimal-perturbation attacks take no budget and return a single run.
Arrays: ``x`` float32 [N, ...] in pixel space within ``bounds``; ``y`` int64 [N] true labels;
``targets`` int64 [N] target classes for targeted attacks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np

from workers.errors import InvalidParameter


class AttackModel(Protocol):
    """The model interface attacks use, all of it. ``workers.runtime.Classifier`` implements
    it, and so do the defended models of ``workers.defenses.adaptive``; a model written from
    this protocol alone runs every attack (tests/attacks/test_protocol.py). Each attack states
    which of the three methods it calls in ``Attack.model_calls``, checked before it runs.

    ``num_classes``: K, the number of logits.

    ``logits(x)``: x float32 [N, ...] in the attack's pixel space; returns the scores [N, K]
    (pre-softmax: the class is their argmax).

    ``loss_and_grad(x, labels, loss="auto", targets=None)``: labels int64 [N]; returns
    (logits [N, K], the per-sample loss [N], d loss[i] / d x[i] shaped like x). ``loss`` is
    one of ``workers.attacks.losses.LOSSES`` ("auto", "cross_entropy", "margin", "dlr",
    "dlr_targeted", "logit"), with the values and logit gradients that module computes;
    "dlr_targeted" also reads ``targets`` (int64 [N]), every other loss ignores it. A model
    that has only a vector-Jacobian product can implement it as
    ``loss_and_dlogits(logits(x), labels, loss, targets)`` followed by ``logits_vjp``.

    ``logits_vjp(x, dlogits)``: dlogits float32 [N, K]; returns (logits [N, K],
    sum_k dlogits[i, k] d z_k / d x[i] shaped like x), the gradient of any linear combination
    of logits (DeepFool, FAB).
    """

    num_classes: int

    def logits(self, x: np.ndarray) -> np.ndarray: ...

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray, loss: str = "auto",
                      targets: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def logits_vjp(self, x: np.ndarray, dlogits: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


MODEL_CALLS = ("logits", "loss_and_grad", "logits_vjp")


def check_model(model, calls: Sequence[str], attack: str) -> None:
    """``model`` has ``num_classes`` and the methods ``calls`` an attack needs (see AttackModel)."""
    classes = getattr(model, "num_classes", None)
    check(isinstance(classes, int | np.integer) and not isinstance(classes, bool) and classes >= 2,
          f"{attack} needs a model with `num_classes` (an integer >= 2, see AttackModel), got {classes!r}")
    missing = [name for name in calls if not callable(getattr(model, name, None))]
    check(not missing, f"{attack} calls the model's {', '.join(missing)}, which "
          f"{type(model).__name__} lacks; implement workers.attacks.base.AttackModel")


# progress(done, total): called by long attacks between batches of work
Progress = Callable[[int, int], None]


@dataclass
class AttackRun:
    """The outcome of one attack at one budget (``eps`` None for minimal attacks)."""

    eps: float | None
    x_adv: np.ndarray  # [N, ...], inside the bounds and (for budgeted attacks) the eps ball
    success: np.ndarray  # bool [N]: misclassified (untargeted) or classified as the target
    queries: np.ndarray | None = None  # int [N] model calls per sample (score-based attacks)
    extra: dict = field(default_factory=dict)  # attack-specific arrays (e.g. a universal delta)
    logits: np.ndarray | None = None  # the attacked model's logits of x_adv, where the attack has them


def check(condition: bool | np.bool_, message: str) -> None:
    """Parameter validation: raise InvalidParameter (a UserError) naming the parameter."""
    if not condition:
        raise InvalidParameter(message)


def check_positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = "integer" if integer else "number"
    ok = isinstance(value, int | np.integer) if integer else isinstance(value, int | float | np.number)
    ok = ok and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    check(ok, f"`{name}` must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}")


class Norm(ABC):
    """The Lp geometry of a budget: random start, steepest-ascent direction, projection."""

    name: ClassVar[str]

    @staticmethod
    def _flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1)

    @abstractmethod
    def size(self, delta: np.ndarray) -> np.ndarray:
        """Per-sample size of ``delta`` in this norm."""

    @abstractmethod
    def random_start(self, rng: np.random.Generator, shape, eps: float) -> np.ndarray:
        """A random point of the eps ball."""

    @abstractmethod
    def ascent_direction(self, grad: np.ndarray) -> np.ndarray:
        """The unit-norm direction of steepest ascent for this norm."""

    @abstractmethod
    def project(self, delta: np.ndarray, eps: float) -> np.ndarray:
        """The nearest point of the eps ball."""


class Linf(Norm):
    name = "linf"

    def size(self, delta):
        return np.abs(self._flat(delta)).max(axis=1) if delta.size else np.zeros(len(delta))

    def random_start(self, rng, shape, eps):
        return rng.uniform(-eps, eps, size=shape).astype(np.float32)

    def ascent_direction(self, grad):
        return np.sign(grad).astype(np.float32)

    def project(self, delta, eps):
        return np.clip(delta, -eps, eps)


class L2(Norm):
    name = "l2"

    def size(self, delta):
        # squares summed in float64 and the norm rounded to float32: the order of the sum then
        # changes nothing but once in ~10^8 norms, so a loop on ONNX Runtime (workers/loop_graphs.py)
        # takes the same steps as this one to the bit
        flat = self._flat(delta)
        return np.sqrt(np.einsum("ij,ij->i", flat, flat, dtype=np.float64)).astype(np.float32)

    def random_start(self, rng, shape, eps):
        direction = rng.standard_normal(size=shape).astype(np.float32)
        direction /= np.maximum(self.size(direction), 1e-12).reshape((-1,) + (1,) * (len(shape) - 1))
        radius = rng.uniform(0, 1, size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
        return direction * radius * eps

    def ascent_direction(self, grad):
        # scaled by its largest entry first: the square of a tiny float32 gradient underflows
        column = (-1,) + (1,) * (grad.ndim - 1)
        peak = np.abs(self._flat(grad)).max(axis=1) if grad.size else np.zeros(len(grad))
        scaled = grad / np.where(peak > 0, peak, 1.0).astype(grad.dtype).reshape(column)
        norms = np.maximum(self.size(scaled), 1e-12).reshape(column)
        return (scaled / norms).astype(np.float32)

    def project(self, delta, eps):
        norms = np.maximum(self.size(delta), 1e-12).reshape((-1,) + (1,) * (delta.ndim - 1))
        return (delta * np.minimum(1.0, eps / norms)).astype(np.float32)


NORMS: dict[str, Norm] = {"linf": Linf(), "l2": L2()}


def get_norm(name: str) -> Norm:
    check(name in NORMS, f"`norm` must be one of {', '.join(NORMS)}, got {name!r}")
    return NORMS[name]


def clip_to_box(x: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return np.clip(x, bounds[0], bounds[1]).astype(np.float32, copy=False)


def random_targets(rng: np.random.Generator, y: np.ndarray, num_classes: int) -> np.ndarray:
    """One class != y per sample, uniformly among the other classes."""
    return ((y + rng.integers(1, num_classes, size=len(y))) % num_classes).astype(np.int64)


def is_adversarial(logits: np.ndarray, y: np.ndarray, targets: np.ndarray | None) -> np.ndarray:
    predicted = logits.argmax(axis=1)
    return predicted == targets if targets is not None else predicted != y


class Attack(ABC):
    """Base class: subclasses validate keyword-only parameters in ``__init__``.

    Facts about an attack are class attributes, read by the evaluation, the sanity checks
    and the service instead of tables keyed by name.
    """

    name: ClassVar[str]
    # single_step, iterative, black_box (scores only), noise, minimal, universal
    kind: ClassVar[str] = "iterative"
    norm: str | None = None  # the default norm (the constructor's `norm` may set another)
    norms: ClassVar[tuple[str, ...]] = ()  # the norms a spec may ask for; more than one: a `norm` parameter
    whole_dataset: ClassVar[bool] = False  # True: one run over every sample at once (not per shard)
    minimal: ClassVar[bool] = False  # True: finds minimal perturbations, takes no eps
    targeted_capable: ClassVar[bool] = False
    # the AttackModel methods the attack calls; ("logits",) alone: it needs no gradients
    model_calls: ClassVar[tuple[str, ...]] = ("logits", "loss_and_grad")

    @property
    def needs_gradients(self) -> bool:
        return self.model_calls != ("logits",)

    @property
    def gradient_loss(self) -> str | None:
        """The loss whose input gradient this attack follows, or None for an attack that reads
        only scores: the evaluation probes it for vanishing or non-finite gradients."""
        return "margin" if self.needs_gradients else None

    def calls_per_sample(self, num_classes: int) -> int:
        """At most how many model calls (a forward pass, or a forward and backward pass) one
        sample costs at one budget: what a job's cost estimate counts (workers/cost.py)."""
        return 1

    def __call__(
        self,
        model: AttackModel,
        x: np.ndarray,
        y: np.ndarray,
        *,
        eps: Sequence[float] | float | None = None,
        targets: np.ndarray | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        seed: int = 0,
        progress: Progress | None = None,
    ) -> list[AttackRun]:
        check_model(model, self.model_calls, self.name)
        x = np.asarray(x, np.float32)
        y = np.asarray(y, np.int64)
        check(x.ndim >= 2 and len(x) == len(y), f"x [N, ...] and y [N] disagree: {x.shape} vs {y.shape}")
        check(bounds[0] < bounds[1], f"`bounds` must satisfy low < high, got {bounds}")
        if targets is not None:
            check(self.targeted_capable, f"{self.name} does not support targeted attacks")
            targets = np.asarray(targets, np.int64)
            check(targets.shape == y.shape, "`targets` must have one class per sample")
        if self.minimal:
            check(eps is None, f"{self.name} finds minimal perturbations and takes no `eps`")
            budgets: Sequence[float | None] = [None]
        else:
            check(eps is not None, f"{self.name} needs `eps`, the perturbation budget(s)")
            assert eps is not None
            values = [float(e) for e in np.atleast_1d(eps)]
            budgets = values
            for e in values:
                check(e >= 0 and np.isfinite(e), f"`eps` values must be finite and >= 0, got {e}")
        rng = np.random.default_rng(seed)
        runs = self.run_budgets(model, x, y, budgets, targets, bounds, rng, progress)
        return [_without_nonfinite(run, x, bounds) for run in runs]

    shares_budgets = False  # run_budgets does less than one run per budget (the unit runner asks it at once)

    def run_budgets(self, model: AttackModel, x: np.ndarray, y: np.ndarray, budgets: Sequence[float | None],
                    targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
                    progress: Progress | None) -> list[AttackRun]:
        """One run per budget, in order (an attack whose budgets can share work overrides it)."""
        return [self.run(model, x, y, e, targets, bounds, rng, progress) for e in budgets]

    @abstractmethod
    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        """Attack every sample at one budget."""


def _without_nonfinite(run: AttackRun, x: np.ndarray, bounds: tuple[float, float]) -> AttackRun:
    """A sample whose adversarial example has a NaN or infinite pixel (arithmetic that
    overflowed) did not fool the model, whatever its NaN logits' argmax says: it becomes its
    clean image, unsuccessful, and ``extra["nonfinite_examples"]`` counts it, so that the
    evaluation warns that this run's robust accuracy cannot be trusted."""
    finite = np.isfinite(run.x_adv.reshape(len(run.x_adv), -1)).all(axis=1)
    if finite.all():
        return run
    x_adv, success = run.x_adv.copy(), run.success & finite
    x_adv[~finite] = np.clip(x[~finite], *bounds)
    extra = {**run.extra, "nonfinite_examples": int(np.count_nonzero(~finite))}
    return replace(run, x_adv=x_adv, success=success, extra=extra, logits=None)


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available by its ``name`` to specs and the CLI."""
    check(cls.name not in ATTACKS, f"attack name {cls.name!r} registered twice")
    ATTACKS[cls.name] = cls
    return cls
