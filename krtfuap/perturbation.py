"""The universal perturbation: warped key-region mask times learnable noise (paper Section 3.4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from krtfuap._ops import straight_through_clamp
from krtfuap.flow import FlowUnit, FlowWarp

__all__ = ["rescale_mask", "masked_perturbation", "lowpass", "limit_rms", "psnr_to_rms", "MaskedPerturbation"]


def rescale_mask(mask: torch.Tensor) -> torch.Tensor:
    """Map a mask from ``[0, 1]`` to ``[1/2, 1]``.

    Non-key regions (0) get half the noise strength of key regions (1), as in
    the paper. Values outside ``[0, 1]`` (float rounding after a warp) are
    clipped first, without blocking the gradient.

    Parameters
    ----------
    mask : torch.Tensor
        Any shape, values nominally in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        Same shape, values in ``[0.5, 1]``.
    """
    return 0.5 + 0.5 * straight_through_clamp(mask, 0.0, 1.0)


def masked_perturbation(noise: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Weight ``noise`` by the rescaled ``mask`` and clip it to the l_inf ball.

    Parameters
    ----------
    noise : torch.Tensor
        Shape ``(3, H, W)``.
    mask : torch.Tensor
        Shape ``(H, W)``, values in ``[0, 1]``.
    epsilon : float
        l_inf radius, on the ``[0, 1]`` image scale.

    Returns
    -------
    torch.Tensor
        Shape ``(3, H, W)``, values in ``[-epsilon, epsilon]``. The clip passes
        gradients through, so noise projected onto the bound can move back.
    """
    return straight_through_clamp(rescale_mask(mask) * noise, -epsilon, epsilon)


def lowpass(perturbation: torch.Tensor, size: int) -> torch.Tensor:
    """Keep only the detail a ``size x size`` grid can hold: average down to it, enlarge back bilinearly.

    A face smaller than the aligned template in a photo (a cloak pasted at
    ``size / H`` of its size, then aligned again) carries little more than this.
    Both steps average neighbouring values, so the result stays within the
    input's l_inf ball.

    Parameters
    ----------
    perturbation : torch.Tensor
        Shape ``(C, H, W)``.
    size : int
        Side of the coarse grid, ``>= 1``; ``size >= max(H, W)`` returns the input.

    Returns
    -------
    torch.Tensor
        Shape ``(C, H, W)``, same dtype and device, differentiable.
    """
    height, width = perturbation.shape[-2:]
    if size >= max(height, width):
        return perturbation
    coarse = F.interpolate(perturbation[None], size=(min(size, height), min(size, width)), mode="area")
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def limit_rms(perturbation: torch.Tensor, rms: float) -> torch.Tensor:
    """Scale ``perturbation`` down, as a whole, so that its root-mean-square is at most ``rms``.

    An l2 budget beside the l_inf one: the PSNR of ``x + v`` against ``x`` is
    ``-20 log10(rms(v))`` on ``[0, 1]`` images (higher where clipping to ``[0, 1]``
    removes some of ``v``), so ``rms = psnr_to_rms(p)`` keeps every image at or above
    ``p`` dB. Scaling down keeps the input's l_inf ball and sign pattern.

    Parameters
    ----------
    perturbation : torch.Tensor
        Any shape; the mean runs over all its elements.
    rms : float
        Largest root-mean-square, ``> 0``, on the image's scale.

    Returns
    -------
    torch.Tensor
        Same shape, dtype and device, differentiable; the input itself when it is already within.
    """
    current = perturbation.pow(2).mean().clamp_min(torch.finfo(perturbation.dtype).tiny).sqrt()
    return perturbation * (rms / current).clamp(max=1.0)


def psnr_to_rms(psnr: float) -> float:
    """The root-mean-square difference, on ``[0, 1]`` images, at which PSNR is ``psnr`` dB: ``10 ** (-psnr / 20)``."""
    return 10.0 ** (-psnr / 20.0)


