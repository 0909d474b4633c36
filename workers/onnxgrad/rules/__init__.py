"""VJP rules, one per operator; importing this package fills the registry."""

from . import (  # noqa: F401
    einsum,
    linear,
    normalization,
    pointwise,
    pooling,
    quantize,
    reduce,
    resize,
    sampling,
    shape,
    trigonometric,
)
