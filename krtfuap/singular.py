"""A start for the perturbation along the direction that moves the faces' embeddings most.

For a small change ``d`` of the input, face ``x_i``'s unit embedding ``u(x_i)`` moves by about
``J_i d``, ``J_i`` the Jacobian of ``u`` at ``x_i``. The direction ``d`` (unit L2 norm) that moves a
set of faces most in total, ``max sum_i |J_i d|^2``, is the top right singular vector of the stacked
Jacobians, the top eigenvector of ``sum_i J_i^T J_i``: the start Khrulkov & Oseledets (CVPR 2018,
"Art of singular vectors and universal adversarial perturbations") gave universal perturbations.
:func:`top_singular_direction` finds it by power iteration without forming any Jacobian: ``J_i d``
by a central difference of two forward passes, ``sum_i J_i^T (J_i d)`` by one backward pass.
``UAPAttack(init="singular")`` starts its noise there.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from krtfuap._validation import Interval, check_param

__all__ = ["top_singular_direction"]

#: The largest pixel change (on [0, 1] images) of the central differences that give ``J_i d``.
_DIFFERENCE_STEP = 0.01


def top_singular_direction(
    embed: Callable[[torch.Tensor], torch.Tensor],
    faces: torch.Tensor,
    *,
    n_members: int | None = None,
    n_iterations: int = 15,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The input direction that changes the unit embeddings of ``faces`` most (power iteration).

    Parameters
    ----------
    embed : callable
        ``(B, 3, H, W)`` faces in ``[0, 1]`` -> ``(B, D)`` embeddings (``(B, K * D)`` for an ensemble
        of ``K = n_members`` members, each unit-normalised on its own), differentiable.
    faces : torch.Tensor
        ``(N, 3, H, W)`` faces in ``[0, 1]``, ``N >= 1``, on the model's device.
    n_members : int, optional
        Number of ensemble members in each embedding; default: one.
    n_iterations : int
        Power iterations, ``>= 1``; each costs three passes over ``faces`` (two forward, one forward
        and backward).
    batch_size : int
        Faces per pass, ``>= 1`` (memory only; the result does not depend on it).
    generator : torch.Generator, optional
        Draws the random start (on the CPU).

    Returns
    -------
    torch.Tensor
        ``(3, H, W)`` on the faces' device and dtype, unit L2 norm. Its sign is arbitrary: ``-d``
        moves the embeddings as much.
    """
    check_param("n_iterations", n_iterations, [Interval(int, 1)])
    check_param("batch_size", batch_size, [Interval(int, 1)])
    if faces.ndim != 4 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"faces must have shape (N, 3, H, W) with N >= 1, got {tuple(faces.shape)}.")
    members = 1 if n_members is None else n_members

    def unit(images: torch.Tensor) -> torch.Tensor:
        embeddings = embed(images.clamp(0.0, 1.0)).float()
        return F.normalize(embeddings.unflatten(1, (members, -1)), dim=2).flatten(1)

    direction = torch.randn(faces.shape[1:], generator=generator).to(faces)
    direction = direction / direction.norm()
    for _ in range(n_iterations):
        pushed = torch.zeros_like(direction)
        for batch in faces.split(batch_size):
            with torch.no_grad():  # J d by central differences, the largest pixel change _DIFFERENCE_STEP
                scale = _DIFFERENCE_STEP / direction.abs().max()
                moved = (unit(batch + scale * direction) - unit(batch - scale * direction)) / (2 * scale)
            change = torch.zeros_like(direction, requires_grad=True)
            (unit(batch + change) * moved).sum().backward()  # J^T (J d), summed over the batch
            pushed += change.grad
        if not torch.isfinite(pushed).all() or pushed.norm() == 0:
            raise ValueError("The model's embeddings do not change with its input (a zero or non-finite "
                             "Jacobian), so no singular direction exists; use init='uniform'.")
        direction = pushed / pushed.norm()
    return direction
