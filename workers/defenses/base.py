"""What every defense shares: the interface, the registry, and putting a stage in front of a model.

A defense is a preprocessing stage g in front of a classifier f: the defended model is f(g(x)).
Arrays are float32 ``x`` [N, ...] in pixel space (the dataset's range), laid out as the
model's input; the image defenses (downsample, median, jpeg) need NCHW [N, C, H, W].

Three ways to attack f(g(x)) (Athalye et al. 2018, "Obfuscated gradients give a false sense
of security"):

- ``differentiable`` defenses: ``compose(model)`` returns f∘g as one ONNX graph of standard
  operators; the gradient builder differentiates through g exactly.
- ``random`` defenses: expectation over transformation, ``adaptive.EOTModel``.
- the others (quantisation, median, JPEG): ``adaptive.BPDAModel``, forward through g, backward
  through the approximation ``bpda(model)`` (identity by default).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper

from workers.attacks.base import check
from workers.datasets import Images
from workers.errors import InvalidParameter, UserError
from workers.onnxgrad import weights
from workers.onnxgrad.dtypes import half_dtype
from workers.onnxgrad.prepare import image_input, load_model, normalise_opset


class NotDifferentiableError(UserError):
    """``compose()`` on a defense that has no exact ONNX stage; the message names the way to attack it."""


class Defense(ABC):
    """Base class: subclasses validate keyword-only parameters in ``__init__`` and keep them in
    ``params`` (JSON-friendly, for reports)."""

    name: ClassVar[str]
    differentiable: ClassVar[bool] = False  # compose() gives an ONNX stage with exact gradients
    random: ClassVar[bool] = False  # apply() draws from rng: attack with expectation over transformation
    fitted: ClassVar[bool] = False  # fit() learns from held-out clean images (fit_samples, fit_dataset)
    needs_model: ClassVar[bool] = False  # its `model` parameter is an ONNX model of the spec's (autoencoder)
    # the parameter a noise curve varies, described for messages (None: the defense has no magnitude)
    magnitude: ClassVar[str | None] = None

    @classmethod
    def at_magnitude(cls, params: dict, magnitude: float) -> dict:
        """``params`` with the defense's magnitude set to ``magnitude`` (for noise curves)."""
        raise InvalidParameter(f"{cls.name} has no magnitude to vary")

    params: dict

    def fit(self, x_fit: Images) -> None:
        """Learn what the stage needs from clean images (only PCA needs it): float32, or uint8
        Pixels that read as float32."""
        return None

    @abstractmethod
    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """What the defended model sees: float32, shaped like ``x``."""

    def compose(self, model: onnx.ModelProto | bytes) -> onnx.ModelProto:
        """The model with this stage in front, as standard ONNX operators; input name unchanged."""
        raise NotDifferentiableError(
            f"{self.name} is not differentiable (its gradient is zero almost everywhere or "
            "undefined): attack it with adaptive.BPDAModel and bpda(model)")

    def bpda(self, model: onnx.ModelProto | bytes) -> onnx.ModelProto:
        """The differentiable approximation of model∘defense used on the backward pass.

        Identity by default (the model itself, a copy); differentiable defenses return
        ``compose(model)``, their exact gradient.
        """
        return self.compose(model) if self.differentiable else load_model(model)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class RandomDefense(Defense):
    """A defense that draws a random transformation t per call; ``transform`` also says where
    dt/dx is the identity (the mask the EOT gradient is multiplied by)."""

    random = True

    @abstractmethod
    def transform(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """(t(x), diagonal of dt/dx: float32 like x, or None where it is the identity everywhere)."""

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        check(rng is not None, f"{self.name} is random: pass `rng` (a seeded numpy Generator)")
        assert rng is not None
        return self.transform(x, rng)[0]

    def compose(self, model):
        raise NotDifferentiableError(
            f"{self.name} is random: no ONNX stage can stand for it in the gradient graph; "
            "attack it with adaptive.EOTModel (gradients averaged over draws of the noise)")


DEFENSES: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: make ``cls`` available by its ``name`` to :func:`build_defense`."""
    check(cls.name not in DEFENSES, f"defense name {cls.name!r} registered twice")
    DEFENSES[cls.name] = cls
    return cls


def build_defense(name: str, **params) -> Defense:
    """The defense registered as ``name``, built with keyword ``params``."""
    check(name in DEFENSES, f"unknown defense {name!r}; known defenses: {', '.join(sorted(DEFENSES))}")
    cls = DEFENSES[name]
    signature = inspect.signature(cls.__init__).parameters.values()
    accepted = [p.name for p in signature if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    check(not unknown, f"defense {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                       f"its parameters: {', '.join(accepted) or 'none'}")
    missing = [p.name for p in signature
               if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in params]
    check(not missing, f"defense {name!r} needs parameter {', '.join(map(repr, missing))}")
    return cls(**params)


# --------------------------------------------------------------------------- validation


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float:
    """``value`` as a number inside the interval, else ValueError naming ``name`` and the interval."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and bool(np.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if low is not None or high is not None:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo, hi = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        where = f" in {left}{lo}, {hi}{right}"
    else:
        where = ""
    check(ok, f"`{name}` must be {'an integer' if integer else 'a finite number'}{where}, got {value!r}")
    return int(value) if integer else float(value)


def check_bounds(name: str, value) -> tuple[float, float]:
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                    and np.isfinite(v) for v in value)
    check(ok and value[0] < value[1], f"`{name}` must be (low, high) with low < high, got {value!r}")
    return float(value[0]), float(value[1])


