"""Zips of image class folders (``classname/image.png``), as torchvision's ImageFolder reads them:
classes sorted by name give labels 0..K-1. An upload may declare ``classes`` instead, the model's
class names in output order: each folder's label is then its name's position there, so a zip
holding images of only some classes is labelled as the model counts (folder positions would
not be).

Images are PNG or JPEG, told from their content. A zip of PNGs that all have one size and mode
(8-bit grayscale "L" or "RGB") is stored as uploaded. Anything else is processed once, at
upload, as declared there (:class:`ImageProcessing`, torchvision's eval transforms): ``color``
converts every image ("rgb" is ImageFolder's own loader), ``resize`` scales the shorter side
to n pixels (or to exactly HxW) with bilinear filtering, ``center_crop`` cuts the centre. The
result is written, one image at a time, as a uint8 .npz (x [N, C, H, W], y [N]): memory stays
at one decoded image however many there are, and workers read pixels without decoding again.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from workers.dataset_archive import Limits, read_member
from workers.datasets import DatasetError
from workers.errors import TooLargeError, first_lines, quoted

MODES = {"L": 1, "RGB": 3}  # mode -> channels, as stored
COLORS = {"rgb": "RGB", "grayscale": "L"}
CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La"}  # 8-bit modes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
MAX_SIDE = 8192  # of a declared resize or crop
MAX_CLASS_NAMES = 100_000  # in a declared ``classes``
SKIPPED = ("__MACOSX/",)  # folders that macOS's Finder adds to every zip
SKIPPED_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the same upload gives the same bytes, hence the same sha256


@dataclass(frozen=True)
class ImageProcessing:
    """What an upload declares to make images of any size into one labelled dataset."""

    resize: int | tuple[int, int] | None = None  # int: the shorter side (aspect kept); (H, W): exact
    center_crop: tuple[int, int] | None = None  # (H, W)
    color: str | None = None  # "rgb" or "grayscale"
    classes: tuple[str, ...] | None = None  # the model's class names in output order: folder labels

    @property
    def declared(self) -> bool:
        return (self.resize is not None or self.center_crop is not None or self.color is not None
                or self.classes is not None)

    def as_dict(self) -> dict:
        """As the dataset record keeps it (``classes`` only where declared: older records lack it)."""
        record = {"resize": _listed(self.resize), "center_crop": _listed(self.center_crop),
                  "color": self.color}
        return record if self.classes is None else {**record, "classes": list(self.classes)}

    @classmethod
    def parse(cls, resize: str | int | None = None, center_crop: str | int | None = None,
              color: str | None = None, classes: str | list[str] | None = None) -> ImageProcessing:
        """From an upload's form fields: sizes "224" or "224x256" (HxW); ``classes`` one name per
        line (or comma-separated on one line); raises DatasetError."""
        if color is not None and color not in COLORS:
            raise DatasetError(f"color must be one of {', '.join(COLORS)}, got {quoted(str(color))}")
        crop = _size("center_crop", center_crop)
        return cls(resize=_size("resize", resize, shorter_side=True),
                   center_crop=(crop, crop) if isinstance(crop, int) else crop, color=color,
                   classes=class_names(classes))


def class_names(declared: str | list[str] | None) -> tuple[str, ...] | None:
    """A declared class list: a list, or text with one name per line (or "a,b,c" on one line)."""
    if declared is None or (isinstance(declared, str) and not declared.strip()):
        return None
    if isinstance(declared, str):
        declared = declared.splitlines() if "\n" in declared.strip() else declared.split(",")
    names = [name.strip() for name in declared if name.strip()]
    if not names or len(names) > MAX_CLASS_NAMES:
        raise DatasetError(f"classes must name from 1 to {MAX_CLASS_NAMES} classes, got {len(names)}")
    bad = next((name for name in names if "/" in name or "\\" in name), None)
    if bad is not None:
        raise DatasetError(f"classes: {quoted(bad)} is not a folder name; name each class as its folder "
                           "is named, one per line in the model's output order")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetError(f"classes names {quoted(repeated[0])} more than once; each output of the model "
                           "is one class")
    return tuple(names)


def class_list_mismatch(classes: int, model_classes: int, declared: bool) -> str | None:
    """Why an image zip's labels, positions among its ``classes`` (declared, or its folders
    sorted), cannot be the model's classes (the counts differ), or None."""
    if classes == model_classes:
        return None
    if declared:
        return (f"classes names {classes} classes but the model has {model_classes} outputs; name every "
                "output of the model, in order, one per line")
    return (f"the dataset's zip has {classes} class folders and the model {model_classes} classes: "
            "without a declared class list a folder's label is its position in sorted order (as "
            "torchvision's ImageFolder), which is the model's class only when every class has a folder; "
            "upload the zip with classes, the model's class names in output order, one per line "
            "(robustness submit|evaluate --classes FILE)")


