"""Upload validation: hostile models and datasets are refused with a message that says why and
how to fix it, before anything is opened, allocated or decompressed; good ones are described."""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import stat
import struct
import sys
import tracemalloc
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.model_admission import ModelInfo, max_runtime_opset, validate_model
from workers.dataset_files import DatasetInfo, load_dataset_file, validate_dataset
from workers.datasets import DatasetError, load_npz
from workers.errors import UserError

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
GOOD_MODEL = ROOT / "examples" / "digits-cnn.onnx"
REEXPORT = (
    "upload its data files with it (multipart `data` parts named as the model names them, or one .zip / "
    ".tar.gz of the model and its data files), or save all weights inside the .onnx file "
    "(onnx.save_model(model, path, save_as_external_data=False))"
)


# --------------------------------------------------------------------------------------------
# Helpers


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def classifier(
    nodes=None, initializers=None, inputs=None, opset: int = 17, **model_fields
) -> onnx.ModelProto:
    """x [N, 4] -> MatMul W [4, 3] -> logits [N, 3], or the nodes given."""
    if nodes is None:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="linear")]
        initializers = [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializers or [],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9, **model_fields
    )


def model_file(tmp_path: Path, model: onnx.ModelProto, name: str = "upload/model.onnx") -> Path:
    return write(tmp_path / name, model.SerializeToString())


def refused_model(path: Path, max_bytes: int = 64 * MiB) -> UserError:
    with pytest.raises(UserError) as caught:
        validate_model(path, max_bytes=max_bytes)
    return caught.value


def external(tensor: TensorProto, location: str | None) -> TensorProto:
    """``tensor`` with its data moved to an external file named ``location``."""
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0", "length": "48"}
    for key, value in entries.items():
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def external_weights_model(location: str | None, where: str) -> onnx.ModelProto:
    weights = external(numpy_helper.from_array(np.ones((4, 3), np.float32), "W"), location)
    if where == "initializer":
        return classifier(initializers=[weights], nodes=[helper.make_node("MatMul", ["x", "W"], ["logits"])])
    if where == "constant":
        return classifier(
            nodes=[
                helper.make_node("Constant", [], ["W"], value=weights),
                helper.make_node("MatMul", ["x", "W"], ["logits"]),
            ]
        )
    branch = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["w_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [4, 3])],
        [weights],
    )
    other = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["w_out2"],
                value=numpy_helper.from_array(np.zeros((4, 3), np.float32), "zeros"),
            )
        ],
        "else",
        [],
        [helper.make_tensor_value_info("w_out2", TensorProto.FLOAT, [4, 3])],
    )
    return classifier(
        nodes=[
            helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "c")),
            helper.make_node("If", ["cond"], ["W"], then_branch=branch, else_branch=other),
            helper.make_node("MatMul", ["x", "W"], ["logits"]),
        ]
    )


