"""Regenerate the demo files: a CNN trained on scikit-learn's digits (upsampled to 28x28)
and its 597 held-out images as uint8.

Needs the test extra (torch, scikit-learn):  python examples/make_digits_demo.py
Writes examples/digits-cnn.onnx and examples/digits-test.npz.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import digits  # noqa: E402


def main() -> None:
    out = ROOT / "examples"
    (out / "digits-cnn.onnx").write_bytes(digits.onnx_bytes("cnn"))
    _, _, x, y = digits.digits()
    np.savez_compressed(out / "digits-test.npz", x=np.round(x * 255).astype(np.uint8), y=y)
    print(f"wrote {out / 'digits-cnn.onnx'} and {out / 'digits-test.npz'} "
          f"(held-out accuracy {digits.accuracy(digits.trained('cnn')):.3f})")


if __name__ == "__main__":
    main()
