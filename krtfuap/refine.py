"""Refine a universal perturbation on one photo, through the path the photo takes to a recogniser.

A universal perturbation is fitted once, on aligned faces. Pasted into a photo
it is shrunk to the face's size, JPEG-coded there and enlarged again when a
recogniser re-detects and re-aligns the face, and it loses most of its effect
(``docs/robustness.rst``). :func:`refine_on_photo` starts from it and takes a
few gradient steps per face of one photo, with that path simulated
differentiably on the face's own pixels:

paste (the aligned square warped onto the photo grid, feathered at its border)
-> 8-bit rounding -> JPEG at a random quality, on the photo's 16-pixel
macroblock grid -> 8-bit rounding -> re-alignment with a little jitter ->
model.

The loss per face is the paper's direction loss between the embedding of that
result and the clean face's, plus ``stealth_weight`` times how far the SSIM of
the face's box (after the simulated JPEG, against the clean photo) falls below
``target_ssim``. The change stays inside each face's aligned square, within
``[-epsilon, epsilon]``. With ``colour=False`` the learnt change is one
luminance change shared by R, G and B: it reads as fine grain rather than
coloured texture, and protects a little less (measured in ``docs/cloak.rst``).
Unlike the universal perturbation, the result is made for this photo and judged by the model it was refined against (a white-box
setting): a recogniser of another family sees a weaker cloak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from kornia.geometry.transform import warp_affine
from torch import nn

from krtfuap._validation import check_images
from krtfuap.augment import _similarity_matrices, jpeg, quantize
from krtfuap.engine import frozen
from krtfuap.losses import direction_loss
from krtfuap.metrics import ssim
from krtfuap.paste import _footprint, box_pixels, face_to_photo_matrix, feather_window

__all__ = ["refine_on_photo"]

_MACROBLOCK = 16  # JPEG's 4:2:0 block grid starts at the photo's top-left corner
_WARP = dict(mode="bilinear", padding_mode="zeros", align_corners=True)


@dataclass
class _FaceRegion:
    """One face's working area: a macroblock-aligned photo rectangle holding its aligned square and box."""

    rows: slice
    cols: slice
    clean: torch.Tensor  # (3, h, w) the photo there
    start: torch.Tensor  # (3, h, w) the pasted universal perturbation (feathered), zero outside the square
    window: torch.Tensor  # (1, h, w) the feather window warped there, in [0, 1]
    to_face: torch.Tensor  # (3, 3) region pixels -> aligned-face pixels
    box: tuple[slice, slice]  # the face's box inside the region (rows, cols)
    reference: torch.Tensor  # (1, D) the clean face's embedding


