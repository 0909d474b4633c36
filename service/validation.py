"""Checking uploaded models and datasets before anything else reads them.

The gateway streams an upload to a private temporary file (hashing it on the way) and calls
:func:`validate_model` or :func:`validate_dataset` on that path; workers read stored datasets
with :func:`load_dataset_file`. Every function reads only the file it is given: a model that
names an external data file is refused before any other code looks at it, and archives are
read in memory, never extracted.

Models (.onnx, parsed from bytes): no external data, no sparse tensors, every tensor's data
matching its declared shape, only standard ONNX operators (the default domain), an opset that
ONNX Runtime loads, ``onnx.checker`` and strict shape inference passing, exactly one float32
input of rank 4 ([N, C, H, W] or [N, H, W, C]) or rank 2 ([N, D]), and constants computed at
load time within a memory budget. Then the gradient engine prepares the classifier; operators
without a gradient rule make ``gradients_available`` false (black-box attacks still run).

Datasets: an .npz with ``x`` (N, C, H, W / N, H, W, C / N, H, W; float or uint8) and ``y``
(N,) integer labels >= 0, or a .zip of PNG class folders (``classname/image.png``; classes
sorted by name give labels 0..K-1, as torchvision's ImageFolder does; 8-bit grayscale "L" and
"RGB" images only, all the same size and mode; RGBA and palette images are refused). The
format is told from the content. Archive members are checked before anything is decompressed:
safe relative names, no links, no duplicate or overlapping entries (CVE-2024-0450), declared
sizes and compression ratios within budget; reads stop at the declared size.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference
from PIL import Image

from workers.datasets import MAX_BYTES, MAX_SAMPLES, Dataset, DatasetError, check_targets, load_npz
from workers.errors import TooLargeError, UserError
from workers.onnxgrad import (
    InvalidModelError,
    PreparedClassifier,
    UnsupportedOperatorError,
    build_gradient_model,
    prepare_classifier,
)
from workers.onnxgrad.prepare import image_input, make_batch_dynamic

MiB = 1 << 20
DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_LOAD_TIME_CONSTANT_BYTES = 256 * MiB  # plus 4x the model's size (casts of stored weights)
MAX_CLASSES = 1_000_000  # labels must be below this
MAX_COMPRESSION_RATIO = 200  # for archive members over 1 MiB once decompressed
INPUT_RANKS = (2, 4)  # [N, D] or [N, C, H, W] / [N, H, W, C]
NPZ_IMAGE_RANKS = (3, 4)  # x as workers.datasets.load_npz accepts it
PNG_MODES = {"L": 1, "RGB": 3}  # mode -> channels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
READ_CHUNK = 8 * MiB


# An upload the service refuses raises one of the engine's user errors (workers/errors.py): its
# message says what is wrong and how to fix it (it never names a server path), its ``type``
# is invalid_model, invalid_dataset or too_large.


def _bad_model(detail: str) -> UserError:
    return InvalidModelError(detail)


def _bad_dataset(detail: str) -> UserError:
    return DatasetError(detail)


def _too_large(detail: str) -> UserError:
    return TooLargeError(detail)


def _quote(text: str, limit: int = 200) -> str:
    """A name from the upload, quoted and shortened for a message."""
    return repr(text[:limit] + "..." if len(text) > limit else text)


def _first_lines(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text[:limit] + "...") if len(text) > limit else text or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelInfo:
    input_name: str
    input_shape: list[int | None]  # None for a symbolic axis (the batch always is)
    num_classes: int
    opset: int
    gradients_available: bool  # False: only black-box attacks can evaluate the model
    unsupported: list[dict]  # {"op_type", "node", "reason"} for each node that blocks gradients
    operators: dict[str, int]  # operator -> count, after constant folding


@dataclass
class Inspection:
    """What the gradient engine sees in a classifier (shared with ``robustness inspect``)."""

    prepared: PreparedClassifier
    operators: dict[str, int]
    unsupported: list[dict]

    @property
    def gradients_available(self) -> bool:
        return not self.unsupported


def inspect_classifier(model: onnx.ModelProto | bytes, loss: str = "cross_entropy") -> Inspection:
    """Prepare the classifier and try to build its gradient graph.

    Raises the engine's ``InvalidModelError`` for a model it cannot use; operators without a
    gradient rule are listed in ``unsupported`` instead of raising.
    """
    prepared = prepare_classifier(model)
    operators = Counter(node.op_type for node in prepared.model.graph.node)
    try:
        build_gradient_model(model, loss=loss)
        unsupported = []
    except UnsupportedOperatorError as exc:
        unsupported = [{"op_type": n.op_type, "node": n.node_name, "reason": n.reason} for n in exc.nodes]
    return Inspection(prepared, dict(sorted(operators.items())), unsupported)


def validate_model(path: Path, *, max_bytes: int) -> ModelInfo:
    """Check an uploaded .onnx file; raises a UserError (workers/errors.py) saying why it is refused."""
    data = _read_model_file(Path(path), max_bytes)
    model = _parse_model(data)
    refuse_external_data(model)  # first: nothing below may follow a path named in the file
    for item in _tensors(model):
        _check_tensor(item)
    _check_domains(model)
    opset = _check_opset(model)
    _check_structure(model)
    _check_input(model)
    _check_load_time_constants(model, budget=MAX_LOAD_TIME_CONSTANT_BYTES + 4 * len(data))
    found = inspect_classifier(model)  # a GradientBuildError is an invalid_model UserError itself
    prepared = found.prepared
    if prepared.num_classes is None:
        raise _bad_model(
            f"the number of classes cannot be read from output {_quote(prepared.logits_name)}; "
            "export the model with a static class axis, logits of shape [N, K]"
        )
    return ModelInfo(
        input_name=prepared.input_name,
        input_shape=[d if isinstance(d, int) else None for d in prepared.input_shape],
        num_classes=int(prepared.num_classes),
        opset=opset,
        gradients_available=found.gradients_available,
        unsupported=found.unsupported,
        operators=found.operators,
    )


def _read_model_file(path: Path, max_bytes: int) -> bytes:
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise _bad_model("the model file is empty; upload the .onnx file itself")
        if size > max_bytes:
            raise _too_large(f"the model is {size} bytes, over the limit of {max_bytes} bytes")
        return handle.read(size)


def _parse_model(data: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError, or errors from its C++ parser
        raise _bad_model(
            f"not an ONNX model: the file does not parse as an ONNX protobuf ({_first_lines(exc)}); "
            "upload the .onnx file written by torch.onnx.export or onnx.save_model"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise _bad_model(
            "not an ONNX model: the file parses but holds no graph; upload the .onnx file "
            "written by torch.onnx.export or onnx.save_model"
        )
    return model


def _node_items(nodes) -> Iterator[TensorProto | onnx.SparseTensorProto]:
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor
            yield from a.sparse_tensors
            if a.HasField("g"):
                yield from _graph_items(a.g)
            for sub in a.graphs:
                yield from _graph_items(sub)


def _graph_items(graph: onnx.GraphProto) -> Iterator[TensorProto | onnx.SparseTensorProto]:
    yield from graph.initializer
    yield from graph.sparse_initializer
    yield from _node_items(graph.node)


def _tensors(model: onnx.ModelProto) -> Iterator[TensorProto | onnx.SparseTensorProto]:
    """Every tensor the model holds: initializers, node attributes, subgraphs, functions,
    training graphs."""
    yield from _graph_items(model.graph)
    for info in model.training_info:
        yield from _graph_items(info.initialization)
        yield from _graph_items(info.algorithm)
    for function in model.functions:
        yield from _node_items(function.node)


def _nodes_in(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.HasField("g"):
                yield from _nodes_in(a.g)
            for sub in a.graphs:
                yield from _nodes_in(sub)


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    yield from _nodes_in(model.graph)
    for info in model.training_info:
        yield from _nodes_in(info.initialization)
        yield from _nodes_in(info.algorithm)
    for function in model.functions:
        for node in function.node:
            yield node
            for a in node.attribute:
                if a.HasField("g"):
                    yield from _nodes_in(a.g)
                for sub in a.graphs:
                    yield from _nodes_in(sub)


def refuse_external_data(model: onnx.ModelProto) -> None:
    """Refuse a model with any tensor stored outside the file. The location is only quoted,
    never resolved, so no path named in the file is ever opened."""
    for item in _tensors(model):
        parts = (item.values, item.indices) if isinstance(item, onnx.SparseTensorProto) else (item,)
        for tensor in parts:
            if tensor.data_location != TensorProto.EXTERNAL and not tensor.external_data:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            what = (
                f"external data file {_quote(location)}" if location is not None else "an external data file"
            )
            raise _bad_model(
                f"the model references {what} (tensor {_quote(tensor.name)}); re-export it with all "
                "weights inside the .onnx file (onnx.save_model(model, path, save_as_external_data=False))"
            )


_PACKED_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT4E2M1: 4,
    TensorProto.INT2: 2,
    TensorProto.UINT2: 2,
    TensorProto.FLOAT6E2M3: 6,
    TensorProto.FLOAT6E3M2: 6,
}
_COMPLEX = (TensorProto.COMPLEX64, TensorProto.COMPLEX128)


def _element_bits(data_type: int) -> int | None:
    if data_type in _PACKED_BITS:
        return _PACKED_BITS[data_type]
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize * 8
    except (KeyError, TypeError, ValueError):
        return None


def _check_tensor(item: TensorProto | onnx.SparseTensorProto) -> None:
    """The data a tensor holds matches its declared shape (checked without allocating it)."""
    if isinstance(item, onnx.SparseTensorProto):
        raise _bad_model(
            f"the model holds a sparse tensor ({_quote(item.values.name)}); sparse "
            "weights are not supported: store them as dense initializers"
        )
    name, dims = _quote(item.name), list(item.dims)
    if any(d < 0 for d in dims):
        raise _bad_model(f"tensor {name} has negative dimensions {dims}; re-export the model")
    if item.HasField("segment"):
        raise _bad_model(f"tensor {name} is stored in segments, which are not supported; re-export it")
    count, bits = math.prod(dims), _element_bits(item.data_type)
    if bits is None:
        raise _bad_model(f"tensor {name} has an unknown element type ({item.data_type}); re-export it")
    if item.data_type == TensorProto.STRING:
        stored, expected, unit = len(item.string_data), count, "strings"
    elif item.HasField("raw_data"):
        stored, expected, unit = len(item.raw_data), math.ceil(count * bits / 8), "bytes"
    else:
        stored = sum(
            len(field)
            for field in (
                item.float_data,
                item.int32_data,
                item.int64_data,
                item.double_data,
                item.uint64_data,
                item.string_data,
            )
        )
        expected = (
            2 * count
            if item.data_type in _COMPLEX
            else math.ceil(count * bits / 8)
            if bits in (2, 4)
            else count
        )
        unit = "values"
    if stored != expected:
        kind = TensorProto.DataType.Name(item.data_type)
        raise _bad_model(
            f"tensor {name} declares shape {dims} ({math.prod(dims)} {kind} elements) but holds "
            f"{stored} {unit} of data where {expected} are needed; the file is corrupt or was edited: "
            "re-export the model"
        )


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _check_domains(model: onnx.ModelProto) -> None:
    for node in _nodes(model):
        if node.domain not in DEFAULT_DOMAINS:
            hint = (
                " (a model-local function: inline it with onnx.inliner.inline_local_functions)"
                if any(f.domain == node.domain and f.name == node.op_type for f in model.functions)
                else ""
            )
            raise _bad_model(
                f"node {_quote(_node_label(node))} uses operator "
                f"{_quote(node.op_type)} from the custom domain {_quote(node.domain)}{hint}; only standard "
                "ONNX operators (the default domain) are supported: export the model without custom "
                "operators"
            )


@functools.cache
def max_runtime_opset() -> int:
    """The newest default-domain opset that both onnx and ONNX Runtime load."""
    import onnxruntime as ort

    newest = onnx.defs.onnx_opset_version()
    for version in range(newest, 6, -1):
        opsets = [helper.make_opsetid("", version)]
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        probe = helper.make_model(
            graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)
        )
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # an opset this runtime refuses: try the one before
            continue
        return version
    return newest


def _check_opset(model: onnx.ModelProto) -> int:
    versions = {imp.domain: imp.version for imp in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise _bad_model(
            "the model imports no standard ONNX opset; export it with torch.onnx.export "
            "(opset_version=17 or later)"
        )
    newest = max_runtime_opset()
    if opset > newest:
        raise _bad_model(
            f"the model uses opset {opset}, newer than the runtime supports; export it "
            f"with opset_version between 17 and {newest}"
        )
    return int(opset)


def _check_structure(model: onnx.ModelProto) -> None:
    """onnx.checker and strict shape inference."""
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # ValidationError, or errors from the C++ checker
        raise _bad_model(f"the model is not valid ONNX: {_first_lines(exc)}") from None
    try:
        shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, or errors from the C++ inference
        raise _bad_model(
            f"shape inference failed: {_first_lines(exc)}; re-export the model (its "
            "declared shapes contradict its operators)"
        ) from None


def _check_input(model: onnx.ModelProto) -> None:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(_quote(i.name) for i in inputs) or "none"
        raise _bad_model(
            f"the model has {len(inputs)} inputs ({names}); export the classifier with "
            "exactly one input, the image batch"
        )
    x = inputs[0]
    if not x.type.HasField("tensor_type"):
        raise _bad_model(
            f"input {_quote(x.name)} is not a tensor; export the classifier with one "
            "float32 image tensor as input"
        )
    tensor_type = x.type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT:
        got = (
            TensorProto.DataType.Name(tensor_type.elem_type)
            if tensor_type.elem_type in TensorProto.DataType.values()
            else str(tensor_type.elem_type)
        )
        raise _bad_model(
            f"input {_quote(x.name)} has element type {got}; export the model with a "
            "float32 input (cast inside the model if it needs another type)"
        )
    if not tensor_type.HasField("shape"):
        raise _bad_model(
            f"input {_quote(x.name)} declares no shape; export it with a shape such as "
            "[N, C, H, W] (a symbolic batch axis and fixed image axes)"
        )
    rank = len(tensor_type.shape.dim)
    if rank not in INPUT_RANKS:
        raise _bad_model(
            f"input {_quote(x.name)} has rank {rank}; expected images [N, C, H, W] or "
            "[N, H, W, C] (add a channel axis to [N, H, W]), or flat vectors [N, D]"
        )


# Operators fold_constants never evaluates, and operators whose output never has more
# elements than their inputs together (so an output of unknown shape is still bounded).
_NEVER_FOLD = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
}
_NOT_LARGER = {
    "Identity",
    "Cast",
    "CastLike",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Slice",
    "Split",
    "Concat",
    "DequantizeLinear",
    "QuantizeLinear",
    "Shape",
    "Size",
    "Neg",
    "Abs",
    "Relu",
    "Sigmoid",
    "Tanh",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Not",
    "Erf",
    "IsNaN",
    "IsInf",
    "Clip",
    "Softmax",
    "LogSoftmax",
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ArgMax",
    "ArgMin",
}


def _static_dims(tensor_type: onnx.TypeProto.Tensor | None) -> list[int | None] | None:
    if tensor_type is None or not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _small_ints(tensor: TensorProto) -> list[int] | None:
    if tensor.data_type not in (TensorProto.INT64, TensorProto.INT32) or math.prod(tensor.dims) > 64:
        return None
    return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]


def _check_load_time_constants(model: onnx.ModelProto, budget: int) -> None:
    """Refuse models that compute huge constants from their weights or static shape reads.

    The gradient engine evaluates input-independent nodes when it prepares a model (constant
    folding, workers/onnxgrad/fold.py, including Shape and Gather(Shape) reads of static
    dimensions, once the batch axis is symbolic); a ConstantOfShape or Tile fed by a few stored
    bytes could otherwise make it allocate gigabytes. This walks the same nodes with the sizes
    shape inference gives; nothing is evaluated.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    x = image_input(copy).name
    fixed_batch = make_batch_dynamic(copy, x)
    hint = (
        f"; the model was exported with a fixed batch size of {fixed_batch}, which its graph may "
        "depend on: export it with a dynamic batch axis (torch.onnx.export(..., "
        f"dynamic_axes={{{x!r}: {{0: 'N'}}}}))"
        if fixed_batch
        else ""
    )
    try:
        graph = shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True).graph
    except Exception:  # the strict inference of the model as uploaded passed: use that
        graph = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True).graph
    types = {v.name: v.type.tensor_type for v in (*graph.value_info, *graph.output, *graph.input)}
    elements = {i.name: math.prod(i.dims) for i in graph.initializer}  # constants known at load time
    ints = {i.name: _small_ints(i) for i in graph.initializer}  # values of small index tensors
    shape_reads: dict[str, list[int | None]] = {}  # Shape outputs that read some symbolic dims
    total = 0
    for node in graph.node:
        if node.op_type in _NEVER_FOLD or node.domain not in DEFAULT_DOMAINS:
            continue
        if node.op_type == "Shape":
            dims = _static_dims(types.get(node.input[0]))
            if dims is None:
                continue
            read = dims[_attr(node, "start", 0) : _attr(node, "end", None)]
            if None in read:
                shape_reads[node.output[0]] = read
                continue
        elif node.op_type == "Gather" and node.input[0] in shape_reads:
            read, index = shape_reads[node.input[0]], ints.get(node.input[1])
            if index is None or any(not -len(read) <= i < len(read) or read[i] is None for i in index):
                continue  # reads a symbolic dimension: never folded
        elif not all(name in elements for name in node.input if name):
            continue
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            elements[node.output[0]] = math.prod(node.attribute[0].t.dims)  # its data is in the file
            ints[node.output[0]] = _small_ints(node.attribute[0].t)
            continue
        for out in (o for o in node.output if o):
            tensor_type = types.get(out)
            dims = _static_dims(tensor_type)
            if dims is not None and None not in dims:
                count = math.prod(dims)
            elif node.op_type in _NOT_LARGER:
                count = sum(elements.get(name, 0) for name in node.input if name)
            else:
                raise _bad_model(
                    f"node {_quote(_node_label(node))} ({node.op_type}) computes a constant whose size "
                    "cannot be known before running it; store the value as an initializer or compute "
                    f"it from the model input{hint}"
                )
            elements[out] = count
            bits = (_element_bits(tensor_type.elem_type) if tensor_type else None) or 64
            total += math.ceil(count * bits / 8)
            if total > budget:
                raise _bad_model(
                    f"the model computes {total} bytes of constants when it is loaded (node "
                    f"{_quote(_node_label(node))}, {node.op_type}), over the limit of {budget} bytes; "
                    "store large constants as initializers or compute them from the model input"
                )


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass
class DatasetInfo:
    format: str  # "npz" or "png-zip"
    samples: int
    shape: list[int]  # one image: as stored in an .npz, [C, H, W] from PNGs
    source_dtype: str
    num_classes: int  # the largest label + 1
    classes: list[str] | None  # class folder names of a PNG zip, in label order
    targets: bool = False  # an .npz with target labels t (for targets: dataset)


