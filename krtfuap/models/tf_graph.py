"""Run a frozen TensorFlow graph (a ``GraphDef`` ``.pb`` file) in PyTorch, differentiably, without TensorFlow.

A frozen graph is one protocol-buffer message, ``GraphDef``: a list of nodes,
each with a name, an operation, the names of its inputs and attributes; the
weights are ``Const`` nodes. :func:`read_graph_def` decodes the few message
fields such a graph uses straight from the protobuf wire format (no
``tensorflow``, no compiled schema), and :class:`TensorFlowGraph` evaluates the
nodes an output depends on with PyTorch operations, keeping TensorFlow's
definitions (``"SAME"`` padding with the odd pixel after, NHWC axes, epsilon of
batch normalisation), so gradients flow to the input.

Only the operations of convolutional face recognisers such as FaceNet's
Inception-ResNet-v1 are supported (:data:`SUPPORTED_OPS`). Tensors of rank 4 are
kept channels-first (``(B, C, H, W)``) inside; TensorFlow's channels-last axes,
constants and reshapes are mapped accordingly.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from krtfuap.models.keras_graph import _pad_same, _same_padding

__all__ = ["GraphNode", "TensorFlowGraph", "read_graph_def", "SUPPORTED_OPS"]

SUPPORTED_OPS = (
    "Const", "Placeholder", "Identity", "Conv2D", "BiasAdd", "Relu", "MaxPool", "AvgPool", "ConcatV2",
    "Add", "AddV2", "Mul", "Maximum", "Square", "Rsqrt", "Sum", "Reshape", "MatMul", "FusedBatchNorm",
)

# TensorFlow's DataType enum values this reader turns into arrays.
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 10: np.bool_}


def _varint(buffer: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, position


def _fields(buffer: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """The ``(field number, wire type, value)`` triples of one protobuf message."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
        elif wire == 1:
            value, position = buffer[position:position + 8], position + 8
        elif wire == 2:
            length, position = _varint(buffer, position)
            value, position = buffer[position:position + length], position + length
        elif wire == 5:
            value, position = buffer[position:position + 4], position + 4
        else:
            raise ValueError(f"Unsupported protobuf wire type {wire} (field {number}).")
        if position > end:
            raise ValueError("Truncated protobuf message.")
        yield number, wire, value


def _signed(value: int) -> int:
    """An int64 read as an unsigned varint, back to its sign."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _packed_varints(value: int | bytes) -> list[int]:
    if isinstance(value, int):
        return [_signed(value)]
    out, position = [], 0
    while position < len(value):
        number, position = _varint(value, position)
        out.append(_signed(number))
    return out


def _shape(buffer: bytes) -> tuple[int, ...]:
    dims = []
    for number, _, value in _fields(buffer):
        if number == 2:
            size = dict((n, v) for n, _, v in _fields(value)).get(1, 0)
            dims.append(_signed(size))
    return tuple(dims)


def _tensor(buffer: bytes) -> np.ndarray:
    """A ``TensorProto`` as an array (raw ``tensor_content`` or the typed value lists)."""
    dtype_code, shape, content = 0, (), b""
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, value in _fields(buffer):
        if number == 1:
            dtype_code = value
        elif number == 2:
            shape = _shape(value)
        elif number == 4:
            content = value
        elif number == 5:
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value) if wire == 2 else struct.unpack("<f", value))
        elif number in (7, 10):
            ints.extend(_packed_varints(value))
    if dtype_code not in _DTYPES:
        raise ValueError(f"Constant of TensorFlow dtype {dtype_code} is not supported.")
    dtype = _DTYPES[dtype_code]
    count = int(np.prod(shape)) if shape else 1
    if content:
        array = np.frombuffer(content, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    else:
        array = np.asarray(floats if floats else ints, dtype=dtype)
        if array.size == 1 and count > 1:  # one value stands for all of them
            array = np.full(count, array[0], dtype=dtype)
    if array.size != count:
        raise ValueError(f"Constant holds {array.size} values for its shape {shape}.")
    return array.reshape(shape)


def _attr_value(buffer: bytes) -> Any:
    """An ``AttrValue``: a list, bytes, int, float, bool, dtype, shape or tensor."""
    for number, wire, value in _fields(buffer):
        if number == 1:
            items: list[Any] = []
            for item_number, item_wire, item in _fields(value):
                if item_number in (3, 6):
                    items.extend(_packed_varints(item))
                elif item_number == 4:
                    count = len(item) // 4 if item_wire == 2 else 1
                    items.extend(struct.unpack(f"<{count}f", item))
                elif item_number == 2:
                    items.append(item)
            return items
        if number == 2:
            return value
        if number in (3, 6):
            return _signed(value)
        if number == 4:
            return struct.unpack("<f", value)[0]
        if number == 5:
            return bool(value)
        if number == 7:
            return _shape(value)
        if number == 8:
            return _tensor(value)
    return None


@dataclass(frozen=True)
class GraphNode:
    """One node of a ``GraphDef``: its name, operation, data inputs (node names) and decoded attributes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


