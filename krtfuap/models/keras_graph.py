"""Run a saved Keras model (HDF5) in PyTorch, differentiably, without TensorFlow.

A Keras 2 ``model.save("model.h5")`` file holds the model's layer graph as JSON
(the ``model_config`` attribute) and each layer's weights as arrays under
``model_weights``. :class:`KerasGraph` rebuilds that graph from ``torch.nn``
layers, keeping Keras' definitions (TensorFlow's ``"same"`` padding, which puts
the odd extra pixel after, not before; batch normalisation with Keras' epsilon),
and gradients flow to the input. The tests check it against a float64 NumPy
re-implementation of those definitions (TensorFlow is not needed, and not used).

Only the layers that convolutional face recognisers such as FaceNet's
Inception-ResNet-v1 use are supported: ``InputLayer``, ``Conv2D``,
``BatchNormalization``, ``Activation`` (``relu``, ``linear``), ``Concatenate``,
``Add``, ``MaxPooling2D``, ``GlobalAveragePooling2D``, ``Dropout`` (identity at
inference), ``Dense`` and the residual-scaling ``Lambda`` (``x * scale``, read
from the layer's ``arguments``). A ``Lambda`` layer stores its function as
marshalled Python bytecode: that code is never loaded or run; a ``Lambda`` whose
arguments are not a single ``scale`` is refused.

Tensors are kept channels-first (``(B, C, H, W)``) inside; Keras' channels-last
axes are mapped accordingly.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KerasGraph", "read_keras_h5"]

SUPPORTED_LAYERS = (
    "InputLayer", "Conv2D", "BatchNormalization", "Activation", "Concatenate", "Add",
    "MaxPooling2D", "GlobalAveragePooling2D", "Dropout", "Dense", "Lambda",
)


def _linear(x: torch.Tensor) -> torch.Tensor:
    return x


_ACTIVATIONS = {"linear": _linear, "relu": F.relu}


def read_keras_h5(path: str | Path) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Read the layer graph and the weights of a Keras 2 HDF5 model file.

    Parameters
    ----------
    path : str or pathlib.Path
        A file written by Keras 2's ``model.save(path)`` (HDF5, with the model).

    Returns
    -------
    config : dict
        The ``model_config`` JSON (``{"class_name": "Functional", "config": {...}}``).
    weights : dict of str to list of numpy.ndarray
        Each layer's weights, by layer name, in Keras' order (e.g. ``[kernel, bias]``).

    Raises
    ------
    ModuleNotFoundError
        If ``h5py`` is not installed (``pip install h5py``).
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not HDF5 or holds no whole Keras model (weights-only files lack the graph).
    """
    try:
        import h5py
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "Reading a Keras .h5 model needs h5py: `pip install h5py` (or `pip install \"krtfuap[facenet]\"`)."
        ) from error
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file not found: {path}.")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not an HDF5 file (truncated, corrupt or another format).") from error
    with handle:
        if "model_config" not in handle.attrs or "model_weights" not in handle:
            raise ValueError(
                f"{path} holds no whole Keras model (no model_config / model_weights): save it with "
                "model.save(path) in Keras 2, not save_weights."
            )
        raw = handle.attrs["model_config"]
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        group = handle["model_weights"]
        weights: dict[str, list[np.ndarray]] = {}
        for name in group:
            names = [n.decode() if isinstance(n, bytes) else n for n in group[name].attrs.get("weight_names", [])]
            weights[name] = [np.asarray(group[name][n]) for n in names]
    return config, weights


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's ``"same"`` padding of one axis: ``(before, after)``, the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = _same_padding(x.shape[-1], kernel[1], stride[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def _channel_axis(axis: int | Sequence[int], rank: int) -> int:
    """The channels-first axis of Keras' channels-last ``axis`` for a tensor of ``rank`` dimensions."""
    if isinstance(axis, Sequence):
        if len(axis) != 1:
            raise ValueError(f"Only one normalisation axis is supported, got {axis!r}.")
        axis = axis[0]
    axis = axis % rank
    if axis == rank - 1:
        return 1
    if axis == 0:
        raise ValueError("A Keras layer over the batch axis is not supported.")
    return axis + 1


