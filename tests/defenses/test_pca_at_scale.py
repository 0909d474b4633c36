"""PCA at large input dimensions (Liang et al.: 224x224x3 = 150,528 values, thousands of
components), reduced for CI: passes over the images in blocks, uint8 images read as such, and a
randomized SVD, each checked against numpy's SVD in float64."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from workers.datasets import Pixels
from workers.defenses import build_defense
from workers.defenses import pca as pca_module

SHAPE = (3, 48, 48)  # D = 6,912 > N


def spectrum_images(n: int = 300, rank: int = 60, seed: int = 0, gap_at: int | None = None) -> np.ndarray:
    """Images with a decaying spectrum (as natural images have) plus a little noise, in [0, 1];
    with ``gap_at`` the components from that one on are 10 times weaker, and the noise too."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    scales = 3.0 * 0.9 ** np.arange(rank)
    if gap_at is not None:
        scales[gap_at:] /= 10
    noise = 0.001 if gap_at is None else 1e-5
    x = 0.5 + 0.02 * (rng.standard_normal((n, rank)) * scales) @ basis.T + noise * rng.standard_normal((n, d))
    return np.clip(x, 0, 1).astype(np.float32).reshape(n, *SHAPE)


def numpy_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, right singular vectors [D, r], variance shares) of the centred images, in float64."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    return flat.mean(axis=0), vt.T, np.cumsum(singular**2) / np.sum(singular**2)