NO_PROCESSING = ImageProcessing()


def _listed(size: int | tuple[int, int] | None) -> int | list[int] | None:
    return list(size) if isinstance(size, tuple) else size


_SIZE = re.compile(r"^\s*(\d{1,5})\s*(?:[xX,]\s*(\d{1,5})\s*)?$")


def _size(name: str, value: str | int | None, shorter_side: bool = False) -> int | tuple[int, int] | None:
    if value is None or value == "":
        return None
    match = _SIZE.match(str(value))
    sides = [int(s) for s in match.groups() if s is not None] if match else []
    if not sides or not all(1 <= s <= MAX_SIDE for s in sides):
        shape = "N (the shorter side) or HxW" if shorter_side else "N (a square) or HxW"
        raise DatasetError(f"{name} must be {shape} with sides from 1 to {MAX_SIDE} pixels, "
                           f"got {quoted(str(value))}; e.g. resize=256 center_crop=224 for ImageNet")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def is_image_folder_zip(files: list[zipfile.ZipInfo]) -> bool:
    return all(i.filename.count("/") == 1 for i in image_members(files))


def image_members(files: list[zipfile.ZipInfo]) -> list[zipfile.ZipInfo]:
    """The members that can be images: not macOS's or Windows's bookkeeping files."""
    return [i for i in files if not i.filename.startswith(SKIPPED)
            and i.filename.rsplit("/", 1)[-1] not in SKIPPED_NAMES
            and not i.filename.rsplit("/", 1)[-1].startswith("._")]


@dataclass
class FolderImages:
    """A zip of class folders, read: the images are decoded one at a time by :meth:`pixels`."""

    files: list[zipfile.ZipInfo]  # in label order, then by name
    classes: list[str]
    labels: np.ndarray  # int64 [N]
    formats: dict[str, int]  # "png" / "jpeg" -> how many

    def needs_processing(self, processing: ImageProcessing) -> bool:
        return processing.declared or self.formats.get("jpeg", 0) > 0


