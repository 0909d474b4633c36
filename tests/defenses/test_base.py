"""The common interface: registry and factory, parameter validation, what apply() returns."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.defenses.conftest import make_autoencoder
from workers.defenses import (
    DEFENSES,
    NotDifferentiableError,
    adaptive_model,
    build_defense,
)
from workers.defenses.adaptive import BPDAModel, EOTModel
from workers.onnxgrad import InvalidModelError
from workers.runtime import Classifier

ALL = ["autoencoder", "bit_depth", "downsample", "gaussian_noise", "jpeg", "median", "pca", "uniform_noise"]

# name, params, kind of apply() output range: "box" stays in [0, 1] for inputs in [0, 1]
CASES = [
    ("pca", {"variance": 0.99, "clip": (0.0, 1.0)}, "box"),
    ("pca", {"variance": 0.9}, None),
    ("uniform_noise", {"low": -0.1, "high": 0.1}, None),
    ("uniform_noise", {"low": -0.1, "high": 0.1, "clip": (0.0, 1.0)}, "box"),
    ("gaussian_noise", {"sigma": 0.2, "clip": (0.0, 1.0)}, "box"),
    ("downsample", {"factor": 0.75}, "box"),
    ("downsample", {"factor": 0.5, "mode": "nearest"}, "box"),
    ("bit_depth", {"bits": 1}, "box"),
    ("bit_depth", {"bits": 5}, "box"),
    ("median", {"size": 2}, "box"),
    ("median", {"size": 3}, "box"),
    ("jpeg", {"quality": 75}, "box"),
    ("jpeg", {"quality": 10}, "box"),
    ("autoencoder", {}, None),
]


def make(name: str, params: dict, x_fit: np.ndarray):
    if name == "autoencoder":
        params = {"model": make_autoencoder()}
    defense = build_defense(name, **params)
    defense.fit(x_fit)
    return defense


def test_registry_lists_every_defense():
    assert sorted(DEFENSES) == ALL
    for name, cls in DEFENSES.items():
        assert cls.name == name
        assert not (cls.random and cls.differentiable)
    assert {n for n, c in DEFENSES.items() if c.differentiable} == {"pca", "downsample", "autoencoder"}
    assert {n for n, c in DEFENSES.items() if c.random} == {"uniform_noise", "gaussian_noise"}


@pytest.mark.parametrize(("name", "params", "box"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_apply_keeps_shape_dtype_and_range(name, params, box, test_data, x_fit):
    x = test_data[0][:20]
    defense = make(name, params, x_fit[:300])
    out = defense.apply(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    if box:
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.array_equal(out, x), "the defense changed nothing"
    # float64 and uint8-ish inputs are accepted too
    again = defense.apply(x.astype(np.float64), np.random.default_rng(0))
    np.testing.assert_allclose(again, out, atol=1e-6)


@pytest.mark.parametrize(("name", "params", "box"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_apply_is_deterministic_given_the_rng(name, params, box, test_data, x_fit):
    x = test_data[0][:10]
    defense = make(name, params, x_fit[:300])
    first = defense.apply(x, np.random.default_rng(7))
    np.testing.assert_array_equal(defense.apply(x, np.random.default_rng(7)), first)
    other = defense.apply(x, np.random.default_rng(8))
    assert np.array_equal(other, first) != defense.random  # only a random defense changes with the seed


@pytest.mark.parametrize("name", ["uniform_noise", "gaussian_noise"])
def test_random_defenses_need_an_rng(name):
    defense = build_defense(name, **({"sigma": 0.1} if name == "gaussian_noise" else {"low": 0, "high": 1}))
    with pytest.raises(ValueError, match="is random: pass `rng`"):
        defense.apply(np.zeros((1, 1, 4, 4), np.float32))


@pytest.mark.parametrize(("name", "params", "message"), [
    ("pca", {"variance": 0}, r"`variance` must be a finite number in \(0, 1\], got 0"),
    ("pca", {"variance": 1.5}, r"`variance` must be a finite number in \(0, 1\]"),
    ("pca", {"variance": float("nan")}, r"`variance` must be a finite number"),
    ("pca", {"solver": "svd"}, r"`solver` must be one of auto, covariance, gram, randomized, got 'svd'"),
    ("pca", {"clip": (1, 0)}, r"`clip` must be \(low, high\) with low < high, got \(1, 0\)"),
    ("uniform_noise", {"low": 0.2, "high": 0.1}, r"`low` must be below `high`, got low=0.2, high=0.1"),
    ("uniform_noise", {"low": "a", "high": 0.1}, r"`low` must be a finite number, got 'a'"),
    ("gaussian_noise", {"sigma": 0}, r"`sigma` must be a finite number in \(0, inf\), got 0"),
    ("gaussian_noise", {"sigma": -1.0}, r"`sigma` must be a finite number in \(0, inf\)"),
    ("gaussian_noise", {"sigma": 0.1, "clip": [0.0]}, r"`clip` must be \(low, high\)"),
    ("downsample", {"factor": 1}, r"`factor` must be a finite number in \(0, 1\), got 1"),
    ("downsample", {"factor": 0}, r"`factor` must be a finite number in \(0, 1\)"),
    ("downsample", {"mode": "cubic"}, r"`mode` must be one of linear, nearest, got 'cubic'"),
    ("bit_depth", {"bits": 0}, r"`bits` must be an integer in \[1, 8\], got 0"),
    ("bit_depth", {"bits": 9}, r"`bits` must be an integer in \[1, 8\]"),
    ("bit_depth", {"bits": 2.5}, r"`bits` must be an integer in \[1, 8\], got 2.5"),
    ("bit_depth", {"bits": True}, r"`bits` must be an integer"),
    ("bit_depth", {"bits": 4, "bounds": (0, 0)}, r"`bounds` must be \(low, high\) with low < high"),
    ("median", {"size": 4}, r"`size` must be 2 or 3 \(the window's side in pixels\), got 4"),
    ("median", {"size": "3"}, r"`size` must be an integer"),
    ("jpeg", {"quality": 0}, r"`quality` must be an integer in \[1, 95\], got 0"),
    ("jpeg", {"quality": 96}, r"`quality` must be an integer in \[1, 95\], got 96"),
])
def test_parameters_are_validated_with_their_name(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_defense(name, **params)


def test_build_defense_names_unknown_defenses_and_parameters():
    with pytest.raises(ValueError, match=r"unknown defense 'thermometer'; known defenses: "
                                         r"autoencoder, bit_depth, downsample, .*uniform_noise"):
        build_defense("thermometer")
    with pytest.raises(ValueError, match=r"defense 'gaussian_noise' has no parameter 'std'; "
                                         r"its parameters: sigma, clip"):
        build_defense("gaussian_noise", std=0.1)
    with pytest.raises(ValueError, match=r"defense 'uniform_noise' needs parameter 'low', 'high'"):
        build_defense("uniform_noise")
    with pytest.raises(ValueError, match=r"defense 'autoencoder' needs parameter 'model'"):
        build_defense("autoencoder")
    with pytest.raises(InvalidModelError, match="not a valid ONNX protobuf"):
        build_defense("autoencoder", model=b"not onnx")


def test_parameters_are_kept_for_reports():
    defense = build_defense("downsample", factor=0.75, mode="nearest")
    assert defense.params == {"factor": 0.75, "mode": "nearest"}
    assert repr(defense) == "Downsample(factor=0.75, mode='nearest')"


@pytest.mark.parametrize(("name", "params", "advice"), [
    ("bit_depth", {"bits": 3}, "BPDAModel"),
    ("median", {"size": 2}, "BPDAModel"),
    ("jpeg", {"quality": 50}, "BPDAModel"),
    ("uniform_noise", {"low": -0.1, "high": 0.1}, "EOTModel"),
    ("gaussian_noise", {"sigma": 0.1}, "EOTModel"),
])
def test_non_differentiable_defenses_refuse_compose_and_bpda_is_the_identity(
        name, params, advice, model_bytes, classifier, test_data):
    defense = build_defense(name, **params)
    with pytest.raises(NotDifferentiableError, match=advice):
        defense.compose(model_bytes)
    approximation = defense.bpda(model_bytes)
    assert approximation.SerializeToString() == onnx.load_from_string(model_bytes).SerializeToString()
    attack_model = adaptive_model(model_bytes, defense, samples=2)
    assert isinstance(attack_model, EOTModel if defense.random else BPDAModel)


def test_differentiable_defenses_attack_through_the_composed_graph(model_bytes, x_fit):
    defense = build_defense("pca", variance=0.9)
    defense.fit(x_fit)
    attack_model = adaptive_model(model_bytes, defense)
    assert isinstance(attack_model, Classifier)
    assert defense.bpda(model_bytes).SerializeToString() == defense.compose(model_bytes).SerializeToString()


def test_image_defenses_need_nchw():
    for name, params in [("downsample", {}), ("median", {}), ("jpeg", {})]:
        with pytest.raises(ValueError, match=r"inputs must be NCHW \[N, C, H, W\], got shape \[2, 28, 28\]"):
            build_defense(name, **params).apply(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"1 \(grayscale\) or 3 \(RGB\) channels, got shape \[2, 2, 8, 8\]"):
        build_defense("jpeg").apply(np.zeros((2, 2, 8, 8), np.float32))
