"""Models whose weights live in separate files (ONNX external data), brought inside the model.

PyTorch's default exporter (torch.export-based, ``dynamo=True``) writes ``model.onnx`` and
``model.onnx.data``; larger models always come that way. A bundle is the model and its data
files, given by name: files next to the model on the command line, the other parts of a
multipart upload, or the members of a .zip or .tar.gz. Nothing here follows a path written in
the model: every ``location`` must be the plain name of a file in the bundle (no separator, no
``..``, no absolute path), the bundle holds regular files only, and each tensor's offset and
length are checked against its file's size and against the tensor's own size before a byte is
read. The result is one self-contained model, stored and hashed as one unit.

Protobuf cannot serialise a model of 2 GiB or more. A bundle past ``inline_limit()`` keeps its
large tensors in their data files (``assemble``), and the engine reads them from the process's
weights folder (weights.py).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import weights
from .errors import InvalidModelError
from .prepare import load_model

PROTOBUF_LIMIT = 2**31 - 1
_ARCHIVE_MEMBERS = 64  # a model and its data files: a few; more is not a model bundle
# pax and GNU long-name headers in a .tar.gz, all together: a few hundred bytes per member in a bundle
MAX_TAR_HEADER_BYTES = 1 << 20
_HEADERS_IN_A_ROW = 8  # before one member: a global and a member pax header, a long name and a long link
_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                     tarfile.GNUTYPE_LONGLINK)
_PLAIN_NAME = re.compile(r"^[^/\\\x00]+$")


class DataFile(Protocol):
    """A data file of a bundle: its size, and its bytes from an offset."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass
class PathFile:
    path: Path
    size: int

    def read(self, offset: int, length: int) -> bytes:
        with self.path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(length)


@dataclass
class BytesFile:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def external_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model (initializers, attributes, subgraphs) whose data is external."""
    for tensor in weights.graph_tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            yield tensor


def data_file_names(model: onnx.ModelProto) -> list[str]:
    """The data files ``model`` names, checked as plain names, in order of first use."""
    names: dict[str, None] = {}
    for tensor in external_tensors(model):
        names[_location(tensor)] = None
    return list(names)


def _location(tensor: TensorProto) -> str:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    if not _PLAIN_NAME.match(location) or location in (".", "..") or Path(location).name != location:
        raise InvalidModelError(
            f"tensor {tensor.name!r} keeps its external data at {location!r}; a data file must be named by a "
            "plain file name in the same folder as the model (no folders, '..' or absolute paths)"
        )
    return location


def _expected_bytes(tensor: TensorProto) -> int | None:
    """The raw size of ``tensor``'s data from its type and dims (None for strings)."""
    if tensor.data_type == TensorProto.STRING:
        return None
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        raise InvalidModelError(
            f"tensor {tensor.name!r} has an unknown element type {tensor.data_type}") from None
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            raise InvalidModelError(f"tensor {tensor.name!r} has a negative dimension {dim}")
        count *= dim
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def inline_limit() -> int:
    """Bundles up to this many bytes become one self-contained model; larger ones keep their large
    tensors outside (weights.py). Protobuf's limit unless ``ROBUSTNESS_INLINE_MODEL_BYTES`` sets
    less (tests use it to run the outside path on small models)."""
    try:
        return min(int(os.environ.get("ROBUSTNESS_INLINE_MODEL_BYTES", PROTOBUF_LIMIT)), PROTOBUF_LIMIT)
    except ValueError:
        return PROTOBUF_LIMIT


@dataclass
class Extent:
    """Where one external tensor's bytes are, checked against its data file and its own size."""

    tensor: TensorProto
    location: str
    offset: int
    length: int


