"""Zips of PNG and JPEG class folders of any size: processed at upload (color, resize,
center_crop as torchvision's eval transforms do), streamed into a uint8 .npz, and read back by
workers as uint8 that becomes float only when a batch is taken."""

from __future__ import annotations

import hashlib
import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.cli import main
from workers.dataset_files import load_dataset_file, validate_dataset
from workers.datasets import DatasetError, Pixels
from workers.errors import TooLargeError
from workers.image_folders import ImageProcessing, class_list_mismatch

LIMITS = {"max_bytes": 1 << 30, "max_samples": 100_000, "max_decoded_bytes": 1 << 30}
DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits-test.npz"


def encoded(pixels: np.ndarray, format: str, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "L")
    image = image if mode == "L" else image.convert(mode)
    image.save(buffer, format=format, **({"quality": 95} if format == "JPEG" else {}))
    return buffer.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upscaled(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels, "L").resize((width, height), Image.Resampling.NEAREST))


SIZES = [(28, 28), (40, 32), (36, 56), (64, 48), (29, 31)]


def digit_zip(count: int = 30) -> tuple[bytes, dict[str, bytes]]:
    """Digits of several sizes, a mix of JPEG and PNG, in folders named after their class."""
    with np.load(DIGITS) as data:
        x, y = data["x"][:count, 0], data["y"][:count]
    members = {}
    for n, (pixels, label) in enumerate(zip(x, y, strict=True)):
        width, height = SIZES[n % len(SIZES)]
        format = "JPEG" if n % 2 else "PNG"
        members[f"digit{label}/{n:03d}.{format.lower()}"] = encoded(upscaled(pixels, width, height), format)
    return zipped(members), members


def reference(data: bytes, short_side: int, crop: int, color: str) -> np.ndarray:
    """torchvision's Resize(short_side), CenterCrop(crop) on ImageFolder's image, written out."""
    image = Image.open(io.BytesIO(data)).convert(color)
    width, height = image.size
    if width <= height:
        size = (short_side, int(short_side * height / width))
    else:
        size = (int(short_side * width / height), short_side)
    image = image.resize(size, Image.Resampling.BILINEAR)
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    array = np.asarray(image.crop((left, top, left + crop, top + crop)))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def test_jpeg_and_png_of_several_sizes_become_one_uint8_npz(tmp_path):
    data, members = digit_zip()
    upload, out = tmp_path / "upload.zip", tmp_path / "stored.npz"
    upload.write_bytes(data)
    processing = ImageProcessing.parse("28", "24", "rgb")
    info = validate_dataset(upload, processing=processing, out=out, **LIMITS)
    assert (info.format, info.samples, info.shape) == ("image-zip", 30, [3, 24, 24])
    assert info.images == {"png": 15, "jpeg": 15}
    assert info.processing == {"resize": 28, "center_crop": [24, 24], "color": "rgb"}
    classes = sorted({name.split("/")[0] for name in members})
    assert info.classes == classes and info.num_classes == len(classes)
    with np.load(out) as stored:
        x, y = stored["x"], stored["y"]
    assert x.dtype == np.uint8 and x.shape == (30, 3, 24, 24)
    names = sorted(members, key=lambda name: name.split("/"))
    for n, name in enumerate(names):
        np.testing.assert_array_equal(x[n], reference(members[name], 28, 24, "RGB"), err_msg=name)
        assert y[n] == classes.index(name.split("/")[0])
    again = tmp_path / "again.npz"
    validate_dataset(upload, processing=processing, out=again, **LIMITS)
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(out.read_bytes()).digest()


@pytest.mark.parametrize(
    ("size", "resize", "crop", "want_box"),
    [
        ((60, 40), 20, 20, (30, 20, 5, 0)),  # (resized width, height, crop left, top)
        ((40, 60), 20, 20, (20, 30, 0, 5)),
        ((61, 40), 20, 20, (30, 20, 5, 0)),  # int(20 * 61 / 40) = 30
        ((45, 40), 20, 20, (22, 20, 1, 0)),  # round(2 / 2) = 1
        ((47, 40), 20, 20, (23, 20, 2, 0)),  # round(3 / 2) = round(1.5) = 2, as torchvision
    ],
)
def test_resize_keeps_the_aspect_and_the_crop_rounds_as_torchvision(tmp_path, size, resize, crop, want_box):
    pixels = np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8)
    upload, out = tmp_path / "upload.zip", tmp_path / "out.npz"
    upload.write_bytes(zipped({"a/1.png": encoded(pixels, "PNG")}))
    validate_dataset(upload, processing=ImageProcessing.parse(resize, crop), out=out, **LIMITS)
    width, height, left, top = want_box
    resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
    want = np.asarray(resized)[top : top + crop, left : left + crop]
    with np.load(out) as stored:
        np.testing.assert_array_equal(stored["x"][0, 0], want)


