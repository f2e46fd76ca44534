"""Tests for krtfuap.landmarks: template, dlib and face-alignment backends."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from krtfuap.landmarks import (
    DlibLandmarks,
    FaceAlignmentLandmarks,
    NoFaceFoundError,
    TemplateLandmarks,
    check_landmarks,
    get_landmark_backend,
    load_landmark_template,
)

ARCFACE_FIVE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
FAN_FILE, SFD_FILE = "2DFAN4-11f355bf06.pth.tar", "s3fd-619a316812.pth"


def load_real_faces(assets: Path, n: int) -> torch.Tensor:
    """``n`` real aligned faces spread over the identities, as (n, 3, 112, 112) in [0, 1]."""
    paths = sorted((assets / "faces").glob("*/*.jpg"))
    paths = paths[:: max(1, len(paths) // n)][:n]
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def dlib_backend() -> DlibLandmarks:
    pytest.importorskip("dlib", reason="dlib not installed: pip install 'krtfuap[dlib]'")
    return DlibLandmarks()


# --- template ---------------------------------------------------------------------------


def test_template_file_describes_how_it_was_made() -> None:
    template = load_landmark_template()
    assert np.asarray(template["points"]).shape == (68, 2)
    assert np.asarray(template["mad"]).shape == (68, 2)
    assert template["image_size"] == [112, 112]
    source = template["source"]
    assert source["n_faces"] == 2407
    assert source["n_detected"] + source["n_fallback_box"] == source["n_faces"]
    left, top, right, bottom = template["face_box"]
    assert 0 <= left < right <= 112 and 0 <= top < bottom <= 120


def test_template_matches_arcface_five_points() -> None:
    points = TemplateLandmarks().points((112, 112))
    five = np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    )
    distances = np.linalg.norm(five - ARCFACE_FIVE, axis=1)
    assert distances.max() < 3.0, distances


def test_template_call_repeats_points_per_image() -> None:
    out = TemplateLandmarks()(torch.rand(3, 3, 112, 112))
    assert out.shape == (3, 68, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out[0], np.asarray(load_landmark_template()["points"]))
    np.testing.assert_array_equal(out[0], out[2])


def test_template_scales_with_image_size() -> None:
    base = TemplateLandmarks().points((112, 112))
    big = TemplateLandmarks()(torch.rand(1, 3, 224, 112))[0]
    np.testing.assert_allclose(big[:, 0], base[:, 0])
    np.testing.assert_allclose(big[:, 1], (base[:, 1] + 0.5) * 2 - 0.5)


def test_template_validates_images() -> None:
    with pytest.raises(TypeError, match="floating point"):
        TemplateLandmarks()(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


# --- checks and errors ------------------------------------------------------------------


def test_no_face_found_error_names_indices_and_hint() -> None:
    error = NoFaceFoundError([1, 3], "SomeBackend", "Try TemplateLandmarks.")
    assert isinstance(error, ValueError)
    assert error.indices == [1, 3]
    assert "[1, 3]" in str(error) and "SomeBackend" in str(error) and "TemplateLandmarks" in str(error)


def test_check_landmarks() -> None:
    assert check_landmarks(torch.zeros(2, 68, 2), 2).shape == (2, 68, 2)
    with pytest.raises(ValueError, match=r"\(2, 68, 2\)"):
        check_landmarks(np.zeros((2, 5, 2)), 2)
    bad = np.zeros((1, 68, 2))
    bad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_landmarks(bad, 1)


def test_get_landmark_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert isinstance(get_landmark_backend("template"), TemplateLandmarks)

    def custom(images: torch.Tensor) -> np.ndarray:
        return np.zeros((len(images), 68, 2))

    assert get_landmark_backend(custom) is custom
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError):  # the name maps to FaceAlignmentLandmarks
        get_landmark_backend("Face-Alignment")
    with pytest.raises(ValueError, match="unknown landmark backend"):
        get_landmark_backend("mediapipe")
    with pytest.raises(TypeError, match="callable"):
        get_landmark_backend(3)  # type: ignore[arg-type]


# --- dlib -------------------------------------------------------------------------------


def test_dlib_missing_packages_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(ImportError, match=r"krtfuap\[dlib\]"):
        DlibLandmarks()


def test_dlib_missing_models_package(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dlib")
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(ImportError, match=r"krtfuap\[dlib\]"):
        DlibLandmarks()


def test_dlib_bad_arguments(tmp_path: Path) -> None:
    pytest.importorskip("dlib")
    with pytest.raises(FileNotFoundError, match="predictor_path"):
        DlibLandmarks(predictor_path=tmp_path / "nope.dat")
    with pytest.raises(ValueError, match="upsample"):
        DlibLandmarks(upsample=-1)


def test_dlib_no_face_without_fallback(dlib_backend: DlibLandmarks) -> None:
    strict = copy.copy(dlib_backend)  # shares the loaded predictor
    strict.fallback_box = False
    images = torch.zeros(2, 3, 112, 112)
    with pytest.raises(NoFaceFoundError, match="TemplateLandmarks") as info:
        strict(images)
    assert info.value.indices == [0, 1]


def test_dlib_fallback_box_gives_landmarks_inside_the_box(dlib_backend: DlibLandmarks) -> None:
    out = dlib_backend(torch.full((1, 3, 112, 112), 0.5))
    assert out.shape == (1, 68, 2)
    left, top, right, bottom = load_landmark_template()["face_box"]
    assert (out[0, :, 0] >= left - 5).all() and (out[0, :, 0] <= right + 5).all()
    assert (out[0, :, 1] >= top - 5).all() and (out[0, :, 1] <= bottom + 5).all()


@pytest.mark.real
def test_dlib_on_real_faces_lands_near_template(shared_assets: Path, dlib_backend: DlibLandmarks) -> None:
    faces = load_real_faces(shared_assets, 10)
    out = dlib_backend(faces)
    assert out.shape == (10, 68, 2)
    template = TemplateLandmarks().points((112, 112))
    inner = np.linalg.norm(out[:, 17:] - template[17:], axis=2).mean(axis=1)  # brows, eyes, nose, lips
    assert inner.mean() < 4.0, inner
    assert inner.max() < 8.0, inner
    assert sum(box is not None for box in dlib_backend.detect(faces)) >= 8


# --- face-alignment ---------------------------------------------------------------------


def test_face_alignment_missing_weights_names_files_urls_and_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("face_alignment")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError) as info:
        FaceAlignmentLandmarks()
    message = str(info.value)
    assert FAN_FILE in message and SFD_FILE in message and str(folder) in message
    assert "https://www.adrianbulat.com/downloads/python-fan/" + FAN_FILE in message

    folder.mkdir(parents=True)
    (folder / FAN_FILE).touch()
    with pytest.raises(FileNotFoundError) as info:
        FaceAlignmentLandmarks()
    assert SFD_FILE in str(info.value) and FAN_FILE not in str(info.value)


class FakeDetector:
    def __init__(self, boxes: list[list[float]]) -> None:
        self.boxes = boxes

    def detect_from_image(self, image: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(b) for b in self.boxes]


class FakeFaceAlignment:
    """Stands in for face_alignment.FaceAlignment: landmarks = box corner + template offsets."""

    instances: list[FakeFaceAlignment] = []
    boxes: list[list[float]] = []

    def __init__(self, landmarks_type: object, **kwargs: object) -> None:
        import face_alignment.api

        self.kwargs = kwargs
        self.fan_path = face_alignment.api.load_file_from_url(face_alignment.api.models_urls["2DFAN-4"])
        self.face_detector = FakeDetector(self.boxes)
        self.seen: list[tuple[np.ndarray, list[np.ndarray]]] = []
        FakeFaceAlignment.instances.append(self)

    def get_landmarks_from_image(self, image: np.ndarray, detected_faces: list[np.ndarray]) -> list[np.ndarray]:
        self.seen.append((image, detected_faces))
        points = TemplateLandmarks().points((112, 112)) + detected_faces[0][:2]
        return [points.astype(np.float32)]


@pytest.fixture
def fake_fan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    face_alignment = pytest.importorskip("face_alignment")
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / FAN_FILE).touch()
    (folder / SFD_FILE).touch()
    monkeypatch.setattr(face_alignment, "FaceAlignment", FakeFaceAlignment)
    monkeypatch.setattr(FakeFaceAlignment, "instances", [])
    return folder


def test_face_alignment_builds_model_from_weights_dir(fake_fan: Path) -> None:
    import face_alignment.api

    original = face_alignment.api.load_file_from_url
    backend = FaceAlignmentLandmarks(weights_dir=fake_fan)
    fake = FakeFaceAlignment.instances[-1]
    assert fake.fan_path == str(fake_fan / FAN_FILE)  # FAN weights read from weights_dir, no download
    assert face_alignment.api.load_file_from_url is original
    assert fake.kwargs["face_detector_kwargs"] == {"path_to_detector": str(fake_fan / SFD_FILE)}
    assert fake.kwargs["device"] == "cpu"
    assert backend.weights_dir == str(fake_fan)


def test_face_alignment_converts_and_picks_largest_face(monkeypatch: pytest.MonkeyPatch, fake_fan: Path) -> None:
    monkeypatch.setattr(FakeFaceAlignment, "boxes", [[1, 2, 20, 20, 0.9], [3, 4, 100, 110, 0.99]])
    backend = FaceAlignmentLandmarks(weights_dir=fake_fan)
    images = torch.rand(2, 3, 112, 112)
    out = backend(images)
    assert out.shape == (2, 68, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out[1], TemplateLandmarks().points((112, 112)) + [3, 4], atol=1e-4)
    image, boxes = FakeFaceAlignment.instances[-1].seen[1]
    assert image.dtype == np.uint8 and image.shape == (112, 112, 3)
    np.testing.assert_array_equal(image, (images[1] * 255).round().byte().permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(boxes[0], [3, 4, 100, 110])


def test_face_alignment_no_face(monkeypatch: pytest.MonkeyPatch, fake_fan: Path) -> None:
    monkeypatch.setattr(FakeFaceAlignment, "boxes", [])
    with pytest.raises(NoFaceFoundError) as info:
        FaceAlignmentLandmarks(weights_dir=fake_fan, fallback_box=False)(torch.rand(3, 3, 112, 112))
    assert info.value.indices == [0, 1, 2]

    FaceAlignmentLandmarks(weights_dir=fake_fan)(torch.rand(1, 3, 112, 112))
    _, boxes = FakeFaceAlignment.instances[-1].seen[0]
    np.testing.assert_allclose(boxes[0], load_landmark_template()["face_box"])