class OpenWatch:
    """Counts opens and reads of one file by anyone (Linux inotify), so a test can prove that a
    path named inside an upload was never touched, not even by C++ code or through a link."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if (
            self.fd < 0
            or self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_ACCESS | self.IN_OPEN) < 0
        ):
            pytest.skip("inotify is not available")

    def events(self) -> int:
        count = 0
        while True:
            try:
                count += len(os.read(self.fd, 4096)) // 16  # events on a file carry no name
            except BlockingIOError:
                return count

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def watch_opens(path: Path):
    watch = OpenWatch(path)
    try:
        yield watch
    finally:
        watch.close()


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="uses inotify")


# --------------------------------------------------------------------------------------------
# Models: external data


@linux_only
def test_the_open_watch_sees_a_read(tmp_path):
    secret = write(tmp_path / "secret", b"x" * 48)
    with watch_opens(secret) as watch:
        assert watch.events() == 0
        secret.read_bytes()
        assert watch.events() >= 1


@linux_only
@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
@pytest.mark.parametrize("variant", ["traversal", "absolute", "hardlink", "symlink"])
def test_external_data_is_refused_without_opening_the_file(tmp_path, monkeypatch, where, variant):
    secret = write(tmp_path / "etc" / "passwd", b"root:x:0:0:root:/root:/bin/bash\n" + b"#" * 16)
    upload_dir = tmp_path / "uploads" / "tmp"
    upload_dir.mkdir(parents=True)
    location = {
        "traversal": "../../etc/passwd",
        "absolute": str(secret),
        "hardlink": "weights.bin",
        "symlink": "link.bin",
    }[variant]
    if variant == "hardlink":
        os.link(secret, upload_dir / "weights.bin")
    if variant == "symlink":
        os.symlink(secret, upload_dir / "link.bin")
    path = model_file(upload_dir, external_weights_model(location, where), "model.onnx")
    monkeypatch.chdir(upload_dir)  # a cwd-relative resolution would land on the secret too
    with watch_opens(secret) as watch:
        error = refused_model(path)
        assert watch.events() == 0
    assert (error.status, error.type) == (400, "invalid_model")
    assert error.detail == f"the model references external data file {location!r} (tensor 'W'); {REEXPORT}"


def test_external_data_without_a_location_is_refused(tmp_path):
    path = model_file(tmp_path, external_weights_model(None, "initializer"))
    detail = refused_model(path).detail
    assert detail == f"the model references an external data file (tensor 'W'); {REEXPORT}"


def test_an_external_sparse_tensor_is_refused(tmp_path):
    values = external(numpy_helper.from_array(np.ones(3, np.float32), "S_values"), "../../secret")
    indices = numpy_helper.from_array(np.array([0, 5, 11], np.int64), "S_indices")
    model = classifier()
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 3]))
    detail = refused_model(model_file(tmp_path, model)).detail
    assert detail == f"the model references external data file '../../secret' (tensor 'S_values'); {REEXPORT}"


def test_a_dense_sparse_tensor_is_refused(tmp_path):
    values = numpy_helper.from_array(np.ones(3, np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 5, 11], np.int64), "S_indices")
    model = classifier()
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 3]))
    assert refused_model(model_file(tmp_path, model)).detail == (
        "the model holds a sparse tensor ('S'); sparse weights are not supported: store them as dense "
        "initializers"
    )


# --------------------------------------------------------------------------------------------
# Models: bytes that are not a model, sizes


@pytest.mark.parametrize("content", ["truncated", "random", "text"])
def test_bytes_that_are_not_a_model_are_refused(tmp_path, content):
    good = GOOD_MODEL.read_bytes()
    data = {
        "truncated": good[: len(good) // 2],
        "random": np.random.default_rng(0).bytes(4096),
        "text": b"this is not a model at all",
    }[content]
    error = refused_model(write(tmp_path / "model.onnx", data))
    assert error.type == "invalid_model"
    assert error.detail.startswith("not an ONNX model: ")
    assert "upload the .onnx file written by torch.onnx.export or onnx.save_model" in error.detail
    assert str(tmp_path) not in error.detail


def test_an_empty_model_file_is_refused(tmp_path):
    error = refused_model(write(tmp_path / "model.onnx", b""))
    assert (error.status, error.detail) == (400, "the model file is empty; upload the .onnx file itself")


def test_a_model_over_the_size_limit_is_refused(tmp_path):
    path = write(tmp_path / "model.onnx", GOOD_MODEL.read_bytes())
    error = refused_model(path, max_bytes=1000)
    assert (error.status, error.type) == (413, "too_large")
    assert error.detail == f"the model is {path.stat().st_size} bytes, over the limit of 1000 bytes"


@pytest.mark.parametrize("storage", ["raw", "typed", "none"])
def test_a_declared_10_gb_tensor_with_little_data_is_refused_without_allocating(tmp_path, storage):
    huge = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[50_000, 50_000])
    stored = {"raw": "16 bytes", "typed": "4 values", "none": "0 values"}[storage]
    expected = {
        "raw": "10000000000 are needed",
        "typed": "2500000000 are needed",
        "none": "2500000000 are needed",
    }[storage]
    if storage == "raw":
        huge.raw_data = b"\0" * 16
    elif storage == "typed":
        huge.float_data.extend([1.0] * 4)
    model = classifier(nodes=[helper.make_node("MatMul", ["x", "W"], ["logits"])], initializers=[huge])
    path = model_file(tmp_path, model)
    tracemalloc.start()
    try:
        error = refused_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    assert error.detail == (
        f"tensor 'W' declares shape [50000, 50000] (2500000000 FLOAT elements) but holds {stored} of data "
        f"where {expected}; the file is corrupt or was edited: re-export the model"
    )


# --------------------------------------------------------------------------------------------
# Models: structure


def test_a_custom_domain_operator_is_refused(tmp_path):
    model = classifier(
        nodes=[helper.make_node("FancyMatMul", ["x", "W"], ["logits"], name="fancy", domain="com.example")],
        initializers=[numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    assert refused_model(model_file(tmp_path, model)).detail == (
        "node 'fancy' uses operator 'FancyMatMul' from the custom domain 'com.example'; only standard ONNX "
        "operators (the default domain) are supported: export the model without custom operators"
    )


def test_an_onnx_runtime_contrib_operator_is_refused_with_the_unoptimised_export_hint(tmp_path):
    model = classifier(
        nodes=[helper.make_node("FastGelu", ["x"], ["g"], name="fused", domain="com.microsoft"),
               helper.make_node("MatMul", ["g", "W"], ["logits"])],
        initializers=[numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    detail = refused_model(model_file(tmp_path, model)).detail
    assert ("'FastGelu' from the custom domain 'com.microsoft' (one of ONNX Runtime's contrib "
            "operators") in detail
    assert "save the model before those optimizations" in detail


def test_a_model_local_function_is_refused_with_the_inlining_hint(tmp_path):
    function = helper.make_function(
        "local",
        "Lin",
        ["a", "b"],
        ["c"],
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [helper.make_opsetid("", 17)],
    )
    model = classifier(
        nodes=[helper.make_node("Lin", ["x", "W"], ["logits"], name="call", domain="local")],
        initializers=[numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
        functions=[function],
    )
    model.opset_import.append(helper.make_opsetid("local", 1))
    detail = refused_model(model_file(tmp_path, model)).detail
    assert (
        "from the custom domain 'local' (a model-local function: inline it with "
        "onnx.inliner.inline_local_functions)" in detail
    )


def _input(name, elem_type, shape):
    return helper.make_tensor_value_info(name, elem_type, shape)


@pytest.mark.parametrize(
    ("inputs", "nodes", "message"),
    [
        (
            [_input("x", TensorProto.FLOAT, ["N", 4]), _input("y", TensorProto.FLOAT, ["N", 4])],
            [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("MatMul", ["s", "W"], ["logits"])],
            "the model has 2 inputs ('x', 'y'); export the classifier with exactly one input, "
            "the image batch",
        ),
        (
            [_input("x", TensorProto.INT64, ["N", 4])],
            [
                helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                helper.make_node("MatMul", ["f", "W"], ["logits"]),
            ],
            "input 'x' has element type INT64; export the model with a float32, float16 or bfloat16 "
            "input (cast inside the model if it needs another type)",
        ),
        (
            [_input("x", TensorProto.FLOAT, ["N", 2, 2])],
            [
                helper.make_node("Reshape", ["x", "flat"], ["f"]),
                helper.make_node("MatMul", ["f", "W"], ["logits"]),
            ],
            "input 'x' has rank 3; expected images [N, C, H, W] or [N, H, W, C] "
            "(add a channel axis to [N, H, W]), or flat vectors [N, D]",
        ),
        (
            [_input("x", TensorProto.FLOAT, None)],
            [helper.make_node("MatMul", ["x", "W"], ["logits"])],
            "the model is not valid ONNX: Field 'shape' of 'type' is required but missing.",
        ),
    ],
)
def test_the_input_must_be_one_float_image_tensor(tmp_path, inputs, nodes, message):
    initializers = [
        numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
    ]
    model = classifier(nodes=nodes, initializers=initializers, inputs=inputs)
    assert refused_model(model_file(tmp_path, model)).detail == message


def test_checker_errors_are_reported(tmp_path):
    model = classifier(
        nodes=[helper.make_node("NoSuchOp", ["x", "W"], ["logits"])],
        initializers=[numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    detail = refused_model(model_file(tmp_path, model)).detail
    assert detail.startswith("the model is not valid ONNX: No Op registered for NoSuchOp")


def test_shape_inference_errors_are_reported(tmp_path):
    model = classifier(
        nodes=[helper.make_node("MatMul", ["x", "W"], ["logits"])],
        initializers=[numpy_helper.from_array(np.ones((5, 3), np.float32), "W")],
    )
    detail = refused_model(model_file(tmp_path, model)).detail
    assert detail.startswith("shape inference failed: ")
    assert "re-export the model (its declared shapes contradict its operators)" in detail


def test_an_opset_newer_than_the_runtime_is_refused(tmp_path):
    newest = max_runtime_opset()
    if newest >= onnx.defs.onnx_opset_version():
        pytest.skip("onnx knows no opset newer than the runtime's")
    detail = refused_model(model_file(tmp_path, classifier(opset=newest + 1))).detail
    assert detail == (
        f"the model uses opset {newest + 1}, newer than the runtime supports; export it with "
        f"opset_version between 17 and {newest}"
    )


def test_a_constant_of_huge_size_is_refused_before_it_is_computed(tmp_path):
    """ConstantOfShape fed by 8 stored bytes would make constant folding allocate 400 GB."""
    model = classifier(
        nodes=[
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["big"],
                name="bomb",
                value=numpy_helper.from_array(np.array([1.0], np.float32)),
            ),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("Add", ["z", "total"], ["logits"]),
        ],
        initializers=[
            numpy_helper.from_array(np.array([100_000_000_000], np.int64), "shape"),
            numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
        ],
    )
    tracemalloc.start()
    try:
        detail = refused_model(model_file(tmp_path, model)).detail
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    assert detail.startswith(
        "the model computes 400000000000 bytes of constants when it is loaded "
        "(node 'bomb', ConstantOfShape), over the limit of "
    )


def expand_bomb(side: int) -> onnx.ModelProto:
    """x [N, 4] -> Expand to a stored [1, 4, side, side] -> ReduceMean -> MatMul: a few stored bytes
    make a tensor of 16 x side^2 bytes per image."""
    return classifier(
        nodes=[
            helper.make_node("Reshape", ["x", "column"], ["r"]),
            helper.make_node("Expand", ["r", "big"], ["e"], name="expand"),
            helper.make_node("ReduceMean", ["e"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["m", "W"], ["logits"]),
        ],
        initializers=[
            numpy_helper.from_array(np.array([-1, 4, 1, 1], np.int64), "column"),
            numpy_helper.from_array(np.array([1, 4, side, side], np.int64), "big"),
            numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
        ],
    )


def test_a_tensor_of_one_image_past_the_limit_is_refused_before_the_model_runs(tmp_path):
    tracemalloc.start()
    try:
        detail = refused_model(model_file(tmp_path, expand_bomb(side=20_000))).detail
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    assert detail.startswith("the model's tensor 'e' takes 6400000000 bytes for one image, over the limit of "
                             "1073741824 bytes; export the model at a smaller input size")
    assert validate_model(model_file(tmp_path, expand_bomb(side=64)), max_bytes=MiB).num_classes == 3


def test_a_constant_of_unknowable_size_is_refused(tmp_path):
    model = classifier(
        nodes=[
            helper.make_node("Where", ["condition", "a", "b"], ["shape"]),
            helper.make_node("Expand", ["row", "shape"], ["rows"], name="expand"),
            helper.make_node("ReduceSum", ["rows"], ["total"], keepdims=0),
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("Add", ["z", "total"], ["logits"]),
        ],
        initializers=[
            numpy_helper.from_array(np.array([True, False]), "condition"),
            numpy_helper.from_array(np.array([10**9, 1], np.int64), "a"),
            numpy_helper.from_array(np.array([1, 3], np.int64), "b"),
            numpy_helper.from_array(np.ones((1, 3), np.float32), "row"),
            numpy_helper.from_array(np.ones((4, 3), np.float32), "W"),
        ],
    )
    assert refused_model(model_file(tmp_path, model)).detail == (
        "node 'expand' (Expand) computes a constant whose size cannot be known before running it; store "
        "the value as an initializer or compute it from the model input"
    )


# --------------------------------------------------------------------------------------------
# Models: accepted


def test_a_good_cnn_is_described():
    info = validate_model(GOOD_MODEL, max_bytes=64 * MiB)
    assert info == ModelInfo(
        input_name="input",
        input_shape=[None, 1, 28, 28],
        num_classes=10,
        opset=17,
        gradients_available=True,
        unsupported=[],
        operators={"Conv": 2, "Flatten": 1, "Gemm": 2, "MaxPool": 2, "Relu": 3},
    )


def test_a_flat_vector_mlp_is_accepted(tmp_path):
    rng = np.random.default_rng(0)
    model = classifier(
        nodes=[
            helper.make_node("Gemm", ["x", "W1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"]),
        ],
        initializers=[
            numpy_helper.from_array(rng.random((64, 16), np.float32), "W1"),
            numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
            numpy_helper.from_array(rng.random((16, 3), np.float32), "W2"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
        ],
        inputs=[_input("x", TensorProto.FLOAT, ["N", 64])],
    )
    info = validate_model(model_file(tmp_path, model), max_bytes=MiB)
    assert (info.input_shape, info.num_classes, info.gradients_available) == ([None, 64], 3, True)


@pytest.mark.parametrize("op_type", ["Sign", "Round"])
def test_an_operator_without_a_gradient_leaves_black_box_attacks(tmp_path, op_type):
    model = classifier(
        nodes=[
            helper.make_node(op_type, ["x"], ["q"], name="quantise"),
            helper.make_node("MatMul", ["q", "W"], ["logits"], name="linear"),
        ],
        initializers=[numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    info = validate_model(model_file(tmp_path, model), max_bytes=MiB)
    assert (info.input_shape, info.num_classes, info.gradients_available) == ([None, 4], 3, False)
    assert info.unsupported == [
        {
            "op_type": op_type,
            "node": "quantise",
            "reason": "its gradient is zero almost everywhere, so gradient attacks would be masked; use "
            "black-box attacks, or write the quantization as QuantizeLinear -> DequantizeLinear, which "
            "is differentiated straight through",
        }
    ]
    assert info.operators == {"MatMul": 1, op_type: 1}


# --------------------------------------------------------------------------------------------
# Datasets: helpers


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def zip_bytes(members: dict, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def png(width: int = 5, height: int = 4, mode: str = "L", value: int = 0, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    color = value if mode in ("L", "P", "1") else (value,) * len(mode)
    Image.new(mode, (width, height), color).save(buffer, format=format)
    return buffer.getvalue()


LIMITS = {"max_bytes": 64 * MiB, "max_samples": 1000, "max_decoded_bytes": 64 * MiB}


def dataset_file(tmp_path: Path, data: bytes, name: str = "dataset.upload") -> Path:
    return write(tmp_path / name, data)


def refused_dataset(path: Path, **limits) -> UserError:
    with pytest.raises(UserError) as caught:
        validate_dataset(path, **{**LIMITS, **limits})
    return caught.value


def one_image() -> np.ndarray:
    return np.full((1, 1, 2, 2), 0.5, np.float32)


# --------------------------------------------------------------------------------------------
# Datasets: .npz


def test_a_good_npz_is_described_and_loads_like_load_npz(tmp_path):
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    data = npz_bytes(x=x, y=np.array([0, 1, 2, 1, 0]))
    path = dataset_file(tmp_path, data)
    assert validate_dataset(path, **LIMITS) == DatasetInfo(
        format="npz", samples=5, shape=[1, 8, 8], source_dtype="float32", num_classes=3, classes=None
    )
    loaded, expected = load_dataset_file(path, (0.0, 1.0)), load_npz(data)
    np.testing.assert_array_equal(loaded.x, expected.x)
    np.testing.assert_array_equal(loaded.y, expected.y)


def test_uint8_and_three_dimensional_images_are_accepted(tmp_path):
    path = dataset_file(tmp_path, npz_bytes(x=np.zeros((4, 6, 6), np.uint8), y=np.arange(4)))
    assert validate_dataset(path, **LIMITS) == DatasetInfo(
        format="npz", samples=4, shape=[6, 6], source_dtype="uint8", num_classes=4, classes=None
    )
    assert load_dataset_file(path, (-1.0, 1.0)).x.shape == (4, 1, 6, 6)


class _Payload:
    """Unpickling this creates a marker file: proof that no pickle is ever loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_inside_an_npz_is_refused_and_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.empty(2, dtype=object)
    payload[:] = [_Payload(marker), _Payload(marker)]
    assert pickle.loads(pickle.dumps(payload[0])) is None and marker.exists()  # the payload works
    marker.unlink()
    for arrays in (
        {"x": payload, "y": np.arange(2)},
        {"x": one_image(), "y": np.zeros(1, np.int64), "extra": payload},
    ):
        path = dataset_file(tmp_path, npz_bytes(**arrays))
        key = "x" if "extra" not in arrays else "extra"
        assert refused_dataset(path).detail == (
            f"{key!r} holds Python objects; store plain numeric arrays (no pickles are ever loaded)"
        )
        with pytest.raises(DatasetError, match="holds Python objects"):
            load_dataset_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.array([[[[np.nan, 0.5], [0.5, 0.5]]]], np.float32), "y": np.zeros(1, np.int64)},
            "'x' holds 1 NaN or infinite values; replace them (numpy.nan_to_num) or drop those images",
        ),
        (
            {"x": np.full((2, 1, 2, 2), np.inf, np.float64), "y": np.zeros(2, np.int64)},
            "'x' holds 8 NaN or infinite values; replace them (numpy.nan_to_num) or drop those images",
        ),
        ({"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.array([0, -1])}, "labels must be >= 0, found -1"),
        (
            {"x": np.zeros((3, 1, 2, 2), np.float32), "y": np.zeros(2, np.int64)},
            "'x' must be [N, C, H, W], [N, H, W, C] or [N, H, W] with N = len(y) = 2, got [3, 1, 2, 2]",
        ),
        (
            {"x": np.zeros((2, 4), np.float32), "y": np.zeros(2, np.int64)},
            "'x' must be [N, C, H, W], [N, H, W, C] or [N, H, W] with N = len(y) = 2, got [2, 4]",
        ),
        (
            {"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.zeros(2, np.float32)},
            "'y' has dtype float32; labels must be integers",
        ),
        (
            {"x": np.zeros((2, 1, 2, 2), np.int32), "y": np.zeros(2, np.int64)},
            "'x' has dtype int32; use float32 pixels or uint8 (0..255)",
        ),
        (
            {"x": np.zeros((2, 1, 2, 2), np.float32), "y": np.zeros((2, 1), np.int64)},
            "'y' must be 1-D (one label per image), got shape [2, 1]",
        ),
        (
            {"x": np.zeros((2, 1, 2, 2), np.float32)},
            "the .npz lacks ['y']; it needs arrays 'x' (images) and 'y' (labels), found ['x']: "
            "numpy.savez(path, x=images, y=labels)",
        ),
        (
            {"x": np.zeros((0, 1, 2, 2), np.float32), "y": np.zeros(0, np.int64)},
            "the dataset holds no samples",
        ),
        (
            {"x": np.zeros((8, 1, 0, 5), np.float32), "y": np.zeros(8, np.int64)},
            "'x' holds images of shape [1, 0, 5], with a dimension of size 0; each image needs at least "
            "one channel, row and column",
        ),
    ],
)
def test_bad_arrays_are_refused_with_a_reason(tmp_path, arrays, message):
    error = refused_dataset(dataset_file(tmp_path, npz_bytes(**arrays)))
    assert (error.status, error.type, error.detail) == (400, "invalid_dataset", message)


def test_more_samples_than_the_limit_are_refused(tmp_path):
    path = dataset_file(tmp_path, npz_bytes(x=np.zeros((11, 1, 2, 2), np.uint8), y=np.zeros(11, np.int64)))
    error = refused_dataset(path, max_samples=10)
    assert (error.status, error.type) == (413, "too_large")
    assert error.detail == "the dataset has 11 samples, over the limit of 10"


def test_arrays_over_the_decoded_budget_are_refused_from_their_headers(tmp_path):
    arrays = {"x": np.zeros((100, 1, 64, 64), np.float32), "y": np.zeros(100, np.int64)}
    path = dataset_file(tmp_path, npz_bytes(**arrays))
    error = refused_dataset(path, max_decoded_bytes=MiB)
    assert error.status == 413
    assert error.detail == (
        "the arrays take 1639200 bytes once decoded, over the limit of 1048576 bytes; "
        "upload fewer or smaller images"
    )


def test_a_header_declaring_a_huge_array_is_refused_without_reading_it(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1, 1000, 1000)}
    )
    data = zip_bytes(
        {"x.npy": header.getvalue(), "y.npy": npz_member(np.zeros(1_000_000, np.int64))}, zipfile.ZIP_STORED
    )
    tracemalloc.start()
    try:
        detail = refused_dataset(dataset_file(tmp_path, data)).detail
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB
    assert detail == (
        "archive member 'x.npy' holds 0 bytes of data but its header declares "
        "[1000000, 1, 1000, 1000] float32; the file is truncated or corrupt: save it again "
        "with numpy.savez"
    )


