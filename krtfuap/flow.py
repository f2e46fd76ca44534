"""Learnable flow field that warps the key-region mask (paper Section 3.3).

A flow field ``f`` of shape ``(2, H, W)`` moves every output pixel ``(a, b)`` to
sample the input at ``(a + f_x, b + f_y)`` (paper Eq. 5), with bilinear
interpolation (Eq. 6) done by :func:`kornia.geometry.transform.remap`.

Units
-----
``unit="pixels"`` (default): a flow value of 1 moves by one pixel, so the
paper's bound ``f in [-1, 1]`` allows sub-pixel to one-pixel adjustments of the
mask, the "minor positional variations" the paper describes.
``unit="normalized"``: a flow value of 1 moves by half the image size
(``grid_sample`` convention), so the same bound allows any displacement.
"""

from __future__ import annotations

from typing import Literal

import torch
from kornia.geometry.transform import remap
from kornia.geometry import create_meshgrid
from torch import nn

from krtfuap._ops import straight_through_clamp

__all__ = ["FlowUnit", "warp_with_flow", "FlowWarp"]

#: Unit of flow values: ``"pixels"`` or ``"normalized"`` (see the module notes).
FlowUnit = Literal["pixels", "normalized"]


def _flow_scale(unit: str, height: int, width: int) -> tuple[float, float]:
    if unit == "pixels":
        return 1.0, 1.0
    if unit == "normalized":
        return (width - 1) / 2.0, (height - 1) / 2.0
    raise ValueError(f"unit must be 'pixels' or 'normalized', got {unit!r}.")


def warp_with_flow(image: torch.Tensor, flow: torch.Tensor, unit: FlowUnit = "pixels") -> torch.Tensor:
    """Warp ``image`` by a dense flow field with differentiable bilinear sampling.

    Parameters
    ----------
    image : torch.Tensor
        Shape ``(B, C, H, W)``, any values.
    flow : torch.Tensor
        Shape ``(2, H, W)`` (shared by the batch) or ``(B, 2, H, W)``;
        channel 0 is the x (column) displacement, channel 1 the y (row) one.
    unit : {"pixels", "normalized"}
        Unit of ``flow`` (see the module docstring).

    Returns
    -------
    torch.Tensor
        Shape ``(B, C, H, W)``; ``output[..., a, b] = image`` sampled at
        ``(a + flow_y, b + flow_x)``. Samples outside the image repeat the border.
        A zero flow returns ``image`` exactly.
    """
    if image.ndim != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}.")
    batch, _, height, width = image.shape
    if flow.ndim == 3:
        flow = flow.unsqueeze(0).expand(batch, -1, -1, -1)
    if flow.shape != (batch, 2, height, width):
        raise ValueError(
            f"flow must have shape (2, {height}, {width}) or ({batch}, 2, {height}, {width}) "
            f"to match the image, got {tuple(flow.shape)}."
        )
    scale_x, scale_y = _flow_scale(unit, height, width)
    grid = create_meshgrid(height, width, normalized_coordinates=False, device=image.device, dtype=image.dtype)
    grid = grid.expand(batch, -1, -1, -1)
    map_x = grid[..., 0] + scale_x * flow[:, 0]
    map_y = grid[..., 1] + scale_y * flow[:, 1]
    # remap's coordinate normalisation rounds, so sampling the identity grid is off by ~1e-6.
    # Adding the difference to the input cancels that rounding: a zero flow gives the input exactly.
    warped = remap(image, map_x, map_y, mode="bilinear", padding_mode="border", align_corners=True)
    identity = remap(image, grid[..., 0], grid[..., 1], mode="bilinear", padding_mode="border", align_corners=True)
    return image + (warped - identity)


class FlowWarp(nn.Module):
    """A learnable flow field, bounded to ``[-bound, bound]``, that warps an image.

    Parameters
    ----------
    height, width : int
        Size of the images it warps.
    bound : float
        Largest absolute flow value (paper: 1).
    unit : {"pixels", "normalized"}
        Unit of the flow values (see the module docstring).

    Attributes
    ----------
    flow : torch.nn.Parameter
        Shape ``(2, H, W)``, starts at zero (the identity warp).
    """

    def __init__(self, height: int, width: int, *, bound: float = 1.0, unit: FlowUnit = "pixels") -> None:
        super().__init__()
        if bound < 0:
            raise ValueError(f"bound must be >= 0, got {bound}.")
        _flow_scale(unit, height, width)
        self.bound = float(bound)
        self.unit = unit
        self.flow = nn.Parameter(torch.zeros(2, height, width))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Warp ``image`` of shape ``(B, C, H, W)`` by the bounded flow."""
        flow = straight_through_clamp(self.flow, -self.bound, self.bound).to(image.dtype)
        return warp_with_flow(image, flow, self.unit)

    @torch.no_grad()
    def project_(self) -> None:
        """Clip the flow parameter into ``[-bound, bound]`` in place."""
        self.flow.clamp_(-self.bound, self.bound)

    def extra_repr(self) -> str:
        return f"size={tuple(self.flow.shape[1:])}, bound={self.bound}, unit={self.unit!r}"