def read_graph_def(path: str | Path) -> list[GraphNode]:
    """Read the nodes of a frozen TensorFlow ``GraphDef`` file.

    Parameters
    ----------
    path : str or pathlib.Path
        A binary ``GraphDef`` (``.pb``), e.g. written by ``tf.io.write_graph(..., as_text=False)``.

    Returns
    -------
    list of GraphNode
        The graph's nodes in file order; inputs name nodes (output ``:0`` and control
        inputs ``^name`` dropped).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a binary ``GraphDef`` (or is truncated).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"TensorFlow graph file not found: {path}.")
    nodes = []
    try:
        for number, wire, value in _fields(path.read_bytes()):
            if number != 1 or wire != 2:
                continue
            name = op = ""
            inputs: list[str] = []
            attrs: dict[str, Any] = {}
            for node_number, _, node_value in _fields(value):
                if node_number == 1:
                    name = node_value.decode()
                elif node_number == 2:
                    op = node_value.decode()
                elif node_number == 3 and not node_value.startswith(b"^"):
                    source = node_value.decode()
                    inputs.append(source[:-2] if source.endswith(":0") else source)
                elif node_number == 5:
                    entry = dict((n, v) for n, _, v in _fields(node_value))
                    attrs[entry[1].decode()] = _attr_value(entry.get(2, b""))
            nodes.append(GraphNode(name, op, tuple(inputs), attrs))
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as error:
        raise ValueError(f"{path} is not a binary TensorFlow GraphDef ({error}).") from error
    if not nodes or not all(node.name and node.op for node in nodes):
        raise ValueError(f"{path} is not a binary TensorFlow GraphDef (no named nodes).")
    return nodes


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2) if x.dim() == 4 else x


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _channels_first_axis(axis: int, rank: int) -> int:
    axis = axis % rank
    return (0, 2, 3, 1)[axis] if rank == 4 else axis


def _broadcast_constant(constant: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A constant written for NHWC broadcasting against ``other``, for ``other`` kept NCHW."""
    if other.dim() != 4 or constant.dim() == 0:
        return constant
    return _nchw(constant.reshape((1,) * (4 - constant.dim()) + tuple(constant.shape)))