# --------------------------------------------------------------------------------------------
# Datasets: archive structure


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.png", "a '..' component"),
        ("cat/../../evil.png", "a '..' component"),
        ("/etc/cron.d/evil.png", "an absolute path"),
        ("cat\\..\\evil.png", "a backslash"),
        ("C:/evil.png", "a drive letter"),
        ("cat//evil.png", "an empty component"),
    ],
)
def test_unsafe_member_names_are_refused(tmp_path, name, problem):
    data = zip_bytes({"cat/a.png": png(), name: png()})
    assert refused_dataset(dataset_file(tmp_path, data)).detail == (
        f"archive member {name!r} has {problem} in its name; zip the dataset with relative paths only "
        "(cd dataset && zip -r ../dataset.zip .)"
    )


def test_a_symlink_entry_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/a.png", png())
        link = zipfile.ZipInfo("cat/b.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "../../../etc/passwd")
    assert refused_dataset(dataset_file(tmp_path, buffer.getvalue())).detail == (
        "archive member 'cat/b.png' is a link or special file; the archive may hold only regular files and "
        "folders (zip without --symlinks)"
    )


def test_a_zip_bomb_is_refused_from_its_declared_size_before_decompressing(tmp_path, monkeypatch):
    data = zip_bytes({"x.npy": b"\0" * (50 * MiB), "y.npy": npz_member(np.zeros(1, np.int64))})
    assert len(data) < MiB

    def no_decompression(*args, **kwargs):
        raise AssertionError("a member was decompressed")

    monkeypatch.setattr(zipfile.ZipExtFile, "read", no_decompression)
    error = refused_dataset(dataset_file(tmp_path, data), max_decoded_bytes=4 * MiB)
    assert (error.status, error.type) == (413, "too_large")
    assert error.detail == (
        f"the archive declares {50 * MiB + 136} bytes once decompressed, over the "
        f"limit of {8 * MiB + MiB} bytes; upload fewer or smaller images"
    )


def test_a_member_compressed_far_beyond_any_image_is_refused(tmp_path, monkeypatch):
    data = zip_bytes({"cat/a.png": b"\0" * (50 * MiB)})
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda *a, **k: pytest.fail("decompressed"))
    detail = refused_dataset(dataset_file(tmp_path, data), max_decoded_bytes=1 << 30).detail
    assert detail.startswith("archive member 'cat/a.png' expands ")
    assert detail.endswith(
        "more than 200 times: refused as a possible zip bomb; store it uncompressed (numpy.savez, zip -0)"
    )