def _region(
    keypoints: np.ndarray, box: np.ndarray | None, size: int, height: int, width: int
) -> tuple[slice, slice, np.ndarray, tuple[int, int, int, int]] | None:
    """The rectangle to work on (rows, cols), its face-to-region matrix and the face box in region pixels.

    The rectangle covers the face's aligned square and its box, clipped to the photo, with its top-left
    corner on the JPEG block grid; None if the square lies outside the photo.
    """
    matrix = face_to_photo_matrix(keypoints, size)
    footprint = _footprint(matrix, size, height, width)
    if footprint is None:
        return None
    top, left, bottom, right = footprint
    box_edges = footprint
    if box is not None:
        box_edges = box_pixels(box, height, width)
        top, left = min(top, box_edges[0]), min(left, box_edges[1])
        bottom, right = max(bottom, box_edges[2]), max(right, box_edges[3])
    top, left = top // _MACROBLOCK * _MACROBLOCK, left // _MACROBLOCK * _MACROBLOCK
    bottom = min(-(-bottom // _MACROBLOCK) * _MACROBLOCK, height)
    right = min(-(-right // _MACROBLOCK) * _MACROBLOCK, width)
    shifted = matrix - np.array([[0.0, 0.0, left], [0.0, 0.0, top]])
    in_region = (box_edges[0] - top, box_edges[1] - left, box_edges[2] - top, box_edges[3] - left)
    return slice(top, bottom), slice(left, right), shifted, in_region


def _prepare(
    photo: torch.Tensor, perturbation: torch.Tensor, keypoints: np.ndarray, box: np.ndarray | None,
    model: nn.Module, feather: float,
) -> _FaceRegion | None:
    size = perturbation.shape[-1]
    window = feather_window(size, feather, device=photo.device)
    found = _region(keypoints, box, size, *photo.shape[-2:])
    if found is None:
        return None
    rows, cols, shifted, (box_top, box_left, box_bottom, box_right) = found
    grid = (rows.stop - rows.start, cols.stop - cols.start)
    matrix = torch.as_tensor(shifted, dtype=torch.float32, device=photo.device)[None]
    start = warp_affine((perturbation * window)[None], matrix, grid, **_WARP)[0]
    warped_window = warp_affine(window[None], matrix, grid, **_WARP)[0]
    to_face = torch.as_tensor(np.linalg.inv(np.vstack([shifted, [0.0, 0.0, 1.0]])), dtype=torch.float32,
                              device=photo.device)
    clean = photo[:, rows, cols]
    with torch.no_grad():
        reference = model(warp_affine(clean[None], to_face[None, :2], (size, size), **_WARP))
    box_slices = (slice(box_top, max(box_bottom, box_top + 2)), slice(box_left, max(box_right, box_left + 2)))
    return _FaceRegion(rows, cols, clean, start, warped_window, to_face, box_slices, reference)


def _realign_jitter(size: int, shift: float, degrees: float, generator: torch.Generator | None) -> torch.Tensor:
    """A ``(1, 3, 3)`` small similarity of the aligned face: a turn about its centre and a shift, drawn uniformly."""
    counterclockwise = (torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * degrees
    offset = (torch.rand(1, 2, generator=generator, dtype=torch.float64) * 2 - 1) * shift
    return _similarity_matrices(-counterclockwise, 1.0, offset, (size, size), (size, size))


def refine_on_photo(
    photo: torch.Tensor,
    perturbation: torch.Tensor,
    keypoints: Sequence[np.ndarray],
    model: nn.Module,
    *,
    epsilon: float,
    boxes: Sequence[np.ndarray] | None = None,
    feather: float = 6.0,
    steps: int = 30,
    lr: float = 0.008,
    target_ssim: float = 0.945,
    stealth_weight: float = 40.0,
    quality: tuple[float, float] = (75.0, 95.0),
    jitter: tuple[float, float] = (1.0, 1.5),
    colour: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Paste a perturbation onto each face of a photo and refine it there, as the module docstring says.

    Parameters
    ----------
    photo : torch.Tensor
        ``(3, H, W)`` RGB in ``[0, 1]``; the work happens on its device.
    perturbation : torch.Tensor
        ``(3, S, S)`` on the aligned template (``S = 112`` for ArcFace) in
        ``[-epsilon, epsilon]``: the starting point (zeros: refine from nothing).
    keypoints : sequence of numpy.ndarray
        One ``(5, 2)`` array of ``(x, y)`` photo pixels per face (eyes, nose, mouth corners).
    model : torch.nn.Module
        Face model, ``(B, 3, S, S)`` in ``[0, 1]`` to ``(B, D)`` embeddings, on the photo's
        device; used in eval mode without weight gradients (restored afterwards).
    epsilon : float
        l_inf budget of the change, in ``(0, 1]``.
    boxes : sequence of numpy.ndarray, optional
        One ``(x1, y1, x2, y2)`` box per face, where SSIM is held; by default the
        face's aligned square.
    feather : float
        Width in aligned-face pixels of the border over which the change fades out.
    steps : int
        Adam steps (0: the plain paste, as :func:`krtfuap.paste.paste_perturbation`).
    lr : float
        Adam's learning rate, in image units.
    target_ssim : float
        SSIM of each face's box, after the simulated JPEG, below which the
        stealth penalty starts; in ``(0, 1]``. A real save lands about 0.01 lower.
    stealth_weight : float
        Weight of that penalty (``>= 0``) against the direction loss (``0..4``).
    quality : (float, float)
        Range of the JPEG quality drawn at every step, within ``[1, 100]``.
    jitter : (float, float)
        Largest re-alignment shift (aligned-face pixels) and turn (degrees) drawn at every step.
    colour : bool
        Learn a change per channel; False: one change shared by R, G and B (added to
        the starting perturbation, which keeps its own colour).
    generator : torch.Generator, optional
        CPU generator for those draws (reproducible results).

    Returns
    -------
    torch.Tensor
        ``(3, H, W)`` in ``[0, 1]``, same dtype and device as ``photo``; differs from
        it only inside the faces' aligned squares, by at most ``epsilon``.
    """
    _check_arguments(photo, perturbation, epsilon, steps, target_ssim, stealth_weight, quality, jitter)
    if boxes is not None and len(boxes) != len(keypoints):
        raise ValueError(f"boxes must give one box per face: {len(boxes)} boxes for {len(keypoints)} faces.")
    work = photo.float()
    start = perturbation.to(device=photo.device, dtype=torch.float32)
    size = start.shape[-1]
    with frozen(model):
        regions = [
            region for index, points in enumerate(keypoints)
            if (region := _prepare(work, start, points, None if boxes is None else boxes[index], model, feather))
        ]
        channels = 3 if colour else 1
        changes = [torch.zeros(channels, *region.clean.shape[-2:], device=work.device, requires_grad=True)
                   for region in regions]
        if steps and regions:
            references = torch.cat([region.reference for region in regions])
            optimizer = torch.optim.Adam(changes, lr=lr)
            for _ in range(steps):
                saved = [_through_the_save(region, change, epsilon, size, quality, jitter, generator)
                         for region, change in zip(regions, changes)]
                embeddings = model(torch.cat([face for face, _ in saved]))
                stealth = torch.cat([box_ssim for _, box_ssim in saved])
                loss = direction_loss(embeddings, references, reduction="none").sum()
                loss = loss + stealth_weight * torch.relu(target_ssim - stealth).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    delta = torch.zeros_like(work)
    with torch.no_grad():
        for region, change in zip(regions, changes):
            delta[:, region.rows, region.cols] += _perturb(region, change, epsilon)
    return (work + delta.clamp_(-epsilon, epsilon)).clamp_(0.0, 1.0).to(photo.dtype)


def _perturb(region: _FaceRegion, change: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The face's change on its region: the pasted start plus the feathered learnt change ``(1 or 3, h, w)``,
    within the budget."""
    return (region.start + region.window * change).clamp(-epsilon, epsilon)


def _through_the_save(
    region: _FaceRegion, change: torch.Tensor, epsilon: float, size: int, quality: tuple[float, float],
    jitter: tuple[float, float], generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The face as a recogniser receives it ``(1, 3, S, S)``, and its box's SSIM after the save ``(1,)``."""
    device = region.clean.device
    saved = quantize((region.clean + _perturb(region, change, epsilon)).clamp(0.0, 1.0)[None])
    drawn_quality = quality[0] + (quality[1] - quality[0]) * torch.rand(1, generator=generator)
    decoded = quantize(jpeg(saved, drawn_quality.to(device)))
    realign = _realign_jitter(size, *jitter, generator).to(device=device, dtype=torch.float32) @ region.to_face
    rows, cols = region.box
    box_ssim = ssim(decoded[..., rows, cols], region.clean[None, :, rows, cols])
    return warp_affine(decoded, realign[:, :2], (size, size), **_WARP), box_ssim


def _check_arguments(
    photo: torch.Tensor, perturbation: torch.Tensor, epsilon: float, steps: int, target_ssim: float,
    stealth_weight: float, quality: tuple[float, float], jitter: tuple[float, float],
) -> None:
    if photo.ndim != 3 or photo.shape[0] != 3:
        raise ValueError(f"photo must have shape (3, H, W) (RGB), got {tuple(photo.shape)}.")
    check_images(photo[None], name="photo")
    if perturbation.ndim != 3 or perturbation.shape[0] != 3 or perturbation.shape[1] != perturbation.shape[2]:
        raise ValueError(f"perturbation must have shape (3, S, S), got {tuple(perturbation.shape)}.")
    if not torch.isfinite(perturbation).all():
        raise ValueError("perturbation contains NaN or inf values; pass a fitted attack's perturbation_.")
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1] (images in [0, 1]), got {epsilon}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (0: paste without refining), got {steps!r}.")
    if not 0.0 < target_ssim <= 1.0:
        raise ValueError(f"target_ssim must be in (0, 1], got {target_ssim}.")
    if not stealth_weight >= 0.0:
        raise ValueError(f"stealth_weight must be >= 0, got {stealth_weight}.")
    if not 1.0 <= quality[0] <= quality[1] <= 100.0:
        raise ValueError(f"quality must be a range (low, high) within [1, 100], got {quality}.")
    if min(jitter) < 0.0:
        raise ValueError(f"jitter (shift in pixels, turn in degrees) must be >= 0, got {jitter}.")
