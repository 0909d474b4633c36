"""Bit depth, median filter and JPEG: values against hand-made references."""

from __future__ import annotations

import numpy as np
import pytest

from workers.defenses import build_defense


def test_bit_depth_rounds_to_two_to_the_bits_levels():
    x = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 1, 1, 101)
    one_bit = build_defense("bit_depth", bits=1).apply(x)
    np.testing.assert_array_equal(one_bit, (x > 0.5).astype(np.float32))  # np.rint(0.5) == 0
    three = build_defense("bit_depth", bits=3).apply(x)
    np.testing.assert_allclose(three, np.rint(x * 7) / 7, atol=1e-7)
    assert len(np.unique(three)) == 8


def test_bit_depth_works_in_the_declared_range():
    x = np.arange(256, dtype=np.float32).reshape(1, 1, 16, 16)
    assert np.array_equal(build_defense("bit_depth", bits=8, bounds=(0, 255)).apply(x), x)
    signed = build_defense("bit_depth", bits=2, bounds=(-1.0, 1.0)).apply(x / 127.5 - 1)
    np.testing.assert_allclose(np.unique(signed), [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
    outside = build_defense("bit_depth", bits=2).apply(np.array([[[[-0.5, 1.5]]]], np.float32))
    np.testing.assert_array_equal(outside, [[[[0.0, 1.0]]]])


def _median_reference(x: np.ndarray, size: int) -> np.ndarray:
    """Window [i - size // 2, i - size // 2 + size) with mirrored edges (scipy's 'reflect'), and
    the value of rank size*size // 2 (the upper middle one for an even window)."""
    n, c, h, w = x.shape
    before = size // 2
    padded = np.pad(x, ((0, 0), (0, 0), (before, size - 1 - before), (before, size - 1 - before)),
                    mode="symmetric")
    windows = np.stack([padded[:, :, i:i + h, j:j + w] for i in range(size) for j in range(size)])
    return np.sort(windows, axis=0)[size * size // 2]


@pytest.mark.parametrize("size", [2, 3])
def test_median_filter_matches_a_reference(size):
    x = np.random.default_rng(0).random((3, 2, 9, 7)).astype(np.float32)
    out = build_defense("median", size=size).apply(x)
    np.testing.assert_array_equal(out, _median_reference(x, size))


def test_median_filter_removes_an_isolated_spike_and_keeps_channels_apart():
    x = np.zeros((1, 2, 7, 7), np.float32)
    x[0, 0, 3, 3] = 1.0
    x[0, 1] = 0.5
    out = build_defense("median", size=3).apply(x)
    assert not out[0, 0].any()
    assert np.all(out[0, 1] == 0.5)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_round_trip_loses_more_at_low_quality(channels):
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.random((4, channels, 32, 32)), axis=2), axis=3)
    x = (smooth / smooth.max(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
    high = build_defense("jpeg", quality=95).apply(x)
    low = build_defense("jpeg", quality=5).apply(x)
    err_high, err_low = np.abs(high - x).mean(), np.abs(low - x).mean()
    assert err_high < 0.01 < err_low
    np.testing.assert_allclose(high * 255, np.rint(high * 255), atol=1e-4)  # decoded 8-bit values


def test_jpeg_maps_the_declared_range_to_bytes():
    x = np.random.default_rng(1).random((2, 3, 16, 16)).astype(np.float32)
    unit = build_defense("jpeg", quality=50).apply(x)
    scaled = build_defense("jpeg", quality=50, bounds=(0, 255)).apply(x * 255)
    np.testing.assert_allclose(scaled, unit * 255, atol=1e-3)
