"""Weights kept outside the model's protobuf, for models over protobuf's 2 GiB limit.

Protobuf cannot hold a message of 2 GiB or more, so such a model's large tensors stay in their
data files and the engine passes around a graph whose tensors name them (ONNX external data).
Every location is resolved in one folder per process, the *weights folder*, and nowhere else:
the blob store's root in a worker (locations ``ab/cdef...``, a stored blob's relative path),
the model's own folder or an unpacked bundle in the CLI. ONNX Runtime reads them there
(``session.model_external_initializers_file_folder_path``; it refuses paths that leave the
folder, links included); numpy reads them through :func:`array`. A model without external
data never touches this module's state.

Small tensors (shapes, axes, biases under ``INLINE_TENSOR_BYTES``) are always kept inside the
graph, so the graph rewrites that read constant values see them as before; only the large
weights stay outside, and nothing folds or copies them.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InvalidModelError

INLINE_TENSOR_BYTES = 1 << 20
FOLDER_CONFIG = "session.model_external_initializers_file_folder_path"

_folder: Path | None = None


def set_folder(path: Path | str | None) -> None:
    """Resolve external data in ``path`` from now on (None: nowhere)."""
    global _folder
    _folder = None if path is None else Path(path).resolve()


def folder() -> Path | None:
    return _folder


_BLOB = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{62})$")


def blob_location(sha256: str) -> str:
    """The location a stored data file has in a model: its path under the blob store's root."""
    return f"{sha256[:2]}/{sha256[2:]}"


def blob_of(location: str) -> str | None:
    """The sha256 a blob location names, or None for any other location."""
    match = _BLOB.match(location)
    return match.group(1) + match.group(2) if match else None


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """The initializers and attribute tensors of ``graph`` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from graph_tensors(sub)


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in graph_tensors(model.graph))


def might_have_external(data: bytes) -> bool:
    """A cheap test on serialized bytes: False means the model certainly keeps all its data."""
    return b"location" in data


def locations(model: onnx.ModelProto) -> list[str]:
    """The external data locations ``model`` names, in order of first use."""
    found: dict[str, None] = {}
    for tensor in graph_tensors(model.graph):
        if is_external(tensor):
            found[_entries(tensor).get("location", "")] = None
    return list(found)


def _entries(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_resolvable(model: onnx.ModelProto) -> None:
    """Every external location of ``model`` is a regular file inside the weights folder (no
    absolute path, no ``..``, no link leading out); otherwise the model is refused."""
    names = locations(model)
    if not names:
        return
    if _folder is None:
        raise InvalidModelError(
            "the model keeps tensors in external data files that were not given with it; upload its "
            "data files with it (multipart `data` parts, or one .zip / .tar.gz), or save all weights "
            "inside the .onnx file (onnx.save_model(model, path, save_as_external_data=False))")
    for name in names:
        parts = name.split("/")
        path = _folder.joinpath(*parts)
        inside = path.resolve().is_relative_to(_folder)
        if (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name
                or not inside or path.is_symlink() or not path.is_file()):
            raise InvalidModelError(
                f"the model keeps tensors in {name!r}, which is not one of the data files given with it; "
                "upload the model together with its data files")


def array(tensor: TensorProto) -> np.ndarray:
    """``tensor``'s value; external data is read from the weights folder only."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    if _folder is None:
        raise InvalidModelError(
            f"tensor {tensor.name!r} keeps its data outside the model and no weights folder is set; "
            "give the model's data files with it")
    return numpy_helper.to_array(tensor, base_dir=str(_folder))


class Values(Mapping[str, np.ndarray]):
    """Tensor values by name, each read (and kept) when first asked for: the graph rewrites look
    at a few small constants, never at every weight of a large model."""

    def __init__(self, tensors: Iterable[TensorProto]):
        self._tensors = {t.name: t for t in tensors}
        self._read: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._read:
            self._read[name] = array(self._tensors[name])
        return self._read[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._tensors.pop(name, None)
        self._read[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self._tensors or name in self._read

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._tensors), **dict.fromkeys(self._read)})

    def __len__(self) -> int:
        return len(set(self._tensors) | set(self._read))

    def is_external(self, name: str) -> bool:
        return name in self._tensors and name not in self._read and is_external(self._tensors[name])


def values(tensors: Iterable[TensorProto]) -> Values:
    return Values(tensors)


def check_model(model: onnx.ModelProto, **kwargs) -> None:
    """``onnx.checker.check_model`` on the graph; external tensors are checked for their
    structure (the checker itself would look for their files next to the working directory)."""
    if has_external(model):
        model = _without_external(model)
    onnx.checker.check_model(model, **kwargs)


def _without_external(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external tensors are empty stand-ins of the same type (for the checker)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in graph_tensors(copy.graph):
        if is_external(tensor):
            stand_in = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=[0])
            tensor.CopyFrom(stand_in)
    return copy


def configure_session(options, model: bytes | None = None) -> None:
    """Let an ONNX Runtime session built from bytes read external data in the weights folder.

    For a model that has such data (``model``, when given), ONNX Runtime maps the files into
    memory: every session and every worker process on the machine shares one copy of the
    weights, in the page cache. Prepacking is off for it, since a packed copy per session and
    matrix multiplication (measured: a 2.17 GB MatMul weight peaked at 10.4 GB in a forward and a
    gradient session, against 2.2 GB mapped) costs more than the packed kernels save (2x on
    that MatMul at batch 8)."""
    if _folder is None:
        return
    options.add_session_config_entry(FOLDER_CONFIG, str(_folder))
    if model is not None and might_have_external(model):
        options.add_session_config_entry("session.disable_prepacking", "1")


def write_outside(value: np.ndarray, name: str) -> TensorProto:
    """A tensor ``name`` whose data is ``value``'s bytes in a file of the weights folder, named by
    their sha256 (a worker's store root: a blob like any other), for a tensor the engine makes
    itself (a PCA projection at 224x224) that would carry a model past protobuf's limit. A
    process without a weights folder gets a private temporary one."""
    value = np.ascontiguousarray(value)
    if value.dtype.byteorder == ">":
        value = value.astype(value.dtype.newbyteorder("<"))
    if _folder is None:
        scratch = Path(tempfile.mkdtemp(prefix="robustness-weights-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        set_folder(scratch)
    assert _folder is not None
    digest = hashlib.sha256(value.reshape(-1).view(np.uint8).data).hexdigest()
    location = blob_location(digest)
    target = _folder / location
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        value.tofile(partial)
        partial.replace(target)
    tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                         dims=list(value.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, entry in (("location", location), ("offset", "0"), ("length", str(value.nbytes))):
        tensor.external_data.add(key=key, value=entry)
    return tensor


def place(source: Path, target: Path) -> None:
    """``source``'s bytes at ``target`` (a hard link where the file system allows it; ONNX
    Runtime refuses symbolic links out of the weights folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        partial = target.with_name(target.name + ".partial")
        with source.open("rb") as reader, partial.open("wb") as writer:
            while chunk := reader.read(1 << 24):
                writer.write(chunk)
        partial.replace(target)