@dataclass
class _Limits:
    max_samples: int
    max_decoded_bytes: int  # x and y once decoded

    @property
    def max_entries(self) -> int:  # files, and a folder entry for each class at most
        return 2 * self.max_samples + 16


def validate_dataset(path: Path, *, max_bytes: int, max_samples: int, max_decoded_bytes: int) -> DatasetInfo:
    """Check an uploaded dataset (.npz or .zip of PNG class folders); raises
    a UserError (workers/errors.py) saying why it is refused."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise _bad_dataset(
            "the dataset file is empty; upload an .npz (numpy.savez(path, x=images, "
            "y=labels)) or a .zip of PNG class folders"
        )
    if size > max_bytes:
        raise _too_large(f"the dataset is {size} bytes, over the limit of {max_bytes} bytes")
    limits = _Limits(max_samples, max_decoded_bytes)
    with _open_archive(path, limits) as (archive, files, kind):
        if kind == "npz":
            return _validate_npz(archive, files, limits)
        _, shape, y, classes = _read_png_zip(archive, files, limits, keep=False)
    return DatasetInfo(
        format="png-zip",
        samples=len(y),
        shape=shape,
        source_dtype="uint8",
        num_classes=len(classes),
        classes=classes,
    )


def load_dataset_file(
    path: Path,
    value_range: tuple[float, float] = (0.0, 1.0),
    *,
    max_samples: int = MAX_SAMPLES,
    max_decoded_bytes: int = MAX_BYTES,
) -> Dataset:
    """Load a stored dataset (.npz or PNG zip) as workers use it: x float32 in ``value_range``
    (uint8 pixels scaled into it), y int64. Raises ``DatasetError`` for a bad file."""
    path = Path(path)
    limits = _Limits(max_samples, max_decoded_bytes)
    with _open_archive(path, limits) as (archive, files, kind):
        if kind == "npz":
            _npz_headers(archive, files, limits)
        else:
            x, _, y, _ = _read_png_zip(archive, files, limits)
    if kind == "npz":
        return load_npz(path.read_bytes(), value_range)
    low, high = value_range
    return Dataset(x=(x.astype(np.float32) / 255.0) * (high - low) + low, y=y, source_dtype="uint8")


_NOT_A_DATASET = (
    "the file is neither an .npz archive nor a .zip of PNG class folders; save arrays with "
    "numpy.savez(path, x=images, y=labels), or zip folders of PNG images named after "
    "their class (classname/image.png)"
)


@contextmanager
def _open_archive(path: Path, limits: _Limits):
    """Yields (ZipFile, file members sorted by name, "npz" | "png-zip") once the archive's
    structure is checked; nothing has been decompressed at that point."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise _bad_dataset(
                "the file is a single .npy array; save images and labels together with "
                "numpy.savez(path, x=images, y=labels)"
            )
        directory_start = _central_directory(handle, size, limits)
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise _bad_dataset(f"the archive is corrupt ({_first_lines(exc)}); {_NOT_A_DATASET}") from None
        with archive:
            infos = archive.infolist()
            for info in infos:
                _check_member(info)
            _check_no_overlap(handle, infos, directory_start)
            files = sorted((i for i in infos if not i.is_dir()), key=lambda i: i.filename)
            _check_declared_sizes(files, limits)
            yield archive, files, _archive_kind(files)


