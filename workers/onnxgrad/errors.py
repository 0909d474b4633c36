"""Errors raised while turning a forward ONNX graph into its gradient graph."""

from __future__ import annotations

from dataclasses import dataclass

from workers.errors import UserError


class GradientBuildError(UserError):
    """Base class: the model cannot be differentiated as given."""

    type = "invalid_model"


class InvalidModelError(GradientBuildError):
    """The bytes or graph are not a classifier this service can use (says what and how to fix)."""


@dataclass(frozen=True)
class UnsupportedNode:
    op_type: str
    node_name: str
    reason: str = "no gradient rule for this operator"
    # the rule needs sizes that shape inference left unknown (batch_probe.py may find them)
    needs_shapes: bool = False

    def describe(self) -> str:
        return f"{self.op_type} (node {self.node_name!r}): {self.reason}"


class UnsupportedOperatorError(GradientBuildError):
    """Operators on the path from the image input to the logits have no gradient rule.

    ``nodes`` lists every offending node; ``op_types`` the distinct operator types.
    """

    def __init__(self, nodes: list[UnsupportedNode]):
        self.nodes = list(nodes)
        self.op_types = sorted({n.op_type for n in self.nodes})
        self.needs_shapes = bool(self.nodes) and all(n.needs_shapes for n in self.nodes)
        listed = "; ".join(n.describe() for n in self.nodes[:20])
        more = f" (and {len(self.nodes) - 20} more)" if len(self.nodes) > 20 else ""
        super().__init__(
            f"cannot build a gradient graph: unsupported operator(s) {', '.join(self.op_types)} "
            f"on the path from the input to the logits: {listed}{more}. "
            "Only black-box (score-based) attacks can evaluate this model."
        )
