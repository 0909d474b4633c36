"""VJP rules, one per operator; importing this package fills the registry."""

from . import linear, normalization, pointwise, pooling, quantize, reduce, resize, shape  # noqa: F401
