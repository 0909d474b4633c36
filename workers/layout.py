"""Image layouts: the dataset's (``input.layout``), the model's, and NCHW in between.

An evaluation works on NCHW pixels whatever the two layouts are: the dataset's images are
transposed to NCHW when they are loaded, and a model that takes NHWC (tf2onnx and Keras
exports) gets a Transpose composed in front of it (workers/preprocess.py). So attacks,
per-channel normalisation, defenses and Square's per-channel stripes all read channels on
axis 1, budgets are unchanged (norms do not depend on the order of the pixels), and the
adversarial examples handed back are transposed to the dataset's layout again.

The model's layout is read from its input shape: the one of NCHW and NHWC under which the
dataset's images fit it, NHWC only where its last axis is a plausible channel axis (no larger
than a known spatial axis: [N, 1, 28, 28] is not an image of 28 channels). When both fit
(every image axis symbolic, or C = H = W), NCHW is taken; ``input.model_layout`` overrides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from workers.datasets import Images, Pixels
from workers.errors import InvalidSpecError

LAYOUTS = ("NCHW", "NHWC")


class LayoutError(InvalidSpecError):
    """The dataset's images do not fit the model's input in any layout; the message says how."""


def to_nchw(x: Images, layout: str) -> Images:
    """Images [N, ...] in ``layout`` as NCHW (a no-op for NCHW and for inputs that are not 4-D);
    uint8 Pixels stay uint8, a transposed view."""
    if isinstance(x, Pixels):
        return x.transpose(0, 3, 1, 2) if layout == "NHWC" and x.ndim == 4 else x
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NHWC" and x.ndim == 4 else x


def from_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    """NCHW images back in ``layout``."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" and x.ndim == 4 else x


IMAGE_CHANNELS = (1, 3, 4)  # gray, RGB, RGBA


def image_nchw(image: Sequence[int], layout: str) -> list[int]:
    """One dataset image's shape, [C, H, W] (or [H, W, C] for NHWC), as [C, H, W].

    NCHW images whose channel axis is longer than a spatial one while their last axis holds
    1, 3 or 4 values ([28, 28, 1]) are NHWC images declared NCHW: refused with that hint.
    """
    image = list(image)
    if layout == "NHWC":
        if len(image) != 3:
            raise LayoutError(f"input.layout NHWC needs images [H, W, C]; these are {image}: "
                              "set input.layout to NCHW")
        return [image[2], image[0], image[1]]
    if len(image) == 3 and image[0] > min(image[1:]) and image[2] in IMAGE_CHANNELS:
        raise LayoutError(f"the images are {image}: as NCHW, {image[0]} channels of {image[1]} x {image[2]} "
                          f"pixels, as NHWC {image[0]} x {image[1]} pixels of {image[2]} channel(s); set "
                          "input.layout to the dataset's layout, NHWC")
    return image


def _fits(dims: Sequence, image: Sequence[int]) -> bool:
    return len(dims) == len(image) and all(not isinstance(d, int) or d == i for d, i in zip(dims, image,
                                                                                          strict=True))


def _plausible_channels(channels, spatial: Sequence) -> bool:
    return not isinstance(channels, int) or all(not isinstance(d, int) or channels <= d for d in spatial)


def _shown(dims: Sequence) -> str:
    return "[N, " + ", ".join(str(d) if isinstance(d, int) else "?" for d in dims) + "]"


def model_layout(input_shape: Sequence, image: Sequence[int], declared: str = "auto") -> str:
    """The layout in which the model (input ``input_shape``, batch axis first, symbolic axes
    as None or names) takes images of NCHW shape ``image``: "NCHW" or "NHWC".

    ``declared`` ("auto", "NCHW" or "NHWC") is ``input.model_layout``. Raises LayoutError
    with what to change when the images fit the model in neither (or not the declared) layout.
    """
    dims = list(input_shape[1:])
    image = list(image)
    fits = {"NCHW": _fits(dims, image)}
    fits["NHWC"] = len(dims) == 3 and _fits([dims[2], dims[0], dims[1]], image)
    if declared in LAYOUTS:
        if not fits[declared]:
            raise LayoutError(f"the images are {image} as (C, H, W) but the model expects {_shown(dims)}, "
                              f"which is not {declared}; check input.layout and input.model_layout")
        return declared
    if fits["NCHW"]:
        return "NCHW"
    if fits["NHWC"] and _plausible_channels(dims[2], dims[:2]):
        return "NHWC"
    hint = ""
    if len(dims) == 3 and sorted(map(str, image)) == sorted(str(d) for d in dims if isinstance(d, int)):
        hint = "; the axes are the same sizes in another order: set input.layout to the dataset's layout"
    if len(dims) == 1 and dims[0] == math.prod(image):
        hint = (f"; the model takes flat vectors of {dims[0]} values (a scikit-learn model, say): give it an "
                "image input by putting a Flatten in front of it (onnx.compose, or flatten inside the "
                "exported module), so that it takes [N, C, H, W]")
    raise LayoutError(f"the images are {image} as (C, H, W) but the model expects {_shown(dims)}, which "
                      f"they fit neither as NCHW nor as NHWC{hint}")