_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_RECORD = 46  # fixed part of a central directory entry


def _central_directory(handle: BinaryIO, size: int, limits: _Limits) -> int:
    """Where the central directory starts. Walks it counting entries, so an archive with
    millions of tiny entries is refused before zipfile builds an object for each."""
    tail_size = min(size, _EOCD.size + 0xFFFF)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _bad_dataset(_NOT_A_DATASET)
    *_, directory_size, _, _ = _EOCD.unpack_from(tail, at)
    end = size - tail_size + at
    if end >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
        handle.seek(end - _ZIP64_LOCATOR.size)
        if handle.read(4) == b"PK\x06\x07":
            handle.seek(end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
            record = handle.read(_ZIP64_EOCD.size)
            if record[:4] != b"PK\x06\x06":
                raise _bad_dataset(f"the archive's zip64 directory is corrupt; {_NOT_A_DATASET}")
            directory_size = _ZIP64_EOCD.unpack(record)[8]
            end -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    start = end - directory_size
    if start < 0:
        raise _bad_dataset(f"the archive's central directory is corrupt; {_NOT_A_DATASET}")
    handle.seek(start)
    directory = handle.read(directory_size)
    entries, at = 0, 0
    while at < len(directory):
        if directory[at : at + 4] != b"PK\x01\x02" or at + _CENTRAL_RECORD > len(directory):
            raise _bad_dataset(f"the archive's central directory is corrupt; {_NOT_A_DATASET}")
        name, extra, comment = struct.unpack_from("<3H", directory, at + 28)
        at += _CENTRAL_RECORD + name + extra + comment
        entries += 1
        if entries > limits.max_entries:
            raise _too_large(
                f"the archive has more than {limits.max_entries} entries; the limit is "
                f"{limits.max_samples} samples"
            )
    return start


_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_member(info: zipfile.ZipInfo) -> None:
    """Safe names and plain files only, readable without a password, stored or deflated."""
    name = info.orig_filename
    parts = name.rstrip("/").split("/")
    problem = (
        "a NUL character"
        if "\x00" in name
        else "an absolute path"
        if name.startswith("/")
        else "a backslash"
        if "\\" in name
        else "a drive letter"
        if _DRIVE.match(name)
        else "a '..' component"
        if ".." in parts
        else "an empty component"
        if "" in parts
        else None
    )
    if problem:
        raise _bad_dataset(
            f"archive member {_quote(name)} has {problem} in its name; zip the dataset "
            "with relative paths only (cd dataset && zip -r ../dataset.zip .)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        raise _bad_dataset(
            f"archive member {_quote(name)} is a link or special file; the archive may "
            "hold only regular files and folders (zip without --symlinks)"
        )
    if info.flag_bits & 0x1:
        raise _bad_dataset(
            f"archive member {_quote(name)} is encrypted; upload an archive without a password"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _bad_dataset(
            f"archive member {_quote(name)} uses compression method "
            f"{info.compress_type}; store or deflate members (numpy.savez, zip)"
        )


def _check_no_overlap(handle: BinaryIO, infos: list[zipfile.ZipInfo], directory_start: int) -> None:
    """Each member's bytes belong to it alone (CVE-2024-0450 'overlapping entries' bombs), and
    no name appears twice."""
    counts = Counter(i.filename for i in infos)
    twice = next((name for name, n in counts.items() if n > 1), None)
    if twice is not None:
        raise _bad_dataset(f"archive member {_quote(twice)} appears more than once; re-create the archive")
    spans = []
    for info in infos:
        handle.seek(info.header_offset)
        header = handle.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise _bad_dataset(
                f"archive member {_quote(info.filename)} has no local header where the "
                "directory says; the archive is corrupt, re-create it"
            )
        name_size, extra_size = struct.unpack_from("<2H", header, 26)
        spans.append(
            (
                info.header_offset,
                info.header_offset + 30 + name_size + extra_size + info.compress_size,
                info.filename,
            )
        )
    spans.sort()
    for (_, end, first), (start, _, second) in pairwise(spans):
        if start < end:
            raise _bad_dataset(
                f"archive members {_quote(first)} and {_quote(second)} overlap (a known "
                "zip-bomb construction); re-create the archive"
            )
    if spans and spans[-1][1] > directory_start:
        raise _bad_dataset(
            f"archive member {_quote(spans[-1][2])} overlaps the central directory; re-create the archive"
        )


def _check_declared_sizes(files: list[zipfile.ZipInfo], limits: _Limits) -> None:
    """Budget the decompressed size from the headers, before decompressing anything."""
    declared = sum(i.file_size for i in files)
    allowed = 2 * limits.max_decoded_bytes + MiB  # PNGs of noise are slightly larger than raw
    if declared > allowed:
        raise _too_large(
            f"the archive declares {declared} bytes once decompressed, over the limit of "
            f"{allowed} bytes; upload fewer or smaller images"
        )
    for info in files:
        ratio = info.file_size // max(info.compress_size, 1)
        if info.file_size > MiB and ratio > MAX_COMPRESSION_RATIO:
            raise _bad_dataset(
                f"archive member {_quote(info.filename)} expands {ratio} times ({info.compress_size} bytes "
                f"to {info.file_size}), more than {MAX_COMPRESSION_RATIO} times: refused as a possible zip "
                "bomb; store it uncompressed (numpy.savez, zip -0)"
            )


def _archive_kind(files: list[zipfile.ZipInfo]) -> str:
    if not files:
        raise _bad_dataset(f"the archive holds no files; {_NOT_A_DATASET}")
    if all("/" not in i.filename and i.filename.endswith(".npy") for i in files):
        return "npz"
    stray = next((i.filename for i in files if i.filename.count("/") != 1), None)
    if stray is None:
        return "png-zip"
    if stray.count("/") > 1:
        raise _bad_dataset(
            f"archive member {_quote(stray)} is nested too deeply: PNG images sit in class "
            "folders at the top of the archive (classname/image.png); zip the contents of "
            "the dataset folder (cd dataset && zip -r ../dataset.zip .)"
        )
    raise _bad_dataset(f"archive member {_quote(stray)} does not fit either layout; {_NOT_A_DATASET}")


_CORRUPT = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)


def _member_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, offset: int = 0) -> Iterator[bytes]:
    """A member from ``offset`` on, in chunks. Never reads past the size the member declares
    (zipfile stops there too, and checks the CRC); a bad CRC or deflate stream is refused."""
    remaining = info.file_size - offset
    try:
        with archive.open(info) as f:
            f.seek(offset)
            while remaining:
                chunk = f.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise EOFError("it ends early")
                remaining -= len(chunk)
                yield chunk
    except _CORRUPT as exc:
        raise _bad_dataset(
            f"archive member {_quote(info.filename)} is corrupt ({_first_lines(exc)}); re-create the archive"
        ) from None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, offset: int = 0) -> bytes:
    return b"".join(_member_chunks(archive, info, offset))


