"""Stand-ins shared by the tests: a tiny face model, random faces, a quick attack, a small Keras file.

Imported as ``from fakes import ...`` (pytest puts ``tests/`` on ``sys.path``). Nothing here
touches the global torch RNG: every random draw comes from a local ``torch.Generator``.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from krtfuap.alignment import ARCFACE_TEMPLATE_112
from krtfuap.attack import UAPAttack


class TinyEmbedder(nn.Module):
    """A small fixed conv net standing in for a face model.

    Two strided 3x3 convolutions (3 -> 8 -> ``dim`` channels, ReLU between) and a global
    average pool: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, dim)``, for ``H, W >= 7``.

    Parameters
    ----------
    seed : int
        The weights depend on it alone (PyTorch's default init, drawn from a local generator).
    dim : int
        Embedding size.

    Attributes
    ----------
    calls : list of int
        The batch size of every forward, for tests that count model calls.
    """

    def __init__(self, seed: int = 0, dim: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        first, second = (_seeded_conv(3, 8, generator), _seeded_conv(8, dim, generator))
        self.net = nn.Sequential(first, nn.ReLU(), second, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return self.net(images - 0.5)


class LinearEmbedder(nn.Module):
    """A linear toy face model: ``(B, 3, size, size)`` -> ``W vec(x) (+ b)`` of shape ``(B, dim)``.

    The weights depend on ``seed`` alone (PyTorch's default init, drawn from a local generator).
    """

    def __init__(self, size: int = 8, dim: int = 4, seed: int = 0, bias: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = skip_init(nn.Linear, 3 * size * size, dim, bias=bias)
        _default_init(self.linear, generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))


def _seeded_conv(in_channels: int, out_channels: int, generator: torch.Generator) -> nn.Conv2d:
    conv = skip_init(nn.Conv2d, in_channels, out_channels, 3, stride=2)
    _default_init(conv, generator)
    return conv


def _default_init(layer: nn.Conv2d | nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default init of a conv or linear layer (``reset_parameters``), drawn from ``generator``."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def random_faces(n: int = 16, seed: int = 0, size: int = 32, margin: float = 0.0) -> torch.Tensor:
    """``n`` random RGB "faces", shape ``(n, 3, size, size)``, uniform in ``[margin, 1 - margin]``."""
    pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return pixels * (1 - 2 * margin) + margin


QUICK = dict(threshold=0.9, max_epochs=2, batch_size=8, random_state=0)
"""The settings of :func:`tiny_attack` that a test does not give: a short, repeatable fit."""


def tiny_attack(estimator: type = UAPAttack, model: nn.Module | None = None, **params: Any):
    """An unfitted ``estimator`` on ``model`` (default a new :class:`TinyEmbedder`).

    ``params`` override the :data:`QUICK` settings. Test modules bind their own settings with
    ``functools.partial(tiny_attack, UAPAttack, stealth_loss="ssim", ...)``.
    """
    taken = estimator._get_param_names()  # random noise learns nothing: it has no stopping rules
    settings = {key: value for key, value in QUICK.items() if key in taken}
    return estimator(model if model is not None else TinyEmbedder(), **{**settings, **params})


def untimed(history: list[dict]) -> list[dict]:
    """Records (``history_``, ``epoch_scores_``) without the wall-clock ``time`` field, which differs between runs."""
    return [{key: value for key, value in record.items() if key != "time"} for record in history]


def placed_keypoints(scale: float, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The five ArcFace template keypoints ``(5, 2)`` placed in a photo by a known similarity transform:
    scaled by ``scale``, turned by ``angle`` radians about the template's origin, moved by ``shift``."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ARCFACE_TEMPLATE_112 @ (scale * rotation).T + np.asarray(shift)


# Keras 2 stores a Lambda's function as marshalled bytecode; this stand-in is not valid bytecode, so a
# loader that tried to run it would fail.
_NOT_BYTECODE = ["bm90IGJ5dGVjb2Rl\n", None, None]


def _layer(kind: str, name: str, inbound: list[str], **config) -> dict:
    nodes = [[[source, 0, 0, {}] for source in inbound]] if inbound else []
    return {"class_name": kind, "name": name, "config": {"name": name, **config}, "inbound_nodes": nodes}


def small_keras_model(rng: np.random.Generator, channels: int = 2) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """A Keras-2-style graph touching every supported layer, random weights: ``(B, 8, 8, channels)`` -> ``(B, 4)``.

    Returns the ``model_config`` dict and the weights by layer name, as :func:`read_keras_h5` does.
    """
    layers = [
        _layer("InputLayer", "in", [], batch_input_shape=[None, 8, 8, channels]),
        # 8 -> 4 with "same" padding: TensorFlow pads one pixel after, none before (asymmetric).
        _layer("Conv2D", "c1", ["in"], filters=3, kernel_size=[3, 3], strides=[2, 2], padding="same",
               data_format="channels_last", dilation_rate=[1, 1], groups=1, activation="relu", use_bias=True),
        _layer("BatchNormalization", "bn1", ["c1"], axis=[3], epsilon=0.001, center=True, scale=False),
        _layer("Conv2D", "c2", ["in"], filters=2, kernel_size=[1, 1], strides=[2, 2], padding="valid",
               data_format="channels_last", dilation_rate=[1, 1], groups=1, activation="linear", use_bias=False),
        # A batch normalisation alone after a linear convolution: KerasGraph folds it into c2.
        _layer("BatchNormalization", "bn3", ["c2"], axis=-1, epsilon=0.001, center=False, scale=True),
        _layer("Concatenate", "cat", ["bn1", "bn3"], axis=3),
        _layer("Lambda", "lam", ["cat"], function=_NOT_BYTECODE, function_type="lambda", arguments={"scale": 0.25}),
        _layer("Add", "add", ["cat", "lam"]),
        _layer("Activation", "act", ["add"], activation="relu"),
        _layer("MaxPooling2D", "pool", ["act"], pool_size=[3, 3], strides=[2, 2], padding="same",
               data_format="channels_last"),
        _layer("GlobalAveragePooling2D", "gap", ["pool"], data_format="channels_last", keepdims=False),
        _layer("Dropout", "drop", ["gap"], rate=0.2),
        _layer("Dense", "dense", ["drop"], units=4, activation="linear", use_bias=True),
        _layer("BatchNormalization", "bn2", ["dense"], axis=[1], epsilon=0.001, center=True, scale=True),
    ]
    config = {"class_name": "Functional", "config": {
        "name": "small", "layers": layers, "input_layers": [["in", 0, 0]], "output_layers": [["bn2", 0, 0]]}}
    positive = lambda *shape: rng.uniform(0.5, 1.5, shape).astype(np.float32)  # noqa: E731
    normal = lambda *shape: rng.normal(0.0, 1.0, shape).astype(np.float32)  # noqa: E731
    weights = {
        "c1": [normal(3, 3, channels, 3), normal(3)],
        "bn1": [normal(3), normal(3), positive(3)],  # beta, moving mean, moving variance (scale=False)
        "c2": [normal(1, 1, channels, 2)],
        "bn3": [positive(2), normal(2), positive(2)],  # gamma, moving mean, moving variance (center=False)
        "dense": [normal(5, 4), normal(4)],
        "bn2": [positive(4), normal(4), normal(4), positive(4)],  # gamma, beta, mean, variance
    }
    return config, weights


def write_keras_h5(path, config: dict, weights: dict[str, list[np.ndarray]]) -> None:
    """Write ``config`` and ``weights`` in Keras 2's whole-model HDF5 layout (needs ``h5py``)."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps(config)
        handle.attrs["keras_version"] = "2.16.0"
        group = handle.create_group("model_weights")
        for layer in config["config"]["layers"]:
            name = layer["name"]
            layer_group = group.create_group(name)
            arrays = weights.get(name, [])
            names = [f"{name}/w{index}:0" for index in range(len(arrays))]
            layer_group.attrs["weight_names"] = [n.encode() for n in names]
            for weight_name, array in zip(names, arrays):
                layer_group.create_dataset(weight_name, data=array)


# ---------------------------------------------------------------- a frozen TensorFlow graph, written here

#: ``(name, op, inputs, attributes)`` of each node of a graph to write.
GraphNodes = list[tuple[str, str, list[str], dict[str, Any]]]


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s as ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _number(number: int, value: int) -> bytes:
    """A varint protobuf field."""
    return _varint(number << 3) + _varint(value)


def _tensor_proto(array: np.ndarray) -> bytes:
    """A ``TensorProto``: float32 scalars as ``float_val``, everything else as raw ``tensor_content``."""
    dtype = {np.dtype(np.float32): 1, np.dtype(np.int32): 3}[array.dtype]
    shape = b"".join(_field(2, _number(1, size)) for size in array.shape)
    if array.ndim == 0 and dtype == 1:
        return _number(1, dtype) + _field(2, shape) + _varint(5 << 3 | 5) + struct.pack("<f", float(array))
    return _number(1, dtype) + _field(2, shape) + _field(4, array.astype(array.dtype.newbyteorder("<")).tobytes())


def _attr_value(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        return _field(8, _tensor_proto(value))
    if isinstance(value, bool):
        return _number(5, int(value))
    if isinstance(value, int):
        return _number(3, value)
    if isinstance(value, float):
        return _varint(4 << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, bytes):
        return _field(2, value)
    return _field(1, _field(3, b"".join(_varint(item) for item in value)))  # a list of ints, packed


def write_graph_def(path, nodes: GraphNodes) -> None:
    """Write ``(name, op, inputs, attributes)`` nodes as a binary TensorFlow ``GraphDef`` file."""
    body = b""
    for name, op, inputs, attrs in nodes:
        node = _field(1, name.encode()) + _field(2, op.encode())
        node += b"".join(_field(3, source.encode()) for source in inputs)
        node += b"".join(_field(5, _field(1, key.encode()) + _field(2, _attr_value(value)))
                         for key, value in attrs.items())
        body += _field(1, node)
    with open(path, "wb") as handle:
        handle.write(body + _field(4, _number(1, 27)))  # versions { producer: 27 }, as TensorFlow writes


def small_tf_graph(rng: np.random.Generator) -> tuple[GraphNodes, dict[str, np.ndarray]]:
    """A small Inception-ResNet-like frozen graph and its weights.

    It takes ``(B, 10, 10, 3)`` NHWC input (so ``"SAME"`` padding at stride 2 is uneven), ends in an
    L2-normalised 5-d embedding (the node ``embeddings``) and uses every op ``TensorFlowGraph`` supports.

    Shapes that TensorFlow froze with a batch of 1 (``[1, -1]``) are kept, as in real frozen graphs.
    """
    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.5, shape).astype(np.float32)

    weights = {
        "w1": normal(3, 3, 3, 4), "b1": normal(4), "w2": normal(1, 3, 4, 2), "w3": normal(3, 1, 4, 2),
        "dense": normal(4, 5), "beta": normal(5), "mean": normal(5),
        "variance": rng.uniform(0.5, 2.0, 5).astype(np.float32), "gamma": np.ones(5, np.float32),
    }
    conv = {"strides": [1, 1, 1, 1], "padding": b"SAME", "data_format": b"NHWC", "dilations": [1, 1, 1, 1]}

    def const(name: str, value: np.ndarray) -> tuple[str, str, list[str], dict[str, Any]]:
        return name, "Const", [], {"value": value, "dtype": 1 if value.dtype == np.float32 else 3}

    nodes = [const(name, value) for name, value in weights.items()] + [
        ("input", "Placeholder", [], {"dtype": 1}),
        ("c1", "Conv2D", ["input:0", "w1"], {**conv, "strides": [1, 2, 2, 1]}),
        ("c1/bias", "BiasAdd", ["c1", "b1"], {"data_format": b"NHWC"}),
        ("r1", "Relu", ["c1/bias"], {}),
        ("c2", "Conv2D", ["r1", "w2"], conv),
        ("c3", "Conv2D", ["r1", "w3"], conv),
        const("axis", np.array(3, np.int32)),
        ("cat", "ConcatV2", ["c2", "c3", "axis"], {"N": 2}),
        const("scale", np.array(0.25, np.float32)),
        ("scaled", "Mul", ["scale", "cat"], {}),
        ("res", "AddV2", ["r1", "scaled"], {}),
        ("pool", "MaxPool", ["res"], {"ksize": [1, 3, 3, 1], "strides": [1, 2, 2, 1], "padding": b"SAME",
                                      "data_format": b"NHWC"}),
        ("avg", "AvgPool", ["pool", "^r1"], {"ksize": [1, 3, 3, 1], "strides": [1, 1, 1, 1], "padding": b"VALID",
                                            "data_format": b"NHWC"}),
        const("flat_shape", np.array([1, -1], np.int32)),
        ("flat", "Reshape", ["avg", "flat_shape"], {}),
        ("dense/out", "MatMul", ["flat", "dense"], {"transpose_a": False, "transpose_b": False}),
        const("as_map", np.array([-1, 1, 1, 5], np.int32)),
        ("map", "Reshape", ["dense/out", "as_map"], {}),
        ("bn", "FusedBatchNorm", ["map", "gamma", "beta", "mean", "variance"],
         {"epsilon": 0.001, "is_training": False, "data_format": b"NHWC"}),
        const("as_vector", np.array([1, 5], np.int32)),
        ("bottleneck", "Reshape", ["bn", "as_vector"], {}),
        ("ident", "Identity", ["bottleneck"], {}),
        ("square", "Square", ["ident"], {}),
        const("sum_axes", np.array([1], np.int32)),
        ("sum", "Sum", ["square", "sum_axes"], {"keep_dims": True}),
        const("floor", np.array(1e-10, np.float32)),
        ("max", "Maximum", ["sum", "floor"], {}),
        ("rsqrt", "Rsqrt", ["max"], {}),
        ("embeddings", "Mul", ["ident", "rsqrt"], {}),
        ("unused", "Softmax", ["embeddings"], {}),  # not on the way to the output: never built
    ]
    return nodes, weights