def _extent(tensor: TensorProto, files: Mapping[str, DataFile]) -> Extent:
    location = _location(tensor)
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if location not in files:
        given = ", ".join(sorted(files)) or "none"
        raise InvalidModelError(
            f"tensor {tensor.name!r} keeps its data in {location!r}, which was not given (data files "
            f"given: {given}); upload it with the model, or put it next to the .onnx file"
        )
    file = files[location]
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else file.size - offset
    except ValueError:
        raise InvalidModelError(f"tensor {tensor.name!r}: its offset or length is not an integer") from None
    if offset < 0 or length < 0 or offset + length > file.size:
        raise InvalidModelError(
            f"tensor {tensor.name!r} reads bytes {offset}..{offset + length} of {location!r}, which has "
            f"{file.size} bytes; the data file does not belong to this model (export them together)"
        )
    expected = _expected_bytes(tensor)
    if expected is not None and length != expected:
        raise InvalidModelError(
            f"tensor {tensor.name!r} is {list(tensor.dims)} of type "
            f"{TensorProto.DataType.Name(tensor.data_type)}, {expected} bytes, but its external data "
            f"has {length}; the data file does not belong to this model"
        )
    return Extent(tensor, location, offset, length)


def _bring_in(extent: Extent, file: DataFile) -> None:
    extent.tensor.raw_data = file.read(extent.offset, extent.length)
    del extent.tensor.external_data[:]
    extent.tensor.data_location = TensorProto.DEFAULT


def internalize(model: onnx.ModelProto, files: Mapping[str, DataFile], max_bytes: int) -> onnx.ModelProto:
    """``model`` (in place) with every external tensor's bytes read from ``files`` into it."""
    extents = [_extent(tensor, files) for tensor in list(external_tensors(model))]
    _check_total(model.ByteSize() + sum(e.length for e in extents), min(max_bytes, PROTOBUF_LIMIT))
    for extent in extents:
        _bring_in(extent, files[extent.location])
    return model


def _check_total(total: int, limit: int) -> None:
    if total > limit:
        raise InvalidModelError(
            f"the model with its data files is {total} bytes, larger than {limit} bytes (the model size "
            "limit); make it smaller, or raise the limit (ROBUSTNESS_MAX_MODEL_BYTES on a server)")


@dataclass
class Assembled:
    """A model and its data files: self-contained (``outside`` empty), or, past the inline limit,
    its large tensors left in data files, named in the model by the keys of ``outside``."""

    model: onnx.ModelProto
    outside: dict[str, DataFile]


def assemble(model: onnx.ModelProto, files: Mapping[str, DataFile], max_bytes: int,
             name_outside: Callable[[str, DataFile], str] = lambda name, file: name,
             inline_bytes: int | None = None) -> Assembled:
    """``model`` (in place) with its data files: all of it inside when the whole fits the inline
    limit (``inline_bytes``, None: ``inline_limit()``); otherwise tensors under
    ``weights.INLINE_TENSOR_BYTES`` inside and the rest outside, their locations renamed by
    ``name_outside(location, file)`` (a worker's blob path, say)."""
    extents = [_extent(tensor, files) for tensor in list(external_tensors(model))]
    total = model.ByteSize() + sum(e.length for e in extents)
    _check_total(total, max_bytes)
    if total <= (inline_limit() if inline_bytes is None else inline_bytes):
        for extent in extents:
            _bring_in(extent, files[extent.location])
        return Assembled(model, {})
    outside: dict[str, DataFile] = {}
    renamed: dict[str, str] = {}
    for extent in extents:
        file = files[extent.location]
        if extent.length < weights.INLINE_TENSOR_BYTES:
            _bring_in(extent, file)
            continue
        if extent.location not in renamed:
            renamed[extent.location] = name_outside(extent.location, file)
        outside[renamed[extent.location]] = file
        entries = {"location": renamed[extent.location], "offset": str(extent.offset),
                   "length": str(extent.length)}
        del extent.tensor.external_data[:]
        for key, value in entries.items():
            extent.tensor.external_data.add(key=key, value=value)
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise InvalidModelError("the model's graph and small tensors alone pass protobuf's 2 GiB; "
                                "keep more of its tensors in data files")
    return Assembled(model, outside)


