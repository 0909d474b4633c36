"""PCA: the share of variance kept, Gram-matrix path against the covariance path, projection
properties, fitting on one set and applying to another."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA as SklearnPCA

from workers.defenses import build_defense
from workers.defenses import pca as pca_module


def fitted(x: np.ndarray, **params):
    defense = build_defense("pca", **params)
    defense.fit(x)
    return defense


def projector(defense) -> np.ndarray:
    u = defense.components.astype(np.float64)
    return u @ u.T


@pytest.mark.parametrize("variance", [0.5, 0.9, 0.99, 1.0])
def test_keeps_at_least_the_requested_variance_with_the_fewest_components(variance, x_fit):
    defense = fitted(x_fit, variance=variance)
    assert defense.explained_variance_ratio >= variance - 1e-9
    flat = x_fit.reshape(len(x_fit), -1).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    kept = np.linalg.norm(centred @ defense.components.astype(np.float64)) ** 2 / np.linalg.norm(centred) ** 2
    assert kept == pytest.approx(defense.explained_variance_ratio, abs=1e-5)
    if variance < 1.0:  # one component fewer would not be enough
        fewer = defense.components[:, :-1].astype(np.float64)
        assert np.linalg.norm(centred @ fewer) ** 2 / np.linalg.norm(centred) ** 2 < variance
    # the upsampled 8x8 digits span at most 64 dimensions of the 784
    assert defense.n_components <= 64


def test_agrees_with_scikit_learn(x_fit):
    ours = fitted(x_fit, variance=0.95)
    reference = SklearnPCA(n_components=0.95, svd_solver="full").fit(x_fit.reshape(len(x_fit), -1))
    assert ours.n_components == reference.n_components_
    np.testing.assert_allclose(ours.mean, reference.mean_, atol=1e-5)  # sklearn sums in float32
    u = reference.components_.T.astype(np.float64)
    np.testing.assert_allclose(projector(ours), u @ u.T, atol=1e-4)


@pytest.mark.parametrize(("data", "variance"), [("digits", 0.99), ("digits", 0.9), ("gaussian", 0.8),
                                                ("gaussian", 1.0)])
def test_gram_path_equals_covariance_path(data, variance, x_fit):
    if data == "digits":
        x = x_fit[:300]  # N = 300 < D = 784
    else:
        rng = np.random.default_rng(0)
        x = (rng.standard_normal((60, 2, 10, 10)) * np.linspace(0.1, 2, 200).reshape(2, 10, 10)
             ).astype(np.float32)  # N = 60 < D = 200, full rank 59
    gram = fitted(x, variance=variance, solver="gram")
    covariance = fitted(x, variance=variance, solver="covariance")
    assert fitted(x, variance=variance).solver_used == "gram"  # auto: D > N
    assert gram.n_components == covariance.n_components
    assert gram.explained_variance_ratio == pytest.approx(covariance.explained_variance_ratio, abs=1e-9)
    np.testing.assert_allclose(gram.mean, covariance.mean)
    np.testing.assert_allclose(projector(gram), projector(covariance), atol=1e-5)
    u = gram.components.astype(np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-5)  # orthonormal columns
    np.testing.assert_allclose(gram.apply(x), covariance.apply(x), atol=1e-5)
    if variance == 1.0:  # every direction of the data is kept: the fitting images are reproduced
        assert gram.n_components == len(x) - 1
        np.testing.assert_allclose(gram.apply(x), x, atol=1e-4)


def test_auto_solver_uses_the_covariance_when_images_outnumber_pixels(x_fit):
    assert fitted(x_fit, variance=0.9).solver_used == "covariance"  # N = 1200 > D = 784


def test_projection_is_idempotent(x_fit, test_data):
    defense = fitted(x_fit, variance=0.99)
    once = defense.apply(test_data[0])
    np.testing.assert_allclose(defense.apply(once), once, atol=1e-5)


def test_fit_on_one_part_apply_to_another(x_fit, test_data):
    x = test_data[0]
    defense = fitted(x_fit, variance=0.99)
    projected = defense.apply(x)
    assert projected.shape == x.shape
    # held-out digits are reconstructed nearly as well as the fitting ones
    def residual(images):
        return np.mean((defense.apply(images) - images) ** 2) / np.var(images)
    assert residual(x) < 0.03
    assert residual(x) < 3 * residual(x_fit)
    # the component of x outside the kept subspace is removed
    flat = (projected - x).reshape(len(x), -1).astype(np.float64)
    assert np.abs(flat @ defense.components).max() < 1e-4


def test_clip_keeps_the_projection_in_the_box(x_fit, test_data):
    unclipped = fitted(x_fit, variance=0.9).apply(test_data[0])
    assert unclipped.min() < 0 or unclipped.max() > 1  # the projection leaves the box...
    clipped = fitted(x_fit, variance=0.9, clip=(0.0, 1.0)).apply(test_data[0])
    np.testing.assert_array_equal(clipped, np.clip(unclipped, 0, 1))  # ...unless clipped


def test_refusals(x_fit, monkeypatch):
    defense = build_defense("pca")
    with pytest.raises(ValueError, match=r"call fit\(x_fit\) before apply\(\) or compose\(\)"):
        defense.apply(x_fit[:2])
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        defense.fit(x_fit[:1])
    with pytest.raises(ValueError, match="all identical"):
        defense.fit(np.ones((5, 1, 4, 4), np.float32))
    defense.fit(x_fit[:100])
    with pytest.raises(ValueError, match=r"inputs have shape \[2, 1, 14, 14\]; the PCA was fit on images "
                                         r"of shape \[1, 28, 28\]"):
        defense.apply(np.zeros((2, 1, 14, 14), np.float32))
    monkeypatch.setattr(pca_module, "MAX_EIGEN_SIZE", 500)
    with pytest.raises(ValueError, match=r"the covariance matrix would be 784 x 784 \(x_fit is 1200 images "
                                         r"of 784 values\); at most 500"):
        defense.fit(x_fit)
    with pytest.raises(ValueError, match=r"the gram matrix would be 600 x 600"):
        fitted(x_fit[:600], solver="gram")
