"""Whether ONNX Runtime can run on a CUDA GPU here, for the tests that need one (CI has none)."""

from __future__ import annotations

import functools

import onnxruntime as ort
import pytest

from workers import runtime


@functools.cache
def cuda_unavailable() -> str | None:
    """None when a session starts on the CUDA execution provider, else why not."""
    if runtime.CUDA not in ort.get_available_providers():
        return f"needs onnxruntime-gpu; this onnxruntime offers {ort.get_available_providers()}"
    from tests import zoo

    probe = zoo.export("mlp").SerializeToString()
    try:
        session = ort.InferenceSession(probe, providers=[runtime.CUDA])
    except Exception as exc:  # no driver, no GPU, missing CUDA libraries
        return f"the CUDA execution provider did not start: {' '.join(str(exc).split())[:200]}"
    if session.get_providers()[0] != runtime.CUDA:
        return f"the CUDA execution provider fell back to {session.get_providers()}"
    return None


requires_cuda = pytest.mark.skipif(bool(cuda_unavailable()),
                                   reason=f"no usable CUDA GPU: {cuda_unavailable()}")