def files_next_to(model_path: Path, names: list[str]) -> dict[str, DataFile]:
    """The data files named by a model at ``model_path``, from the model's own folder: regular
    files only (no links), each a plain name (checked by ``data_file_names``)."""
    found: dict[str, DataFile] = {}
    for name in names:
        path = model_path.parent / name
        if path.is_symlink() or not path.is_file():
            raise InvalidModelError(
                f"{model_path.name} keeps tensors in {name!r}, which is not a regular file next to it; "
                "copy the model's data files (not links) into its folder"
            )
        found[name] = PathFile(path, path.stat().st_size)
    return found


def read_archive(handle: BinaryIO, max_bytes: int, spill: Path | None = None
                 ) -> tuple[str, bytes, dict[str, DataFile]]:
    """(the .onnx member's name, its bytes, the other members) of a .zip or .tar.gz bundle:
    regular files with plain names only, at most ``max_bytes`` unpacked in all. The other
    members are held in memory, or with ``spill`` (an empty folder) streamed into files there."""
    start = handle.read(4)
    handle.seek(0)
    sink = _Members(max_bytes, spill)
    if start.startswith(b"PK\x03\x04"):
        _zip_members(handle, sink)
    elif start.startswith(b"\x1f\x8b"):
        _tar_members(handle, sink)
    else:
        raise InvalidModelError("not a .zip or .tar.gz bundle")
    models = [name for name in sink.files if name.endswith(".onnx")]
    if len(models) != 1:
        raise InvalidModelError(
            f"the bundle holds {len(models)} .onnx files ({', '.join(models) or 'none'}); put exactly one "
            "model and its data files at the top of the archive"
        )
    model = sink.files.pop(models[0])
    return models[0], model.read(0, model.size), sink.files


def is_archive(start: bytes) -> bool:
    return start.startswith((b"PK\x03\x04", b"\x1f\x8b"))


def _member_name(name: str) -> str:
    if not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise InvalidModelError(
            f"the bundle's member {name!r} is not a plain file name; put the model and its data files "
            "at the top of the archive, with no folders"
        )
    return name


class _Members:
    """The bundle's members as they are read: names checked, sizes within the budget, bytes in
    memory or (``spill``) in files."""

    def __init__(self, max_bytes: int, spill: Path | None):
        self.max_bytes, self.budget, self.spill = max_bytes, max_bytes, spill
        self.files: dict[str, DataFile] = {}

    def add(self, name: str, declared: int, reader: IO[bytes]) -> None:
        if name in self.files:
            raise InvalidModelError(f"the bundle holds {name!r} twice")
        _check_count(len(self.files) + 1)
        if declared > self.budget:
            raise _too_large(self.max_bytes)
        file: DataFile
        if self.spill is None or name.endswith(".onnx"):
            data = reader.read(declared + 1)
            size, file = len(data), BytesFile(data)
        else:
            path = self.spill / name
            size = 0
            with path.open("xb") as out:
                while size <= declared and (chunk := reader.read(min(1 << 22, declared + 1 - size))):
                    out.write(chunk)
                    size += len(chunk)
            file = PathFile(path, size)
        if size != declared:
            raise InvalidModelError(f"the bundle's member {name!r} is not the size its header declares")
        self.budget -= size
        self.files[name] = file


def _zip_members(handle: BinaryIO, sink: _Members) -> None:
    try:
        archive = zipfile.ZipFile(handle)
    except zipfile.BadZipFile as exc:
        raise InvalidModelError(f"the bundle is not a readable .zip ({exc})") from None
    infos = [info for info in archive.infolist() if not info.is_dir()]
    _check_count(len(infos))
    for info in infos:
        name = _member_name(info.filename)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise InvalidModelError(f"the bundle's member {name!r} is a symbolic link; bundle regular files")
        try:
            with archive.open(info) as member:
                sink.add(name, info.file_size, member)
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as exc:
            raise InvalidModelError(f"the bundle's member {name!r} cannot be read ({exc})") from None


