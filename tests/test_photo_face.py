"""One value per face found in a photo (krtfuap/photo_face.py): its alignment, region and box."""

from __future__ import annotations

import numpy as np
from fakes import placed_keypoints
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.alignment import ARCFACE_TEMPLATE_112, estimate_similarity
from krtfuap.photo_face import MACROBLOCK, as_photo_faces, box_pixels, face_to_photo_matrix, locate_face


def test_matrix_inverts_the_alignment() -> None:
    keypoints = placed_keypoints(1.7, 0.3, (40.0, 25.0))
    matrix = face_to_photo_matrix(keypoints)
    mapped = np.c_[ARCFACE_TEMPLATE_112, np.ones(5)] @ matrix.T
    np.testing.assert_allclose(mapped, keypoints, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(0.3, 3.0), angle=st.floats(-0.6, 0.6), x=st.floats(-100.0, 300.0), y=st.floats(-100.0, 250.0),
    height=st.integers(40, 400), width=st.integers(40, 400), pad=st.floats(0.0, 30.0),
)
def test_the_region_is_on_the_block_grid_and_holds_the_square_and_the_box(
    scale: float, angle: float, x: float, y: float, height: int, width: int, pad: float
) -> None:
    keypoints = placed_keypoints(scale, angle, (x, y))
    corners = np.c_[[[0, 0], [111, 0], [0, 111], [111, 111]], np.ones(4)] @ face_to_photo_matrix(keypoints).T
    box = np.r_[corners.min(0) + pad, corners.max(0) - pad]
    face = locate_face(keypoints, (height, width), box=box, score=0.9)
    assert face.score == pytest.approx(0.9) and face.photo_size == (height, width) and face.size == 112
    np.testing.assert_allclose(face.photo_to_face[:2], estimate_similarity(keypoints, ARCFACE_TEMPLATE_112))
    np.testing.assert_allclose(face.photo_to_face @ face.face_to_photo, np.eye(3), atol=1e-9)
    inside = (corners[:, 0].max() >= -1 and corners[:, 0].min() <= width and corners[:, 1].max() >= -1
              and corners[:, 1].min() <= height)
    if face.region is None:
        assert not inside
        return
    top, left, bottom, right = face.region
    assert top % MACROBLOCK == 0 and left % MACROBLOCK == 0  # the JPEG grid starts at the photo's corner
    assert bottom == height or bottom % MACROBLOCK == 0
    assert right == width or right % MACROBLOCK == 0
    assert 0 <= top < bottom <= height and 0 <= left < right <= width
    # every photo pixel the aligned square reaches lies in the region
    reached = np.clip(np.floor(corners[:, :2]).astype(int), [0, 0], [width - 1, height - 1])
    assert (reached[:, 0] >= left).all() and (reached[:, 0] < right).all()
    assert (reached[:, 1] >= top).all() and (reached[:, 1] < bottom).all()
    box_top, box_left, box_bottom, box_right = face.box_pixels
    if box_bottom > box_top and box_right > box_left:
        assert top <= box_top and box_bottom <= bottom and left <= box_left and box_right <= right
        in_region = face.box_in_region
        assert (in_region[0] + top, in_region[1] + left) == (box_top, box_left)
    # the region's own matrices agree with the photo's
    point = np.array([50.0, 60.0, 1.0])
    np.testing.assert_allclose(face.face_to_region @ point, face.face_to_photo @ point - [left, top, 0], atol=1e-9)
    np.testing.assert_allclose(face.region_to_face @ face.face_to_region, np.eye(3), atol=1e-9)


def test_without_a_box_the_box_is_the_aligned_square() -> None:
    keypoints = placed_keypoints(1.0, 0.0, (100.0, 80.0))  # the aligned square covers x 100..211, y 80..191
    face = locate_face(keypoints, (300, 300))
    assert face.box_pixels == (79, 99, 193, 213) and np.isnan(face.score)  # a pixel of margin, 2 past the end
    assert face.region == (64, 96, 208, 224)
    assert face.rows == slice(64, 208) and face.cols == slice(96, 224) and face.region_size == (144, 128)


def test_a_face_outside_the_photo_has_no_region() -> None:
    face = locate_face(placed_keypoints(0.5, 0.0, (400.0, 400.0)), (160, 200))
    assert face.region is None
    with pytest.raises(ValueError, match="outside the photo"):
        face.rows


def test_faces_are_located_once_and_checked_against_the_photo() -> None:
    keypoints = placed_keypoints(1.0, 0.1, (30.0, 30.0))
    located = locate_face(keypoints, (200, 240))
    faces = as_photo_faces([located, keypoints], (200, 240), 112)
    assert faces[0] is located and np.array_equal(faces[1].region, located.region)
    with pytest.raises(ValueError, match="locate it again"):
        as_photo_faces([located], (200, 241), 112)
    with pytest.raises(ValueError, match="locate it again"):
        as_photo_faces([located], (200, 240), 96)
    with pytest.raises(ValueError, match="keypoints must have shape"):
        locate_face(np.zeros((4, 2)), (200, 240))


def test_box_pixels_covers_the_touched_pixels_and_stays_in_the_photo() -> None:
    assert box_pixels(np.array([10.2, 5.7, 30.5, 40.0]), 100, 120) == (5, 10, 40, 31)
    assert box_pixels(np.array([-3.0, -1.5, 130.2, 99.9]), 100, 120) == (0, 0, 100, 120)
    top, left, bottom, right = box_pixels(np.array([200.0, 200.0, 220.0, 230.0]), 100, 120)
    assert bottom <= top or right <= left  # wholly outside: an empty rectangle