def read_folders(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], limits: Limits,
                 declared: tuple[str, ...] | None = None) -> FolderImages:
    """The class folders' members, each checked to be a PNG or JPEG from its first bytes, labelled
    by the folder's position among the ``declared`` classes, or among the folders sorted."""
    files = image_members(files)
    if not files:
        raise DatasetError("the archive holds no images; zip folders of PNG or JPEG images named "
                           "after their class (classname/image.png)")
    if len(files) > limits.max_samples:
        raise TooLargeError(f"the archive holds {len(files)} images, over the limit of {limits.max_samples}")
    files = sorted(files, key=lambda i: i.filename.split("/"))
    folders = sorted({i.filename.split("/")[0] for i in files})
    classes = folders if declared is None else list(declared)
    label = {name: k for k, name in enumerate(classes)}
    unknown = [name for name in folders if name not in label]
    if unknown:
        shown = ", ".join(quoted(name, 60) for name in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DatasetError(f"{len(unknown)} class folder(s) ({shown}) are not among the {len(classes)} "
                           "declared classes; name each folder exactly as its class in classes")
    formats: dict[str, int] = {}
    for info in files:
        kind = _format(_head(archive, info), info.filename)
        formats[kind] = formats.get(kind, 0) + 1
    labels = np.array([label[i.filename.split("/")[0]] for i in files], np.int64)
    return FolderImages(files, classes, labels, formats)


def _head(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as member:
            return member.read(min(info.file_size, 32))
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise DatasetError(
            f"archive member {quoted(info.filename)} is corrupt ({first_lines(exc)}); re-create the archive"
        ) from None


def _format(head: bytes, name: str) -> str:
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    raise DatasetError(f"archive member {quoted(name)} is neither a PNG nor a JPEG image; a zip dataset "
                       "holds only class folders of images (classname/image.png)")


def decoded_images(archive: zipfile.ZipFile, folders: FolderImages, limits: Limits,
                   processing: ImageProcessing = NO_PROCESSING) -> Iterator[np.ndarray]:
    """Each image as uint8 [C, H, W], processed; all have one shape (or DatasetError says why).
    Each image's shape is known from its header before it is decoded: the first is checked against
    the decoded-size budget, the others against the first."""
    first: tuple[str, tuple, tuple] | None = None
    for info in folders.files:
        with _open_image(read_member(archive, info), info.filename) as image:
            source = (image.mode, *image.size)
            shape = _planned_shape(image, processing, info.filename)
            if first is None:
                _check_budget(len(folders.files), shape, limits, processing)
                first = (info.filename, source, shape)
            elif shape != first[2]:
                raise DatasetError(_mismatch(info.filename, source, shape, first, processing))
            pixels = _pixels(_processed(image, processing, info.filename), info.filename)
        yield pixels


def _check_budget(count: int, shape: tuple[int, ...], limits: Limits, processing: ImageProcessing) -> None:
    channels, height, width = shape
    decoded = count * (channels * height * width + 8)
    if decoded > limits.max_decoded_bytes:
        what = "processed " if processing.declared else ""
        raise TooLargeError(
            f"{count} {what}images of {width}x{height} {'RGB' if channels == 3 else 'L'} take {decoded} "
            f"bytes once decoded, over the limit of {limits.max_decoded_bytes} bytes; upload fewer or "
            "smaller images" + (", or declare a smaller resize / center_crop" if processing.declared else ""))


def _mismatch(name: str, source: tuple, shape: tuple, first: tuple, processing: ImageProcessing) -> str:
    first_name, first_source, first_shape = first
    if processing.declared:
        return (f"{quoted(name)} ({source[1]}x{source[2]} {source[0]}) becomes {_shown(shape)} but "
                f"{quoted(first_name)} ({first_source[1]}x{first_source[2]} {first_source[0]}) becomes "
                f"{_shown(first_shape)}; declare center_crop (e.g. 224) so that every image ends the same "
                "size" + ("" if processing.color else ", and color=rgb to give every image 3 channels"))
    return (f"{quoted(name)} is {source[1]}x{source[2]} {source[0]} but {quoted(first_name)} is "
            f"{first_source[1]}x{first_source[2]} {first_source[0]}; all images must have the same size and "
            "mode: declare resize / center_crop (and color=rgb) at upload, or resize and convert them")


def _shown(shape: tuple[int, ...]) -> str:
    channels, height, width = shape
    return f"{width}x{height} {'RGB' if channels == 3 else 'L'}"


_IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    struct.error,
    Image.DecompressionBombError,
)


def _open_image(data: bytes, name: str) -> Image.Image:
    """The image, opened lazily (only its header is read) once its size is within limits."""
    kind = _format(data[:8], name)
    if kind == "png":  # before Pillow, which only warns below twice the limit
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise DatasetError(f"{quoted(name)} is not a readable PNG image (no IHDR header)")
        _check_pixels(name, *struct.unpack_from(">2I", data, 16))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below
            image = Image.open(io.BytesIO(data), formats=["PNG" if kind == "png" else "JPEG"])
    except _IMAGE_ERRORS as exc:
        # Pillow names its in-memory buffer, an address that says nothing to the user
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", first_lines(exc))
        raise DatasetError(f"{quoted(name)} is not a readable {kind.upper()} image ({reason}); save it again "
                           "with an image editor or Pillow, or leave it out of the zip") from None
    try:
        _check_pixels(name, *image.size)
    except TooLargeError:
        image.close()
        raise
    return image


def _check_pixels(name: str, width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise TooLargeError(f"{quoted(name)} is {width}x{height} pixels, over the limit of {limit} "
                            "pixels per image")


def _planned_shape(image: Image.Image, processing: ImageProcessing, name: str) -> tuple[int, int, int]:
    """The [C, H, W] that ``image`` becomes, from its header alone; refused where its mode cannot be
    converted, its resize passes MAX_SIDE or its crop does not fit."""
    width, height = _resized_size(image.size, processing)
    if max(width, height) > MAX_SIDE:
        raise TooLargeError(
            f"{quoted(name)} is {image.width}x{image.height} and resize={processing.resize} (its shorter "
            f"side) makes it {width}x{height}, over the limit of {MAX_SIDE} pixels a side; declare a smaller "
            "resize, or an exact size (resize=HxW)")
    if processing.center_crop is not None:
        crop_height, crop_width = processing.center_crop
        if crop_height > height or crop_width > width:
            raise DatasetError(
                f"{quoted(name)} is {width}x{height} (after resize) and center_crop "
                f"{crop_width}x{crop_height} does not fit in it; declare a resize at least as large as "
                "the crop (resize=256 center_crop=224)")
        width, height = crop_width, crop_height
    return _channels(image, processing, name), height, width


def _channels(image: Image.Image, processing: ImageProcessing, name: str) -> int:
    if processing.color is not None:
        if image.mode not in CONVERTIBLE:
            raise DatasetError(f"{quoted(name)} has mode {image.mode}; only 8-bit images can be converted: "
                               "save it with 8 bits per channel")
        return MODES[COLORS[processing.color]]
    if image.mode not in MODES:
        raise DatasetError(
            f"{quoted(name)} has mode {image.mode}; only 8-bit grayscale (L) and RGB images are accepted "
            "as they are: declare color=rgb (or grayscale) at upload to convert every image, or convert "
            "it, e.g. Image.open(p).convert('RGB').save(p)")
    return MODES[image.mode]


def _resized_size(size: tuple[int, int], processing: ImageProcessing) -> tuple[int, int]:
    """(width, height) after the declared resize."""
    if processing.resize is None:
        return size
    if isinstance(processing.resize, tuple):
        return processing.resize[1], processing.resize[0]
    width, height = size  # torchvision's Resize(n): the shorter side to n
    short, long = sorted((width, height))
    new_short, new_long = processing.resize, int(processing.resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _processed(image: Image.Image, processing: ImageProcessing, name: str) -> Image.Image:
    """``image`` converted, resized and cropped as declared (torchvision's eval transforms, PIL path),
    once ``_planned_shape`` has checked what it becomes."""
    if processing.color is not None:
        image = _loaded(image, name).convert(COLORS[processing.color])
    size = _resized_size(image.size, processing)
    if size != image.size:
        image = _loaded(image, name).resize(size, Image.Resampling.BILINEAR)
    if processing.center_crop is not None:
        crop_height, crop_width = processing.center_crop
        width, height = image.size
        top = int(round((height - crop_height) / 2.0))  # as torchvision's center_crop rounds
        left = int(round((width - crop_width) / 2.0))
        image = _loaded(image, name).crop((left, top, left + crop_width, top + crop_height))
    return image


def _loaded(image: Image.Image, name: str) -> Image.Image:
    try:
        image.load()
    except _IMAGE_ERRORS as exc:
        raise DatasetError(f"{quoted(name)} is not a readable {image.format or ''} image "
                           f"({first_lines(exc)})".replace("  ", " ")) from None
    return image


def _pixels(image: Image.Image, name: str) -> np.ndarray:
    """[C, H, W] uint8."""
    array = np.asarray(_loaded(image, name), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def write_npz(out: Path, images: Iterator[np.ndarray], labels: np.ndarray,
              classes: Sequence[str] | None = None) -> list[int]:
    """Stream ``images`` (uint8 [C, H, W], one shape) into ``out`` as an .npz with x [N, C, H, W]
    and y [N], stored uncompressed with fixed timestamps; returns one image's shape. The
    ``classes`` the labels index (declared, or the folders sorted) are kept in it too
    (``classes``: their names, one per line, as UTF-8 bytes), so that its sha256, which names
    the stored dataset, covers what its labels mean, and reports can name them."""
    count = len(labels)
    shape: list[int] = []
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(zipfile.ZipInfo("x.npy", _FIXED_TIME), "w", force_zip64=True) as member:
            for n, pixels in enumerate(images):
                if n == 0:
                    shape = [int(s) for s in pixels.shape]
                    np.lib.format.write_array_header_1_0(
                        member, {"descr": "|u1", "fortran_order": False, "shape": (count, *shape)})
                member.write(np.ascontiguousarray(pixels).tobytes())
        with archive.open(zipfile.ZipInfo("y.npy", _FIXED_TIME), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, labels.astype(np.int64), allow_pickle=False)
        if classes is not None:
            text = np.frombuffer("\n".join(classes).encode("utf-8"), np.uint8)
            with archive.open(zipfile.ZipInfo("classes.npy", _FIXED_TIME), "w") as member:
                np.lib.format.write_array(member, text, allow_pickle=False)
    return shape


def stacked(images: Iterator[np.ndarray], count: int) -> np.ndarray:
    """The images as one uint8 [N, C, H, W] array, filled as they are decoded."""
    x: np.ndarray | None = None
    for n, pixels in enumerate(images):
        if x is None:
            x = np.empty((count, *pixels.shape), np.uint8)
        x[n] = pixels
    assert x is not None
    return x

