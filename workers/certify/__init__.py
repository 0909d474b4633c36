"""Certified robustness: sound lower bounds on robust accuracy, from bound graphs built from
the ONNX model and run on ONNX Runtime (ibp.py: interval bound propagation)."""

from workers.certify.bounds import Certificate, IntervalBounds
from workers.certify.bounds_graph import build_bounds_model
from workers.certify.ibp import RULES, UnsupportedForBounds, supported_op_types

__all__ = ["RULES", "Certificate", "IntervalBounds", "UnsupportedForBounds", "build_bounds_model",
           "supported_op_types"]