def _patch_first_member_size(data: bytes, name: bytes, file_size: int) -> bytes:
    """Rewrite the uncompressed size the first member declares, in its local and central headers."""
    out = bytearray(data)
    assert out[30 : 30 + len(name)] == name
    struct.pack_into("<L", out, 22, file_size)
    central = struct.unpack_from("<L", out, out.rindex(b"PK\x05\x06") + 16)[0]
    assert out[central + 46 : central + 46 + len(name)] == name
    struct.pack_into("<L", out, central + 24, file_size)
    return bytes(out)


def test_a_member_that_decompresses_past_its_declared_size_is_cut_off(tmp_path):
    """x.npy says it holds 192 bytes (a consistent header and 64 bytes of data) but inflates to 50 MB:
    reading stops at 192 bytes and the CRC check refuses it."""
    small = npz_member(np.zeros((1, 1, 4, 4), np.float32))
    data = zip_bytes({"x.npy": small + b"\0" * (50 * MiB), "y.npy": npz_member(np.zeros(1, np.int64))})
    data = _patch_first_member_size(data, b"x.npy", len(small))
    tracemalloc.start()
    try:
        detail = refused_dataset(dataset_file(tmp_path, data)).detail
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB
    assert detail == (
        "archive member 'x.npy' is corrupt (Bad CRC-32 for file 'x.npy'); re-create the archive"
    )


