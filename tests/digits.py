"""Small classifiers trained in the tests on scikit-learn's bundled digits, upsampled to 28x28.

Accuracies mean something (the CNN reaches about 97% on the held-out part), so attack
results can be compared with reference implementations and with the seed papers' tables.
Everything is seeded and cached per process.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

SHAPE = (1, 28, 28)
TRAIN = 1200  # the rest (597 images) is held out


@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test); x float32 [N, 1, 28, 28] in [0, 1]."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    up = nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    x = up.clamp(0, 1).numpy()
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def _fc(*widths: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [28 * 28, *widths, 10]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


ARCHITECTURES = {
    "fc10": lambda: _fc(),  # softmax regression (Szegedy et al.'s FC10)
    "fc100": lambda: _fc(100, 100),
    "fc200": lambda: _fc(200, 200),
    "cnn": _cnn,
}


@functools.lru_cache(maxsize=16)
def trained(name: str, seed: int = 0, epochs: int = 25) -> nn.Module:
    """A model of ``ARCHITECTURES[name]`` trained on the training split, in eval mode."""
    x, y, _, _ = digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is several times faster on 2 busy cores
    try:
        return _train(name, seed, epochs, x, y)
    finally:
        torch.set_num_threads(threads)


def _train(name: str, seed: int, epochs: int, x: np.ndarray, y: np.ndarray) -> nn.Module:
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = ARCHITECTURES[name]()
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        xt, yt = torch.tensor(x), torch.tensor(y)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for batch in torch.randperm(len(xt), generator=generator).split(64):
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
                optimiser.step()
    return model.eval()


def accuracy(model: nn.Module) -> float:
    _, _, x, y = digits()
    with torch.no_grad():
        return float((model(torch.tensor(x)).argmax(1).numpy() == y).mean())


@functools.lru_cache(maxsize=16)
def onnx_bytes(name: str, seed: int = 0) -> bytes:
    """The trained model exported to ONNX (opset 17, dynamic batch, input 'input')."""
    model = trained(name, seed)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, *SHAPE),), buffer, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


class _Scaled(nn.Module):
    def __init__(self, net: nn.Module, scale: float, softmax: bool = False):
        super().__init__()
        self.net, self.scale, self.softmax = net, scale, softmax

    def forward(self, x):
        z = self.net(x) * self.scale
        return torch.softmax(z, dim=1) if self.softmax else z


class _ChannelsLast(nn.Module):
    """Takes NHWC images, as tf2onnx and Keras exports do: a Transpose, then the network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


class _Flat(nn.Module):
    """Takes [N, 784, 1]: inputs that are not images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 28, 28))


# Variants of the trained models that real exports look like. The saturated ones have logits
# in the hundreds or thousands, where the cross-entropy's float32 gradient is exactly zero:
# "cnn" itself fed 0..255 pixels (not rescaled) is another (top-two logit gaps of 460, 2,700
# and 4,600 at the 5th, 50th and 95th percentile; the CNTK MNIST model's are 140, 1,174, 2,704).
VARIANTS = {
    "cnn-x100": (lambda: _Scaled(trained("cnn"), 100.0), SHAPE),
    "cnn-x1000": (lambda: _Scaled(trained("cnn"), 1000.0), SHAPE),
    "cnn-softmax-x100": (lambda: _Scaled(trained("cnn"), 100.0, softmax=True), SHAPE),
    "cnn-nhwc": (lambda: _ChannelsLast(trained("cnn")), (28, 28, 1)),
    "fc100-flat": (lambda: _Flat(trained("fc100")), (784, 1)),
}


@functools.lru_cache(maxsize=16)
def variant_onnx_bytes(name: str) -> bytes:
    """``VARIANTS[name]`` exported like ``onnx_bytes`` (legacy exporter, opset 17, dynamic batch)."""
    make, shape = VARIANTS[name]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(make().eval(), (torch.zeros(2, *shape),), buffer, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()