def test_an_exact_resize_needs_no_crop(tmp_path):
    upload, out = tmp_path / "upload.zip", tmp_path / "out.npz"
    upload.write_bytes(digit_zip(10)[0])
    info = validate_dataset(upload, processing=ImageProcessing.parse("20x30"), out=out, **LIMITS)
    assert info.shape == [1, 20, 30]


def test_the_stored_npz_is_memory_mapped_and_becomes_float_only_per_batch(tmp_path):
    upload, out = tmp_path / "upload.zip", tmp_path / "out.npz"
    upload.write_bytes(digit_zip()[0])
    validate_dataset(upload, processing=ImageProcessing.parse(28, 28), out=out, **LIMITS)
    dataset = load_dataset_file(out, (-1.0, 1.0))
    assert isinstance(dataset.x, Pixels) and isinstance(dataset.x.raw, np.memmap)
    assert dataset.x.shape == (30, 1, 28, 28) and dataset.x.dtype == np.float32
    with np.load(out) as stored:
        raw = stored["x"]
    batch = dataset.x[4:9]
    assert batch.dtype == np.float32 and batch.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(batch, (raw[4:9].astype(np.float32) / 255.0) * 2.0 - 1.0)
    assert dataset.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    selected = dataset.x.rows(slice(None, 10))
    assert isinstance(selected, Pixels) and selected.raw.dtype == np.uint8 and len(selected) == 10
    np.testing.assert_array_equal(np.asarray(selected), dataset.x[:10])


def test_the_zip_loads_locally_as_the_upload_is_stored(tmp_path):
    upload, out = tmp_path / "upload.zip", tmp_path / "out.npz"
    upload.write_bytes(digit_zip()[0])
    processing = ImageProcessing.parse(28, 28)
    validate_dataset(upload, processing=processing, out=out, **LIMITS)
    local = load_dataset_file(upload, processing=processing)
    stored = load_dataset_file(out)
    np.testing.assert_array_equal(local.x.raw, stored.x.raw)
    np.testing.assert_array_equal(local.y, stored.y)


def test_conversion_memory_does_not_grow_with_the_number_of_images(tmp_path):
    rng = np.random.default_rng(1)
    image = encoded(rng.integers(0, 256, (128, 128), dtype=np.uint8), "JPEG")
    peaks = {}
    for count in (50, 400):
        upload, out = tmp_path / f"{count}.zip", tmp_path / f"{count}.npz"
        upload.write_bytes(zipped({f"c{n % 3}/{n}.jpg": image for n in range(count)}))
        tracemalloc.start()
        validate_dataset(upload, processing=ImageProcessing.parse(color="rgb"), out=out, **LIMITS)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.stat().st_size > count * 3 * 128 * 128
    # 400 RGB images of 128x128 are 19.7 MB decoded; a stacked array would show
    assert peaks[400] < peaks[50] + 2_000_000, peaks


def test_images_that_end_in_different_sizes_are_refused_with_the_crop_hint(tmp_path):
    upload = tmp_path / "upload.zip"
    upload.write_bytes(digit_zip(10)[0])
    with pytest.raises(DatasetError) as error:
        validate_dataset(upload, processing=ImageProcessing.parse(28), out=tmp_path / "out.npz", **LIMITS)
    assert "declare center_crop (e.g. 224) so that every image ends the same size" in str(error.value)
    with pytest.raises(DatasetError, match="declare resize / center_crop"):  # JPEGs without processing
        validate_dataset(upload, **LIMITS)


def test_a_crop_larger_than_the_image_is_refused(tmp_path):
    upload = tmp_path / "upload.zip"
    upload.write_bytes(digit_zip(3)[0])
    with pytest.raises(DatasetError) as error:
        validate_dataset(upload, processing=ImageProcessing.parse(28, 30), **LIMITS)
    assert str(error.value) == (
        "'digit4/000.png' is 28x28 (after resize) and center_crop 30x30 does not fit in it; declare a "
        "resize at least as large as the crop (resize=256 center_crop=224)"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"resize": "0"}, "resize must be N (the shorter side) or HxW with sides from 1 to 8192 pixels, "
                          "got '0'"),
        ({"resize": "big"}, "resize must be N (the shorter side) or HxW"),
        ({"center_crop": "224x"}, "center_crop must be N (a square) or HxW"),
        ({"center_crop": "99999"}, "center_crop must be N (a square) or HxW with sides from 1 to 8192"),
        ({"color": "cmyk"}, "color must be one of rgb, grayscale, got 'cmyk'"),
        ({"classes": "cat\ndog\ncat"}, "classes names 'cat' more than once"),
        ({"classes": "animals/cat,dog"}, "classes: 'animals/cat' is not a folder name"),
        ({"classes": ["\n", " "]}, "classes must name from 1 to 100000 classes, got 0"),
    ],
)
def test_bad_processing_fields_are_refused(fields, message):
    with pytest.raises(DatasetError) as error:
        ImageProcessing.parse(**fields)
    assert str(error.value).startswith(message)