def test_overlapping_entries_are_refused(tmp_path):
    """Two directory entries share one local file (CVE-2024-0450's 'overlapping' zip bomb)."""
    data = zip_bytes({"cat/a.png": png()})
    end = data.rindex(b"PK\x05\x06")
    size, offset = struct.unpack_from("<LL", data, end + 12)
    record = data[offset : offset + size]
    directory = record + record.replace(b"cat/a.png", b"cat/b.png")
    tail = bytearray(data[end:])
    struct.pack_into("<HHL", tail, 8, 2, 2, len(directory))
    data = data[:offset] + directory + bytes(tail)
    assert refused_dataset(dataset_file(tmp_path, data)).detail == (
        "archive members 'cat/a.png' and 'cat/b.png' overlap (a known zip-bomb construction); re-create "
        "the archive"
    )


def test_duplicate_names_are_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("cat/a.png", png())
            archive.writestr("cat/a.png", png(value=255))
        data = buffer.getvalue()
    assert refused_dataset(dataset_file(tmp_path, data)).detail == (
        "archive member 'cat/a.png' appears more than once; re-create the archive"
    )


def test_an_archive_with_too_many_entries_is_refused_before_parsing_them(tmp_path, monkeypatch):
    data = zip_bytes({f"c/{i}.png": b"" for i in range(30)})
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("zipfile parsed the directory"))
    error = refused_dataset(dataset_file(tmp_path, data), max_samples=3)
    assert (error.status, error.detail) == (
        413,
        "the archive has more than 22 entries; the limit is 3 samples",
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"",
            "the dataset file is empty; upload an .npz (numpy.savez(path, x=images, y=labels)) or a .zip of "
            "image class folders",
        ),
        (
            b"random bytes, not an archive" * 10,
            "the file is neither an .npz archive nor a .zip of image class folders; save arrays with "
            "numpy.savez(path, x=images, y=labels), or zip folders of PNG or JPEG images named after "
            "their class (classname/image.png)",
        ),
        (
            npz_member(np.zeros(3)),
            "the file is a single .npy array; save images and labels together with "
            "numpy.savez(path, x=images, y=labels)",
        ),
    ],
)
def test_files_that_are_not_datasets_are_refused(tmp_path, data, message):
    assert refused_dataset(dataset_file(tmp_path, data)).detail == message


