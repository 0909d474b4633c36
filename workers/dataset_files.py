"""Dataset files: checking an upload before anything else reads it, and loading a stored one.

The gateway calls :func:`validate_dataset` on an upload's private temporary file; workers read
stored datasets with :func:`load_dataset_file`. Archives are read in memory, never extracted,
and only the file given is read.

Datasets: an .npz with ``x`` (N, C, H, W / N, H, W, C / N, H, W; float or uint8), ``y``
(N,) integer labels >= 0 and optionally ``t`` (N,) target labels, or a .zip of PNG class
folders (``classname/image.png``; classes sorted by name give labels 0..K-1, as torchvision's
ImageFolder does; 8-bit grayscale "L" and "RGB" images only, all the same size and mode; RGBA
and palette images are refused). The format is told from the content. Archive members are
checked before anything is decompressed: safe relative names, no links, no duplicate or
overlapping entries (CVE-2024-0450), declared sizes and compression ratios within budget;
reads stop at the declared size. A refused file raises DatasetError (or TooLargeError), a
UserError whose message says what is wrong and how to fix it and never names a server path.
"""

from __future__ import annotations

import hashlib
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
from PIL import Image

from workers.datasets import MAX_BYTES, MAX_SAMPLES, Dataset, DatasetError, check_targets, load_npz
from workers.errors import TooLargeError, first_lines, quoted

