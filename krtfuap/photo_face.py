"""A face found in a photo, as one value: where it is, how it aligns, which part of the photo holds it.

Alignment (:func:`krtfuap.alignment.align_face`) maps a photo onto the ``S x S`` ArcFace template
with the similarity transform that takes the face's five keypoints to the template's. The paste
(:mod:`krtfuap.paste`), the per-photo refinement (:mod:`krtfuap.refine`) and the cloak's
verification (:class:`krtfuap.apps.cloak.PhotoCloak`) all work on the photo around that face;
:func:`locate_face` computes what they need once, as a :class:`PhotoFace`:

* the detector's box and score and the keypoints;
* the alignment matrix (photo pixels -> aligned-face pixels) and its inverse;
* the face's **region**: the photo rectangle that holds its aligned square (with a pixel of margin
  for bilinear sampling) and its box, grown outwards onto the 16-pixel grid of JPEG's 4:2:0
  macroblocks (which starts at the photo's top-left corner), clipped to the photo. A JPEG encoder
  codes those blocks together, so a simulated save of the region codes the face as a save of the
  whole photo does;
* the box inside the region.

Rectangles are ``(top, left, bottom, right)`` whole pixels: rows ``top:bottom`` and columns
``left:right``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from krtfuap.alignment import ARCFACE_TEMPLATE_112, estimate_similarity

__all__ = ["MACROBLOCK", "PhotoFace", "as_photo_faces", "box_pixels", "face_to_photo_matrix", "locate_face"]

#: Side in pixels of JPEG's 4:2:0 macroblock; a photo's block grid starts at its top-left corner.
MACROBLOCK = 16

Rectangle = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class PhotoFace:
    """One face of a ``photo_size`` photo, aligned to an ``size x size`` template (see the module docstring).

    Attributes
    ----------
    box : numpy.ndarray
        ``(4,)`` float64 ``(x1, y1, x2, y2)`` photo pixels: the detector's box, or the rectangle of
        the aligned square when the face was given by its keypoints alone.
    score : float
        The detector's score; NaN when the face was not detected.
    keypoints : numpy.ndarray
        ``(5, 2)`` float64 ``(x, y)`` photo pixels of the eyes, nose tip and mouth corners.
    photo_to_face, face_to_photo : numpy.ndarray
        ``(3, 3)`` float64 similarity transforms between photo and aligned-face pixels.
    photo_size : (int, int)
        ``(H, W)`` of the photo.
    size : int
        Side of the aligned template.
    box_pixels : tuple of int
        The box as whole photo pixels, clipped to the photo (may be empty).
    region : tuple of int or None
        The face's region; None when its aligned square lies wholly outside the photo (nothing of
        the face to change).
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray
    photo_to_face: np.ndarray
    face_to_photo: np.ndarray
    photo_size: tuple[int, int]
    size: int
    box_pixels: Rectangle
    region: Rectangle | None

    @property
    def rows(self) -> slice:
        """The region's rows of the photo."""
        return slice(self._region[0], self._region[2])

    @property
    def cols(self) -> slice:
        """The region's columns of the photo."""
        return slice(self._region[1], self._region[3])

    @property
    def region_size(self) -> tuple[int, int]:
        """``(h, w)`` of the region."""
        top, left, bottom, right = self._region
        return bottom - top, right - left

    @property
    def face_to_region(self) -> np.ndarray:
        """``(3, 3)`` float64: aligned-face pixels -> region pixels."""
        top, left = self._region[:2]
        return np.array([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]]) @ self.face_to_photo

    @property
    def region_to_face(self) -> np.ndarray:
        """``(3, 3)`` float64: region pixels -> aligned-face pixels."""
        top, left = self._region[:2]
        return self.photo_to_face @ np.array([[1.0, 0.0, left], [0.0, 1.0, top], [0.0, 0.0, 1.0]])

    @property
    def box_in_region(self) -> Rectangle:
        """The box's pixels in region pixels (the region always holds them)."""
        top, left = self._region[:2]
        box_top, box_left, box_bottom, box_right = self.box_pixels
        return box_top - top, box_left - left, box_bottom - top, box_right - left

    @property
    def _region(self) -> Rectangle:
        if self.region is None:
            raise ValueError("this face's aligned square lies outside the photo: it has no region to work on.")
        return self.region


