"""Adapter that gives any face backbone the library's image convention.

Every model in :mod:`krtfuap` is called with ``(B, 3, H, W)`` float RGB images in
``[0, 1]``. Face backbones each expect their own size, channel order and
normalisation; :class:`FaceEmbedder` applies those inside the model so that the
rest of the library never has to know about them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from krtfuap._validation import check_embeddings, check_images

__all__ = ["FaceEmbedder"]

_CHANNEL_ORDERS = ("RGB", "BGR")


class FaceEmbedder(nn.Module):
    """Wrap a face backbone so it takes ``[0, 1]`` RGB images and returns ``(B, D)``.

    The forward pass is differentiable with respect to the input images:
    resize (bilinear), channel reordering, ``(x - mean) / std``, backbone, flatten.

    Parameters
    ----------
    backbone : torch.nn.Module
        Maps normalised images ``(B, 3, h, w)`` (``(h, w) = input_size``) to
        embeddings of shape ``(B, D)`` or ``(B, D, 1, 1)``-like (flattened here).
    input_size : tuple of int
        ``(h, w)`` the backbone expects. Inputs of another size are resized with
        bilinear interpolation (``align_corners=False``, no antialiasing).
    mean, std : sequence of 3 floats
        Per-channel normalisation applied after reordering, in the backbone's
        channel order and on the ``[0, 1]`` scale (e.g. ``0.5`` for ``127.5/255``).
    channel_order : {"RGB", "BGR"}
        Channel order the backbone expects.
    flip_average : bool
        If ``True``, return ``backbone(x) + backbone(flip(x))`` (horizontal flip),
        the common test-time augmentation of face recognition.

    Attributes
    ----------
    backbone : torch.nn.Module
    input_size : tuple of int
    channel_order : str
    flip_average : bool
    mean, std : torch.Tensor
        Buffers of shape ``(1, 3, 1, 1)``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        input_size: tuple[int, int] = (112, 112),
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        channel_order: str = "RGB",
        flip_average: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"backbone must be a torch.nn.Module, got {type(backbone).__name__}; "
                "wrap plain functions in an nn.Module first."
            )
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (height, width) with positive ints, got {input_size!r}.")
        if channel_order not in _CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}.")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (one per channel), got {mean!r} and {std!r}.")
        if min(std) <= 0:
            raise ValueError(f"std values must be positive, got {std!r}.")
        self.backbone = backbone
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.channel_order = channel_order
        self.flip_average = flip_average
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn ``[0, 1]`` RGB images into the backbone's input.

        Parameters
        ----------
        images : torch.Tensor
            Shape ``(B, 3, H, W)``, RGB, values in ``[0, 1]``.

        Returns
        -------
        torch.Tensor
            Shape ``(B, 3, h, w)`` with ``(h, w) = input_size``, in the backbone's
            channel order, normalised; same device and dtype as ``images``.
        """
        x = images
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.channel_order == "BGR":
            x = x.flip(1)
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        std = self.std.to(device=x.device, dtype=x.dtype)
        return (x - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of face images.

        Parameters
        ----------
        images : torch.Tensor
            Shape ``(B, 3, H, W)``, float RGB, values in ``[0, 1]``.

        Returns
        -------
        torch.Tensor
            Raw (not L2-normalised) embeddings, shape ``(B, D)``.
        """
        check_images(images)
        x = self.preprocess(images)
        embeddings = self.backbone(x).flatten(1)
        if self.flip_average:
            embeddings = embeddings + self.backbone(x.flip(-1)).flatten(1)
        return check_embeddings(embeddings, images.shape[0])

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, channel_order={self.channel_order!r}, "
            f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, "
            f"std={tuple(round(v, 4) for v in self.std.flatten().tolist())}, "
            f"flip_average={self.flip_average}"
        )