MiB = 1 << 20
MAX_CLASSES = 1_000_000  # labels must be below this
MAX_COMPRESSION_RATIO = 200  # for archive members over 1 MiB once decompressed
NPZ_IMAGE_RANKS = (3, 4)  # x as workers.datasets.load_npz accepts it
PNG_MODES = {"L": 1, "RGB": 3}  # mode -> channels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
READ_CHUNK = 8 * MiB




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
        raise DatasetError(
            "the dataset file is empty; upload an .npz (numpy.savez(path, x=images, "
            "y=labels)) or a .zip of PNG class folders"
        )
    if size > max_bytes:
        raise TooLargeError(f"the dataset is {size} bytes, over the limit of {max_bytes} bytes")
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
    assert x is not None  # keep=True, and _archive_kind refuses an archive without files
    return Dataset(x=(x.astype(np.float32) / 255.0) * (high - low) + low, y=y, source_dtype="uint8",
                   sha256=_file_sha256(path))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
            raise DatasetError(
                "the file is a single .npy array; save images and labels together with "
                "numpy.savez(path, x=images, y=labels)"
            )
        directory_start = _central_directory(handle, size, limits)
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise DatasetError(f"the archive is corrupt ({first_lines(exc)}); {_NOT_A_DATASET}") from None
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
        raise DatasetError(_NOT_A_DATASET)
    *_, directory_size, _, _ = _EOCD.unpack_from(tail, at)
    end = size - tail_size + at
    if end >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
        handle.seek(end - _ZIP64_LOCATOR.size)
        if handle.read(4) == b"PK\x06\x07":
            handle.seek(end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
            record = handle.read(_ZIP64_EOCD.size)
            if record[:4] != b"PK\x06\x06":
                raise DatasetError(f"the archive's zip64 directory is corrupt; {_NOT_A_DATASET}")
            directory_size = _ZIP64_EOCD.unpack(record)[8]
            end -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    start = end - directory_size
    if start < 0:
        raise DatasetError(f"the archive's central directory is corrupt; {_NOT_A_DATASET}")
    handle.seek(start)
    directory = handle.read(directory_size)
    entries, at = 0, 0
    while at < len(directory):
        if directory[at : at + 4] != b"PK\x01\x02" or at + _CENTRAL_RECORD > len(directory):
            raise DatasetError(f"the archive's central directory is corrupt; {_NOT_A_DATASET}")
        name, extra, comment = struct.unpack_from("<3H", directory, at + 28)
        at += _CENTRAL_RECORD + name + extra + comment
        entries += 1
        if entries > limits.max_entries:
            raise TooLargeError(
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
        raise DatasetError(
            f"archive member {quoted(name)} has {problem} in its name; zip the dataset "
            "with relative paths only (cd dataset && zip -r ../dataset.zip .)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        raise DatasetError(
            f"archive member {quoted(name)} is a link or special file; the archive may "
            "hold only regular files and folders (zip without --symlinks)"
        )
    if info.flag_bits & 0x1:
        raise DatasetError(
            f"archive member {quoted(name)} is encrypted; upload an archive without a password"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DatasetError(
            f"archive member {quoted(name)} uses compression method "
            f"{info.compress_type}; store or deflate members (numpy.savez, zip)"
        )


def _check_no_overlap(handle: BinaryIO, infos: list[zipfile.ZipInfo], directory_start: int) -> None:
    """Each member's bytes belong to it alone (CVE-2024-0450 'overlapping entries' bombs), and
    no name appears twice."""
    counts = Counter(i.filename for i in infos)
    twice = next((name for name, n in counts.items() if n > 1), None)
    if twice is not None:
        raise DatasetError(f"archive member {quoted(twice)} appears more than once; re-create the archive")
    spans = []
    for info in infos:
        handle.seek(info.header_offset)
        header = handle.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise DatasetError(
                f"archive member {quoted(info.filename)} has no local header where the "
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
            raise DatasetError(
                f"archive members {quoted(first)} and {quoted(second)} overlap (a known "
                "zip-bomb construction); re-create the archive"
            )
    if spans and spans[-1][1] > directory_start:
        raise DatasetError(
            f"archive member {quoted(spans[-1][2])} overlaps the central directory; re-create the archive"
        )


def _check_declared_sizes(files: list[zipfile.ZipInfo], limits: _Limits) -> None:
    """Budget the decompressed size from the headers, before decompressing anything."""
    declared = sum(i.file_size for i in files)
    allowed = 2 * limits.max_decoded_bytes + MiB  # PNGs of noise are slightly larger than raw
    if declared > allowed:
        raise TooLargeError(
            f"the archive declares {declared} bytes once decompressed, over the limit of "
            f"{allowed} bytes; upload fewer or smaller images"
        )
    for info in files:
        ratio = info.file_size // max(info.compress_size, 1)
        if info.file_size > MiB and ratio > MAX_COMPRESSION_RATIO:
            raise DatasetError(
                f"archive member {quoted(info.filename)} expands {ratio} times ({info.compress_size} bytes "
                f"to {info.file_size}), more than {MAX_COMPRESSION_RATIO} times: refused as a possible zip "
                "bomb; store it uncompressed (numpy.savez, zip -0)"
            )


def _archive_kind(files: list[zipfile.ZipInfo]) -> str:
    if not files:
        raise DatasetError(f"the archive holds no files; {_NOT_A_DATASET}")
    if all("/" not in i.filename and i.filename.endswith(".npy") for i in files):
        return "npz"
    stray = next((i.filename for i in files if i.filename.count("/") != 1), None)
    if stray is None:
        return "png-zip"
    if stray.count("/") > 1:
        raise DatasetError(
            f"archive member {quoted(stray)} is nested too deeply: PNG images sit in class "
            "folders at the top of the archive (classname/image.png); zip the contents of "
            "the dataset folder (cd dataset && zip -r ../dataset.zip .)"
        )
    raise DatasetError(f"archive member {quoted(stray)} does not fit either layout; {_NOT_A_DATASET}")


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
        raise DatasetError(
            f"archive member {quoted(info.filename)} is corrupt ({first_lines(exc)}); re-create the archive"
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
    name = quoted(info.filename)
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
        raise DatasetError(
            f"archive member {name} is corrupt ({first_lines(exc)}); re-create the archive"
        ) from None
    except (ValueError, SyntaxError, OSError) as exc:
        raise DatasetError(
            f"archive member {name} is not a readable .npy array ({first_lines(exc)}); "
            "save the arrays with numpy.savez(path, x=images, y=labels)"
        ) from None
    if dtype.hasobject:
        raise DatasetError(
            f"{quoted(info.filename[:-4])} holds Python objects; store plain numeric "
            "arrays (no pickles are ever loaded)"
        )
    header = _NpyHeader(info, tuple(shape), dtype, offset)
    if any(d < 0 for d in shape) or info.file_size != offset + header.nbytes:
        raise DatasetError(
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
        raise DatasetError(
            f"the .npz lacks {missing}; it needs arrays 'x' (images) and 'y' (labels), "
            f"found {sorted(headers)}: numpy.savez(path, x=images, y=labels)"
        )
    x, y = headers["x"], headers["y"]
    t = headers.get("t")
    if t is not None and (t.shape != y.shape or not np.issubdtype(t.dtype, np.integer)):
        raise DatasetError(
            f"'t' (target labels) must be integers of the shape of 'y' {list(y.shape)}, got "
            f"{t.dtype} {list(t.shape)}"
        )
    if len(y.shape) != 1:
        raise DatasetError(f"'y' must be 1-D (one label per image), got shape {list(y.shape)}")
    if len(x.shape) not in NPZ_IMAGE_RANKS or x.shape[0] != y.shape[0]:
        raise DatasetError(
            f"'x' must be [N, C, H, W], [N, H, W, C] or [N, H, W] with N = len(y) = "
            f"{y.shape[0]}, got {list(x.shape)}"
        )
    if x.shape[0] > limits.max_samples:
        raise TooLargeError(f"the dataset has {x.shape[0]} samples, over the limit of {limits.max_samples}")
    decoded = sum(h.nbytes for h in headers.values())
    if decoded > limits.max_decoded_bytes:
        raise TooLargeError(
            f"the arrays take {decoded} bytes once decoded, over the limit of "
            f"{limits.max_decoded_bytes} bytes; upload fewer or smaller images"
        )
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
        raise DatasetError(f"'x' has dtype {x.dtype}; use float32 pixels or uint8 (0..255)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"'y' has dtype {y.dtype}; labels must be integers")
    if x.shape[0] == 0:
        raise DatasetError("the dataset holds no samples")
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
            raise DatasetError(str(exc)) from None
        num_classes = max(num_classes, _check_labels(targets))
    not_finite = 0
    for chunk in _member_chunks(archive, x.info, x.offset):  # all of x: its CRC is checked at the end
        if x.dtype != np.uint8:
            values = np.frombuffer(chunk, x.dtype)  # READ_CHUNK is a multiple of every itemsize
            not_finite += values.size - int(np.count_nonzero(np.isfinite(values)))
    if not_finite:
        raise DatasetError(
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
        raise DatasetError(f"labels must be >= 0, found {low}")
    if high >= MAX_CLASSES:
        raise DatasetError(f"labels must be below {MAX_CLASSES}, found {high}")
    return high + 1


def _read_png_zip(
    archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: _Limits, keep: bool = True
) -> tuple[np.ndarray | None, list[int], np.ndarray, list[str]]:
    """x uint8 [N, C, H, W] (None unless ``keep``: every image is still decoded), the shape of
    one image [C, H, W], y int64 [N] and the class names (sorted folder names -> 0..K-1)."""
    if len(files) > limits.max_samples:
        raise TooLargeError(f"the archive holds {len(files)} images, over the limit of {limits.max_samples}")
    for info in files:
        if not info.filename.lower().endswith(".png"):
            raise DatasetError(
                f"archive member {quoted(info.filename)} is not a .png image; a zip dataset "
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
                    raise TooLargeError(
                        f"{len(files)} images of {width}x{height} {mode} take {decoded} bytes "
                        f"once decoded, over the limit of {limits.max_decoded_bytes} bytes; "
                        "upload fewer or smaller images"
                    )
                shape = [PNG_MODES[mode], height, width]
                x = np.empty((len(files), *shape), np.uint8) if keep else None
                first = (info.filename, layout)
            elif layout != first[1]:
                raise DatasetError(
                    f"{quoted(info.filename)} is {layout[1]}x{layout[2]} {layout[0]} but "
                    f"{quoted(first[0])} is {first[1][1]}x{first[1][2]} {first[1][0]}; all images must have "
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
        raise DatasetError(
            f"{quoted(name)} is not a PNG image; a zip dataset holds only class folders "
            "of PNG images (classname/image.png)"
        )
    width, height = struct.unpack_from(">2I", data, 16)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:  # before Pillow, which only warns below twice the limit
        raise TooLargeError(
            f"{quoted(name)} is {width}x{height} pixels, over the limit of {limit} pixels per image"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except _PNG_ERRORS as exc:
        raise DatasetError(f"{quoted(name)} is not a readable PNG image ({first_lines(exc)})") from None
    if image.mode not in PNG_MODES:
        image.close()
        raise DatasetError(
            f"{quoted(name)} has mode {image.mode}; only 8-bit grayscale (L) and RGB "
            "PNGs are accepted: convert it, e.g. Image.open(p).convert('RGB').save(p)"
        )
    return image


def _pixels(image: Image.Image, name: str) -> np.ndarray:
    """[C, H, W] uint8."""
    try:
        image.load()
        array = np.asarray(image, dtype=np.uint8)
    except _PNG_ERRORS as exc:
        raise DatasetError(f"{quoted(name)} is not a readable PNG image ({first_lines(exc)})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
