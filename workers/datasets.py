"""Loading labelled image datasets safely: .npz with ``x``, ``y`` and optionally ``t`` (target
labels for targeted attacks), never with pickle.

Sizes are checked from the archive's headers before anything is allocated, so a file that
declares a huge array is refused without reading it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass

import numpy as np

from workers.errors import UserError

MAX_SAMPLES = 1_000_000
MAX_BYTES = 4 << 30  # decoded size of x and y together


class DatasetError(UserError):
    """The dataset cannot be used; the message says why and how to fix it."""

    type = "invalid_dataset"


class Pixels:
    """uint8 images [N, ...] that read as float32 in a pixel range: indexing, slicing and
    np.asarray give float32 arrays, so a batch becomes float only when it is taken. Row
    selections (``rows``) and transposes stay uint8 views (of a memory-mapped file, often)."""

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)):
        if raw.dtype != np.uint8:
            raise TypeError(f"Pixels holds uint8 images, got {raw.dtype}")
        self.raw = raw
        self.value_range = (float(value_range[0]), float(value_range[1]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.raw.shape

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def size(self) -> int:
        return self.raw.size

    @property
    def nbytes(self) -> int:  # as float32, what the images take once taken
        return 4 * self.raw.size

    def __len__(self) -> int:
        return len(self.raw)

    def floats(self, raw: np.ndarray) -> np.ndarray:
        low, high = self.value_range
        return (raw.astype(np.float32) / 255.0) * (high - low) + low

    def __getitem__(self, key) -> np.ndarray:
        return self.floats(np.asarray(self.raw[key]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        floats = self.floats(np.asarray(self.raw))
        return floats if dtype is None else floats.astype(dtype, copy=False)

    def copy(self) -> np.ndarray:
        return self[:]

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self[:].astype(dtype, copy=False)

    def reshape(self, *shape) -> np.ndarray:
        return self[:].reshape(*shape)

    def rows(self, key) -> Pixels:
        """A selection of images, still uint8."""
        return Pixels(self.raw[key], self.value_range)

    def transpose(self, *axes) -> Pixels:
        return Pixels(self.raw.transpose(*axes), self.value_range)


Images = np.ndarray | Pixels  # float32 images, or uint8 ones that read as float32


@dataclass
class Dataset:
    x: Images  # float32 in the declared pixel range (uint8 images: Pixels), layout as given
    y: np.ndarray  # int64 [N]
    source_dtype: str
    t: np.ndarray | None = None  # int64 [N]: a target class per sample, != y (``targets: dataset``)
    sha256: str | None = None  # the file's, as the API and the CLI show it (None: made in memory)
    classes: list[str] | None = None  # an image zip's: labels are positions in it
    classes_declared: bool = False  # classes came with the upload (else: its folders, sorted)


def _member_headers(archive: zipfile.ZipFile) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    headers = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            try:
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            except ValueError as exc:
                raise DatasetError(f"{info.filename}: unreadable array header ({exc})") from None
        if dtype.hasobject:
            raise DatasetError(f"{info.filename[:-4]!r} holds Python objects; store plain numeric "
                               "arrays (no pickles are ever loaded)")
        headers[info.filename[:-4]] = (tuple(shape), dtype)
    return headers


def load_npz(data: bytes, value_range: tuple[float, float] = (0.0, 1.0)) -> Dataset:
    """Parse an .npz holding ``x`` (N,C,H,W or N,H,W,C; float in ``value_range`` or uint8
    0..255), ``y`` (N,) integer labels and optionally ``t`` (N,) integer target labels."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise DatasetError("the file is not an .npz archive; save it with "
                           "numpy.savez(path, x=images, y=labels)") from None
    with archive:
        headers = _member_headers(archive)
        missing = [k for k in ("x", "y") if k not in headers]
        if missing:
            raise DatasetError(f"the .npz lacks {missing}; it needs arrays 'x' (images) and "
                               f"'y' (labels), found {sorted(headers)}")
        (x_shape, x_dtype), (y_shape, y_dtype) = headers["x"], headers["y"]
        if len(y_shape) != 1:
            raise DatasetError(f"'y' must be 1-D (one label per image), got shape {list(y_shape)}")
        if len(x_shape) not in (3, 4) or x_shape[0] != y_shape[0]:
            raise DatasetError(f"'x' must be [N, C, H, W] or [N, H, W, C] with N = len(y) = "
                               f"{y_shape[0]}, got {list(x_shape)}")
        if x_shape[0] > MAX_SAMPLES:
            raise DatasetError(f"{x_shape[0]} samples exceed the limit of {MAX_SAMPLES}")
        check_image_size(x_shape[1:])
        size = int(np.prod(x_shape)) * x_dtype.itemsize + int(np.prod(y_shape)) * y_dtype.itemsize
        if size > MAX_BYTES:
            raise DatasetError(f"the arrays would take {size / 2**30:.1f} GiB; the limit is "
                               f"{MAX_BYTES / 2**30:.0f} GiB")
        if not (np.issubdtype(x_dtype, np.floating) or x_dtype == np.uint8):
            raise DatasetError(f"'x' has dtype {x_dtype}; use float32 in the declared range or uint8")
        if not np.issubdtype(y_dtype, np.integer):
            raise DatasetError(f"'y' has dtype {y_dtype}; labels must be integers")
        if "t" in headers:
            t_shape, t_dtype = headers["t"]
            if t_shape != y_shape or not np.issubdtype(t_dtype, np.integer):
                raise DatasetError(f"'t' (target labels) must be integers of the shape of 'y' "
                                   f"{list(y_shape)}, got {t_dtype} {list(t_shape)}")
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
            t = arrays["t"] if "t" in headers else None
    if len(x_shape) == 3:  # [N, H, W]: one channel
        x = x[:, None]
    low, high = value_range
    if x.dtype == np.uint8:
        x = (x.astype(np.float32) / 255.0) * (high - low) + low
    else:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DatasetError(f"'x' holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
        if x.size and (x.min() < low - 1e-6 or x.max() > high + 1e-6):
            raise DatasetError(f"'x' values span [{x.min():.4g}, {x.max():.4g}] but the declared "
                               f"range is [{low}, {high}]; set input.range or rescale the data")
    if y.size and y.min() < 0:
        raise DatasetError(f"labels must be >= 0, found {int(y.min())}")
    if t is not None:
        check_targets(t, y)
        t = t.astype(np.int64)
    return Dataset(x=x, y=y.astype(np.int64), source_dtype=str(x_dtype), t=t,
                   sha256=hashlib.sha256(data).hexdigest())


def check_image_size(image_shape: tuple[int, ...]) -> None:
    """Images of no pixel pass every shape check but fail inside the model (a pooling, a
    reshape), so they are refused with the file."""
    if 0 in image_shape:
        raise DatasetError(f"'x' holds images of shape {list(image_shape)}, with a dimension of size 0; "
                           "each image needs at least one channel, row and column")


def check_targets(t: np.ndarray, y: np.ndarray) -> None:
    """Target labels are classes >= 0, each different from its sample's label."""
    if t.size and t.min() < 0:
        raise DatasetError(f"target labels 't' must be >= 0, found {int(t.min())}")
    same = np.flatnonzero(t == y)
    if len(same):
        raise DatasetError(f"target labels 't' equal the labels 'y' for {len(same)} samples (first: index "
                           f"{int(same[0])}); a target must be another class")
