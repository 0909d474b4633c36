"""Small, deterministic PyTorch image classifiers and their ONNX exports.

Every architecture is written by hand in plain torch (no torchvision). Weights are seeded,
and every BatchNorm gets random running statistics and a random affine transform, so that
no normalisation layer is the identity.

Exports use the legacy TorchScript exporter (``dynamo=False``). In eval mode that exporter
folds a BatchNorm that directly follows a Conv into the Conv's weights, so a
``BatchNormalization`` node survives only where it follows something else (the VGG
classifier's BatchNorm1d and the BatchNorm2d in ``ops_kitchen``).

    from tests.zoo import MODEL_NAMES, export, make_model, input_shape
    proto = export("lenet")  # onnx.ModelProto, input "input" [batch,1,28,28] -> "logits"
"""

from __future__ import annotations

import functools
import io
import math
import warnings

import onnx
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_NAMES", "make_model", "input_shape", "export_onnx", "export", "export_default",
           "build_seeded"]

NUM_CLASSES = 10

# --------------------------------------------------------------------------------------------
# MLPs and LeNet


class MLP(nn.Module):
    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.softmax(y, dim=1) if self.softmax else y


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------
# VGG


class SmallVGG(nn.Module):
    CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in self.CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(channels * 4 * 4, 256),
            nn.ReLU(),
            nn.BatchNorm1d(256),  # follows ReLU, so it survives export as BatchNormalization
            nn.Dropout(0.5),
            nn.Linear(256, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------
# ResNet-18 (CIFAR variant)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.pool(self.layers(y))
        return self.fc(torch.flatten(y, 1))


# --------------------------------------------------------------------------------------------
# MobileNetV2 (CIFAR variant, width 0.5)


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    # expansion t, channels c, repeats n, stride s (CIFAR: the stem and stage 2 keep 32x32)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, width: float = 0.5) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [*_conv_bn(3, cin, 3, 1), nn.ReLU6()]
        for t, c, n, s in self.SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.features(x))
        return self.classifier(torch.flatten(y, 1))


# --------------------------------------------------------------------------------------------
# MobileNetV3-small (CIFAR variant)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * scale


class V3Block(nn.Module):
    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()

        def act() -> nn.Module:
            return nn.Hardswish() if hs else nn.ReLU()

        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [*_conv_bn(cin, hidden, 1), act()]
        layers += [*_conv_bn(hidden, hidden, k, stride, groups=hidden), act()]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += _conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    # kernel, expanded channels, out channels, squeeze-excite, hardswish, stride
    SETTINGS = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2),
                (3, 88, 24, False, False, 1), (5, 96, 40, True, True, 2),
                (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
                (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1),
                (5, 288, 96, True, True, 2), (5, 576, 96, True, True, 1),
                (5, 576, 96, True, True, 1))  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, 16, 3, 1), nn.Hardswish()]
        cin = 16
        for k, hidden, cout, se, hs, stride in self.SETTINGS:
            layers.append(V3Block(cin, k, hidden, cout, se, hs, stride))
            cin = cout
        layers += [*_conv_bn(cin, 576, 1), nn.Hardswish()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.features(x))
        return self.classifier(torch.flatten(y, 1))


# --------------------------------------------------------------------------------------------
# SqueezeNet (CIFAR variant)


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand1: int, expand3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand1, 1)
        self.expand3 = nn.Conv2d(squeeze, expand3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], dim=1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(2),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(2),
            Fire(256, 48, 192, 192),
            Fire(384, 64, 256, 256),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Conv2d(512, NUM_CLASSES, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------------------
# Vision transformer


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(attn, dim=-1)
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 4) -> None:
        super().__init__()
        tokens = (32 // patch) ** 2
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.1)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x).flatten(2).transpose(1, 2)  # [N, tokens, dim]
        cls = self.cls.expand(y.shape[0], -1, -1)
        y = torch.cat([cls, y], dim=1) + self.pos
        y = self.norm(self.blocks(y))
        return self.head(y[:, 0])


# --------------------------------------------------------------------------------------------
# A grab bag of operators


