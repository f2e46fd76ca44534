"""Small tensor operations shared by the modules."""

from __future__ import annotations

import torch

__all__ = ["straight_through_clamp"]


def straight_through_clamp(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp the values into ``[low, high]`` but pass the gradient through unchanged.

    ``torch.clamp`` has zero gradient at and beyond its bounds, so a parameter
    projected exactly onto a bound (or a binary mask sitting at 0 and 1) would
    never receive a gradient again. The forward value is exactly the clamped
    one (``values - values.detach()`` is exactly zero).
    """
    return values.detach().clamp(low, high) + (values - values.detach())