class MaskedPerturbation(nn.Module):
    """Learnable noise shaped by a (optionally flow-warped) key-region mask.

    ``v = clip(rescale(Flow(M0)) * n, -epsilon, epsilon)`` (paper Eq. 7), then,
    with ``lowpass_size``, :func:`lowpass` of it, then, with ``rms_budget``,
    :func:`limit_rms` of that.

    Parameters
    ----------
    mask : torch.Tensor or None
        Key-region mask ``M0`` of shape ``(H, W)`` in ``[0, 1]``. ``None``
        means no key regions (a global perturbation: the ablation of Table 3),
        in which case ``height`` and ``width`` are required.
    epsilon : float
        l_inf budget on ``[0, 1]`` images (paper: 0.08).
    learn_flow : bool
        Learn a flow field that warps the mask (paper); ``False`` keeps the
        key regions fixed (the ablation of Table 4).
    flow_bound, flow_unit :
        See :class:`krtfuap.flow.FlowWarp`.
    init_scale : float
        The noise starts uniform in ``[-init_scale * epsilon, init_scale * epsilon]``.
    generator : torch.Generator, optional
        Source of randomness for the initial noise.
    height, width : int, optional
        Image size; only needed when ``mask`` is ``None``.
    lowpass_size : int, optional
        Band-limit ``v`` to a grid of this side (:func:`lowpass`), so that it
        survives being pasted into a photo at a smaller size; ``None``: full
        resolution (paper).
    rms_budget : float, optional
        Largest root-mean-square of ``v``, ``> 0`` (an l2 budget: :func:`psnr_to_rms`
        turns a PSNR floor into it); ``None``: the l_inf budget alone (paper).

    Attributes
    ----------
    noise : torch.nn.Parameter
        Shape ``(3, H, W)``.
    base_mask : torch.Tensor
        Buffer, shape ``(H, W)``.
    flow_warp : FlowWarp or None
    """

    def __init__(
        self,
        mask: torch.Tensor | None,
        *,
        epsilon: float = 0.08,
        learn_flow: bool = True,
        flow_bound: float = 1.0,
        flow_unit: FlowUnit = "pixels",
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        lowpass_size: int | None = None,
        rms_budget: float | None = None,
    ) -> None:
        super().__init__()
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (an l_inf radius on [0, 1] images), got {epsilon}.")
        if mask is None:
            if height is None or width is None:
                raise ValueError("Pass height and width when mask is None (a global perturbation).")
            mask = torch.ones(height, width)
        if mask.ndim != 2:
            raise ValueError(f"mask must have shape (H, W), got {tuple(mask.shape)}.")
        height, width = mask.shape
        whole = isinstance(lowpass_size, int) and not isinstance(lowpass_size, bool)
        if lowpass_size is not None and not (whole and lowpass_size >= 1):
            raise ValueError(f"lowpass_size must be a whole number of pixels >= 1 or None, got {lowpass_size!r}.")
        if rms_budget is not None and not rms_budget > 0:
            raise ValueError(f"rms_budget must be > 0 (a root-mean-square on [0, 1] images) or None, got {rms_budget}.")
        self.epsilon = float(epsilon)
        self.lowpass_size = lowpass_size
        self.rms_budget = None if rms_budget is None else float(rms_budget)
        self.register_buffer("base_mask", mask.detach().float().clone())
        noise = (torch.rand(3, height, width, generator=generator) * 2 - 1) * (init_scale * self.epsilon)
        self.noise = nn.Parameter(noise)
        self.flow_warp = FlowWarp(height, width, bound=flow_bound, unit=flow_unit) if learn_flow else None

    def warped_mask(self) -> torch.Tensor:
        """The mask after the flow, ``Mf``, shape ``(H, W)`` in ``[0, 1]``."""
        if self.flow_warp is None:
            return self.base_mask
        return self.flow_warp(self.base_mask[None, None])[0, 0]

    def forward(self) -> torch.Tensor:
        """The perturbation ``v``, shape ``(3, H, W)`` in ``[-epsilon, epsilon]``."""
        perturbation = masked_perturbation(self.noise, self.warped_mask(), self.epsilon)
        if self.lowpass_size is not None:
            perturbation = lowpass(perturbation, self.lowpass_size)
        return perturbation if self.rms_budget is None else limit_rms(perturbation, self.rms_budget)

    @torch.no_grad()
    def start_along_(self, direction: torch.Tensor, init_scale: float = 1.0) -> None:
        """Set the noise to ``direction`` scaled to the root mean square of the uniform start of
        ``init_scale`` (``init_scale * epsilon / sqrt(3)``), clipped to ``[-epsilon, epsilon]``.

        Parameters
        ----------
        direction : torch.Tensor
            ``(3, H, W)``, not all zero.
        init_scale : float
            As in the constructor, ``>= 0``.
        """
        rms = init_scale * self.epsilon / math.sqrt(3.0)
        self.start_at_(direction * (rms / direction.pow(2).mean().sqrt()))

    @torch.no_grad()
    def start_at_(self, noise: torch.Tensor) -> None:
        """Set the noise to ``noise`` (``(3, H, W)``, any device and dtype) clipped to ``[-epsilon, epsilon]``."""
        self.noise.copy_(noise.clamp(-self.epsilon, self.epsilon))

    @torch.no_grad()
    def project_(self) -> None:
        """Clip noise to ``[-epsilon, epsilon]`` and the flow to its bound, in place."""
        self.noise.clamp_(-self.epsilon, self.epsilon)
        if self.flow_warp is not None:
            self.flow_warp.project_()
