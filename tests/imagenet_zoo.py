"""ImageNet-size architectures, lean: the operator patterns of ResNet-50, EfficientNet-B0,
ConvNeXt-T, ViT-S/16, Swin, DenseNet, Inception-v3 and MobileNetV3-Large at their input sizes
(224x224, Inception 299x299), with fewer blocks and channels so that CI exports and
differentiates all of them in minutes. Written in plain torch (no torchvision), seeded, every
normalisation layer given random statistics so that none is the identity.

Each is exported both ways (tests/onnxgrad/test_imagenet_zoo.py): PyTorch's default exporter
(torch.export-based, ``dynamo=True``, external data) and the TorchScript one (``dynamo=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo import build_seeded

NUM_CLASSES = 10


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


# ------------------------------------------ ResNet-50: bottlenecks


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            _bn(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            _bn(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False),
            _bn(cout),
        )
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _bn(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return F.relu(self.body(x) + self.down(x))


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
            _bn(16),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.stages = nn.Sequential(Bottleneck(16, 8, 1), Bottleneck(32, 16, 2), Bottleneck(64, 16, 1))
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


# ------------------------------------------ EfficientNet-B0: SiLU, SE, depthwise 5x5


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeezed: int, gate: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.reduce, self.expand, self.gate, self.act = (
            nn.Conv2d(c, squeezed, 1),
            nn.Conv2d(squeezed, c, 1),
            gate,
            act,
        )

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            _bn(mid),
            nn.SiLU(),
            nn.Conv2d(mid, mid, k, stride=stride, padding=k // 2, groups=mid, bias=False),
            _bn(mid),
            nn.SiLU(),
            SqueezeExcite(mid, max(1, cin // 4), nn.Sigmoid(), nn.SiLU()),
            nn.Conv2d(mid, cout, 1, bias=False),
            _bn(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class EfficientNetB0(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), _bn(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 16, 3, 1, 1), MBConv(16, 24, 5, 2, 4), MBConv(24, 24, 5, 1, 4))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), _bn(64), nn.SiLU())
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1), 1))


# ------------------------------------------ ConvNeXt-T: dw 7x7, channels-last LN, GELU, layer scale


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.up, self.down = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)  # channels last
        y = self.gamma * self.down(F.gelu(self.up(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 4, stride=4), LayerNorm2d(24, eps=1e-6))
        self.stage1 = ConvNeXtBlock(24)
        self.down = nn.Sequential(LayerNorm2d(24, eps=1e-6), nn.Conv2d(24, 48, 2, stride=2))
        self.stage2 = ConvNeXtBlock(48)
        self.norm = nn.LayerNorm(48, eps=1e-6)
        self.fc = nn.Linear(48, NUM_CLASSES)

    def forward(self, x):
        y = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(y.mean(dim=(2, 3))))


# ------------------------------------------ ViT-S/16: class token, position embedding, attention


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ViTS16(nn.Module):
    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, stride=16)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + 14 * 14, dim) * 0.02)
        self.blocks = nn.ModuleList([TransformerBlock(dim, 4) for _ in range(2)])
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc(self.norm(tokens[:, 0]))


# ------------------------------------------ Swin: windows, shifted windows (roll), attention masks


def _window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """Swin's mask for a cyclically shifted map: -100 between tokens from different regions."""
    regions = torch.zeros(size, size)
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[rows, cols] = label
            label += 1
    windows = regions.reshape(size // window, window, size // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)[:, None]  # [windows, 1, T, T]


class SwinBlock(nn.Module):
    def __init__(self, dim: int, size: int, window: int, shift: int) -> None:
        super().__init__()
        self.size, self.window, self.shift = size, window, shift
        self.block = TransformerBlock(dim, 2)
        self.register_buffer("mask", _window_mask(size, window, shift) if shift else None)

    def forward(self, x):  # x [N, H, W, C]
        n, h, w, c = x.shape
        win = self.window
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = x.reshape(n, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(-1, win * win, c)
        mask = None
        if self.mask is not None:
            mask = self.mask.repeat(n, 1, 1, 1)
        windows = self.block(windows, mask)
        x = windows.reshape(n, h // win, w // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class Swin(nn.Module):
    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)  # 224 / 8 = 28 = 4 windows of 7
        self.norm0 = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(SwinBlock(dim, 28, 7, 0), SwinBlock(dim, 28, 7, 3))
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        y = self.blocks(self.norm0(self.patch(x).permute(0, 2, 3, 1)))
        return self.fc(self.norm(y.mean(dim=(1, 2))))


# ------------------------------------------ DenseNet: dense Concat


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _bn(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 2 * growth, 1, bias=False),
            _bn(2 * growth),
            nn.ReLU(),
            nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
            _bn(16),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, c = [], 16
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.dense = nn.Sequential(*layers)
        self.transition = nn.Sequential(
            _bn(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        self.dense2 = DenseLayer(c // 2, growth)
        self.norm = _bn(c // 2 + growth)
        self.fc = nn.Linear(c // 2 + growth, NUM_CLASSES)

    def forward(self, x):
        y = F.relu(self.norm(self.dense2(self.transition(self.dense(self.stem(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


# ------------------------------------------ Inception-v3 at 299: 1x7 / 7x1, AvgPool counting pads


def _conv(cin: int, cout: int, kernel, **kw) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, bias=False, **kw), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU()
    )


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.b1 = _conv(cin, 32, 1)
        self.b7 = nn.Sequential(
            _conv(cin, c7, 1), _conv(c7, c7, (1, 7), padding=(0, 3)), _conv(c7, 32, (7, 1), padding=(3, 0))
        )
        self.b77 = nn.Sequential(
            _conv(cin, c7, 1),
            _conv(c7, c7, (7, 1), padding=(3, 0)),
            _conv(c7, c7, (1, 7), padding=(0, 3)),
            _conv(c7, 32, (1, 7), padding=(0, 3)),
        )
        self.pool = _conv(cin, 32, 1)

    def forward(self, x):
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)  # count_include_pad=True, as Inception-v3
        return torch.cat([self.b1(x), self.b7(x), self.b77(x), self.pool(pooled)], dim=1)


class InceptionV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv(3, 16, 3, stride=2),
            _conv(16, 16, 3),
            _conv(16, 32, 3, padding=1),
            nn.MaxPool2d(3, stride=2),
            _conv(32, 48, 3, stride=2),
            nn.MaxPool2d(3, stride=2),
        )
        self.mixed = InceptionC(48, 16)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.mixed(self.stem(x)), 1), 1))


# ------------------------------------------ MobileNetV3-Large: HardSwish, HardSigmoid SE


class InvertedResidualV3(nn.Module):
    def __init__(
        self, cin: int, mid: int, cout: int, k: int, stride: int, se: bool, act: type[nn.Module]
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(cin, mid, 1, bias=False),
            _bn(mid),
            act(),
            nn.Conv2d(mid, mid, k, stride=stride, padding=k // 2, groups=mid, bias=False),
            _bn(mid),
            act(),
        ]
        if se:
            layers.append(SqueezeExcite(mid, max(8, mid // 4), nn.Hardsigmoid(), nn.ReLU()))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Large(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), _bn(16), nn.Hardswish()
        )
        self.blocks = nn.Sequential(
            InvertedResidualV3(16, 16, 16, 3, 1, False, nn.ReLU),
            InvertedResidualV3(16, 48, 24, 5, 2, True, nn.ReLU),
            InvertedResidualV3(24, 72, 24, 3, 1, True, nn.Hardswish),
        )
        self.head = nn.Sequential(nn.Conv2d(24, 96, 1, bias=False), _bn(96), nn.Hardswish())
        self.fc = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, NUM_CLASSES))

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1), 1))


BUILDERS = {
    "resnet50": (ResNet50, (3, 224, 224)),
    "efficientnet_b0": (EfficientNetB0, (3, 224, 224)),
    "convnext_t": (ConvNeXtT, (3, 224, 224)),
    "vit_s16": (ViTS16, (3, 224, 224)),
    "swin": (Swin, (3, 224, 224)),
    "densenet": (DenseNet, (3, 224, 224)),
    "inception_v3": (InceptionV3, (3, 299, 299)),
    "mobilenet_v3_large": (MobileNetV3Large, (3, 224, 224)),
}
MODEL_NAMES = tuple(BUILDERS)


def make_model(name: str, seed: int = 0) -> nn.Module:
    return build_seeded(BUILDERS[name][0], seed, layer_norms=True)


def input_shape(name: str) -> tuple[int, int, int]:
    return BUILDERS[name][1]
