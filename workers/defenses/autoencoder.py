"""A denoising autoencoder in front of the classifier (Liang et al., "Deep adversarial
robustness", section 5: an autoencoder trained on held-out images reconstructs each input
before classification; they found it "not very effective at reproducing a useful image").

The autoencoder is the user's ONNX model (``model``: its bytes): one float image input, one
output of the same shape, batch axis first. It is checked when the defense is built: the
shapes (message quotes both), and, where its image size is static, that the gradient builder
can differentiate through it (UnsupportedOperatorError names the operators it cannot).

``compose(classifier)`` concatenates the graphs: every autoencoder name gets the prefix
``defense/autoencoder/``, its input becomes the classifier's input (same name) and its output
feeds what read that input. A model at a different opset is converted to the higher one
first. ``apply`` runs the autoencoder alone on ONNX Runtime.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, version_converter

from workers.attacks.base import check
from workers.onnxgrad import GradientBuildError, InvalidModelError, build_gradient_model
from workers.onnxgrad.prepare import (
    image_input,
    infer_shapes,
    load_model,
    make_batch_dynamic,
    normalise_opset,
    refuse_external_data,
)
from workers.runtime import choose_providers

from .base import Defense, all_names, as_images, input_dims, prepend_stage, register_defense, stage_model

BATCH = 64  # images per ONNX Runtime call in apply()


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _convert(model: onnx.ModelProto, opset: int, what: str) -> onnx.ModelProto:
    if _opset(model) == opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise InvalidModelError(
            f"autoencoder: the {what} could not be converted from opset {_opset(model)} to {opset} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); export both models "
            "with the same opset") from None


def _shape_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


@register_defense
class Autoencoder(Defense):
    """x -> autoencoder(x), the user's ONNX model."""

    name = "autoencoder"
    differentiable = True
    needs_model = True

    def __init__(self, *, model: bytes | onnx.ModelProto):
        ae = load_model(model)
        refuse_external_data(ae)
        digest = hashlib.sha256(ae.SerializeToString()).hexdigest()
        ae = normalise_opset(ae)
        try:
            onnx.checker.check_model(ae)
        except onnx.checker.ValidationError as exc:
            raise InvalidModelError(f"autoencoder: not valid ONNX: {str(exc).splitlines()[0]}") from None
        x = image_input(ae)
        check(len(ae.graph.output) == 1,
              f"autoencoder: expected one output (the reconstruction), found {len(ae.graph.output)}")
        make_batch_dynamic(ae, x.name)
        ae = infer_shapes(ae)
        self.model = ae
        self.input_name, self.output_name = x.name, ae.graph.output[0].name
        self.input_dims = input_dims(x)
        self.output_dims = input_dims(ae.graph.output[0])
        check(len(self.input_dims) >= 2, f"autoencoder: its input has shape {_shape_text(self.input_dims)}")
        if self.output_dims:
            self._check_same("its output", self.output_dims, "its input", self.input_dims)
        self.params = {"model": f"sha256:{digest}"}
        self._session: ort.InferenceSession | None = None
        if all(isinstance(d, int) for d in self.input_dims[1:]):
            self._check_differentiable()

    @staticmethod
    def _check_same(name_a: str, a, name_b: str, b) -> None:
        same_rank = len(a) == len(b)
        clash = not same_rank or any(
            isinstance(p, int) and isinstance(q, int) and p != q for p, q in zip(a[1:], b[1:], strict=True))
        check(not clash, f"autoencoder: shapes differ: {name_a} {_shape_text(a)}, {name_b} "
                         f"{_shape_text(b)}; they must match (batch axis first)")

    def _check_differentiable(self) -> None:
        """Build the gradient of a stand-in classifier (the sum of all pixels) behind the autoencoder."""
        dims = self.input_dims
        graph = helper.make_graph(
            [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("ReduceSum", ["flat", "axis"], ["score"], keepdims=1)],
            "stand_in", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *dims[1:]])],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
            [helper.make_tensor("axis", TensorProto.INT64, [1], [1])])
        stand_in = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _opset(self.model))],
                                     ir_version=self.model.ir_version)
        try:
            build_gradient_model(self.compose(stand_in), "cotangent")
        except GradientBuildError as exc:
            exc.args = (f"autoencoder: {exc}",)  # keeps the type (UnsupportedOperatorError: .nodes)
            raise

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._session = ort.InferenceSession(self.model.SerializeToString(), options,
                                                 providers=choose_providers(None))
        parts = [self._session.run([self.output_name], {self.input_name: x[i:i + BATCH]})[0]
                 for i in range(0, len(x), BATCH)]
        return np.concatenate(parts) if parts else np.zeros_like(x)

    def apply(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        x = as_images(x, self.name)
        self._check_same("its input", self.input_dims, "the images", [None, *x.shape[1:]])
        out = self._run(x)
        check(out.shape == x.shape, f"autoencoder: shapes differ: its output {list(out.shape)}, its input "
                                    f"{list(x.shape)}; they must match")
        return out.astype(np.float32, copy=False)

    def compose(self, model: onnx.ModelProto | bytes) -> onnx.ModelProto:
        model, x = stage_model(model)
        model_dims = input_dims(x)
        self._check_same("its input", self.input_dims, f"the model's input {x.name!r}", model_dims)
        self._check_same("its output", self.output_dims or self.input_dims,
                         f"the model's input {x.name!r}", model_dims)
        opset = max(_opset(model), _opset(self.model))
        model = _convert(model, opset, "classifier")
        ae = _convert(self.model, opset, "autoencoder")

        taken = all_names(model.graph)
        prefix = "defense/autoencoder/"
        while any(n.startswith(prefix) for n in taken):
            prefix = prefix[:-1] + "_/"
        ae = onnx.compose.add_prefix(ae, prefix)
        ae_input, ae_output = prefix + self.input_name, prefix + self.output_name
        for node in ae.graph.node:
            for i, name in enumerate(node.input):
                if name == ae_input:
                    node.input[i] = x.name
        if ae_output == ae_input:  # an autoencoder that returns its input unchanged
            ae.graph.node.append(helper.make_node("Identity", [x.name], [ae_output],
                                                  name=prefix + "Identity"))

        versions = {o.domain or "": o.version for o in model.opset_import}
        for o in ae.opset_import:
            versions[o.domain or ""] = max(versions.get(o.domain or "", 0), o.version)
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(domain, v) for domain, v in versions.items())
        model.ir_version = max(model.ir_version, ae.ir_version)
        model.functions.extend(ae.functions)
        model.graph.sparse_initializer.extend(ae.graph.sparse_initializer)
        return prepend_stage(model, x, list(ae.graph.node), list(ae.graph.initializer), ae_output)
