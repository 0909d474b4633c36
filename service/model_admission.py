"""Admitting an uploaded model before anything else reads it.

The gateway streams an upload to a private temporary file (hashing it on the way) and calls
:func:`validate_model` on that path. It reads only that file: a model that names an external
data file is refused before any other code looks at it.

Models (.onnx, parsed from bytes): no external data, no sparse tensors, every tensor's data
matching its declared shape, only standard ONNX operators (the default domain), an opset that
ONNX Runtime loads, ``onnx.checker`` and strict shape inference passing, exactly one float32
input of rank 4 ([N, C, H, W] or [N, H, W, C]) or rank 2 ([N, D]), and constants computed at
load time within a memory budget. Then the gradient engine prepares the classifier, whose
tensors for one image must stay under MAX_SAMPLE_TENSOR_BYTES; operators without a gradient
rule make ``gradients_available`` false (black-box attacks still run).
A refused model raises the engine's InvalidModelError (or TooLargeError), a UserError whose
message says what is wrong and how to fix it and never names a server path.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from infra.blobs import file_sha256
from workers import memory_budget
from workers.errors import TooLargeError, first_lines, quoted
from workers.onnxgrad import (
    InvalidModelError,
    PreparedClassifier,
    UnsupportedOperatorError,
    build_gradient_model,
    prepare_classifier,
    weights,
)
from workers.onnxgrad.dtypes import HALF
from workers.onnxgrad.external import DataFile, PathFile, assemble_file, is_archive
from workers.onnxgrad.prepare import image_input, load_model, make_batch_dynamic

MiB = 1 << 20
DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_LOAD_TIME_CONSTANT_BYTES = 256 * MiB  # plus 4x the model's size (casts of stored weights)
# one intermediate tensor for one image, as shape inference sizes it: ResNet-50's largest at 224x224 is
# 3 MB, a ViT-H's attention at 518x518 120 MB; a few stored bytes can declare gigabytes (Expand)
MAX_SAMPLE_TENSOR_BYTES = 1 << 30
INPUT_RANKS = (2, 4)  # [N, D] or [N, C, H, W] / [N, H, W, C]




@dataclass
class ModelInfo:
    input_name: str
    input_shape: list[int | None]  # None for a symbolic axis (the batch always is)
    num_classes: int
    opset: int
    gradients_available: bool  # False: only black-box attacks can evaluate the model
    unsupported: list[dict]  # {"op_type", "node", "reason"} for each node that blocks gradients
    operators: dict[str, int]  # operator -> count, after constant folding
    dtype: str = "float32"  # float16 / bfloat16: predictions in it, gradients of its float32 twin
    output_squeezed_from: list | None = None  # the output's own shape when it was [N, K, 1, 1] or such
    binary: str | None = None  # one score read as two classes: "sigmoid" or "logit" (prepare.py)
    gradients_straight_through: int = 0  # QDQ pairs differentiated straight through (rules/quantize.py)
    gradients_probed_side: int | None = None  # symbolic image axes: gradients built with them pinned so
    weights: list[str] = field(default_factory=list)  # sha256 of the data files kept outside the model
    # "image_to_image": one output shaped like its input (an autoencoder, for a defense), no classes
    kind: str = "classifier"


@dataclass
class Inspection:
    """What the gradient engine sees in a classifier (shared with ``robustness inspect``)."""

    prepared: PreparedClassifier
    operators: dict[str, int]
    unsupported: list[dict]
    # symbolic image axes (a fully convolutional export's H and W) pinned to this side for the
    # gradient graph: an evaluation differentiates the model at its dataset's image size
    probed_side: int | None = None

    @property
    def gradients_available(self) -> bool:
        return not self.unsupported


PROBE_SIDES = (224, 32)  # pixels, for symbolic image axes: ImageNet's size, then CIFAR's


def inspect_classifier(model: onnx.ModelProto | bytes, loss: str = "cross_entropy") -> Inspection:
    """Prepare the classifier and try to build its gradient graph.

    Raises the engine's ``InvalidModelError`` for a model it cannot use; operators without a
    gradient rule are listed in ``unsupported`` instead of raising. Rules that need static sizes
    (Conv, pools) cannot differentiate symbolic image axes, which every evaluation pins to its
    dataset's image size (workers.preprocess.compose_preprocessing): such a model is tried with
    them pinned to each of PROBE_SIDES.
    """
    prepared = prepare_classifier(model)
    operators = Counter(node.op_type for node in prepared.model.graph.node)
    unsupported = _unsupported(model, loss)
    if unsupported and any(not isinstance(d, int) for d in prepared.input_shape[1:]):
        for side in PROBE_SIDES:
            try:
                found = _unsupported(with_image_side(model, side), loss)
            except InvalidModelError:  # shape inference fails at that size
                continue
            if not found:
                return Inspection(prepared, dict(sorted(operators.items())), [], side)
    return Inspection(prepared, dict(sorted(operators.items())), unsupported)


def _unsupported(model: onnx.ModelProto | bytes, loss: str) -> list[dict]:
    try:
        build_gradient_model(model, loss=loss)
    except UnsupportedOperatorError as exc:
        return [{"op_type": n.op_type, "node": n.node_name, "reason": n.reason} for n in exc.nodes]
    return []


def with_image_side(model: onnx.ModelProto | bytes, side: int) -> onnx.ModelProto:
    """``model`` with every symbolic axis of its input but the batch set to ``side``."""
    model = load_model(model)
    for dim in list(image_input(model).type.tensor_type.shape.dim)[1:]:
        if not dim.HasField("dim_value"):
            dim.Clear()
            dim.dim_value = side
    return model


DEFAULT_MAX_LOOP_ITERATIONS = 100_000


def validate_model(path: Path, *, max_bytes: int,
                   max_loop_iterations: int = DEFAULT_MAX_LOOP_ITERATIONS,
                   weights_outside: bool = False) -> ModelInfo:
    """Check an uploaded .onnx file; raises a UserError (workers/errors.py) saying why it is refused.
    ``weights_outside``: the model is one ``validate_model_upload`` assembled, whose large tensors
    name blobs in the weights folder it set (weights.py); any other external data is refused."""
    data = _read_model_file(Path(path), max_bytes)
    model = _parse_model(data)
    if weights_outside:
        _check_outside_locations(model)
    else:
        refuse_external_data(model)  # first: nothing below may follow a path named in the file
    for item in _tensors(model):
        if not (weights_outside and isinstance(item, TensorProto) and weights.is_external(item)):
            _check_tensor(item)  # an outside tensor's extent was checked when it was assembled
    _check_domains(model)
    opset = _check_opset(model)
    _check_loops(model.graph, max_loop_iterations)
    for function in model.functions:
        _check_loops(function, max_loop_iterations)
    _check_structure(model)
    _check_input(model)
    _check_load_time_constants(model, budget=MAX_LOAD_TIME_CONSTANT_BYTES + 4 * len(data))
    if _maps_images_to_images(model):
        return _image_to_image_info(model, opset)
    found = inspect_classifier(model)  # a GradientBuildError is an invalid_model UserError itself
    prepared = found.prepared
    _check_sample_tensors(prepared.model)
    _check_runtime_loads(prepared.forward or prepared.model)  # what predictions run
    if prepared.num_classes is None:
        raise InvalidModelError(
            f"the number of classes cannot be read from output {quoted(prepared.logits_name)}; "
            "export the model with a static class axis, logits of shape [N, K]"
        )
    return ModelInfo(
        weights=[blob for name in weights.locations(model) if (blob := weights.blob_of(name))],
        input_name=prepared.input_name,
        input_shape=[d if isinstance(d, int) else None for d in prepared.input_shape],
        num_classes=int(prepared.num_classes),
        opset=opset,
        gradients_available=found.gradients_available,
        unsupported=found.unsupported,
        operators=found.operators,
        dtype=prepared.dtype,
        output_squeezed_from=None if prepared.squeezed_from is None else [
            d if isinstance(d, int) else None for d in prepared.squeezed_from],
        binary=prepared.binary,
        gradients_probed_side=found.probed_side,
        gradients_straight_through=prepared.straight_through if found.gradients_available else 0,
    )


def validate_model_upload(path: Path, data: dict[str, Path], out: Path, *, max_bytes: int,
                          max_loop_iterations: int = DEFAULT_MAX_LOOP_ITERATIONS,
                          inline_bytes: int | None = None) -> tuple[ModelInfo, bool]:
    """An uploaded model: a plain .onnx, validated as it is ((info, False)); or a model with its
    external data files, or a .zip / .tar.gz bundle of them, made one self-contained model in
    ``out`` and validated there ((info, True)). Data files come only from the upload: nothing is
    looked up next to the file or at a path the model names."""
    with path.open("rb") as handle:
        archive = is_archive(handle.read(4))
    if not data and not archive:
        return validate_model(path, max_bytes=max_bytes, max_loop_iterations=max_loop_iterations), False
    if data and archive:
        raise InvalidModelError("send either a .zip / .tar.gz bundle, or the .onnx file with its data files; "
                                "not both")
    files = {name: PathFile(file, file.stat().st_size) for name, file in data.items()}
    folder = outside_weights_folder(out)
    spill = folder / "bundle"  # an archive's members, streamed out of it (removed with the folder)
    spill.mkdir(parents=True, exist_ok=True)
    model, outside = assemble_file(path, max_bytes, files, lambda name, file: weights.blob_location(
        file_sha256(_local_path(file))), inline_bytes, spill)
    out.write_bytes(model)
    if not outside:
        return validate_model(out, max_bytes=max_bytes, max_loop_iterations=max_loop_iterations), True
    for location, file in outside.items():
        weights.place(_local_path(file), folder / location)
    weights.set_folder(folder)
    try:
        return validate_model(out, max_bytes=max_bytes, max_loop_iterations=max_loop_iterations,
                              weights_outside=True), True
    finally:
        weights.set_folder(None)


def outside_weights_folder(out: Path) -> Path:
    """Where ``validate_model_upload`` puts the data files it kept outside the model written to
    ``out``, as ``<blob location>`` (the caller stores them, then removes the folder)."""
    return out.with_name(out.name + ".weights")


def _local_path(file: DataFile) -> Path:
    assert isinstance(file, PathFile), "the upload's data files and an archive's spilled members are files"
    return file.path


def _check_outside_locations(model: onnx.ModelProto) -> None:
    for name in weights.locations(model):
        if weights.blob_of(name) is None:
            raise InvalidModelError(f"the model names external data {quoted(name)}; upload its data files "
                                    "with it")
    weights.check_resolvable(model)


def _maps_images_to_images(model: onnx.ModelProto) -> bool:
    """One output of its input's shape (rank 3 or more, batch first): an autoencoder or a
    denoiser, which an autoencoder defense puts in front of a classifier."""
    if len(model.graph.output) != 1:
        return False
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the classifier checks that follow say what is wrong
        return False
    from workers.defenses.base import input_dims

    dims, out_dims = input_dims(image_input(inferred)), input_dims(inferred.graph.output[0])
    pairs = zip(dims[1:], out_dims[1:], strict=False)
    clash = any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in pairs)
    return len(dims) >= 3 and len(out_dims) == len(dims) and not clash


def _image_to_image_info(model: onnx.ModelProto, opset: int) -> ModelInfo:
    """An image-to-image model, checked as an autoencoder defense checks it (one output of its
    input's shape; differentiable where its size is static); it can be a defense's model, and
    is not evaluated itself."""
    from workers.defenses.autoencoder import Autoencoder

    autoencoder = Autoencoder(model=model)
    _check_sample_tensors(autoencoder.model)
    _check_runtime_loads(autoencoder.model)
    return ModelInfo(
        kind="image_to_image",
        input_name=autoencoder.input_name,
        input_shape=[d if isinstance(d, int) else None for d in autoencoder.input_dims],
        num_classes=0,
        opset=opset,
        gradients_available=True,
        unsupported=[],
        operators=dict(Counter(node.op_type for node in autoencoder.model.graph.node)),
    )


def _check_sample_tensors(model: onnx.ModelProto) -> None:
    """No intermediate tensor of one image past MAX_SAMPLE_TENSOR_BYTES (``model`` shape-inferred)."""
    name, size = memory_budget.largest_sample_tensor(model.graph)
    if size > MAX_SAMPLE_TENSOR_BYTES:
        raise InvalidModelError(
            f"the model's tensor {quoted(name)} takes {size} bytes for one image, over the limit of "
            f"{MAX_SAMPLE_TENSOR_BYTES} bytes; export the model at a smaller input size, or without the "
            "operator that makes it that large (an Expand or Tile to a fixed large shape, say)")


def _check_runtime_loads(model: onnx.ModelProto) -> None:
    """ONNX Runtime builds a session of the model, or the upload is refused now rather than
    failing every evaluation later."""
    import onnxruntime as ort

    from workers.runtime import MODEL_REFUSED, runtime_refusal

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # loading is the check
    weights.configure_session(options)
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except MODEL_REFUSED as exc:
        raise runtime_refusal(exc) from None


def _read_model_file(path: Path, max_bytes: int) -> bytes:
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise InvalidModelError("the model file is empty; upload the .onnx file itself")
        if size > max_bytes:
            raise TooLargeError(f"the model is {size} bytes, over the limit of {max_bytes} bytes")
        return handle.read(size)


def _parse_model(data: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError, or errors from its C++ parser
        raise InvalidModelError(
            f"not an ONNX model: the file does not parse as an ONNX protobuf ({first_lines(exc)}); "
            "upload the .onnx file written by torch.onnx.export or onnx.save_model"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise InvalidModelError(
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


def _integer_constants(graph: onnx.GraphProto | onnx.FunctionProto) -> dict[str, int]:
    """Scalar integer initializers and Constant outputs of ``graph``, by name."""
    tensors = {t.name: t for t in getattr(graph, "initializer", ())}
    found = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value_int":
                    found[node.output[0]] = int(a.i)
                elif a.name == "value" and a.HasField("t"):
                    tensors[node.output[0]] = a.t
    for name, tensor in tensors.items():
        if tensor.data_type in _INTEGER_TYPES and math.prod(tensor.dims) == 1:
            found[name] = int(numpy_helper.to_array(tensor).reshape(-1)[0])
    return found


_INTEGER_TYPES = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                  TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}


def _check_loops(graph: onnx.GraphProto | onnx.FunctionProto, bound: int, outer: int = 1,
                 known: dict[str, int] | None = None) -> None:
    """Refuse Loops that could run more than ``bound`` iterations (nested ones multiplied):
    one without a constant trip count cannot be bounded when it is uploaded, and would hold a
    worker until the job's time limit."""
    known = {**(known or {}), **_integer_constants(graph)}
    for node in graph.node:
        iterations = outer
        if node.op_type == "Loop":
            trip = node.input[0] if node.input else ""
            if trip not in known:
                raise InvalidModelError(
                    f"Loop node {quoted(node.name or node.output[0] if node.output else '')} has no constant "
                    "trip count, so its cost cannot be bounded; export the model with the loop unrolled or "
                    "with a constant trip count"
                )
            iterations = outer * max(known[trip], 0)
            if iterations > bound:
                raise InvalidModelError(
                    f"Loop node {quoted(node.name)} runs {known[trip]} iterations ({iterations} with the "
                    f"loops around it), over the bound of {bound} (ROBUSTNESS_MAX_LOOP_ITERATIONS on the "
                    "server)"
                )
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _check_loops(sub, bound, iterations, known)


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
                f"external data file {quoted(location)}" if location is not None else "an external data file"
            )
            raise InvalidModelError(
                f"the model references {what} (tensor {quoted(tensor.name)}); upload its data files "
                "with it (multipart `data` parts named as the model names them, or one .zip / .tar.gz of "
                "the model and its data files), or save all weights inside the .onnx file "
                "(onnx.save_model(model, path, save_as_external_data=False))"
            )


