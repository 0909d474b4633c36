"""Emitting nodes into a graph: fresh names, deduplicated constants, opset-aware helpers.

Every gradient rule writes through a :class:`GraphBuilder`, so the forms that changed
between opsets (reduction axes as attribute or input) live in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeGuard

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str | None
Shape = tuple[Dim, ...]

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})

# Reductions whose `axes` moved from attribute to input at opset 18 (ReduceSum moved at 13).
_AXES_INPUT_SINCE = {"ReduceSum": 13}
_AXES_INPUT_SINCE_DEFAULT = 18


class GraphBuilder:
    """Appends nodes and initializers with names that never collide with the model's."""

    def __init__(self, opset: int, taken: Iterable[str], prefix: str = "grad/",
                 device: str = "cpu"):
        self.opset = opset
        # the ONNX Runtime provider the graph is for: rules pick forms that are fast there
        # ("cpu": blocked-layout ramps, Col2Im; "cuda": only ops with CUDA kernels)
        self.device = device
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken)
        self._prefix = prefix
        self._counter = 0
        self._constants: dict[tuple, str] = {}
        self._shapes: dict[str, str] = {}
        # gradient tensor -> the forward tensor it is the gradient of (same type and shape)
        self.gradient_of: dict[str, str] = {}
        # other emitted tensors whose shape shape inference cannot see (Resize by scales)
        self.declared: dict[str, tuple[int, Shape]] = {}
        # dtype of float constants: set by the driver to the dtype of the node being
        # differentiated, so float16 and float64 sections get constants of their own type
        self.float_dtype: np.dtype = np.dtype(np.float32)

    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"{self._prefix}{hint}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs):
        """Emit one node; returns its output name (or a list when ``outputs`` > 1)."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), **attrs)
        )
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=None) -> str:
        """An initializer holding ``value``; equal constants share one initializer.

        Without ``dtype``, floats take ``float_dtype`` and integers stay int64.
        """
        if dtype is None:
            raw = np.asarray(value)
            dtype = np.int64 if raw.dtype.kind in "iub" else self.float_dtype
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        name = self._constants.get(key)
        if name is None:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return name

    def declare(self, name: str, shape: Shape | None) -> str:
        """Record ``name``'s shape (in ``float_dtype``) for the model's value_info."""
        if shape is not None:
            self.declared[name] = (_ELEM_TYPES[self.float_dtype], tuple(shape))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def shape(self, x: str) -> str:
        """``Shape(x)``, emitted once per tensor."""
        if x not in self._shapes:
            self._shapes[x] = self.op("Shape", x, hint="shape")
        return self._shapes[x]

    def reshape_like(self, x: str, like: str) -> str:
        return self.op("Reshape", x, self.shape(like))

    def zeros(self, shape: str) -> str:
        """Float zeros of a run-time shape, in ``float_dtype``."""
        return self.op("ConstantOfShape", shape,
                       value=numpy_helper.from_array(np.zeros(1, self.float_dtype)))

    def zeros_like(self, like: str) -> str:
        return self.zeros(self.shape(like))

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: bool) -> str:
        """A reduction over ``axes`` (None: every axis) in the form this opset expects."""
        since = _AXES_INPUT_SINCE.get(op_type, _AXES_INPUT_SINCE_DEFAULT)
        keep = int(keepdims)
        if axes is None:
            return self.op(op_type, x, keepdims=keep)
        if self.opset >= since:
            return self.op(op_type, x, self.ints(axes), keepdims=keep)
        return self.op(op_type, x, axes=list(axes), keepdims=keep)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.ints(axes))

    def add_all(self, terms: Sequence[str]) -> str:
        return terms[0] if len(terms) == 1 else self.op("Sum", *terms, hint="accum")


def tensor_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Every typed tensor of a shape-inferred graph: inputs, outputs, value_info, initializers."""
    types: dict[str, onnx.TypeProto] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type
    for init in graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
    return types


def static_shape(tp: onnx.TypeProto | None) -> Shape | None:
    """Dims as int (known), str (symbolic) or None (unknown); None when the rank is unknown."""
    if tp is None or not tp.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tp.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def same_dim(a: Dim, b: Dim) -> bool:
    """True only when the two dims are provably equal."""
    return a is not None and a == b


def all_static(dims: Sequence[Dim]) -> TypeGuard[Sequence[int]]:
    """True when every dim is a known integer."""
    return all(isinstance(d, int) for d in dims)


NUMPY_FLOATS: dict[int, type[np.floating]] = {
    TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}
_ELEM_TYPES = {np.dtype(v): k for k, v in NUMPY_FLOATS.items()}


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("model imports no default-domain opset")
