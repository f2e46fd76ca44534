"""Map a perturbation from an aligned face back into the photo it came from.

Alignment (:func:`krtfuap.alignment.align_face`) warps a photo onto the 112x112
ArcFace template with a similarity transform ``A`` (photo pixels -> face pixels).
A universal perturbation lives on that template. To cloak the photo itself, the
perturbation (not the face) is warped the other way, with ``A``'s inverse, onto
the photo's pixel grid (bilinear, kornia), weighted by a feathered window that
is 1 inside the aligned square and falls linearly to 0 over its last ``feather``
pixels, so the cloak ends without a seam. Only the photo rectangle the aligned
square covers is touched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from kornia.geometry.transform import warp_affine

from krtfuap.alignment import ARCFACE_TEMPLATE_112, estimate_similarity

__all__ = ["box_pixels", "face_to_photo_matrix", "feather_window", "paste_perturbation"]


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
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (5, 2):
        raise ValueError(f"keypoints must have shape (5, 2) (five (x, y) points), got {keypoints.shape}.")
    photo_to_face = np.vstack([estimate_similarity(keypoints, ARCFACE_TEMPLATE_112 * (size / 112.0)), [0, 0, 1]])
    return np.linalg.inv(photo_to_face)[:2]


def feather_window(size: int, feather: float, *, device: torch.device | None = None) -> torch.Tensor:
    """A square weight that is 1 inside and falls linearly to 0 at the border.

    Parameters
    ----------
    size : int
        Side in pixels.
    feather : float
        Width of the ramp in pixels, ``>= 0`` (0: a hard edge).

    Returns
    -------
    torch.Tensor
        Shape ``(1, size, size)``, float32 in ``[0, 1]``.
    """
    if feather < 0 or not math.isfinite(feather):
        raise ValueError(f"feather must be a finite number of pixels >= 0, got {feather}.")
    position = torch.arange(size, dtype=torch.float32, device=device)
    distance = torch.minimum(position, size - 1 - position) + 1.0  # 1 at the outermost pixel
    ramp = (distance / feather).clamp(max=1.0) if feather > 0 else torch.ones_like(distance)
    return torch.minimum(ramp[:, None], ramp[None, :])[None]


def box_pixels(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """A detector box ``(x1, y1, x2, y2)`` as whole photo pixels ``(top, left, bottom, right)``, clipped to
    an ``height x width`` photo (the rows ``top:bottom`` and columns ``left:right`` it touches; may be empty)."""
    x1, y1, x2, y2 = (float(value) for value in box)
    return (max(math.floor(y1), 0), max(math.floor(x1), 0), min(math.ceil(y2), height), min(math.ceil(x2), width))


def _footprint(matrix: np.ndarray, size: int, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Photo rectangle ``(top, left, bottom, right)`` covering the warped square, or None if outside."""
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], dtype=np.float64)
    mapped = corners @ matrix.T
    left, top = np.floor(mapped.min(axis=0)).astype(int) - 1
    right, bottom = np.ceil(mapped.max(axis=0)).astype(int) + 2
    top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
    if top >= bottom or left >= right:
        return None
    return int(top), int(left), int(bottom), int(right)


def paste_perturbation(
    photo: torch.Tensor,
    perturbation: torch.Tensor,
    keypoints: np.ndarray | list[np.ndarray],
    *,
    epsilon: float,
    feather: float = 6.0,
) -> torch.Tensor:
    """Add an aligned-face perturbation to every listed face of a photo.

    Parameters
    ----------
    photo : torch.Tensor
        ``(3, H, W)`` RGB in ``[0, 1]``.
    perturbation : torch.Tensor
        ``(3, S, S)`` on the aligned template (``S = 112`` for ArcFace), values in
        ``[-epsilon, epsilon]``.
    keypoints : numpy.ndarray or list of them
        One ``(5, 2)`` array per face, in pixels of ``photo``; or ``(N, 5, 2)``.
    epsilon : float
        The l_inf budget; where the faces' areas overlap, the summed perturbation is
        clipped back into ``[-epsilon, epsilon]``.
    feather : float
        Width in aligned-face pixels of the border over which the perturbation fades out.

    Returns
    -------
    torch.Tensor
        ``(3, H, W)`` in ``[0, 1]``, same dtype and device as ``photo``: the photo
        plus the perturbation over each face's aligned square, unchanged elsewhere.
    """
    if photo.ndim != 3 or photo.shape[0] != 3:
        raise ValueError(f"photo must have shape (3, H, W) (RGB), got {tuple(photo.shape)}.")
    if perturbation.ndim != 3 or perturbation.shape[0] != 3 or perturbation.shape[1] != perturbation.shape[2]:
        raise ValueError(f"perturbation must have shape (3, S, S), got {tuple(perturbation.shape)}.")
    size = perturbation.shape[-1]
    height, width = photo.shape[-2:]
    window = feather_window(size, feather, device=photo.device)
    weighted = (perturbation.to(device=photo.device, dtype=torch.float32) * window)[None]
    delta = torch.zeros(3, height, width, dtype=torch.float32, device=photo.device)
    for face_keypoints in keypoints:
        matrix = face_to_photo_matrix(face_keypoints, size)
        box = _footprint(matrix, size, height, width)
        if box is None:
            continue
        top, left, bottom, right = box
        shifted = matrix - np.array([[0.0, 0.0, left], [0.0, 0.0, top]])
        patch = warp_affine(
            weighted,
            torch.as_tensor(shifted, dtype=torch.float32, device=photo.device)[None],
            dsize=(bottom - top, right - left),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )
        delta[:, top:bottom, left:right] += patch[0]
    delta.clamp_(-epsilon, epsilon)
    return (photo.float() + delta).clamp_(0.0, 1.0).to(photo.dtype)
