"""Dataset files: checking an upload before anything else reads it, and loading a stored one.

The gateway calls :func:`validate_dataset` on an upload's private temporary file; workers read
stored datasets with :func:`load_dataset_file`. Only the file given is read; the zip container
is checked first (workers/dataset_archive.py) and never extracted.

Datasets: an .npz with ``x`` (N, C, H, W / N, H, W, C / N, H, W; float or uint8), ``y``
(N,) integer labels >= 0 and optionally ``t`` (N,) target labels, or a .zip of PNG or JPEG
class folders (workers/image_folders.py), which is processed at upload into a uint8 .npz when
its images need it. The format is told from the content. uint8 images stay uint8 once loaded
(workers.datasets.Pixels), memory-mapped where the .npz stores them uncompressed. A refused
file raises DatasetError (or TooLargeError), a UserError whose message says what is wrong and
how to fix it and never names a server path.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workers.dataset_archive import NOT_A_DATASET, Limits, member_chunks, open_archive, read_member
from workers.datasets import (
    MAX_BYTES,
    MAX_SAMPLES,
    Dataset,
    DatasetError,
    Pixels,
    check_image_size,
    check_targets,
    load_npz,
)
from workers.errors import TooLargeError, first_lines, quoted
from workers.image_folders import (
    NO_PROCESSING,
    ImageProcessing,
    decoded_images,
    is_image_folder_zip,
    read_folders,
    stacked,
    write_npz,
)

MAX_CLASSES = 1_000_000  # labels must be below this
NPZ_IMAGE_RANKS = (3, 4)  # x as workers.datasets.load_npz accepts it


@dataclass
class DatasetInfo:
    format: str  # "npz", "png-zip" (stored as uploaded) or "image-zip" (stored processed, as a uint8 .npz)
    samples: int
    shape: list[int]  # one image: as stored in an .npz, [C, H, W] from images
    source_dtype: str
    num_classes: int  # the largest label + 1 (of y and t)
    classes: list[str] | None  # an image zip's class names in label order: its folders, or as declared
    targets: bool = False  # an .npz with target labels t (for targets: dataset)
    processing: dict | None = None  # an image zip's declared resize / center_crop / color
    images: dict[str, int] | None = field(default=None)  # an image zip's images by format
    target_classes: int | None = None  # the largest target label in t + 1


def validate_dataset(path: Path, out: Path | None = None, *, max_bytes: int, max_samples: int,
                     max_decoded_bytes: int, processing: ImageProcessing = NO_PROCESSING) -> DatasetInfo:
    """Check an uploaded dataset (.npz or .zip of image class folders); raises a UserError
    (workers/errors.py) saying why it is refused. An image zip that needs processing (JPEGs,
    images of several sizes, a declared ``processing``) is written to ``out`` as a uint8 .npz,
    and its info says format "image-zip": that file, not the upload, is what is stored."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise DatasetError(
            "the dataset file is empty; upload an .npz (numpy.savez(path, x=images, "
            "y=labels)) or a .zip of image class folders"
        )
    if size > max_bytes:
        raise TooLargeError(f"the dataset is {size} bytes, over the limit of {max_bytes} bytes")
    limits = Limits(max_samples, max_decoded_bytes)
    with open_archive(path, limits) as (archive, files):
        if _archive_kind(files) == "npz":
            if processing.declared:
                raise DatasetError("resize, center_crop, color and classes apply to a zip of image class "
                                   "folders; an .npz is used as it is: process its images before saving it")
            return _validate_npz(archive, files, limits)
        folders = read_folders(archive, files, limits, processing.classes)
        processed = folders.needs_processing(processing)
        images = decoded_images(archive, folders, limits, processing)
        if processed and out is not None:
            shape = write_npz(Path(out), images, folders.labels, folders.classes)
        else:
            shape = []
            for pixels in images:
                shape = list(pixels.shape)
    return DatasetInfo(
        format="image-zip" if processed else "png-zip",
        samples=len(folders.labels),
        shape=shape,
        source_dtype="uint8",
        num_classes=len(folders.classes),
        classes=folders.classes,
        processing=processing.as_dict() if processing.declared else None,
        images=folders.formats,
    )


def load_dataset_file(
    path: Path,
    value_range: tuple[float, float] = (0.0, 1.0),
    *,
    max_samples: int = MAX_SAMPLES,
    max_decoded_bytes: int = MAX_BYTES,
    processing: ImageProcessing = NO_PROCESSING,
) -> Dataset:
    """Load a dataset (.npz or image zip) as workers use it: x float32 in ``value_range``, or,
    for uint8 images, Pixels that read as such; y int64. An image zip is processed as
    ``processing`` declares (as an upload would be). Raises ``DatasetError`` for a bad file."""
    path = Path(path)
    limits = Limits(max_samples, max_decoded_bytes)
    with open_archive(path, limits) as (archive, files):
        if _archive_kind(files) == "npz":
            x_header, y_header = _npz_headers(archive, files, limits)
            if x_header.dtype != np.uint8 or x_header.fortran_order:
                return load_npz(path.read_bytes(), value_range)
            return _uint8_npz(path, archive, files, x_header, y_header, value_range)
        folders = read_folders(archive, files, limits, processing.classes)
        x = stacked(decoded_images(archive, folders, limits, processing), len(folders.labels))
    return Dataset(x=Pixels(x, value_range), y=folders.labels, source_dtype="uint8",
                   sha256=_file_sha256(path),
                   classes=folders.classes, classes_declared=processing.classes is not None)