@dataclass
class _NpyHeader:
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the data starts in the member

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyHeader:
    name = _quote(info.filename)
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _bad_dataset(
            f"archive member {name} is corrupt ({_first_lines(exc)}); re-create the archive"
        ) from None
    except (ValueError, SyntaxError, OSError) as exc:
        raise _bad_dataset(
            f"archive member {name} is not a readable .npy array ({_first_lines(exc)}); "
            "save the arrays with numpy.savez(path, x=images, y=labels)"
        ) from None
    if dtype.hasobject:
        raise _bad_dataset(
            f"{_quote(info.filename[:-4])} holds Python objects; store plain numeric "
            "arrays (no pickles are ever loaded)"
        )
    header = _NpyHeader(info, tuple(shape), dtype, offset)
    if any(d < 0 for d in shape) or info.file_size != offset + header.nbytes:
        raise _bad_dataset(
            f"archive member {name} holds {info.file_size - offset} bytes of data but its "
            f"header declares {list(shape)} {dtype}; the file is truncated or corrupt: "
            "save it again with numpy.savez"
        )
    return header


def _npz_headers(
    archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: _Limits
) -> tuple[_NpyHeader, _NpyHeader]:
    """Headers of x and y, checked as workers.datasets.load_npz checks them, with the given
    limits; only headers are decompressed."""
    headers = {info.filename[:-4]: _npy_header(archive, info) for info in files}
    missing = [k for k in ("x", "y") if k not in headers]
    if missing:
        raise _bad_dataset(
            f"the .npz lacks {missing}; it needs arrays 'x' (images) and 'y' (labels), "
            f"found {sorted(headers)}: numpy.savez(path, x=images, y=labels)"
        )
    x, y = headers["x"], headers["y"]
    t = headers.get("t")
    if t is not None and (t.shape != y.shape or not np.issubdtype(t.dtype, np.integer)):
        raise _bad_dataset(
            f"'t' (target labels) must be integers of the shape of 'y' {list(y.shape)}, got "
            f"{t.dtype} {list(t.shape)}"
        )
    if len(y.shape) != 1:
        raise _bad_dataset(f"'y' must be 1-D (one label per image), got shape {list(y.shape)}")
    if len(x.shape) not in NPZ_IMAGE_RANKS or x.shape[0] != y.shape[0]:
        raise _bad_dataset(
            f"'x' must be [N, C, H, W], [N, H, W, C] or [N, H, W] with N = len(y) = "
            f"{y.shape[0]}, got {list(x.shape)}"
        )
    if x.shape[0] > limits.max_samples:
        raise _too_large(f"the dataset has {x.shape[0]} samples, over the limit of {limits.max_samples}")
    decoded = sum(h.nbytes for h in headers.values())
    if decoded > limits.max_decoded_bytes:
        raise _too_large(
            f"the arrays take {decoded} bytes once decoded, over the limit of "
            f"{limits.max_decoded_bytes} bytes; upload fewer or smaller images"
        )
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
        raise _bad_dataset(f"'x' has dtype {x.dtype}; use float32 pixels or uint8 (0..255)")
    if not np.issubdtype(y.dtype, np.integer):
        raise _bad_dataset(f"'y' has dtype {y.dtype}; labels must be integers")
    if x.shape[0] == 0:
        raise _bad_dataset("the dataset holds no samples")
    return x, y


