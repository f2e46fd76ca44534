"""Input diversity: random resize-and-pad of the adversarial faces while fitting.

Xie et al. (CVPR 2019, "Improving Transferability of Adversarial Examples with
Input Diversity") feed the model a randomly shrunk and padded copy of the
adversarial image at each step, so the perturbation cannot rely on the exact
pixel grid of one model; it transfers better to other models. Here the face is
shrunk by a random factor in ``[min_scale, 1]`` (bilinear) and placed at a
random offset on a zero canvas of the original size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_and_pad", "RandomResizePad"]


def resize_and_pad(images: torch.Tensor, size: tuple[int, int], top: int, left: int) -> torch.Tensor:
    """Shrink ``images`` to ``size`` and pad them back to their own size with zeros.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)``.
    size : tuple of int
        ``(h, w)`` with ``h <= H`` and ``w <= W``.
    top, left : int
        Offset of the shrunk image on the canvas, ``0 <= top <= H - h``,
        ``0 <= left <= W - w``.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)``, differentiable with respect to ``images``; within the range of ``images``
        and zero (bilinear weights can round a value one float step past its neighbours, which an
        image model checking ``[0, 1]`` refuses).
    """
    height, width = images.shape[-2:]
    h, w = size
    if not (0 < h <= height and 0 < w <= width and 0 <= top <= height - h and 0 <= left <= width - w):
        raise ValueError(f"Cannot place a {h}x{w} image at ({top}, {left}) on a {height}x{width} canvas.")
    shrunk = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    shrunk = shrunk.clamp(images.min().detach(), images.max().detach())
    return F.pad(shrunk, (left, width - w - left, top, height - h - top))


class RandomResizePad:
    """Apply :func:`resize_and_pad` with probability ``probability``, at a random size and offset.

    Parameters
    ----------
    probability : float
        Chance in ``[0, 1]`` that a call transforms its batch (one draw per
        call; the whole batch shares the size and offset).
    min_scale : float
        Smallest side scale, in ``(0, 1]``.
    generator : torch.Generator, optional
        Source of the random draws (CPU); pass a seeded one for repeatable fits.
    """

    def __init__(self, probability: float = 0.5, min_scale: float = 0.9, generator: torch.Generator | None = None):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"input diversity probability must be in [0, 1], got {probability}.")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"input diversity min_scale must be in (0, 1], got {min_scale}.")
        self.probability = probability
        self.min_scale = min_scale
        self.generator = generator

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Return ``images`` unchanged or resized and padded; ``(B, C, H, W)`` in and out."""
        if self.probability == 0.0 or self._uniform() >= self.probability:
            return images
        height, width = images.shape[-2:]
        scale = self.min_scale + (1.0 - self.min_scale) * self._uniform()
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        top = int(self._uniform() * (height - h + 1))
        left = int(self._uniform() * (width - w + 1))
        return resize_and_pad(images, (h, w), min(top, height - h), min(left, width - w))