class OpsKitchen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.prelu = nn.PReLU(num_parameters=8)
        self.norm = nn.BatchNorm2d(8)  # follows PReLU, so it is kept as BatchNormalization
        self.maxpool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avg_incl = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
        self.avg_excl = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.leaky = nn.LeakyReLU(0.1)
        self.elu = nn.ELU()
        self.softplus = nn.Softplus()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 + 5 + 4 + 3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.prelu(self.conv1(x)))  # [N, 8, 32, 32]
        a = F.pad(h, (1, 1, 1, 1))  # constant
        b = F.pad(h, (1, 2, 2, 1), mode="reflect")[:, :, 1:, :-1]  # slice back to 34x34
        h = a - 0.5 * torch.tanh(b)  # [N, 8, 34, 34]
        h = self.maxpool(h)  # [N, 8, 17, 17], last window overhangs
        h = self.leaky(self.avg_incl(h)) + self.elu(self.avg_excl(h))
        c1, c2 = torch.chunk(h, 2, dim=1)  # [N, 4, 17, 17] each
        t = torch.sqrt(c2 * c2 + 1.0)
        h = torch.cat([self.softplus(c1) * t, torch.log(torch.sigmoid(c2) + 1.0) / t], dim=1)
        h = self.conv2(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # [N, 8, 17, 17]
        g = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)  # 34x34
        g = torch.pow(torch.sigmoid(g) + 0.5, 1.5) + torch.exp(-torch.tanh(g))
        first, rest = torch.split(g, [3, 5], dim=1)
        pooled = g.mean(dim=(2, 3), keepdim=True).squeeze(-1).squeeze(-1)  # [N, 8]
        summed = rest.sum(dim=(2, 3)) / (34.0 * 34.0)  # [N, 5]
        std = torch.sqrt(((first - first.mean(dim=1, keepdim=True)) ** 2).mean(dim=1) + 1e-3)
        corners = F.avg_pool2d(std.unsqueeze(1), 17).flatten(1)  # [N, 4]
        stats = torch.cat([pooled, summed.neg(), corners, first.amax(dim=(2, 3))], dim=1)
        return self.fc(stats)


# --------------------------------------------------------------------------------------------
# Registry

_BUILDERS = {
    "mlp": (MLP, (1, 28, 28)),
    "lenet": (LeNet, (1, 28, 28)),
    "vgg": (SmallVGG, (3, 32, 32)),
    "resnet18": (ResNet18, (3, 32, 32)),
    "mobilenet_v2": (MobileNetV2, (3, 32, 32)),
    "mobilenet_v3_small": (MobileNetV3Small, (3, 32, 32)),
    "squeezenet": (SqueezeNet, (3, 32, 32)),
    "vit": (ViT, (3, 32, 32)),
    "ops_kitchen": (OpsKitchen, (3, 32, 32)),
    "softmax_mlp": (functools.partial(MLP, softmax=True), (1, 28, 28)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _lookup(name: str):
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}") from None


def input_shape(name: str) -> tuple[int, int, int]:
    """The (C, H, W) image shape `name` takes."""
    return _lookup(name)[1]


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A freshly built, seeded model in eval mode. The global torch RNG is left untouched."""
    return build_seeded(_lookup(name)[0], seed)


def build_seeded(builder, seed: int = 0, *, layer_norms: bool = False) -> torch.nn.Module:
    """``builder()`` under ``seed`` in eval mode, every BatchNorm given random statistics and
    affine transform (and every LayerNorm a random affine one, with ``layer_norms``), so that
    no normalisation layer is the identity; the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.normal_(0.0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
                elif isinstance(module, nn.PReLU):
                    module.weight.uniform_(0.05, 0.5)
                elif layer_norms and isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
    return model.float().eval()


def export_onnx(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "logits",
    fold_constants: bool = True,
) -> onnx.ModelProto:
    """Export `module` with the legacy TorchScript exporter; input [batch, *input_shape].

    With `dynamic_batch` the batch axis is the symbolic dimension "batch"; otherwise the
    model is traced (and fixed) at batch 2. `fold_constants` (the exporter's default) folds a
    BatchNorm after a Conv into the Conv's weights, rounded in float32: a slightly different
    float32 function from the module's.
    """
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *input_shape, generator=generator)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}}
    buffer = io.BytesIO()
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer chatter
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            do_constant_folding=fold_constants,
        )
    return onnx.load_from_string(buffer.getvalue())


def export_default(module: torch.nn.Module, input_shape: tuple[int, ...], path) -> None:
    """Export `module` to `path` as `torch.onnx.export` does by default since PyTorch 2.9: the
    torch.export-based exporter (``dynamo=True``, onnxscript), weights in `path`.data beside
    it (external data), a symbolic batch axis."""
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, verbose=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=True)


@functools.lru_cache(maxsize=64)
def _export_cached(name: str, seed: int, options: tuple) -> onnx.ModelProto:
    return export_onnx(make_model(name, seed), input_shape(name), **dict(options))


def export(name: str, seed: int = 0, **kw) -> onnx.ModelProto:
    """`export_onnx(make_model(name, seed), input_shape(name), **kw)`, cached in-process.

    Returns a fresh copy each call, so callers may mutate it freely.
    """
    proto = _export_cached(name, seed, tuple(sorted(kw.items())))
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy
