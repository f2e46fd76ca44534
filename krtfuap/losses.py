"""Adversarial losses on face embeddings (paper Section 3.5.1 and Table 5).

All losses take the embeddings of the perturbed faces ``F(x + v)`` and of the
clean faces ``F(x)``, both of shape ``(B, D)``, and return one value per face
(``reduction="none"``) or their mean. Smaller is a stronger attack.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["direction_loss", "cosine_loss", "euclidean_loss", "ADVERSARIAL_LOSSES", "DirectionLoss"]

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
