"""Adversarial losses on face embeddings (paper Section 3.5.1 and Table 5).

All losses take the embeddings of the perturbed faces ``F(x + v)`` and of the
clean faces ``F(x)``, both of shape ``(B, D)``, and return one value per face
(``reduction="none"``) or their mean. Smaller is a stronger attack.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "direction_loss", "cosine_loss", "euclidean_loss", "worst_member_loss", "ADVERSARIAL_LOSSES", "DirectionLoss",
]

Reduction = Literal["mean", "none"]


def _reduce(per_face: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_face.mean()
    if reduction == "none":
        return per_face
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")


def direction_loss(adversarial: torch.Tensor, clean: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """The paper's direction loss ``|| F(x)/|F(x)| + F(x+v)/|F(x+v)| ||^2`` (Eq. 9).

    Zero when the perturbed embedding points exactly opposite the clean one.
    Per face it equals ``2 + 2 cos(F(x+v), F(x))``, in ``[0, 4]``.

    Parameters
    ----------
    adversarial, clean : torch.Tensor
        Shape ``(B, D)``.
    reduction : {"mean", "none"}

    Returns
    -------
    torch.Tensor
        Scalar, or shape ``(B,)`` for ``reduction="none"``.
    """
    per_face = (F.normalize(clean, dim=1) + F.normalize(adversarial, dim=1)).pow(2).sum(dim=1)
    return _reduce(per_face, reduction)


def cosine_loss(adversarial: torch.Tensor, clean: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Cosine similarity of perturbed and clean embeddings, in ``[-1, 1]`` per face (Table 5)."""
    return _reduce(F.cosine_similarity(adversarial, clean, dim=1), reduction)


def euclidean_loss(adversarial: torch.Tensor, clean: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Negative Euclidean distance of the L2-normalised embeddings, in ``[-2, 0]`` per face (Table 5).

    Embeddings are normalised first so the loss does not depend on the
    model's embedding scale.
    """
    distance = (F.normalize(adversarial, dim=1) - F.normalize(clean, dim=1)).norm(dim=1)
    return _reduce(-distance, reduction)


def worst_member_loss(
    similarities: torch.Tensor,
    thresholds: torch.Tensor | list[float],
    *,
    margin: float = 0.0,
    temperature: float = 0.02,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Push every model of an ensemble below its own threshold: a smooth maximum over members.

    Per face ``2 * temperature * (logsumexp_m((s_m - t_m + margin) / temperature) - log M)``, where
    ``s_m`` is member ``m``'s cosine similarity of the perturbed and the clean face and ``t_m``
    its verification threshold. The gradient goes mostly to the member that still matches the
    face most (relative to its threshold), so a member the others dominate cannot slip through,
    as it can under the mean of an :class:`~krtfuap.models.ensemble.EnsembleEmbedder`. With one
    member (or ``M`` members that agree) it is ``2 * (s - t + margin)``, whose gradient is the
    direction loss's (``2 + 2 s``); as ``temperature -> 0`` it tends to twice the worst member's excess.

    Parameters
    ----------
    similarities : torch.Tensor
        ``(B, M)`` cosine similarities, one column per member, in ``[-1, 1]``.
    thresholds : torch.Tensor or list of float
        ``(M,)`` the members' verification thresholds (same person when ``s >= t``).
    margin : float
        How far below its threshold each member is pushed, ``>= 0``.
    temperature : float
        Softness of the maximum, ``> 0``, in units of cosine similarity.
    reduction : {"mean", "none"}

    Returns
    -------
    torch.Tensor
        Scalar, or ``(B,)`` for ``reduction="none"``; smaller is a stronger attack.
    """
    if similarities.ndim != 2:
        raise ValueError(f"similarities must have shape (B, M), one column per model, got {tuple(similarities.shape)}.")
    thresholds = torch.as_tensor(thresholds, dtype=similarities.dtype, device=similarities.device)
    if thresholds.shape != similarities.shape[1:]:
        raise ValueError(
            f"thresholds must give one value per model: {tuple(thresholds.shape)} for {similarities.shape[1]} models."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (a softness in cosine units, e.g. 0.02), got {temperature}.")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 (how far below each threshold to push), got {margin}.")
    excess = (similarities - thresholds + margin) / temperature
    per_face = 2.0 * temperature * (torch.logsumexp(excess, dim=1) - math.log(similarities.shape[1]))
    return _reduce(per_face, reduction)


#: Adversarial loss functions by the name ``UAPAttack(adversarial_loss=...)`` takes.
ADVERSARIAL_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "direction": direction_loss,
    "cosine": cosine_loss,
    "euclidean": euclidean_loss,
}


class DirectionLoss(nn.Module):
    """Adversarial loss module; ``kind`` picks the paper's loss or an ablation.

    Parameters
    ----------
    kind : {"direction", "cosine", "euclidean"}
        ``"direction"`` is the paper's loss (Eq. 9); the other two are the
        ablations of Table 5.
    reduction : {"mean", "none"}
    """

    def __init__(self, kind: str = "direction", reduction: Reduction = "mean") -> None:
        super().__init__()
        if kind not in ADVERSARIAL_LOSSES:
            raise ValueError(f"kind must be one of {sorted(ADVERSARIAL_LOSSES)}, got {kind!r}.")
        _reduce(torch.zeros(1), reduction)
        self.kind = kind
        self.reduction = reduction

    def forward(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Loss of perturbed embeddings ``(B, D)`` against clean ones ``(B, D)``."""
        return ADVERSARIAL_LOSSES[self.kind](adversarial, clean, self.reduction)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"