class _CheckedHeader(tarfile.TarInfo):
    """A tar header whose extensions are checked before tarfile reads them: it reads a pax or GNU
    long-name header whole (a chain of them recursively), and a sparse map block by block, before
    the member budget sees any size."""

    def _proc_member(self, archive: _BundleTar):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse_member()
        if self.type not in _EXTENDED_HEADERS:
            archive.headers_in_a_row = 0
            return super()._proc_member(archive)  # type: ignore[misc]  # tarfile's extension point
        archive.header_bytes += self.size
        archive.headers_in_a_row += 1
        if archive.header_bytes > MAX_TAR_HEADER_BYTES or archive.headers_in_a_row > _HEADERS_IN_A_ROW:
            raise InvalidModelError(
                f"the bundle's pax or GNU long-name headers take more than {MAX_TAR_HEADER_BYTES} bytes, or "
                f"more than {_HEADERS_IN_A_ROW} precede one member; re-create it with plain file names, e.g. "
                "tar -czf model.tar.gz model.onnx model.onnx.data")
        return super()._proc_member(archive)  # type: ignore[misc]

    def _proc_gnusparse_10(self, next, pax_headers, archive):  # reads its map until a count it declares
        raise _sparse_member()


class _BundleTar(tarfile.TarFile):
    tarinfo = _CheckedHeader
    header_bytes = 0  # of the pax and GNU long-name headers read so far
    headers_in_a_row = 0  # extended headers since the last member's own header


def _sparse_member() -> InvalidModelError:
    return InvalidModelError("the bundle holds a sparse file; bundle regular files (tar without --sparse)")


def _tar_members(handle: BinaryIO, sink: _Members) -> None:
    try:
        with _BundleTar.open(fileobj=handle, mode="r:gz") as archive:
            for info in archive:
                if info.isdir():
                    continue
                name = _member_name(info.name[2:] if info.name.startswith("./") else info.name)
                if not info.isreg():
                    raise InvalidModelError(
                        f"the bundle's member {name!r} is not a regular file (a link or device); "
                        "bundle regular files")
                extracted = archive.extractfile(info)
                sink.add(name, info.size, extracted if extracted is not None else io.BytesIO())
    except (tarfile.TarError, EOFError, OSError, io.UnsupportedOperation) as exc:
        raise InvalidModelError(f"the bundle is not a readable .tar.gz ({exc})") from None


def _too_large(max_bytes: int) -> InvalidModelError:
    return InvalidModelError(f"the bundle unpacks to more than {max_bytes} bytes (the model size limit)")


def _check_count(count: int) -> None:
    if count > _ARCHIVE_MEMBERS:
        raise InvalidModelError(
            f"the bundle holds more than {_ARCHIVE_MEMBERS} files; put one model and its data files in it")


def assemble_file(path: Path, max_bytes: int, data_files: Mapping[str, DataFile] | None = None,
                  name_outside: Callable[[str, DataFile], str] = lambda name, file: name,
                  inline_bytes: int | None = None, spill: Path | None = None
                  ) -> tuple[bytes, dict[str, DataFile]]:
    """The model at ``path`` with its data files (``assemble``): an .onnx whose data files are
    ``data_files`` (None: the files next to it, on the command line only), or a .zip or .tar.gz
    bundle (its data members in memory, or in files in the empty folder ``spill``). Returns the
    model's bytes and the data files left outside it (by the names the model now gives them). A
    model without external data comes back byte for byte."""
    with path.open("rb") as handle:
        if is_archive(handle.read(4)):
            handle.seek(0)
            _, data, data_files = read_archive(handle, max_bytes, spill)
        else:
            handle.seek(0)
            data = handle.read()
    model = load_model(data)
    names = data_file_names(model)
    if not names:
        return data, {}
    files = data_files if data_files is not None else files_next_to(path, names)
    assembled = assemble(model, files, max_bytes, name_outside, inline_bytes)
    return assembled.model.SerializeToString(), assembled.outside


def self_contained(path: Path, max_bytes: int, data_files: Mapping[str, DataFile] | None = None) -> bytes:
    """The model at ``path`` as one self-contained model (see ``assemble_file``); refused past
    the inline limit."""
    data, outside = assemble_file(path, max_bytes, data_files)
    if outside:
        raise InvalidModelError("the model with its data files is too large for one self-contained model")
    return data