class _Conv2D(nn.Module):
    """A Keras ``Conv2D``; its weight is kept channels-last in memory (oneDNN's fast path on CPUs)."""

    def __init__(self, config: Mapping[str, Any], weights: Sequence[np.ndarray]) -> None:
        super().__init__()
        if config.get("data_format", "channels_last") != "channels_last" or config.get("groups", 1) != 1:
            raise ValueError(f"Conv2D {config['name']!r}: only channels_last, ungrouped convolutions are supported.")
        if tuple(config.get("dilation_rate", (1, 1))) != (1, 1):
            raise ValueError(f"Conv2D {config['name']!r}: dilated convolutions are not supported.")
        kernel = torch.from_numpy(np.ascontiguousarray(weights[0].transpose(3, 2, 0, 1))).float()
        self.weight = nn.Parameter(kernel.contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(torch.from_numpy(weights[1]).float()) if config["use_bias"] else None
        self.kernel_size = tuple(config["kernel_size"])
        self.stride = tuple(config["strides"])
        self.same = config["padding"] == "same"
        self.activation = _activation(config)

    def absorb(self, norm: _BatchNorm) -> None:
        """Fold the batch normalisation that follows this (linear) convolution into its weight and bias."""
        scale, shift = norm.scale.double(), norm.shift.double()
        weight = self.weight.detach().double() * scale.view(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias.detach().double() * scale + shift
        self.weight = nn.Parameter(weight.float().contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad_same(x, self.kernel_size, self.stride)
        return self.activation(F.conv2d(x, self.weight, self.bias, self.stride))


class _Dense(nn.Module):
    def __init__(self, config: Mapping[str, Any], weights: Sequence[np.ndarray]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(np.ascontiguousarray(weights[0].T)).float())
        self.bias = nn.Parameter(torch.from_numpy(weights[1]).float()) if config["use_bias"] else None
        self.activation = _activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.linear(x, self.weight, self.bias))


class _BatchNorm(nn.Module):
    """Inference-time batch normalisation folded to ``x * scale + shift`` along one axis."""

    def __init__(self, config: Mapping[str, Any], weights: Sequence[np.ndarray]) -> None:
        super().__init__()
        arrays = [torch.from_numpy(w).double() for w in weights]
        gamma = arrays.pop(0) if config.get("scale", True) else None
        beta = arrays.pop(0) if config.get("center", True) else None
        mean, variance = arrays
        scale = 1.0 / torch.sqrt(variance + config["epsilon"])
        if gamma is not None:
            scale = scale * gamma
        shift = -mean * scale + (beta if beta is not None else 0.0)
        self.axis = config["axis"]
        self.register_buffer("scale", scale.float())
        self.register_buffer("shift", shift.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = _channel_axis(self.axis, x.dim())
        shape = [1] * x.dim()
        shape[axis] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)


class _MaxPool(nn.Module):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.kernel_size = tuple(config["pool_size"])
        self.stride = tuple(config["strides"] or config["pool_size"])
        self.same = config["padding"] == "same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = _pad_same(x, self.kernel_size, self.stride, value=-math.inf)
        return F.max_pool2d(x, self.kernel_size, self.stride)


class _Elementwise(nn.Module):
    """The weight-free layers: activation, concatenation, sum, scaling, pooling, dropout."""

    def __init__(self, kind: str, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.kind = kind
        self.activation = _activation(config) if kind == "Activation" else None
        self.axis = config.get("axis", -1)
        self.scale = _lambda_scale(config) if kind == "Lambda" else 1.0

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.kind == "Concatenate":
            return torch.cat(inputs, dim=_channel_axis(self.axis, inputs[0].dim()))
        if self.kind == "Add":
            return torch.stack(inputs).sum(0)
        (x,) = inputs
        if self.activation is not None:
            return self.activation(x)
        if self.kind == "GlobalAveragePooling2D":
            return x.mean(dim=(2, 3))
        if self.kind == "Lambda":
            return x * self.scale
        return x  # Dropout, InputLayer: identity at inference

    def extra_repr(self) -> str:
        return f"{self.kind}" + (f", scale={self.scale}" if self.kind == "Lambda" else "")


def _activation(config: Mapping[str, Any]) -> Any:
    name = config.get("activation", "linear")
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Layer {config['name']!r}: activation {name!r} is not supported (only {', '.join(_ACTIVATIONS)})."
        )
    return _ACTIVATIONS[name]


def _lambda_scale(config: Mapping[str, Any]) -> float:
    arguments = config.get("arguments") or {}
    if set(arguments) != {"scale"}:
        raise ValueError(
            f"Lambda layer {config['name']!r} is not a residual scaling (arguments {sorted(arguments)!r}, expected "
            "['scale']); its code is stored as bytecode, which krtfuap never runs."
        )
    return float(arguments["scale"])


def _inbound(layer: Mapping[str, Any]) -> list[str]:
    """Names of the layers feeding ``layer`` (Keras 2's ``inbound_nodes`` format, one call per layer)."""
    nodes = layer.get("inbound_nodes", [])
    if not nodes:
        return []
    if len(nodes) != 1 or not isinstance(nodes[0], list):
        raise ValueError(
            f"Layer {layer['name']!r}: only Keras 2 graphs with each layer called once are supported."
        )
    return [entry[0] for entry in nodes[0]]


class KerasGraph(nn.Module):
    """A Keras Functional model's layer graph, run with PyTorch layers.

    Parameters
    ----------
    config : dict
        The ``model_config`` of a Keras 2 Functional model (see :func:`read_keras_h5`).
    weights : dict of str to list of numpy.ndarray
        Each layer's weights by layer name, in Keras' order.

    Raises
    ------
    ValueError
        If the model is not a single-input, single-output Functional model, uses a
        layer outside :data:`SUPPORTED_LAYERS`, or a layer lacks its weights.

    Notes
    -----
    ``forward`` takes ``(B, C, H, W)`` (channels first, where Keras takes
    ``(B, H, W, C)``) and returns the output layer's tensor, ``(B, D)`` for an
    embedding model. Parameters are plain tensors: call ``requires_grad_(False)``
    to freeze them. A batch normalisation that alone reads a linear convolution
    is folded into that convolution (the same function, one pass less).
    """

    def __init__(self, config: Mapping[str, Any], weights: Mapping[str, Sequence[np.ndarray]]) -> None:
        super().__init__()
        if config.get("class_name") not in ("Functional", "Model"):
            raise ValueError(f"Only Keras Functional models are supported, got {config.get('class_name')!r}.")
        body = config["config"]
        if len(body["input_layers"]) != 1 or len(body["output_layers"]) != 1:
            raise ValueError("Only Keras models with one input and one output are supported.")
        self.layers = nn.ModuleDict()
        self.order: list[tuple[str, list[str]]] = []
        for layer in body["layers"]:
            name, kind, layer_config = layer["name"], layer["class_name"], layer["config"]
            if kind not in SUPPORTED_LAYERS:
                raise ValueError(
                    f"Layer {name!r} is a {kind}, which KerasGraph does not support "
                    f"(supported: {', '.join(SUPPORTED_LAYERS)})."
                )
            if kind in ("Conv2D", "Dense", "BatchNormalization") and not weights.get(name):
                raise ValueError(f"Layer {name!r} ({kind}) has no weights in the file: a truncated or other model?")
            self.layers[_key(name)] = _build(kind, layer_config, weights.get(name, []))
            self.order.append((name, _inbound(layer)))
        self.input_name = body["input_layers"][0][0]
        self.output_name = body["output_layers"][0][0]
        self._fold_batch_norms()

    def _fold_batch_norms(self) -> None:
        """Fold each batch norm that alone reads a linear convolution into it (the norm becomes identity)."""
        readers = Counter(source for _, inbound in self.order for source in inbound)
        for name, inbound in self.order:
            norm = self.layers[_key(name)]
            if not isinstance(norm, _BatchNorm) or len(inbound) != 1 or readers[inbound[0]] != 1:
                continue
            if inbound[0] == self.output_name:  # the convolution's own output is the model's
                continue
            conv = self.layers[_key(inbound[0])]
            if isinstance(conv, _Conv2D) and conv.activation is _linear and _channel_axis(norm.axis, 4) == 1:
                conv.absorb(norm)
                self.layers[_key(name)] = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the graph on ``x`` of shape ``(B, C, H, W)``; returns the output layer's tensor."""
        values: dict[str, torch.Tensor] = {}
        for name, inbound in self.order:
            inputs = [values[source] for source in inbound] if inbound else [x]
            values[name] = self.layers[_key(name)](*inputs)
        return values[self.output_name]


def _key(name: str) -> str:
    """A ``ModuleDict`` key for a Keras layer name (which may hold characters torch refuses)."""
    return name.replace(".", "_")


def _build(kind: str, config: Mapping[str, Any], weights: Sequence[np.ndarray]) -> nn.Module:
    if kind == "Conv2D":
        return _Conv2D(config, weights)
    if kind == "Dense":
        return _Dense(config, weights)
    if kind == "BatchNormalization":
        return _BatchNorm(config, weights)
    if kind == "MaxPooling2D":
        return _MaxPool(config)
    return _Elementwise(kind, config)
