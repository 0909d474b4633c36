"""Attacks, registered by name; importing this package fills ``ATTACKS``."""

from . import apgd, autoattack, cw, deepfool, fab, gradient, lbfgs, noise, square, universal  # noqa: F401
from .base import ATTACKS, Attack, AttackModel, AttackRun

__all__ = ["ATTACKS", "Attack", "AttackModel", "AttackRun"]