def as_images(x: np.ndarray, name: str, *, rank: int | None = None) -> np.ndarray:
    """``x`` as float32 [N, ...] (a view where it already is)."""
    x = np.asarray(x)
    check(np.issubdtype(x.dtype, np.number), f"{name}: inputs must be numeric, got {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if rank is None:
        check(x.ndim >= 2, f"{name}: inputs must be [N, ...], got shape {list(x.shape)}")
    else:
        check(x.ndim == rank, f"{name}: inputs must be NCHW [N, C, H, W], got shape {list(x.shape)}")
    return x


# --------------------------------------------------------------------------- graph surgery


def stage_model(model: onnx.ModelProto | bytes) -> tuple[onnx.ModelProto, onnx.ValueInfoProto]:
    """A private copy of ``model`` at opset >= 17 (as the gradient builder wants), and its image input."""
    model = normalise_opset(load_model(model))
    return model, image_input(model)


def input_dims(x: onnx.ValueInfoProto) -> list[int | str | None]:
    """The declared dims of an input: ints, symbolic names, or None where unknown."""
    dims = []
    for d in x.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def all_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    names |= {i.name for i in graph.initializer} | {v.name for v in graph.value_info}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def unique_prefix(graph: onnx.GraphProto, base: str) -> str:
    """``base`` (ending in '/'), lengthened until no name of ``graph`` starts with it."""
    names = all_names(graph)
    prefix = base
    while any(n.startswith(prefix) for n in names):
        prefix = prefix[:-1] + "_/"
    return prefix


def prepend_stage(model: onnx.ModelProto, x: onnx.ValueInfoProto, nodes: list[onnx.NodeProto],
                  initializers: list[onnx.TensorProto], output: str) -> onnx.ModelProto:
    """Put ``nodes`` (reading ``x.name``, writing ``output``) in front of ``model``, in place.

    Every node that read the image input now reads ``output``; the input keeps its name. The
    stage computes in float32: before a half-precision model, its output is cast to the model's type.
    """
    graph = model.graph
    for out in graph.output:
        check(out.name != x.name, f"the model returns its input {x.name!r} unchanged; nothing to defend")
    half = half_dtype(x)
    if half is not None:
        nodes = [*nodes, helper.make_node("Cast", [output], [f"{output}/half"], to=half)]
        output = f"{output}/half"
        x.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == x.name:
                node.input[i] = output
    new_nodes = list(nodes) + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(initializers)
    del graph.value_info[:]
    weights.check_model(model)
    return model


def node(op_type: str, inputs: list[str], output: str, prefix: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, [output], name=f"{prefix}{op_type}/{output.rsplit('/', 1)[-1]}",
                            **attrs)
