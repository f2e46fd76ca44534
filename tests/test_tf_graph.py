"""TensorFlowGraph: a small frozen GraphDef written here, read back, run in PyTorch, against a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import small_tf_graph, write_graph_def
from numpy_ops import conv2d, max_pool_same

from krtfuap.models.tf_graph import TensorFlowGraph, read_graph_def


def reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The small graph's output computed in float64 NumPy, channels last."""
    r1 = np.maximum(conv2d(x, w["w1"], 2, same=True) + w["b1"], 0.0)
    cat = np.concatenate([conv2d(r1, w["w2"], 1, same=True), conv2d(r1, w["w3"], 1, same=True)], axis=3)
    pooled = max_pool_same(r1 + 0.25 * cat, 3, 2)
    dense = pooled.mean(axis=(1, 2)) @ w["dense"]
    bottleneck = (dense - w["mean"]) / np.sqrt(w["variance"] + 0.001) * w["gamma"] + w["beta"]
    return bottleneck / np.linalg.norm(bottleneck, axis=1, keepdims=True)


def _graph(tmp_path, seed: int = 0, edit=None) -> tuple[TensorFlowGraph, dict[str, np.ndarray]]:
    nodes, weights = small_tf_graph(np.random.default_rng(seed))
    if edit is not None:
        nodes = [edit(node) for node in nodes]
    path = tmp_path / "graph.pb"
    write_graph_def(path, nodes)
    return TensorFlowGraph(read_graph_def(path), "input", "embeddings"), weights


def test_small_graph_matches_numpy_reference_through_a_pb_file(tmp_path):
    graph, weights = _graph(tmp_path)
    x = np.random.default_rng(1).uniform(0.0, 1.0, (3, 10, 10, 3))  # a batch of 3, though frozen with 1
    got = graph(torch.from_numpy(x).float().permute(0, 3, 1, 2))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.detach().numpy(), reference(x, weights), rtol=1e-4, atol=1e-5)


def test_reads_nodes_inputs_and_attributes(tmp_path):
    nodes, weights = small_tf_graph(np.random.default_rng(0))
    write_graph_def(tmp_path / "graph.pb", nodes)
    read = {node.name: node for node in read_graph_def(tmp_path / "graph.pb")}
    assert len(read) == len(nodes)
    assert read["c1"].inputs == ("input", "w1")  # ":0" dropped
    assert read["avg"].inputs == ("pool",)  # control input "^r1" dropped
    assert read["c1"].attrs["strides"] == [1, 2, 2, 1] and read["c1"].attrs["padding"] == b"SAME"
    assert read["bn"].attrs["is_training"] is False and read["bn"].attrs["epsilon"] == pytest.approx(0.001)
    np.testing.assert_array_equal(read["w1"].attrs["value"], weights["w1"])
    np.testing.assert_array_equal(read["flat_shape"].attrs["value"], [1, -1])  # a negative int32
    assert read["scale"].attrs["value"] == pytest.approx(0.25)  # a scalar written as float_val


def test_gradients_reach_the_input_and_there_are_no_parameters(tmp_path):
    graph, _ = _graph(tmp_path, seed=2)
    assert list(graph.parameters()) == []
    x = torch.rand(2, 3, 10, 10, requires_grad=True)
    graph(x)[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_only_the_nodes_the_output_needs_are_built(tmp_path):
    graph, _ = _graph(tmp_path)  # the graph holds a Softmax after the output, which is not supported
    assert "unused" not in {name for name, *_ in graph.plan}
    with pytest.raises(ValueError, match=r"Node 'unused' is a Softmax.*not support"):
        TensorFlowGraph(read_graph_def(tmp_path / "graph.pb"), "input", "unused")


def test_a_bias_add_is_folded_into_the_convolution_it_alone_reads(tmp_path):
    graph, weights = _graph(tmp_path)
    plan = {name: (op, inputs) for name, op, inputs, *_ in graph.plan}
    assert "c1" not in plan and plan["c1/bias"] == ("Conv2D", ("input", "w1", "b1"))
    # a convolution that is the output keeps its own node and no bias
    x = np.random.default_rng(3).uniform(0.0, 1.0, (2, 10, 10, 3))
    alone = TensorFlowGraph(read_graph_def(tmp_path / "graph.pb"), "input", "c1")
    got = alone(torch.from_numpy(x).float().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got.detach().numpy(), conv2d(x, weights["w1"], 2, same=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, attrs, problem", [
    ("c2", {"data_format": b"NCHW"}, "data format other than NHWC"),
    ("c2", {"dilations": [1, 2, 2, 1]}, "dilation"),
    ("avg", {"padding": b"SAME"}, "SAME-padded average pooling"),
    ("dense/out", {"transpose_b": True}, "transposed MatMul"),
    ("bn", {"is_training": True}, "training-mode batch normalisation"),
])
def test_refuses_attributes_it_does_not_implement(tmp_path, name, attrs, problem):
    def edit(node):
        return (node[0], node[1], node[2], {**node[3], **attrs}) if node[0] == name else node

    with pytest.raises(ValueError, match=rf"Node '{name}'.*{problem}"):
        _graph(tmp_path, edit=edit)


def test_names_a_missing_input_output_or_source(tmp_path):
    nodes, _ = small_tf_graph(np.random.default_rng(0))
    write_graph_def(tmp_path / "graph.pb", nodes)
    read = read_graph_def(tmp_path / "graph.pb")
    with pytest.raises(ValueError, match="no output node 'logits'"):
        TensorFlowGraph(read, "input", "logits")
    with pytest.raises(ValueError, match="no input node 'images'"):
        TensorFlowGraph(read, "images", "embeddings")
    broken = [(n[0], n[1], ["gone" if s == "r1" else s for s in n[2]], n[3]) for n in nodes]
    write_graph_def(tmp_path / "broken.pb", broken)
    with pytest.raises(ValueError, match="no node 'gone'"):
        TensorFlowGraph(read_graph_def(tmp_path / "broken.pb"), "input", "embeddings")


def test_read_refuses_a_missing_file_and_one_that_is_not_a_graph(tmp_path):
    with pytest.raises(FileNotFoundError, match="graph file not found"):
        read_graph_def(tmp_path / "missing.pb")
    text = tmp_path / "notes.pb"
    text.write_text("these are notes, not a graph\n" * 3)
    with pytest.raises(ValueError, match="not a binary TensorFlow GraphDef"):
        read_graph_def(text)
    truncated = tmp_path / "truncated.pb"
    write_graph_def(truncated, small_tf_graph(np.random.default_rng(0))[0])
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a binary TensorFlow GraphDef"):
        read_graph_def(truncated)


def test_an_axis_or_shape_must_be_an_integer_constant(tmp_path):
    def float_axis(node):
        return (node[0], node[1], node[2], {**node[3], "value": np.array(3.0, np.float32)}) if node[0] == "axis" else node

    with pytest.raises(ValueError, match=r"Node 'cat' \(ConcatV2\): its axis or shape 'axis' must be an integer"):
        _graph(tmp_path, edit=float_axis)