_PACKED_BITS: dict[int, int] = {
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
        raise InvalidModelError(
            f"the model holds a sparse tensor ({quoted(item.values.name)}); sparse "
            "weights are not supported: store them as dense initializers"
        )
    name, dims = quoted(item.name), list(item.dims)
    if any(d < 0 for d in dims):
        raise InvalidModelError(f"tensor {name} has negative dimensions {dims}; re-export the model")
    if item.HasField("segment"):
        raise InvalidModelError(f"tensor {name} is stored in segments, which are not supported; re-export it")
    count, bits = math.prod(dims), _element_bits(item.data_type)
    if bits is None:
        raise InvalidModelError(f"tensor {name} has an unknown element type ({item.data_type}); re-export it")
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
        raise InvalidModelError(
            f"tensor {name} declares shape {dims} ({math.prod(dims)} {kind} elements) but holds "
            f"{stored} {unit} of data where {expected} are needed; the file is corrupt or was edited: "
            "re-export the model"
        )


def _node_label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


_CONTRIB_HINT = (" (one of ONNX Runtime's contrib operators, which its graph optimizer and optimum's "
                 "--optimize write into saved models: save the model before those optimizations, "
                 "e.g. without optimized_model_filepath or --optimize)")


def _check_domains(model: onnx.ModelProto) -> None:
    for node in _nodes(model):
        if node.domain not in DEFAULT_DOMAINS:
            hint = (
                " (a model-local function: inline it with onnx.inliner.inline_local_functions)"
                if any(f.domain == node.domain and f.name == node.op_type for f in model.functions)
                else _CONTRIB_HINT if node.domain == "com.microsoft" else ""
            )
            raise InvalidModelError(
                f"node {quoted(_node_label(node))} uses operator "
                f"{quoted(node.op_type)} from the custom domain {quoted(node.domain)}{hint}; only standard "
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
        raise InvalidModelError(
            "the model imports no standard ONNX opset; export it with torch.onnx.export "
            "(opset_version=17 or later)"
        )
    newest = max_runtime_opset()
    if opset > newest:
        raise InvalidModelError(
            f"the model uses opset {opset}, newer than the runtime supports; export it "
            f"with opset_version between 17 and {newest}"
        )
    return int(opset)


def _check_structure(model: onnx.ModelProto) -> None:
    """onnx.checker and strict shape inference."""
    try:
        weights.check_model(model, full_check=False)
    except Exception as exc:  # ValidationError, or errors from the C++ checker
        raise InvalidModelError(f"the model is not valid ONNX: {first_lines(exc)}") from None
    try:
        shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError, or errors from the C++ inference
        raise InvalidModelError(
            f"shape inference failed: {first_lines(exc)}; re-export the model (its "
            "declared shapes contradict its operators)"
        ) from None


def _check_input(model: onnx.ModelProto) -> None:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(quoted(i.name) for i in inputs) or "none"
        raise InvalidModelError(
            f"the model has {len(inputs)} inputs ({names}); export the classifier with "
            "exactly one input, the image batch"
        )
    x = inputs[0]
    if not x.type.HasField("tensor_type"):
        raise InvalidModelError(
            f"input {quoted(x.name)} is not a tensor; export the classifier with one "
            "float32 image tensor as input"
        )
    tensor_type = x.type.tensor_type
    if tensor_type.elem_type not in (TensorProto.FLOAT, *HALF):
        got = (
            TensorProto.DataType.Name(tensor_type.elem_type)
            if tensor_type.elem_type in TensorProto.DataType.values()
            else str(tensor_type.elem_type)
        )
        raise InvalidModelError(
            f"input {quoted(x.name)} has element type {got}; export the model with a "
            "float32, float16 or bfloat16 input (cast inside the model if it needs another type)"
        )
    if not tensor_type.HasField("shape"):
        raise InvalidModelError(
            f"input {quoted(x.name)} declares no shape; export it with a shape such as "
            "[N, C, H, W] (a symbolic batch axis and fixed image axes)"
        )
    rank = len(tensor_type.shape.dim)
    if rank not in INPUT_RANKS:
        raise InvalidModelError(
            f"input {quoted(x.name)} has rank {rank}; expected images [N, C, H, W] or "
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
            known = [d for d in dims if d is not None] if dims is not None else []
            if dims is not None and len(known) == len(dims):
                count = math.prod(known)
            elif node.op_type in _NOT_LARGER:
                count = sum(elements.get(name, 0) for name in node.input if name)
            else:
                raise InvalidModelError(
                    f"node {quoted(_node_label(node))} ({node.op_type}) computes a constant whose size "
                    "cannot be known before running it; store the value as an initializer or compute "
                    f"it from the model input{hint}"
                )
            elements[out] = count
            bits = (_element_bits(tensor_type.elem_type) if tensor_type else None) or 64
            total += math.ceil(count * bits / 8)
            if total > budget:
                raise InvalidModelError(
                    f"the model computes {total} bytes of constants when it is loaded (node "
                    f"{quoted(_node_label(node))}, {node.op_type}), over the limit of {budget} bytes; "
                    "store large constants as initializers or compute them from the model input"
                )


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