class TensorFlowGraph(nn.Module):
    """The part of a frozen TensorFlow graph that computes one node from the input images, in PyTorch.

    Parameters
    ----------
    nodes : sequence of GraphNode
        The graph (see :func:`read_graph_def`).
    input_node : str
        Name of the ``Placeholder`` node the images go to.
    output_node : str
        Name of the node whose value ``forward`` returns.

    Raises
    ------
    ValueError
        If ``input_node`` or ``output_node`` is not in the graph, a node the output depends on
        uses an operation outside :data:`SUPPORTED_OPS` or attributes this runner
        does not implement (NCHW data format, dilation, transposed inputs to
        ``MatMul``, training-mode batch normalisation), or a node has no source.

    Notes
    -----
    ``forward`` takes ``(B, C, H, W)`` (where TensorFlow takes ``(B, H, W, C)``) and
    returns the output's value, ``(B, D)`` for an embedding model. ``Reshape`` keeps the first
    axis as the batch whatever size the frozen shape gives it (frozen graphs often hold shapes
    traced with a batch of 1). The constants are buffers (no parameters): the graph is frozen by
    construction. Two rewrites save passes over the activations without changing the result: a
    ``BiasAdd`` that alone reads a ``Conv2D`` becomes that convolution's bias, and ``SAME`` padding
    that is the same on both sides is done inside the convolution (7-12 % of FaceNet's forward and
    backward time on a CPU, ``benchmarks/RESULTS.md`` 8n).
    """

    def __init__(self, nodes: Sequence[GraphNode], input_node: str, output_node: str) -> None:
        super().__init__()
        by_name = {node.name: node for node in nodes}
        for role, name in (("input", input_node), ("output", output_node)):
            if name not in by_name:
                raise ValueError(f"The graph has no {role} node {name!r}.")
        self.input_name, self.output_name = input_node, output_node
        # Per computed node: name, op, tensor inputs, attributes, and the integer operand (axis or shape).
        self.plan: list[tuple[str, str, tuple[str, ...], dict[str, Any], tuple[int, ...]]] = []
        self._buffer_of: dict[str, str] = {}
        needed = self._needed(by_name, output_node)
        kernels = _kernels_only(needed)
        for node in needed:
            if node.op not in SUPPORTED_OPS:
                raise ValueError(
                    f"Node {node.name!r} is a {node.op}, which TensorFlowGraph does not support "
                    f"(supported: {', '.join(SUPPORTED_OPS)})."
                )
            _check_attributes(node)
            if node.op == "Const":
                self._add_constant(node, transpose=node.name in kernels)
            elif node.name != input_node:
                self.plan.append((node.name, node.op, *_split_integer_operand(node, by_name), node.attrs))
        self.plan = _with_biases_in_convolutions(self.plan, output_node)

    @staticmethod
    def _needed(by_name: Mapping[str, GraphNode], output: str) -> list[GraphNode]:
        """The nodes ``output`` depends on, each after its inputs."""
        order: list[GraphNode] = []
        seen: set[str] = set()
        stack: list[tuple[str, bool]] = [(output, False)]
        while stack:
            name, expanded = stack.pop()
            if expanded:
                order.append(by_name[name])
                continue
            if name in seen:
                continue
            if name not in by_name:
                raise ValueError(f"The graph has no node {name!r}, which another node reads.")
            seen.add(name)
            stack.append((name, True))
            stack.extend((source, False) for source in reversed(by_name[name].inputs) if source not in seen)
        return order

    def _add_constant(self, node: GraphNode, *, transpose: bool) -> None:
        """Register a ``Const`` node's tensor as a buffer; a convolution kernel goes from HWIO to OIHW."""
        value = node.attrs.get("value")
        if not isinstance(value, np.ndarray):
            raise ValueError(f"Const node {node.name!r} holds no tensor.")
        if transpose:
            value = value.transpose(3, 2, 0, 1)
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if tensor.is_floating_point():
            tensor = tensor.float()
        if tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        key = f"constant_{len(self._buffer_of)}"
        self.register_buffer(key, tensor)
        self._buffer_of[node.name] = key

    def _value(self, name: str, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return values[name] if name in values else getattr(self, self._buffer_of[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the graph on ``x`` of shape ``(B, C, H, W)``; returns the output node's value."""
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for name, op, inputs, operand, attrs in self.plan:
            values[name] = self._run(op, [self._value(source, values) for source in inputs], inputs, operand, attrs)
        return values[self.output_name]

    def _run(self, op: str, args: list[torch.Tensor], inputs: Sequence[str], operand: tuple[int, ...],
             attrs: Mapping[str, Any]) -> torch.Tensor:
        if op == "Identity":
            return args[0]
        if op == "Conv2D":  # a third input is the bias of a BiasAdd folded in (_with_biases_in_convolutions)
            stride = tuple(attrs["strides"][1:3])
            x, kernel, bias = args[0], args[1], args[2] if len(args) == 3 else None
            if attrs["padding"] == b"VALID":
                return F.conv2d(x, kernel, bias, stride)
            top, bottom = _same_padding(x.shape[-2], kernel.shape[-2], stride[0])
            left, right = _same_padding(x.shape[-1], kernel.shape[-1], stride[1])
            if (top, left) == (bottom, right):  # symmetric: padded inside the convolution, no copy
                return F.conv2d(x, kernel, bias, stride, padding=(top, left))
            return F.conv2d(F.pad(x, (left, right, top, bottom)), kernel, bias, stride)
        if op in ("MaxPool", "AvgPool"):
            kernel, stride = tuple(attrs["ksize"][1:3]), tuple(attrs["strides"][1:3])
            if op == "AvgPool":
                return F.avg_pool2d(args[0], kernel, stride)
            x = _pad_same(args[0], kernel, stride, value=-math.inf) if attrs["padding"] == b"SAME" else args[0]
            return F.max_pool2d(x, kernel, stride)
        if op == "BiasAdd":
            return args[0] + (args[1].view(1, -1, 1, 1) if args[0].dim() == 4 else args[1])
        if op == "Relu":
            return F.relu(args[0])
        if op == "ConcatV2":
            rank = args[0].dim()
            return torch.cat(args, dim=_channels_first_axis(operand[0], rank))
        if op in ("Add", "AddV2", "Mul", "Maximum"):
            left, right = args
            if inputs[0] in self._buffer_of:
                left = _broadcast_constant(left, right)
            if inputs[1] in self._buffer_of:
                right = _broadcast_constant(right, left)
            if op == "Mul":
                return left * right
            return torch.maximum(left, right) if op == "Maximum" else left + right
        if op == "Square":
            return args[0] * args[0]
        if op == "Rsqrt":
            return torch.rsqrt(args[0])
        if op == "Sum":
            rank = args[0].dim()
            axes = [_channels_first_axis(axis, rank) for axis in operand]
            return args[0].sum(dim=axes, keepdim=bool(attrs.get("keep_dims", False)))
        if op == "Reshape":
            shape = [args[0].shape[0], *operand[1:]]  # the batch axis stays the batch
            return _nchw(_nhwc(args[0]).reshape(shape))
        if op == "MatMul":
            return args[0] @ args[1]
        # FusedBatchNorm (inference): x * scale / sqrt(variance + epsilon) + (offset - mean * that)
        x, scale, offset, mean, variance = args
        factor = scale * torch.rsqrt(variance + float(attrs.get("epsilon", 1e-3)))
        shift = offset - mean * factor
        shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
        return x * factor.view(shape) + shift.view(shape)


def _with_biases_in_convolutions(plan: list[tuple], output: str) -> list[tuple]:
    """``plan`` with each ``BiasAdd`` that alone reads a ``Conv2D`` folded into it: one convolution with a bias
    (3 inputs: image, kernel, bias) in the ``BiasAdd``'s place, a pass over the activations fewer."""
    readers = Counter(source for _, _, inputs, _, _ in plan for source in inputs)
    convolutions = {entry[0]: entry for entry in plan if entry[1] == "Conv2D"}
    folded: set[str] = set()
    fused = []
    for name, op, inputs, operand, attrs in plan:
        convolution = convolutions.get(inputs[0]) if op == "BiasAdd" else None
        if convolution is not None and readers[convolution[0]] == 1 and convolution[0] != output:
            folded.add(convolution[0])
            fused.append((name, "Conv2D", (*convolution[2], inputs[1]), (), convolution[4]))
        else:
            fused.append((name, op, inputs, operand, attrs))
    return [entry for entry in fused if entry[0] not in folded]


def _kernels_only(nodes: Sequence[GraphNode]) -> set[str]:
    """Names that ``nodes`` read only as a ``Conv2D`` kernel (their second input)."""
    kernels = {node.inputs[1] for node in nodes if node.op == "Conv2D"}
    other = {source for node in nodes for index, source in enumerate(node.inputs)
             if not (node.op == "Conv2D" and index == 1)}
    return kernels - other


# The ops whose last input is an integer constant (an axis or a shape), read once when the plan is made.
_INTEGER_OPERAND_OPS = ("ConcatV2", "Sum", "Reshape")


def _split_integer_operand(
    node: GraphNode, by_name: Mapping[str, GraphNode]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``node``'s tensor inputs, and the values of its integer-constant input (empty for other ops)."""
    if node.op not in _INTEGER_OPERAND_OPS:
        return node.inputs, ()
    *tensors, source = node.inputs
    value = by_name[source].attrs.get("value") if by_name[source].op == "Const" else None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise ValueError(f"Node {node.name!r} ({node.op}): its axis or shape {source!r} must be an integer Const.")
    return tuple(tensors), tuple(int(v) for v in value.ravel())


def _check_attributes(node: GraphNode) -> None:
    """Refuse attributes :class:`TensorFlowGraph` does not implement, naming the node."""
    attrs = node.attrs
    problems = []
    if attrs.get("data_format", b"NHWC") != b"NHWC":
        problems.append("data format other than NHWC")
    if any(d != 1 for d in attrs.get("dilations", [1, 1, 1, 1])):
        problems.append("dilation")
    if node.op in ("Conv2D", "MaxPool", "AvgPool") and attrs.get("padding") not in (b"SAME", b"VALID"):
        problems.append(f"padding {attrs.get('padding')!r}")
    if node.op == "AvgPool" and attrs.get("padding") != b"VALID":
        problems.append("SAME-padded average pooling")
    if node.op == "MatMul" and (attrs.get("transpose_a") or attrs.get("transpose_b")):
        problems.append("transposed MatMul inputs")
    if node.op == "FusedBatchNorm" and attrs.get("is_training", True):
        problems.append("training-mode batch normalisation")
    if problems:
        raise ValueError(
            f"Node {node.name!r} ({node.op}) uses {', '.join(problems)}, which TensorFlowGraph does not support."
        )