def face_to_photo_matrix(keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The similarity transform from aligned-face pixels to photo pixels.

    Parameters
    ----------
    keypoints : numpy.ndarray
        Shape ``(5, 2)``: ``(x, y)`` photo pixels of the left eye, right eye, nose
        tip, left and right mouth corners (as :meth:`SCRFDDetector.detect` returns).
    size : int
        Side of the aligned face the template is scaled to.

    Returns
    -------
    numpy.ndarray
        Shape ``(2, 3)`` float64, the inverse of the matrix :func:`align_face` uses.
    """
    return _alignment(keypoints, size)[1][:2]


def _alignment(keypoints: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(3, 3)`` photo -> face and face -> photo matrices of a face's keypoints."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (5, 2):
        raise ValueError(f"keypoints must have shape (5, 2) (five (x, y) points), got {keypoints.shape}.")
    photo_to_face = np.vstack([estimate_similarity(keypoints, ARCFACE_TEMPLATE_112 * (size / 112.0)), [0, 0, 1]])
    return photo_to_face, np.linalg.inv(photo_to_face)


def box_pixels(box: np.ndarray, height: int, width: int) -> Rectangle:
    """A box ``(x1, y1, x2, y2)`` as whole photo pixels ``(top, left, bottom, right)``, clipped to an
    ``height x width`` photo (the rows ``top:bottom`` and columns ``left:right`` it touches; may be empty)."""
    x1, y1, x2, y2 = (float(value) for value in box)
    return (max(math.floor(y1), 0), max(math.floor(x1), 0), min(math.ceil(y2), height), min(math.ceil(x2), width))


def _square(face_to_photo: np.ndarray, size: int, height: int, width: int) -> Rectangle | None:
    """Photo pixels the warped ``size x size`` square reaches by bilinear sampling, clipped; None if none."""
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], dtype=np.float64)
    mapped = corners @ face_to_photo[:2].T
    left, top = np.floor(mapped.min(axis=0)).astype(int) - 1
    right, bottom = np.ceil(mapped.max(axis=0)).astype(int) + 2
    top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
    if top >= bottom or left >= right:
        return None
    return int(top), int(left), int(bottom), int(right)


def _on_block_grid(rectangle: Rectangle, height: int, width: int) -> Rectangle:
    """``rectangle`` grown outwards onto the macroblock grid, clipped to the photo."""
    top, left, bottom, right = rectangle
    return (top // MACROBLOCK * MACROBLOCK, left // MACROBLOCK * MACROBLOCK,
            min(-(-bottom // MACROBLOCK) * MACROBLOCK, height), min(-(-right // MACROBLOCK) * MACROBLOCK, width))


def locate_face(
    keypoints: np.ndarray,
    photo_size: tuple[int, int],
    *,
    box: np.ndarray | None = None,
    score: float = math.nan,
    size: int = 112,
) -> PhotoFace:
    """The :class:`PhotoFace` of a face in a ``photo_size`` photo.

    Parameters
    ----------
    keypoints : numpy.ndarray
        ``(5, 2)`` ``(x, y)`` photo pixels (left eye, right eye, nose tip, left and right mouth corners).
    photo_size : (int, int)
        ``(H, W)`` of the photo.
    box : numpy.ndarray, optional
        ``(x1, y1, x2, y2)`` the detector's box; by default the rectangle the aligned square covers.
    score : float
        The detector's score.
    size : int
        Side of the aligned template (112 for ArcFace).

    Returns
    -------
    PhotoFace
    """
    height, width = (int(side) for side in photo_size)
    photo_to_face, face_to_photo = _alignment(keypoints, size)
    square = _square(face_to_photo, size, height, width)
    if box is None:
        corners = (0, 0, width, height) if square is None else (square[1], square[0], square[3], square[2])
        box = np.asarray(corners, dtype=np.float64)
    box = np.asarray(box, dtype=np.float64).reshape(4)
    pixels = box_pixels(box, height, width)
    region = None
    if square is not None:
        covering = (min(square[0], pixels[0]), min(square[1], pixels[1]), max(square[2], pixels[2]),
                    max(square[3], pixels[3]))
        region = _on_block_grid(covering, height, width)
    return PhotoFace(box, float(score), np.asarray(keypoints, dtype=np.float64), photo_to_face, face_to_photo,
                     (height, width), int(size), pixels, region)


def as_photo_faces(
    faces: Sequence[PhotoFace | np.ndarray] | np.ndarray, photo_size: tuple[int, int], size: int
) -> list[PhotoFace]:
    """Faces given as :class:`PhotoFace` values or as ``(5, 2)`` keypoint arrays (or one ``(N, 5, 2)``
    array), as :class:`PhotoFace` values of a ``photo_size`` photo and an ``size x size`` template.

    Raises
    ------
    ValueError
        If a :class:`PhotoFace` was located in a photo or for a template of another size.
    """
    located = []
    for face in faces:
        if not isinstance(face, PhotoFace):
            face = locate_face(face, photo_size, size=size)
        elif face.photo_size != tuple(photo_size) or face.size != size:
            raise ValueError(
                f"a face located in a {face.photo_size} photo for a {face.size}-pixel template was given for a "
                f"{tuple(photo_size)} photo and a {size}-pixel perturbation; locate it again (locate_face)."
            )
        located.append(face)
    return located