def projection_gap(components: np.ndarray, reference: np.ndarray) -> float:
    """Spectral norm of the difference of the two orthogonal projectors: sin of the largest
    principal angle between the subspaces."""
    ours, theirs = (np.linalg.qr(u.astype(np.float64))[0] for u in (components, reference))
    assert ours.shape == theirs.shape
    cosines = np.linalg.svd(ours.T @ theirs, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - cosines.min() ** 2)))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows / columns, so that every pass really is split."""
    monkeypatch.setattr(pca_module, "BLOCK_BYTES", 64 * 8 * 300)


@pytest.mark.parametrize("variance", [0.9, 0.99])
def test_the_streamed_gram_path_equals_numpy_svd(variance, small_blocks):
    x = spectrum_images()
    defense = build_defense("pca", variance=variance)
    defense.fit(x)
    mean, vectors, shares = numpy_svd(x)
    k = int(np.searchsorted(shares, variance - 1e-9)) + 1
    assert defense.solver_used == "gram" and defense.n_components == k
    assert defense.explained_variance_ratio == pytest.approx(shares[k - 1], abs=1e-9)
    np.testing.assert_allclose(defense.mean, mean, atol=1e-6)
    assert projection_gap(defense.components, vectors[:, :k]) < 1e-4


def test_the_randomized_svd_keeps_nearly_the_most_variance_possible(small_blocks):
    x = spectrum_images()  # a slow decay (0.9 per component): no gap after the 20th
    defense = build_defense("pca", variance=0.999, components=20)
    defense.fit(x)
    assert defense.solver_used == "randomized" and defense.n_components == 20
    _, _, shares = numpy_svd(x)
    flat = x.reshape(len(x), -1).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    kept = np.linalg.norm(centred @ defense.components.astype(np.float64)) ** 2 / np.linalg.norm(centred) ** 2
    assert kept == pytest.approx(defense.explained_variance_ratio, rel=1e-5)  # the share it reports is true
    assert shares[19] * (1 - 2e-3) < kept <= shares[19] + 1e-9  # the best 20 components keep shares[19]


def test_the_randomized_svd_finds_the_leading_subspace(small_blocks):
    x = spectrum_images(gap_at=20)
    defense = build_defense("pca", variance=0.999, components=20)
    defense.fit(x)
    _, vectors, shares = numpy_svd(x)
    assert defense.explained_variance_ratio == pytest.approx(shares[19], rel=1e-3)
    assert projection_gap(defense.components, vectors[:, :20]) < 1e-3
    u = defense.components.astype(np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(20), atol=1e-5)
    gram = build_defense("pca", variance=0.999, components=20, solver="gram")
    gram.fit(x)
    assert gram.n_components == 20 and projection_gap(gram.components, vectors[:, :20]) < 1e-4
    again = build_defense("pca", variance=0.999, components=20)
    again.fit(x)
    np.testing.assert_array_equal(again.components, defense.components)  # seeded


def test_the_randomized_svd_stops_at_the_variance_asked(small_blocks):
    x = spectrum_images()
    defense = build_defense("pca", variance=0.5, components=40, solver="randomized")
    defense.fit(x)
    _, _, shares = numpy_svd(x)
    assert defense.n_components == int(np.searchsorted(shares, 0.5)) + 1 < 40


def test_uint8_images_fit_as_their_floats_without_a_float64_copy(small_blocks):
    rng = np.random.default_rng(1)
    raw = (spectrum_images(n=600) * 255).round().astype(np.uint8)
    raw[:, :, :4] = rng.integers(0, 256, raw[:, :, :4].shape, dtype=np.uint8)
    pixels = Pixels(raw, (0.0, 1.0))
    floats = build_defense("pca", variance=0.95)
    floats.fit(np.asarray(pixels))
    tracemalloc.start()
    streamed = build_defense("pca", variance=0.95)
    streamed.fit(pixels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert streamed.n_components == floats.n_components
    np.testing.assert_allclose(streamed.mean, floats.mean, atol=1e-6)
    np.testing.assert_array_equal(streamed.components, floats.components)
    whole = raw.size * 8  # the images as one float64 matrix: 33 MB
    assert peak - streamed.components.nbytes < whole / 4, (peak, streamed.components.nbytes, whole)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"solver": "randomized"}, "solver 'randomized' needs `components`"),
        ({"components": 0}, "`components` must be a positive integer, got 0"),
        ({"components": 2.5}, "`components` must be a positive integer, got 2.5"),
    ],
)
def test_bad_component_settings_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        build_defense("pca", **params)


def test_a_gram_too_large_points_to_the_randomized_solver(monkeypatch):
    monkeypatch.setattr(pca_module, "MAX_EIGEN_SIZE", 100)
    x = spectrum_images(n=150)
    with pytest.raises(ValueError, match="give `components` to use solver='randomized'"):
        build_defense("pca").fit(x)
    defense = build_defense("pca", components=30)
    defense.fit(x)
    assert defense.solver_used == "randomized"


def test_a_projection_that_would_pass_2_gib_is_kept_outside_the_composed_model(monkeypatch, tmp_path):
    """At 224x224 the kept components (5,964 x 150,528 float32: 3.6 GB) cannot sit in one
    protobuf; past the inline limit (lowered here) they go to a file of the weights folder named
    by their sha256, and the composed model's logits and gradients are unchanged."""
    from tests.defenses.conftest import EXAMPLES
    from workers.onnxgrad import weights
    from workers.runtime import Classifier

    model = (EXAMPLES / "digits-cnn.onnx").read_bytes()
    x = spectrum_images(200, seed=3)[:, :1, :28, :28]
    defense = build_defense("pca", components=40)
    defense.fit(x)
    inside = defense.compose(model)
    monkeypatch.setenv("ROBUSTNESS_INLINE_MODEL_BYTES", str(len(model) + 1000))
    monkeypatch.setattr(weights, "_folder", tmp_path.resolve())
    outside = defense.compose(model)
    kept = [t for t in outside.graph.initializer if weights.is_external(t)]
    assert [t.name for t in kept] == ["defense/pca/components"]
    stored = tmp_path / weights.locations(outside)[0]
    assert stored.read_bytes() == defense.components.astype(np.float32).tobytes()
    assert outside.ByteSize() < inside.ByteSize() - defense.components.nbytes // 2
    ours, theirs = Classifier(outside), Classifier(inside)
    labels = np.arange(16) % 10
    np.testing.assert_allclose(ours.logits(x[:16]), theirs.logits(x[:16]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.loss_and_grad(x[:16], labels, "cross_entropy")[2],
                               theirs.loss_and_grad(x[:16], labels, "cross_entropy")[2], rtol=1e-4, atol=1e-6)
