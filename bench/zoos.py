"""The model zoos bench/gradients.py draws from.

small: tests.zoo (digits and CIFAR sizes), TorchScript exports. imagenet: tests.imagenet_zoo
(ImageNet sizes), each module exported by both PyTorch exporters, named ``<model>@dynamo``
(the default, torch.export-based exporter; model.onnx + model.onnx.data, read as one model)
and ``<model>@torchscript`` (``dynamo=False``, its default constant folding).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

EXPORTERS = ("dynamo", "torchscript")


class SmallZoo:
    def __init__(self) -> None:
        from tests import zoo

        self._zoo = zoo
        self.NUM_CLASSES = zoo.NUM_CLASSES
        self.names = zoo.MODEL_NAMES
        self.default = ("mlp", "lenet", "resnet18", "mobilenet_v2")

    def input_shape(self, name: str) -> tuple[int, ...]:
        return self._zoo.input_shape(name)

    def make_model(self, name: str) -> torch.nn.Module:
        return self._zoo.make_model(name)

    def export(self, name: str) -> onnx.ModelProto:
        return self._zoo.export(name)


class ImagenetZoo:
    def __init__(self) -> None:
        from tests import imagenet_zoo

        self._zoo = imagenet_zoo
        self.NUM_CLASSES = imagenet_zoo.NUM_CLASSES
        self.names = tuple(f"{m}@{e}" for m in imagenet_zoo.MODEL_NAMES for e in EXPORTERS)
        self.default = self.names

    def input_shape(self, name: str) -> tuple[int, ...]:
        return self._zoo.input_shape(name.split("@")[0])

    def make_model(self, name: str) -> torch.nn.Module:
        return self._zoo.make_model(name.split("@")[0])

    def export(self, name: str) -> onnx.ModelProto:
        from tests.zoo import export_default, export_onnx
        from workers.onnxgrad.external import self_contained

        model, exporter = name.split("@")
        module, shape = self.make_model(name), self.input_shape(name)
        if exporter == "torchscript":
            return export_onnx(module, shape)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{model}.onnx"
            export_default(module, shape, path)
            return onnx.load_from_string(self_contained(path, 2**31 - 1))


ZOOS = {"small": SmallZoo, "imagenet": ImagenetZoo}


def get_zoo(name: str):
    return ZOOS[name]()
