"""Input-transformation defenses, registered by name; importing this package fills ``DEFENSES``.

    from workers.defenses import build_defense
    defense = build_defense("pca", variance=0.99)
    defense.fit(x_held_out)
    composed = defense.compose(model_bytes)  # f∘g, differentiable end to end

See base.py for the interface and adaptive.py for attacking a defended model.
"""

from . import autoencoder, downsample, jpeg, noise, pca, squeezing  # noqa: F401
from .adaptive import BPDAModel, DefendedModel, EOTModel, adaptive_model, defended_model
from .base import DEFENSES, Defense, NotDifferentiableError, RandomDefense, build_defense, register_defense

__all__ = [
    "DEFENSES",
    "BPDAModel",
    "DefendedModel",
    "Defense",
    "EOTModel",
    "NotDifferentiableError",
    "RandomDefense",
    "adaptive_model",
    "build_defense",
    "defended_model",
    "register_defense",
]
