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

At 224x224 (D = 150,528) the images are never held as one float64 matrix: every pass reads them
in blocks (uint8 datasets stay uint8, workers.datasets.Pixels) and the N x N or D x D matrix
is summed block by block. ``solver="randomized"`` (Halko, Martinsson and Tropp 2011, algorithm
4.4) finds at most ``components`` components from a sketch of components + 10 random
directions refined by two power iterations, in 5 + 2 passes over the images and
O(N D (components + 10)) time: the choice when N is too large for an N x N eigendecomposition
or only the leading components matter. Its variance shares are exact: the total is summed too.

Arguments: ``variance`` in (0, 1], the share of variance kept (Liang et al.: 0.99; the fewest
components reaching it are kept); ``components`` an upper bound on the number kept (required by
"randomized"; the variance kept is then reported, and may fall short of ``variance``);
``solver`` "auto" (randomized when ``components`` is given and much smaller than N and D, else
Gram when D > N, else covariance), "covariance", "gram" or "randomized"; ``clip`` (low, high)
clips the projection into the pixel range, None (default, as in Liang et al.) leaves it
unclipped, which keeps the stage linear and idempotent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np
import onnx
from onnx import numpy_helper

from workers.attacks.base import check, check_positive
from workers.datasets import Images, Pixels
from workers.onnxgrad import weights
from workers.onnxgrad.external import inline_limit

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

SOLVERS = ("auto", "covariance", "gram", "randomized")
MAX_EIGEN_SIZE = 10_000  # eigendecomposition of at most 10,000 x 10,000 (Gram: images, covariance: pixels)
OVERSAMPLING = 10  # extra random directions of the randomized sketch
POWER_ITERATIONS = 2
BLOCK_BYTES = 128 << 20  # float64 working block of a streamed pass
_RELATIVE_RANK_TOLERANCE = 1e-10  # eigenvalues below this share of the largest count as zero