def test_a_file_over_the_size_limit_is_refused(tmp_path):
    path = dataset_file(tmp_path, npz_bytes(x=one_image(), y=np.zeros(1, np.int64)))
    error = refused_dataset(path, max_bytes=100)
    assert (error.status, error.detail) == (
        413,
        f"the dataset is {path.stat().st_size} bytes, over the limit of 100 bytes",
    )


def test_members_of_neither_layout_are_refused(tmp_path):
    data = zip_bytes({"cat/a.png": png(), "README.txt": b"hello"})
    assert refused_dataset(dataset_file(tmp_path, data)).detail.startswith(
        "archive member 'README.txt' does not fit either layout; the file is neither an .npz"
    )


def test_a_zipped_dataset_folder_gets_a_hint(tmp_path):
    data = zip_bytes({"digits/cat/a.png": png()})
    assert refused_dataset(dataset_file(tmp_path, data)).detail == (
        "archive member 'digits/cat/a.png' is nested too deeply: images sit in class folders at the top "
        "of the archive (classname/image.png); zip the contents of the dataset folder "
        "(cd dataset && zip -r ../dataset.zip .)"
    )


def test_npy_members_that_are_not_arrays_are_refused(tmp_path):
    data = zip_bytes({"x.npy": png(), "y.npy": npz_member(np.zeros(1, np.int64))})
    assert refused_dataset(dataset_file(tmp_path, data)).detail.startswith(
        "archive member 'x.npy' is not a readable .npy array ("
    )