def three_class_zip(folders: list[str]) -> bytes:
    """Two 8x8 PNGs in each folder."""
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    return zipped({f"{folder}/{n}.png": encoded(pixels + n, "PNG") for folder in folders for n in range(2)})


def test_declared_classes_label_each_folder_by_its_place_in_the_model_s_list(tmp_path):
    """A zip of some classes only: folder positions would label bird and dog 0 and 1; the
    declared list labels them as the model counts, and the stored npz keeps those labels."""
    upload, out = tmp_path / "some.zip", tmp_path / "out.npz"
    upload.write_bytes(three_class_zip(["dog", "bird"]))
    folders = load_dataset_file(upload)
    assert (folders.classes, list(folders.y), folders.classes_declared) == (
        ["bird", "dog"], [0, 0, 1, 1], False)
    processing = ImageProcessing.parse(classes="cat\ndog\nfrog\nbird\n")
    info = validate_dataset(upload, out, processing=processing, **LIMITS)
    assert (info.format, info.num_classes, info.classes) == ("image-zip", 4, ["cat", "dog", "frog", "bird"])
    assert info.processing == {"resize": None, "center_crop": None, "color": None,
                               "classes": ["cat", "dog", "frog", "bird"]}
    assert list(load_dataset_file(out).y) == [3, 3, 1, 1]
    local = load_dataset_file(upload, processing=processing)
    assert (list(local.y), local.classes_declared) == ([3, 3, 1, 1], True)
    assert ImageProcessing.parse(classes="cat, dog ,frog,bird").classes == ("cat", "dog", "frog", "bird")
    # the same labels under another class list are another dataset: the file names its classes
    for n, listed in enumerate(("bird,dog", "bird,dog,cat")):
        processing = ImageProcessing.parse(classes=listed)
        validate_dataset(upload, tmp_path / f"{n}.npz", processing=processing, **LIMITS)
        with np.load(tmp_path / f"{n}.npz") as stored:
            assert list(stored["y"]) == [0, 0, 1, 1]
            assert bytes(stored["classes"]).decode() == listed.replace(",", "\n")
    assert (tmp_path / "0.npz").read_bytes() != (tmp_path / "1.npz").read_bytes()


def test_a_folder_missing_from_the_declared_classes_is_refused(tmp_path):
    upload = tmp_path / "some.zip"
    upload.write_bytes(three_class_zip(["dog", "Bird"]))
    with pytest.raises(DatasetError) as error:
        validate_dataset(upload, tmp_path / "out.npz", processing=ImageProcessing.parse(classes="bird,dog"),
                         **LIMITS)
    assert str(error.value) == ("1 class folder(s) ('Bird') are not among the 2 declared classes; name each "
                                "folder exactly as its class in classes")


def test_robustness_evaluate_refuses_folder_labels_that_miss_classes_and_takes_the_list(tmp_path, capsys):
    members = {name: data for name, data in digit_zip(40)[1].items() if name.startswith(("digit2", "digit5"))}
    upload, spec, classes = tmp_path / "some.zip", tmp_path / "spec.yaml", tmp_path / "classes.txt"
    upload.write_bytes(zipped(members))
    spec.write_text("samples: all\nattacks:\n  - {name: fgsm, eps: 0.05}\n")
    classes.write_text("".join(f"digit{k}\n" for k in range(10)))
    model = DIGITS.parent / "digits-cnn.onnx"
    command = ["evaluate", str(model), str(upload), "--spec", str(spec), "--resize", "28",
               "--center-crop", "28", "--color", "grayscale", "--out", str(tmp_path / "out.json")]
    assert main(command) == 2
    assert "the dataset's zip has 2 class folders and the model 10 classes" in capsys.readouterr().err
    assert main(command + ["--classes", str(classes)]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["clean_accuracy"] >= 0.9  # labelled 0 and 1 (folder positions) it would be near 0


@pytest.mark.parametrize(("classes", "model_classes", "declared", "message"), [
    (4, 4, False, None),
    (2, 4, False, "the dataset's zip has 2 class folders and the model 4 classes: without a declared class "
                  "list a folder's label is its position in sorted order"),
    (5, 4, True, "classes names 5 classes but the model has 4 outputs"),
])
def test_labels_from_a_class_list_are_refused_where_it_does_not_count_the_model_s_classes(
        classes, model_classes, declared, message):
    found = class_list_mismatch(classes, model_classes, declared)
    assert found is None if message is None else found.startswith(message)


def test_processing_an_npz_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="an .npz is used as it is"):
        validate_dataset(DIGITS, processing=ImageProcessing.parse(28), **LIMITS)