def _validate_npz(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: _Limits) -> DatasetInfo:
    x, y = _npz_headers(archive, files, limits)
    labels = np.frombuffer(_read_member(archive, y.info, y.offset), y.dtype)
    num_classes = _check_labels(labels)
    t_info = next((info for info in files if info.filename == "t.npy"), None)
    if t_info is not None:
        t = _npy_header(archive, t_info)
        targets = np.frombuffer(_read_member(archive, t_info, t.offset), t.dtype)
        try:
            check_targets(targets, labels)
        except DatasetError as exc:
            raise _bad_dataset(str(exc)) from None
        num_classes = max(num_classes, _check_labels(targets))
    not_finite = 0
    for chunk in _member_chunks(archive, x.info, x.offset):  # all of x: its CRC is checked at the end
        if x.dtype != np.uint8:
            values = np.frombuffer(chunk, x.dtype)  # READ_CHUNK is a multiple of every itemsize
            not_finite += values.size - int(np.count_nonzero(np.isfinite(values)))
    if not_finite:
        raise _bad_dataset(
            f"'x' holds {not_finite} NaN or infinite values; replace them "
            "(numpy.nan_to_num) or drop those images"
        )
    return DatasetInfo(
        format="npz",
        samples=int(x.shape[0]),
        shape=[int(d) for d in x.shape[1:]],
        source_dtype=str(x.dtype),
        num_classes=num_classes,
        classes=None,
        targets=t_info is not None,
    )