# --------------------------------------------------------------------------------------------
# Datasets: PNG class folders


def test_a_png_class_folder_zip_is_described_and_loaded(tmp_path):
    members = {
        "dog/1.png": png(value=255),
        "cat/b.png": png(value=51),
        "cat/a.png": png(value=0),
        "bird/x.png": png(value=102),
        "bird/": b"",
    }
    path = dataset_file(tmp_path, zip_bytes(members), name="upload.npz")  # the name does not matter
    assert validate_dataset(path, **LIMITS) == DatasetInfo(
        format="png-zip",
        samples=4,
        shape=[1, 4, 5],
        source_dtype="uint8",
        num_classes=3,
        classes=["bird", "cat", "dog"],
        images={"png": 4},
    )
    dataset = load_dataset_file(path, (-1.0, 1.0))
    assert dataset.x.shape == (4, 1, 4, 5) and dataset.x.dtype == np.float32
    np.testing.assert_array_equal(dataset.y, [0, 1, 1, 2])  # bird/x, cat/a, cat/b, dog/1
    np.testing.assert_allclose(dataset.x[:, 0, 0, 0], [-0.2, -1.0, -0.6, 1.0], rtol=1e-6)
    assert dataset.source_dtype == "uint8"


def test_rgb_images_give_three_channels(tmp_path):
    path = dataset_file(tmp_path, zip_bytes({"a/1.png": png(mode="RGB"), "b/1.png": png(mode="RGB")}))
    info = validate_dataset(path, **LIMITS)
    assert (info.shape, info.num_classes) == ([3, 4, 5], 2)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            png(width=6),
            "'cat/2.png' is 6x4 L but 'cat/1.png' is 5x4 L; all images must have the same size and "
            "mode: declare resize / center_crop (and color=rgb) at upload, or resize and convert them",
        ),
        (
            png(mode="RGB"),
            "'cat/2.png' is 5x4 RGB but 'cat/1.png' is 5x4 L; all images must have the same size "
            "and mode: declare resize / center_crop (and color=rgb) at upload",
        ),
        (
            png(mode="RGBA"),
            "'cat/2.png' has mode RGBA; only 8-bit grayscale (L) and RGB images are accepted as they are: "
            "declare color=rgb (or grayscale) at upload to convert every image, or convert it, e.g. "
            "Image.open(p).convert('RGB').save(p)",
        ),
        (
            png(mode="P"),
            "'cat/2.png' has mode P; only 8-bit grayscale (L) and RGB images are accepted as they are",
        ),
        (
            b"GIF89a" + bytes(40),
            "archive member 'cat/2.png' is neither a PNG nor a JPEG image; a zip dataset holds only "
            "class folders of images (classname/image.png)",
        ),
        (png()[:45], "'cat/2.png' is not a readable PNG image (image file is truncated"),
        (png(format="JPEG")[:60], "'cat/2.png' is not a readable JPEG image"),
        # Pillow's message names its buffer's address: left out
        (b"\xff\xd8\xff" + bytes(40),
         "'cat/2.png' is not a readable JPEG image (cannot identify image file); save it again with an "
         "image editor or Pillow, or leave it out of the zip"),
    ],
)
def test_images_that_do_not_match_are_refused(tmp_path, second, message):
    data = zip_bytes({"cat/1.png": png(), "cat/2.png": second})
    assert refused_dataset(dataset_file(tmp_path, data)).detail.startswith(message)


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    data = zip_bytes({"cat/1.png": png(), "cat/notes.txt": b"hello"})
    assert refused_dataset(dataset_file(tmp_path, data)).detail == (
        "archive member 'cat/notes.txt' is neither a PNG nor a JPEG image; a zip dataset holds only class "
        "folders of images (classname/image.png)"
    )


