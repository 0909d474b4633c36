"""Loading .npz datasets: what is accepted, converted and refused (and that refusal reads nothing)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from workers.datasets import DatasetError, check_against_model, load_npz


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


def test_dataset_is_checked_against_the_model():
    data = load_npz(npz(x=np.zeros((2, 1, 28, 28), np.float32), y=np.array([0, 12])))
    with pytest.raises(DatasetError, match="the model has 10 classes"):
        check_against_model(data, ("N", 1, 28, 28), 10, "NCHW")
    with pytest.raises(DatasetError, match="expects"):
        check_against_model(data, ("N", 3, 32, 32), 20, "NCHW")
