"""auto_LiRPA, the reference verifier, for the tests that compare bounds with it.

Its PyPI release (0.3, 2022) declares torch < 1.13 and torchvision, so the test command installs
it with --no-deps; it then imports beside torch 2.13 and numpy 2 once three APIs it used are given
back (none changes a bound): ``torch.onnx.symbolic_helper._set_opset_version`` (gone from torch),
``numpy.lib.arraysetops`` (moved in numpy 2; it imports ``isin``), and ``torch._C.Node``'s
``node[attribute]`` (its graph parser reads attributes so). Without it the tests skip, saying how
to install it."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch


def load():
    """The ``auto_LiRPA`` module, made importable here (raises ImportError where it is absent)."""
    import torch.onnx.symbolic_helper as symbolic_helper

    if not hasattr(symbolic_helper, "_set_opset_version"):
        symbolic_helper._set_opset_version = lambda version: None  # type: ignore[attr-defined]
    sys.modules.setdefault("numpy.lib.arraysetops", types.SimpleNamespace(isin=np.isin))  # type: ignore[arg-type]
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = lambda node, name: getattr(node, node.kindOf(name))(name)  # type: ignore[attr-defined]
    import auto_LiRPA

    return auto_LiRPA


def auto_lirpa():
    """The ``auto_LiRPA`` module, or a skip of the calling test."""
    try:
        return load()
    except ImportError as exc:
        pytest.skip(f"auto_LiRPA is not installed ({exc}); pip install --no-deps auto_LiRPA==0.3 appdirs")