def test_an_image_over_the_pixel_limit_is_refused_before_pillow_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = zip_bytes({"cat/1.png": png(width=12, height=12)})  # 144 pixels: Pillow would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        error = refused_dataset(dataset_file(tmp_path, data))
    assert (error.status, error.detail) == (
        413,
        "'cat/1.png' is 12x12 pixels, over the limit of 100 pixels per image",
    )


def test_png_limits_on_samples_and_decoded_size(tmp_path):
    data = zip_bytes({f"cat/{i}.png": png(width=64, height=64, mode="RGB") for i in range(10)})
    path = dataset_file(tmp_path, data)
    error = refused_dataset(path, max_samples=9)
    assert (error.status, error.detail) == (413, "the archive holds 10 images, over the limit of 9")
    error = refused_dataset(path, max_decoded_bytes=100_000)
    assert (error.status, error.detail) == (
        413,
        "10 images of 64x64 RGB take 122960 bytes once decoded, over the limit of 100000 bytes; upload "
        "fewer or smaller images",
    )


def test_load_dataset_file_raises_dataset_errors(tmp_path):
    path = dataset_file(tmp_path, zip_bytes({"../x.png": png()}))
    with pytest.raises(DatasetError, match=r"has a '\.\.' component in its name"):
        load_dataset_file(path)
