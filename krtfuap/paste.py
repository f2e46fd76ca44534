"""Map a perturbation from an aligned face back into the photo it came from.

Alignment (:func:`krtfuap.alignment.align_face`) warps a photo onto the 112x112
ArcFace template with a similarity transform ``A`` (photo pixels -> face pixels).
A universal perturbation lives on that template. To cloak the photo itself, the
perturbation (not the face) is warped the other way, with ``A``'s inverse, onto
the photo's pixel grid (bilinear, kornia; :func:`warp_to_region`), weighted by a
feathered window that is 1 inside the aligned square and falls linearly to 0 over
its last ``feather`` pixels, so the cloak ends without a seam. Only the face's
region (:class:`krtfuap.photo_face.PhotoFace`) is touched, and within it only the
pixels the aligned square reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from kornia.geometry.transform import warp_affine

from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.photo_face import PhotoFace, as_photo_faces

__all__ = ["feather_window", "paste_perturbation", "warp_to_region"]


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


def warp_to_region(aligned: torch.Tensor, face: PhotoFace) -> torch.Tensor:
    """Warp something on the aligned template onto the face's region of the photo (bilinear).

    Parameters
    ----------
    aligned : torch.Tensor
        ``(C, S, S)`` on the ``S x S`` template ``face`` was located for, float32.
    face : PhotoFace
        A face whose aligned square lies at least partly in the photo (``face.region`` is set).

    Returns
    -------
    torch.Tensor
        ``(C, h, w)`` over ``face.region``, on ``aligned``'s device; zero where the aligned square
        does not reach, differentiable with respect to ``aligned``.
    """
    matrix = torch.as_tensor(face.face_to_region[:2], dtype=torch.float32, device=aligned.device)[None]
    return warp_affine(aligned[None], matrix, dsize=face.region_size, mode="bilinear", padding_mode="zeros",
                       align_corners=True)[0]


def paste_perturbation(
    photo: torch.Tensor,
    perturbation: torch.Tensor,
    faces: Sequence[PhotoFace | np.ndarray] | np.ndarray,
    *,
    epsilon: float,
    feather: float = CLOAK_DEFAULTS.feather,
) -> torch.Tensor:
    """Add an aligned-face perturbation to every listed face of a photo.

    Parameters
    ----------
    photo : torch.Tensor
        ``(3, H, W)`` RGB in ``[0, 1]``.
    perturbation : torch.Tensor
        ``(3, S, S)`` on the aligned template (``S = 112`` for ArcFace), values in
        ``[-epsilon, epsilon]``.
    faces : sequence of PhotoFace or of numpy.ndarray
        The faces (:func:`krtfuap.photo_face.locate_face`), or one ``(5, 2)`` keypoint array per
        face in pixels of ``photo`` (or one ``(N, 5, 2)`` array).
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
    window = feather_window(size, feather, device=photo.device)
    weighted = perturbation.to(device=photo.device, dtype=torch.float32) * window
    delta = torch.zeros(3, *photo.shape[-2:], dtype=torch.float32, device=photo.device)
    for face in as_photo_faces(faces, photo.shape[-2:], size):
        if face.region is not None:
            delta[:, face.rows, face.cols] += warp_to_region(weighted, face)
    delta.clamp_(-epsilon, epsilon)
    return (photo.float() + delta).clamp_(0.0, 1.0).to(photo.dtype)