def _check_labels(labels: np.ndarray) -> int:
    """The number of classes (largest label + 1)."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise _bad_dataset(f"labels must be >= 0, found {low}")
    if high >= MAX_CLASSES:
        raise _bad_dataset(f"labels must be below {MAX_CLASSES}, found {high}")
    return high + 1


def _read_png_zip(
    archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: _Limits, keep: bool = True
) -> tuple[np.ndarray | None, list[int], np.ndarray, list[str]]:
    """x uint8 [N, C, H, W] (None unless ``keep``: every image is still decoded), the shape of
    one image [C, H, W], y int64 [N] and the class names (sorted folder names -> 0..K-1)."""
    if len(files) > limits.max_samples:
        raise _too_large(f"the archive holds {len(files)} images, over the limit of {limits.max_samples}")
    for info in files:
        if not info.filename.lower().endswith(".png"):
            raise _bad_dataset(
                f"archive member {_quote(info.filename)} is not a .png image; a zip dataset "
                "holds only class folders of PNG images (classname/image.png)"
            )
    files = sorted(files, key=lambda i: i.filename.split("/"))
    classes = sorted({i.filename.split("/")[0] for i in files})
    label = {name: k for k, name in enumerate(classes)}
    x, first = None, None
    for n, info in enumerate(files):
        with _open_png(_read_member(archive, info), info.filename) as image:
            layout = (image.mode, *image.size)
            if first is None:
                mode, width, height = layout
                decoded = len(files) * (PNG_MODES[mode] * height * width + 8)
                if decoded > limits.max_decoded_bytes:
                    raise _too_large(
                        f"{len(files)} images of {width}x{height} {mode} take {decoded} bytes "
                        f"once decoded, over the limit of {limits.max_decoded_bytes} bytes; "
                        "upload fewer or smaller images"
                    )
                shape = [PNG_MODES[mode], height, width]
                x = np.empty((len(files), *shape), np.uint8) if keep else None
                first = (info.filename, layout)
            elif layout != first[1]:
                raise _bad_dataset(
                    f"{_quote(info.filename)} is {layout[1]}x{layout[2]} {layout[0]} but "
                    f"{_quote(first[0])} is {first[1][1]}x{first[1][2]} {first[1][0]}; all images must have "
                    "the same size and mode: resize or convert them"
                )
            pixels = _pixels(image, info.filename)
            if x is not None:
                x[n] = pixels
    y = np.array([label[i.filename.split("/")[0]] for i in files], np.int64)
    return x, shape, y, classes


_PNG_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    struct.error,
    Image.DecompressionBombError,
)


def _open_png(data: bytes, name: str) -> Image.Image:
    """The image, opened lazily (only its header is read) once its size is within limits."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise _bad_dataset(
            f"{_quote(name)} is not a PNG image; a zip dataset holds only class folders "
            "of PNG images (classname/image.png)"
        )
    width, height = struct.unpack_from(">2I", data, 16)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:  # before Pillow, which only warns below twice the limit
        raise _too_large(
            f"{_quote(name)} is {width}x{height} pixels, over the limit of {limit} pixels per image"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except _PNG_ERRORS as exc:
        raise _bad_dataset(f"{_quote(name)} is not a readable PNG image ({_first_lines(exc)})") from None
    if image.mode not in PNG_MODES:
        image.close()
        raise _bad_dataset(
            f"{_quote(name)} has mode {image.mode}; only 8-bit grayscale (L) and RGB "
            "PNGs are accepted: convert it, e.g. Image.open(p).convert('RGB').save(p)"
        )
    return image


def _pixels(image: Image.Image, name: str) -> np.ndarray:
    """[C, H, W] uint8."""
    try:
        image.load()
        array = np.asarray(image, dtype=np.uint8)
    except _PNG_ERRORS as exc:
        raise _bad_dataset(f"{_quote(name)} is not a readable PNG image ({_first_lines(exc)})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
