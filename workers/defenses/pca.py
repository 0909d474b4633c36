"""PCA projection: keep the principal components that hold a share of the clean data's variance.

Liang et al. ("Deep adversarial robustness", section 5) fit PCA on 10,000 held-out images,
keep the components that capture 99% of the variance and project each test image onto them
and back into image space before the classifier: x -> mean + U U^T (x - mean), U [D, k]
orthonormal. The projection is linear, so the defended model f(P x) keeps exact gradients
(J = U U^T) and an adaptive attacker simply differentiates through it.

``fit(x_fit)`` flattens x_fit [N, ...] to [N, D]. When D > N (images larger than the fitting
set) the eigenvectors come from the N x N Gram matrix X X^T instead of the D x D covariance
X^T X / (N - 1) (Liang et al.'s equation 1): X^T X (X^T v) = (X^T v) λ, so u = X^T v / sqrt(λ)
is a unit eigenvector of the covariance with eigenvalue λ / (N - 1).

Arguments: ``variance`` in (0, 1], the share of variance kept (Liang et al.: 0.99; the fewest
components reaching it are kept); ``solver`` "auto" (Gram when D > N), "covariance" or "gram";
``clip`` (low, high) clips the projection into the pixel range, None (default, as in Liang et
al.) leaves it unclipped, which keeps the stage linear and idempotent.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from workers.attacks.base import check

from .base import (
    Defense,
    as_images,
    check_bounds,
    check_number,
    input_dims,
    node,
    prepend_stage,
    register_defense,
    stage_model,
    unique_prefix,
)

SOLVERS = ("auto", "covariance", "gram")
MAX_EIGEN_SIZE = 10_000  # eigendecomposition of at most 10,000 x 10,000 (Gram: images, covariance: pixels)
_RELATIVE_RANK_TOLERANCE = 1e-10  # eigenvalues below this share of the largest count as zero


@register_defense
class PCA(Defense):
    """x -> mean + U U^T (x - mean) with the leading principal components of ``fit``'s images."""

    name = "pca"
    differentiable = True
    fitted = True

    def __init__(self, *, variance: float = 0.99, solver: str = "auto",
                 clip: tuple[float, float] | None = None):
        self.variance = check_number("variance", variance, low=0.0, high=1.0, low_open=True)
        check(solver in SOLVERS, f"`solver` must be one of {', '.join(SOLVERS)}, got {solver!r}")
        self.solver = solver
        self.clip = None if clip is None else check_bounds("clip", clip)
        self.params = {"variance": self.variance, "solver": solver, "clip": self.clip}
        self.mean: np.ndarray | None = None  # float32 [D]
        self.components: np.ndarray | None = None  # float32 [D, k], orthonormal columns
        self.explained_variance_ratio: float | None = None  # share of the fit variance kept
        self.image_shape: tuple[int, ...] | None = None  # x_fit.shape[1:]
        self.solver_used: str | None = None

    @property
    def n_components(self) -> int | None:
        return None if self.components is None else int(self.components.shape[1])

    def fit(self, x_fit: np.ndarray) -> None:
        x_fit = as_images(x_fit, "pca.fit")
        n = len(x_fit)
        check(n >= 2, f"pca.fit: `x_fit` needs at least 2 images, got {n}")
        flat = x_fit.reshape(n, -1).astype(np.float64)
        d = flat.shape[1]
        solver = self.solver if self.solver != "auto" else ("gram" if d > n else "covariance")
        size = n if solver == "gram" else d
        check(size <= MAX_EIGEN_SIZE,
              f"pca.fit: the {solver} matrix would be {size} x {size} (x_fit is {n} images of {d} "
              f"values); at most {MAX_EIGEN_SIZE}: fit on fewer images"
              + (" or use solver='gram'" if solver == "covariance" and n < d else ""))
        mean = flat.mean(axis=0)
        centred = flat - mean
        if solver == "gram":
            eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
        else:
            eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, vectors = eigenvalues[order], vectors[:, order]
        total = float(np.einsum("ij,ij->", centred, centred))  # trace: the same for both solvers
        check(total > 0, "pca.fit: the images of `x_fit` are all identical; there is no variance to keep")
        rank = int(np.sum(eigenvalues > _RELATIVE_RANK_TOLERANCE * eigenvalues[0]))
        shares = np.cumsum(eigenvalues[:rank]) / total
        k = min(int(np.searchsorted(shares, self.variance - 1e-9)) + 1, rank)
        if solver == "gram":
            components = centred.T @ vectors[:, :k] / np.sqrt(eigenvalues[:k])
        else:
            components = vectors[:, :k]
        self.mean = mean.astype(np.float32)
        self.components = np.ascontiguousarray(components, np.float32)
        self.explained_variance_ratio = float(shares[k - 1])
        self.image_shape = tuple(int(s) for s in x_fit.shape[1:])
        self.solver_used = solver

    def _fitted(self) -> None:
        check(self.components is not None, "pca: call fit(x_fit) before apply() or compose()")

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        self._fitted()
        assert self.mean is not None and self.components is not None and self.image_shape is not None
        x = as_images(x, "pca")
        check(x.shape[1:] == self.image_shape,
              f"pca: inputs have shape {list(x.shape)}; the PCA was fit on images of shape "
              f"{list(self.image_shape)}")
        flat = x.reshape(len(x), -1)
        # the same float32 operations, in the same order, as the ONNX stage
        projected = ((flat - self.mean) @ self.components) @ self.components.T + self.mean
        if self.clip is not None:
            projected = np.clip(projected, *self.clip)
        return projected.astype(np.float32, copy=False).reshape(x.shape)

    def compose(self, model: onnx.ModelProto | bytes) -> onnx.ModelProto:
        """Reshape -> Sub(mean) -> MatMul(U) -> Gemm(U, transB=1), i.e. MatMul(U^T) -> Add(mean)
        [-> Clip] -> Reshape."""
        self._fitted()
        assert self.mean is not None and self.components is not None and self.image_shape is not None
        model, x = stage_model(model)
        dims = input_dims(x)[1:]
        check(all(isinstance(d, int) for d in dims) and tuple(dims) == self.image_shape,
              f"pca: the model's input {x.name!r} has shape {input_dims(x)}; the PCA was fit on "
              f"images of shape [N, {', '.join(map(str, self.image_shape))}]")
        p = unique_prefix(model.graph, "defense/pca/")
        d = self.components.shape[0]
        constants = {
            "flat_shape": np.array([-1, d], np.int64),
            "image_shape": np.array([-1, *self.image_shape], np.int64),
            "mean": self.mean,
            "components": self.components,  # stored once: U^T is Gemm's transB
        }
        if self.clip is not None:
            constants["low"] = np.array(self.clip[0], np.float32)
            constants["high"] = np.array(self.clip[1], np.float32)
        initializers = [numpy_helper.from_array(v, p + k) for k, v in constants.items()]
        nodes = [
            node("Reshape", [x.name, p + "flat_shape"], p + "flat", p),
            node("Sub", [p + "flat", p + "mean"], p + "centred", p),
            node("MatMul", [p + "centred", p + "components"], p + "coefficients", p),
            node("Gemm", [p + "coefficients", p + "components"], p + "centred_projection", p, transB=1),
            node("Add", [p + "centred_projection", p + "mean"], p + "projection", p),
        ]
        last = p + "projection"
        if self.clip is not None:
            nodes.append(node("Clip", [last, p + "low", p + "high"], p + "clipped", p))
            last = p + "clipped"
        nodes.append(node("Reshape", [last, p + "image_shape"], p + "output", p))
        return prepend_stage(model, x, nodes, initializers, p + "output")
