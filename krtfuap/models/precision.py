"""Run a face model's convolutions in bfloat16, with float32 at its edges.

A CPU with AMX tiles (Intel Xeon from Sapphire Rapids on) runs bfloat16 convolutions in
hardware. Under :func:`torch.autocast` a model's convolutions and matrix products then run in
bfloat16 while everything else (resizing, normalisation, the loss) stays float32. On the 2-core
CPU of ``benchmarks/model_speed.py`` that halves the forward and backward time of FaceNet-CASIA,
the per-face cloak's slowest surrogate, at an embedding cosine of 0.99997 to float32's; the
MobileFaceNets (depthwise convolutions) gain nothing. A surrogate only steers the refinement, so
:func:`krtfuap.pretrained.default_surrogates` runs its further models this way where the CPU has
AMX; the models that judge a cloak stay float32.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BFloat16Autocast", "PRECISIONS", "fast_bfloat16", "full_precision", "use_bfloat16"]

#: The precision choices of ``krtfuap cloak --surrogate-precision`` (see :func:`use_bfloat16`).
PRECISIONS = ("auto", "bfloat16", "float32")


def fast_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 convolutions in hardware (it has AMX tiles)."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(is_supported is not None and is_supported())


def use_bfloat16(precision: str) -> bool:
    """Whether a precision choice of :data:`PRECISIONS` runs a surrogate in bfloat16.

    ``"auto"`` is :func:`fast_bfloat16`; ``"bfloat16"`` and ``"float32"`` force it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}; pass one of them.")
    return fast_bfloat16() if precision == "auto" else precision == "bfloat16"


class BFloat16Autocast(nn.Module):
    """Call ``model`` under bfloat16 autocast on the input's device; return float32 embeddings.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, 3, H, W)`` float32 RGB in ``[0, 1]`` to ``(B, D)``; the wrapper takes its
        training mode.

    Attributes
    ----------
    model : torch.nn.Module
        The wrapped model, unchanged (its weights stay float32).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.train(model.training)  # a frozen, eval-mode model stays one

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images`` ``(B, 3, H, W)``; ``(B, D)`` float32, differentiable with respect to ``images``."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            embeddings = self.model(images)
        return embeddings.float()


def full_precision(model: nn.Module) -> nn.Module:
    """The float32 model inside a :class:`BFloat16Autocast` (any other model as it is)."""
    return model.model if isinstance(model, BFloat16Autocast) else model