def _uint8_npz(path: Path, archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], x_header: _NpyHeader,
               y_header: _NpyHeader, value_range: tuple[float, float]) -> Dataset:
    """x as uint8 Pixels: memory-mapped when the member is stored uncompressed (numpy.savez, and
    every processed image zip), read in chunks otherwise."""
    y = np.frombuffer(read_member(archive, y_header.info, y_header.offset), y_header.dtype)
    _check_labels(y)
    t_info = next((info for info in files if info.filename == "t.npy"), None)
    t = None
    if t_info is not None:
        t_header = _npy_header(archive, t_info)
        t = np.frombuffer(read_member(archive, t_info, t_header.offset), t_header.dtype)
        check_targets(t, y)
        t = t.astype(np.int64)
    info = x_header.info
    if info.compress_type == zipfile.ZIP_STORED:
        with path.open("rb") as handle:
            handle.seek(info.header_offset + 26)
            name_size, extra_size = np.frombuffer(handle.read(4), "<u2")
        start = info.header_offset + 30 + int(name_size) + int(extra_size) + x_header.offset
        raw: np.ndarray = np.memmap(path, np.uint8, "r", offset=start, shape=x_header.shape)
    else:
        raw = np.empty(x_header.shape, np.uint8)
        flat, at = raw.reshape(-1), 0
        for chunk in member_chunks(archive, info, x_header.offset):
            flat[at : at + len(chunk)] = np.frombuffer(chunk, np.uint8)
            at += len(chunk)
    if raw.ndim == 3:  # [N, H, W]: one channel
        raw = raw[:, None]
    return Dataset(x=Pixels(raw, value_range), y=y.astype(np.int64), source_dtype="uint8", t=t,
                   sha256=_file_sha256(path), classes=_stored_classes(archive, files))


def _stored_classes(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo]) -> list[str] | None:
    """The class names a processed image zip's .npz keeps (image_folders.write_npz), if any."""
    info = next((i for i in files if i.filename == "classes.npy"), None)
    if info is None:
        return None
    header = _npy_header(archive, info)
    if header.dtype != np.uint8:
        raise DatasetError("'classes' must hold the class names as UTF-8 bytes, one per line")
    try:
        return read_member(archive, info, header.offset).decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise DatasetError("'classes' is not UTF-8 text") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_kind(files: list[zipfile.ZipInfo]) -> str:
    if not files:
        raise DatasetError(f"the archive holds no files; {NOT_A_DATASET}")
    if all("/" not in i.filename and i.filename.endswith(".npy") for i in files):
        return "npz"
    if is_image_folder_zip(files):
        return "image-zip"
    stray = next(i.filename for i in files if i.filename.count("/") != 1)
    if stray.count("/") > 1:
        raise DatasetError(
            f"archive member {quoted(stray)} is nested too deeply: images sit in class "
            "folders at the top of the archive (classname/image.png); zip the contents of "
            "the dataset folder (cd dataset && zip -r ../dataset.zip .)"
        )
    raise DatasetError(f"archive member {quoted(stray)} does not fit either layout; {NOT_A_DATASET}")


@dataclass
class _NpyHeader:
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the data starts in the member
    fortran_order: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyHeader:
    name = quoted(info.filename)
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
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
    header = _NpyHeader(info, tuple(shape), dtype, offset, bool(fortran_order))
    if any(d < 0 for d in shape) or info.file_size != offset + header.nbytes:
        raise DatasetError(
            f"archive member {name} holds {info.file_size - offset} bytes of data but its "
            f"header declares {list(shape)} {dtype}; the file is truncated or corrupt: "
            "save it again with numpy.savez"
        )
    return header


def _npz_headers(
    archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: Limits
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
    check_image_size(x.shape[1:])
    return x, y


def _validate_npz(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: Limits) -> DatasetInfo:
    x, y = _npz_headers(archive, files, limits)
    labels = np.frombuffer(read_member(archive, y.info, y.offset), y.dtype)
    num_classes = _check_labels(labels)
    target_classes = None
    t_info = next((info for info in files if info.filename == "t.npy"), None)
    if t_info is not None:
        t = _npy_header(archive, t_info)
        targets = np.frombuffer(read_member(archive, t_info, t.offset), t.dtype)
        try:
            check_targets(targets, labels)
        except DatasetError as exc:
            raise DatasetError(str(exc)) from None
        target_classes = _check_labels(targets)
        num_classes = max(num_classes, target_classes)
    not_finite = 0
    for chunk in member_chunks(archive, x.info, x.offset):  # all of x: its CRC is checked at the end
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
        target_classes=target_classes,
    )


def _check_labels(labels: np.ndarray) -> int:
    """The number of classes (largest label + 1)."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DatasetError(f"labels must be >= 0, found {low}")
    if high >= MAX_CLASSES:
        raise DatasetError(f"labels must be below {MAX_CLASSES}, found {high}")
    return high + 1
