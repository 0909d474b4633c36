"""Loading .npz datasets: what is accepted, converted and refused (and that refusal reads nothing)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from workers.datasets import DatasetError, load_npz
from workers.layout import LayoutError, image_nchw, model_layout


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_float_nchw_is_loaded_as_is():
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    data = load_npz(npz(x=x, y=np.arange(5)))
    np.testing.assert_array_equal(data.x, x)
    assert data.y.dtype == np.int64 and data.source_dtype == "float32"


def test_uint8_is_scaled_into_the_declared_range():
    x = np.array([[[[0, 255], [51, 102]]]], np.uint8)
    data = load_npz(npz(x=x, y=np.array([3])), value_range=(-1.0, 1.0))
    np.testing.assert_allclose(data.x[0, 0], [[-1.0, 1.0], [-0.6, -0.2]], rtol=1e-6)


def test_three_dimensional_images_get_a_channel_axis():
    data = load_npz(npz(x=np.zeros((4, 6, 6), np.float32), y=np.zeros(4, np.int64)))
    assert data.x.shape == (4, 1, 6, 6)


def test_pickled_objects_are_refused_before_loading():
    payload = np.empty(2, dtype=object)
    payload[:] = [{"a": 1}, [1, 2]]
    with pytest.raises(DatasetError, match="holds Python objects"):
        load_npz(npz(x=payload, y=np.arange(2)))


def test_a_huge_declared_array_is_refused_from_its_header():
    """The header says 10^12 floats; the archive holds none of them. Nothing is allocated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1, 1000, 1000)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", header.getvalue())  # the header alone, no data
        labels = io.BytesIO()
        np.save(labels, np.zeros(1_000_000, np.int64))
        archive.writestr("y.npy", labels.getvalue())
    with pytest.raises(DatasetError, match="GiB; the limit is"):
        load_npz(buffer.getvalue())


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((2, 1, 4, 4), np.float32)}, r"lacks \['y'\]"),
    ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros((2, 1), np.int64)}, "must be 1-D"),
    ({"x": np.zeros((3, 1, 4, 4), np.float32), "y": np.zeros(2, np.int64)}, "N = len"),
    ({"x": np.zeros((2, 4), np.float32), "y": np.zeros(2, np.int64)}, r"\[N, C, H, W\]"),
    ({"x": np.zeros((2, 1, 4, 4), np.int32), "y": np.zeros(2, np.int64)}, "dtype int32"),
    ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2, np.float32)}, "labels must be integers"),
    ({"x": np.full((2, 1, 4, 4), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN or infinite"),
    ({"x": np.full((2, 1, 4, 4), 2.0, np.float32), "y": np.zeros(2, np.int64)}, "declared range"),
    ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.array([0, -1])}, "labels must be >= 0"),
])
def test_bad_arrays_are_refused_with_a_reason(arrays, message):
    with pytest.raises(DatasetError, match=message):
        load_npz(npz(**arrays))


def test_not_a_zip_is_refused():
    with pytest.raises(DatasetError, match="not an .npz archive"):
        load_npz(b"\x93NUMPY but not really")


def test_target_labels_are_read_and_checked():
    x, y = np.zeros((3, 1, 4, 4), np.float32), np.array([0, 1, 2])
    data = load_npz(npz(x=x, y=y, t=np.array([1, 2, 0], np.int32)))
    assert data.t.dtype == np.int64 and list(data.t) == [1, 2, 0]
    assert load_npz(npz(x=x, y=y)).t is None
    with pytest.raises(DatasetError, match="equal the labels 'y' for 1 samples"):
        load_npz(npz(x=x, y=y, t=np.array([1, 1, 0])))
    with pytest.raises(DatasetError, match="shape of 'y'"):
        load_npz(npz(x=x, y=y, t=np.array([1, 2])))
    with pytest.raises(DatasetError, match="must be integers"):
        load_npz(npz(x=x, y=y, t=np.array([1.0, 2.0, 0.0])))
    with pytest.raises(DatasetError, match=">= 0"):
        load_npz(npz(x=x, y=y, t=np.array([-1, 2, 0])))


@pytest.mark.parametrize("model_shape, image, declared, want", [
    (["N", 3, 32, 32], [3, 32, 32], "auto", "NCHW"),
    (["N", 32, 32, 3], [3, 32, 32], "auto", "NHWC"),  # tf2onnx / Keras
    ([1, None, None, 3], [3, 32, 32], "auto", "NHWC"),  # Keras with free spatial axes
    (["N", 1, 28, 28], [1, 28, 28], "NCHW", "NCHW"),
    (["N", None, None, None], [3, 8, 8], "auto", "NCHW"),  # both fit: NCHW ...
    (["N", None, None, None], [3, 8, 8], "NHWC", "NHWC"),  # ... unless declared
    (["N", 784], [784], "auto", "NCHW"),  # not an image: nothing to transpose
])
def test_the_model_layout_is_the_one_the_images_fit(model_shape, image, declared, want):
    assert model_layout(model_shape, image, declared) == want


def test_images_that_fit_no_layout_are_refused_with_a_hint():
    with pytest.raises(LayoutError, match="another order: set input.layout"):
        model_layout(["N", 3, 32, 32], [32, 32, 3], "auto")  # NHWC data declared NCHW
    with pytest.raises(LayoutError, match="which is not NHWC"):
        model_layout(["N", 3, 32, 32], [3, 32, 32], "NHWC")
    with pytest.raises(LayoutError, match=r"\[N, 3, 32, 32\]"):
        model_layout(["N", 3, 32, 32], [1, 28, 28], "auto")
    with pytest.raises(LayoutError, match="flat vectors of 64 values .* Flatten in front"):
        model_layout(["N", 64], [1, 8, 8], "auto")  # a scikit-learn model


def test_a_last_axis_larger_than_the_image_is_not_taken_for_channels():
    """[N, 1, 28, 28] fits 28-channel images [28, 1, 28] as NHWC, but no image is 1 pixel high
    with 28 channels: such data was declared NHWC by mistake."""
    with pytest.raises(LayoutError, match="fit neither"):
        model_layout(["N", 1, 28, 28], [28, 1, 28], "auto")
    assert model_layout(["N", 1, 28, 28], [28, 1, 28], "NHWC") == "NHWC"  # unless declared


def test_nhwc_images_declared_nchw_are_refused_with_the_fix():
    with pytest.raises(LayoutError, match="set input.layout to the dataset's layout, NHWC"):
        image_nchw([28, 28, 1], "NCHW")
    assert image_nchw([28, 28, 1], "NHWC") == [1, 28, 28]
    assert image_nchw([64, 8, 8], "NCHW") == [64, 8, 8]  # feature maps: not image channels last
    assert image_nchw([1, 28, 28], "NCHW") == [1, 28, 28]