@register_defense
class PCA(Defense):
    """x -> mean + U U^T (x - mean) with the leading principal components of ``fit``'s images."""

    name = "pca"
    differentiable = True
    fitted = True

    def __init__(self, *, variance: float = 0.99, solver: str = "auto", components: int | None = None,
                 clip: tuple[float, float] | None = None):
        self.variance = check_number("variance", variance, low=0.0, high=1.0, low_open=True)
        check(solver in SOLVERS, f"`solver` must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if components is not None:
            check_positive("components", components, integer=True)
        check(solver != "randomized" or components is not None,
              "pca: solver 'randomized' needs `components`, the most components to find (e.g. 500)")
        self.solver = solver
        self.max_components = None if components is None else int(components)
        self.clip = None if clip is None else check_bounds("clip", clip)
        self.params = {"variance": self.variance, "solver": solver, "components": self.max_components,
                       "clip": self.clip}
        self.mean: np.ndarray | None = None  # float32 [D]
        self.components: np.ndarray | None = None  # float32 [D, k], orthonormal columns
        self.explained_variance_ratio: float | None = None  # share of the fit variance kept
        self.image_shape: tuple[int, ...] | None = None  # x_fit.shape[1:]
        self.solver_used: str | None = None

    @property
    def n_components(self) -> int | None:
        return None if self.components is None else int(self.components.shape[1])

    def fit(self, x_fit: Images) -> None:
        """Fit on images [N, ...]: float32, or uint8 Pixels read block by block."""
        check(len(x_fit) >= 2, f"pca.fit: `x_fit` needs at least 2 images, got {len(x_fit)}")
        images = _FlatImages(x_fit)
        n, d = images.n, images.d
        solver = self._solver(n, d)
        size = (n if solver == "gram" else d if solver == "covariance"
                else min(n, d, (self.max_components or 0) + OVERSAMPLING))
        check(size <= MAX_EIGEN_SIZE,
              f"pca.fit: the {solver} matrix would be {size} x {size} (x_fit is {n} images of {d} "
              f"values); at most {MAX_EIGEN_SIZE}: fit on fewer images"
              + (" or use solver='gram'" if solver == "covariance" and n < d else "")
              + (", or give `components` to use solver='randomized'" if solver == "gram" else ""))
        total = images.total_variance()
        check(total > 0, "pca.fit: the images of `x_fit` are all identical; there is no variance to keep")
        if solver == "randomized":
            eigenvalues, components_of = _randomized(images, size)
        elif solver == "gram":
            eigenvalues, vectors = _descending(*np.linalg.eigh(images.gram()))
            components_of = partial(images.right_vectors, vectors, eigenvalues)
        else:
            eigenvalues, vectors = _descending(*np.linalg.eigh(images.covariance()))
            components_of = partial(_leading, vectors, eigenvalues)
        rank = int(np.sum(eigenvalues > _RELATIVE_RANK_TOLERANCE * eigenvalues[0]))
        shares = np.cumsum(eigenvalues[:rank]) / total
        k = min(int(np.searchsorted(shares, self.variance - 1e-9)) + 1, rank, self.max_components or rank)
        components, kept = components_of(k)
        self.mean = images.mean.astype(np.float32)
        self.components = np.ascontiguousarray(components, np.float32)
        self.explained_variance_ratio = kept / total
        self.image_shape = tuple(int(s) for s in x_fit.shape[1:])
        self.solver_used = solver

    def _solver(self, n: int, d: int) -> str:
        if self.solver != "auto":
            return self.solver
        if self.max_components is not None and 2 * (self.max_components + OVERSAMPLING) <= min(n, d):
            return "randomized"
        return "gram" if d > n else "covariance"

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
        initializers = [numpy_helper.from_array(v, p + k) for k, v in constants.items() if k != "components"]
        if model.ByteSize() + self.components.nbytes > inline_limit():  # 224x224, thousands of components
            initializers.append(weights.write_outside(self.components, p + "components"))
        else:
            initializers.append(numpy_helper.from_array(self.components, p + "components"))
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


class _FlatImages:
    """Images [N, ...] as the rows of an N x D matrix, centred, read in float64 blocks of rows or
    of columns (pixels) that fit in BLOCK_BYTES."""

    def __init__(self, x: Images):
        self.x = x
        self.n, self.d = len(x), math.prod(x.shape[1:])
        self._flat = (Pixels(x.raw.reshape(self.n, self.d), x.value_range) if isinstance(x, Pixels)
                      else as_images(x, "pca.fit").reshape(self.n, self.d))
        total = np.zeros(self.d)
        for rows in self.row_blocks(centred=False):
            total += rows.sum(axis=0)
        self.mean = total / self.n

    def row_blocks(self, centred: bool = True):
        step = max(1, BLOCK_BYTES // (8 * self.d))
        for start in range(0, self.n, step):
            rows = np.asarray(self._flat[start:start + step], np.float64)
            yield rows - self.mean if centred else rows

    def column_blocks(self):
        """(pixel slice, centred columns [N, c]) pairs."""
        step = max(1, BLOCK_BYTES // (8 * self.n))
        for start in range(0, self.d, step):
            where = slice(start, min(start + step, self.d))
            yield where, np.asarray(self._flat[:, where], np.float64) - self.mean[where]

    def total_variance(self) -> float:
        return float(sum(np.einsum("ij,ij->", rows, rows) for rows in self.row_blocks()))

    def gram(self) -> np.ndarray:
        """X X^T [N, N]."""
        gram = np.zeros((self.n, self.n))
        for _, columns in self.column_blocks():
            gram += columns @ columns.T
        return gram

    def covariance(self) -> np.ndarray:
        """X^T X [D, D] (unnormalised)."""
        covariance = np.zeros((self.d, self.d))
        for rows in self.row_blocks():
            covariance += rows.T @ rows
        return covariance

    def right_vectors(self, left: np.ndarray, eigenvalues: np.ndarray, k: int) -> tuple[np.ndarray, float]:
        """X^T left[:, :k] / sqrt(eigenvalues[:k]) [D, k]: unit eigenvectors of X^T X from those
        of X X^T (or orthonormal vectors from a sketch's Q^T X X^T Q, with ``left`` = Q W), and
        the variance the images have along them, ||X V||^2, summed in the same pass."""
        out = np.empty((self.d, k), np.float32)
        scale = 1.0 / np.sqrt(eigenvalues[:k])
        along = np.zeros((self.n, k))
        for where, columns in self.column_blocks():
            block = (columns.T @ left[:, :k]) * scale
            out[where] = block
            along += columns @ block
        return out, float(np.einsum("ij,ij->", along, along))

    def times(self, matrix_of: Callable[[slice], np.ndarray], width: int) -> np.ndarray:
        """X M [N, width], M given block by block of its D rows."""
        out = np.zeros((self.n, width))
        for where, columns in self.column_blocks():
            out += columns @ matrix_of(where)
        return out


def _leading(vectors: np.ndarray, eigenvalues: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    return vectors[:, :k], float(np.sum(eigenvalues[:k]))


def _descending(eigenvalues: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(eigenvalues)[::-1]
    return eigenvalues[order], vectors[:, order]


def _randomized(images: _FlatImages, sketch: int
                ) -> tuple[np.ndarray, Callable[[int], tuple[np.ndarray, float]]]:
    """Eigenvalues of X^T X on the range of a randomized sketch (Halko et al. algorithm 4.4), and
    a function giving the first k approximate eigenvectors [D, k] with the variance along them.
    Seeded: the same images give the same fit."""
    def gaussian(where: slice) -> np.ndarray:  # D x l, drawn block by block, never held whole
        return np.random.default_rng((0, where.start)).standard_normal((where.stop - where.start, sketch))

    sample = images.times(gaussian, sketch)
    for _ in range(POWER_ITERATIONS):
        basis = np.linalg.qr(sample)[0]
        sample = np.zeros_like(sample)
        for _, columns in images.column_blocks():
            sample += columns @ (columns.T @ basis)
    basis = np.linalg.qr(sample)[0]  # N x l, orthonormal: X's leading column space
    projected = np.zeros((sketch, sketch))  # Q^T X X^T Q
    for _, columns in images.column_blocks():
        block = basis.T @ columns
        projected += block @ block.T
    eigenvalues, vectors = _descending(*np.linalg.eigh(projected))
    eigenvalues = np.maximum(eigenvalues, 0.0)
    return eigenvalues, lambda k: images.right_vectors(basis @ vectors, eigenvalues, k)
