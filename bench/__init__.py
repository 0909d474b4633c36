"""Benchmarks printing ratios against reference implementations (see the README)."""

from __future__ import annotations

import argparse


def zoo_models(text: str) -> list[str]:
    """argparse type for --models: comma-separated names from tests.zoo."""
    from tests import zoo

    models = [m.strip() for m in text.split(",") if m.strip()]
    for model in models:
        if model not in zoo.MODEL_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown model {model!r}; choose from {', '.join(zoo.MODEL_NAMES)}")
    return models
