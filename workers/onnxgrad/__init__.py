"""ONNX -> gradient ONNX: reverse-mode differentiation into standard operators.

    from workers.onnxgrad import build_gradient_model, UnsupportedOperatorError
    grad_model = build_gradient_model(model, loss="cross_entropy")
"""

from .autodiff import REGISTRY
from .build import build_gradient_model, build_vjp_model
from .errors import (
    GradientBuildError,
    InvalidModelError,
    UnsupportedNode,
    UnsupportedOperatorError,
)
from .losses import LOSSES
from .prepare import PreparedClassifier, prepare_classifier


def supported_op_types() -> list[str]:
    """Operators with a gradient rule (refused ones excluded)."""
    return sorted(op for op, rule in REGISTRY.items() if rule.refusal is None)


__all__ = [
    "LOSSES",
    "GradientBuildError",
    "InvalidModelError",
    "PreparedClassifier",
    "UnsupportedNode",
    "UnsupportedOperatorError",
    "build_gradient_model",
    "build_vjp_model",
    "prepare_classifier",
    "supported_op_types",
]
