"""KerasGraph: a small Keras 2 HDF5 model written here, run in PyTorch, against a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fakes import small_keras_model as small_model
from fakes import write_keras_h5
from numpy_ops import conv2d, max_pool_same

from krtfuap.models.keras_graph import KerasGraph, read_keras_h5

h5py = pytest.importorskip("h5py", reason="h5py is needed to write Keras HDF5 files (pip install h5py)")


def reference(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    """The small model's output computed in float64 NumPy, channels last."""
    c1 = np.maximum(conv2d(x, weights["c1"][0], 2, same=True) + weights["c1"][1], 0.0)
    beta, mean, variance = weights["bn1"]
    bn1 = (c1 - mean) / np.sqrt(variance + 0.001) + beta
    c2 = conv2d(x, weights["c2"][0], 2, same=False)
    gamma, mean, variance = weights["bn3"]
    bn3 = (c2 - mean) / np.sqrt(variance + 0.001) * gamma
    cat = np.concatenate([bn1, bn3], axis=3)
    act = np.maximum(cat + 0.25 * cat, 0.0)
    gap = max_pool_same(act, 3, 2).mean(axis=(1, 2))
    dense = gap @ weights["dense"][0] + weights["dense"][1]
    gamma, beta, mean, variance = weights["bn2"]
    return (dense - mean) / np.sqrt(variance + 0.001) * gamma + beta


def test_small_model_matches_numpy_reference_through_an_h5_file(tmp_path):
    rng = np.random.default_rng(0)
    config, weights = small_model(rng)
    path = tmp_path / "small.h5"
    write_keras_h5(path, config, weights)
    read_config, read_weights = read_keras_h5(path)
    graph = KerasGraph(read_config, read_weights)
    x = rng.uniform(0.0, 1.0, (2, 8, 8, 2))
    got = graph(torch.from_numpy(x).float().permute(0, 3, 1, 2))
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got.detach().numpy(), reference(x, weights), rtol=1e-4, atol=1e-4)


def test_folds_only_a_batch_norm_that_alone_reads_a_linear_convolution():
    graph = KerasGraph(*small_model(np.random.default_rng(7)))
    assert isinstance(graph.layers["bn3"], torch.nn.Identity)  # after the linear c2, its only reader
    assert not isinstance(graph.layers["bn1"], torch.nn.Identity)  # after c1, which applies a ReLU first
    assert not isinstance(graph.layers["bn2"], torch.nn.Identity)  # after a Dense layer


def test_same_padding_puts_the_odd_pixel_after():
    # A 3x3 kernel that reads only its top-left tap: with TensorFlow's padding (0 before, 1 after on an
    # even input at stride 2) output (i, j) is input (2i, 2j); symmetric padding would shift it by one.
    config, weights = small_model(np.random.default_rng(1))
    kernel = np.zeros((3, 3, 2, 3), np.float32)
    kernel[0, 0, 0, 0] = 1.0
    conv = KerasGraph(config, {**weights, "c1": [kernel, np.zeros(3, np.float32)]}).layers["c1"]
    x = torch.rand(1, 2, 8, 8)
    np.testing.assert_allclose(conv(x)[0, 0].detach().numpy(), x[0, 0, ::2, ::2].numpy())


def test_gradients_reach_the_input():
    config, weights = small_model(np.random.default_rng(2))
    x = torch.rand(1, 2, 8, 8, requires_grad=True)
    KerasGraph(config, weights)(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _named(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["name"] == name)


def test_refuses_unsupported_layer():
    config, weights = small_model(np.random.default_rng(3))
    _named(config, "c1")["class_name"] = "SeparableConv2D"
    with pytest.raises(ValueError, match="SeparableConv2D.*supported"):
        KerasGraph(config, weights)


def test_refuses_a_lambda_that_is_not_a_scaling():
    config, weights = small_model(np.random.default_rng(4))
    _named(config, "lam")["config"]["arguments"] = {"offset": 1.0}
    with pytest.raises(ValueError, match="never runs"):
        KerasGraph(config, weights)


def test_refuses_unsupported_activation():
    config, weights = small_model(np.random.default_rng(5))
    _named(config, "act")["config"]["activation"] = "swish"
    with pytest.raises(ValueError, match="swish"):
        KerasGraph(config, weights)


def test_refuses_a_layer_without_weights():
    config, weights = small_model(np.random.default_rng(6))
    del weights["c1"]
    with pytest.raises(ValueError, match="no weights"):
        KerasGraph(config, weights)


def test_read_refuses_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_keras_h5(tmp_path / "missing.h5")


def test_read_refuses_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_keras_h5(path)


def test_read_refuses_a_weights_only_file(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as handle:
        handle.create_group("conv")
    with pytest.raises(ValueError, match="save_weights"):
        read_keras_h5(path)
