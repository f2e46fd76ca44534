"""One perturbation scaled for each face so that every face meets an SSIM target.

A universal perturbation ``v`` changes every face by the same amount, but its
SSIM differs from face to face: flat, smooth faces show the change more than
textured ones (at a mean SSIM of 0.951 one fitted ``v`` spreads over 0.927-0.975,
benchmarks/RESULTS.md 8q). :func:`scale_to_ssim` gives each face ``x`` the change
``clip(s(x) * v, -m, m)`` (``m`` the largest ``|v|``) with the largest scale ``s(x)`` whose
SSIM is still at or above the target: no face falls below it, and faces with headroom take more.
The estimators apply it with ``transform(X, per_face_ssim=S)`` and judge it with
``evaluate(X, per_face_ssim=S)``.
"""

from __future__ import annotations

import torch

from krtfuap._validation import Interval, check_param
from krtfuap.metrics import ssim

__all__ = ["scale_to_ssim"]

#: The largest scale tried; a face whose SSIM stays above the target there keeps it.
_LARGEST_SCALE = 64.0
#: Multiples of the predicted scale tried, in order, before the bisection.
_BRACKET = (0.8, 1.25, 2.0)


@torch.no_grad()
def scale_to_ssim(
    images: torch.Tensor,
    perturbation: torch.Tensor,
    target_ssim: float,
    *,
    epsilon: float | None = None,
    iterations: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each face with ``perturbation`` scaled to its own largest scale whose SSIM is ``>= target_ssim``.

    The change of face ``x`` is ``clip(s * v, -epsilon, epsilon)``. For a small change ``1 - SSIM``
    grows as ``s**2``, so the SSIM at ``s = 1`` predicts each face's scale ``s0``; a bisection on
    :func:`krtfuap.metrics.ssim` (scikit-image's SSIM) then finds it between the last scale that
    meets the target and the first that does not, of ``0, 0.8 * s0, 1.25 * s0, 2 * s0, 64`` (a face
    still above the target at ``64`` keeps ``64``). Every returned face meets the target: only
    scales whose SSIM was computed and met it are kept.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` clean faces in ``[0, 1]``.
    perturbation : torch.Tensor
        ``(3, H, W)`` (or broadcastable to ``images``), on the images' device.
    target_ssim : float
        In ``(0, 1)``.
    epsilon : float, optional
        Bound on each value of the scaled change; default: the largest ``|perturbation|``, so the
        change never leaves the perturbation's own l_inf budget.
    iterations : int
        Bisection steps, ``>= 1`` (12 narrow a bracket below ``2 * s0`` to within 0.02 % of ``s0``).

    Returns
    -------
    adversarial : torch.Tensor
        ``(B, 3, H, W)`` in ``[0, 1]``, ``clip(images + clip(s * v, -epsilon, epsilon), 0, 1)``.
    scales : torch.Tensor
        ``(B,)`` the scale ``s`` of each face, in ``[0, 64]``.
    """
    check_param("target_ssim", target_ssim, [Interval(float, 0, 1, closed="neither")])
    check_param("iterations", iterations, [Interval(int, 1)])
    perturbation = perturbation.to(images.dtype)
    bound = float(perturbation.abs().max()) if epsilon is None else float(epsilon)

    def apply(scales: torch.Tensor) -> torch.Tensor:
        change = (scales.view(-1, 1, 1, 1) * perturbation).clamp(-bound, bound)
        return (images + change).clamp(0.0, 1.0)

    def meets(scales: torch.Tensor) -> torch.Tensor:
        return ssim(apply(scales), images) >= target_ssim

    at_one = 1.0 - ssim(apply(torch.ones(len(images), dtype=images.dtype, device=images.device)), images)
    predicted = ((1.0 - target_ssim) / at_one.clamp_min(1e-12)).sqrt().clamp(max=_LARGEST_SCALE)
    low, high = torch.zeros_like(predicted), torch.full_like(predicted, _LARGEST_SCALE)
    settled = torch.zeros_like(predicted, dtype=torch.bool)  # a scale that fails the target is known
    for candidate in (*((factor * predicted).clamp(max=_LARGEST_SCALE) for factor in _BRACKET), high.clone()):
        above = meets(candidate)
        low = torch.where(above & ~settled, candidate, low)
        high = torch.where(~above & ~settled, candidate, high)
        settled |= ~above
    for _ in range(iterations):
        middle = (low + high) / 2.0
        above = meets(middle)
        low = torch.where(above, middle, low)
        high = torch.where(above, high, middle)
    return apply(low), low