def test_cmyk_jpegs_need_a_color_and_convert_with_one(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (20, 20), dtype=np.uint8)
    upload, out = tmp_path / "upload.zip", tmp_path / "out.npz"
    upload.write_bytes(zipped({"a/1.jpg": encoded(pixels, "JPEG", "CMYK"),
                               "a/2.jpg": encoded(pixels, "JPEG")}))
    with pytest.raises(DatasetError, match="'a/1.jpg' has mode CMYK; .* declare color=rgb"):
        validate_dataset(upload, **LIMITS)
    converted = validate_dataset(upload, processing=ImageProcessing.parse(color="rgb"), out=out, **LIMITS)
    assert converted.shape == [3, 20, 20]


def test_macos_bookkeeping_files_are_skipped(tmp_path):
    data, members = digit_zip(4)
    upload = tmp_path / "upload.zip"
    upload.write_bytes(zipped({**members, "__MACOSX/digit0/._000.png": b"\x00\x05\x16\x07",
                               "digit0/.DS_Store": b"\x00\x00\x00\x01Bud1"}))
    info = validate_dataset(upload, processing=ImageProcessing.parse(28, 28), out=tmp_path / "o.npz",
                            **LIMITS)
    assert info.samples == 4


def test_the_processed_size_counts_against_the_decoded_budget(tmp_path):
    upload = tmp_path / "upload.zip"
    upload.write_bytes(digit_zip(10)[0])
    with pytest.raises(TooLargeError) as error:
        validate_dataset(upload, processing=ImageProcessing.parse(64, 64, "rgb"),
                         **{**LIMITS, "max_decoded_bytes": 100_000})
    assert str(error.value) == (
        "10 processed images of 64x64 RGB take 122960 bytes once decoded, over the limit of 100000 bytes; "
        "upload fewer or smaller images, or declare a smaller resize / center_crop"
    )


def tall_zip(height: int, count: int = 2) -> bytes:
    return zipped({f"a/{n}.png": encoded(np.zeros((height, 1), np.uint8), "PNG") for n in range(count)})


@pytest.mark.parametrize("height", [24, 300_000])
def test_a_shorter_side_resize_past_the_side_limit_is_refused_before_decoding(tmp_path, height):
    """resize=8192 makes a 1x24 image 8192x196608 (4.8 GB were allocated before a 413) and a
    1x300000 one too large for Pillow (a 500): each is refused from its header."""
    upload = tmp_path / "tall.zip"
    upload.write_bytes(tall_zip(height))
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError) as error:
            validate_dataset(upload, processing=ImageProcessing.parse(8192), out=tmp_path / "o.npz", **LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value) == (
        f"'a/0.png' is 1x{height} and resize=8192 (its shorter side) makes it 8192x{8192 * height}, over the "
        "limit of 8192 pixels a side; declare a smaller resize, or an exact size (resize=HxW)")
    assert peak < 8 << 20, peak


def test_the_decoded_budget_is_checked_before_an_image_is_resized(tmp_path):
    upload = tmp_path / "upload.zip"
    upload.write_bytes(tall_zip(24, count=3))
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError, match="3 processed images of 8000x8000 L take 192000024 bytes"):
            validate_dataset(upload, processing=ImageProcessing.parse("8000x8000"),
                             **{**LIMITS, "max_decoded_bytes": 1 << 20})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # one 8000x8000 image would be 64 MB


def test_robustness_evaluate_exits_2_for_a_resize_past_the_side_limit(tmp_path, capsys):
    upload, spec = tmp_path / "tall.zip", tmp_path / "spec.yaml"
    upload.write_bytes(tall_zip(300_000))
    spec.write_text("samples: all\nattacks:\n  - {name: fgsm, eps: 0.05}\n")
    command = ["evaluate", str(DIGITS.parent / "digits-cnn.onnx"), str(upload), "--spec", str(spec),
               "--resize", "8192", "--out", str(tmp_path / "out.json")]
    assert main(command) == 2
    assert "over the limit of 8192 pixels a side; declare a smaller resize" in capsys.readouterr().err
