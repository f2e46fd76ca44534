"""Several face models seen as one, for fitting a perturbation that transfers.

:class:`EnsembleEmbedder` L2-normalises each model's embedding, concatenates
them and divides by ``sqrt(K)``. The result has unit norm, and for two images
the cosine similarity of the ensemble embeddings is the **mean** of the
per-model cosine similarities; the direction loss on it is the mean of the
per-model direction losses. So any code written for one model (``UAPAttack``,
the baselines, the metrics) fits and judges an ensemble unchanged, with the
verification threshold read as a threshold on the mean similarity.

:class:`MemberwiseEmbedder` keeps that property and lays the members out in
equal blocks, so that :func:`member_similarities` reads each member's own
similarity off two of its embeddings: for judging every member against its
own threshold (``UAPAttack(model=[...], threshold=[...])``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from krtfuap._ops import call_model
from krtfuap._validation import check_embeddings

__all__ = ["EnsembleEmbedder", "MemberwiseEmbedder", "member_similarities"]


class EnsembleEmbedder(nn.Module):
    """Concatenate the normalised embeddings of several face models.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Each maps ``(B, 3, H, W)`` RGB in ``[0, 1]`` to ``(B, D_k)``.

    Attributes
    ----------
    models : torch.nn.ModuleList
    input_dtype : torch.dtype
        float32: the ensemble takes float32 images and casts them to each
        member's own dtype (:func:`krtfuap._ops.call_model`), so members of
        different precisions can be mixed.
    """

    input_dtype = torch.float32

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("EnsembleEmbedder needs at least one model; got an empty list.")
        for index, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"Ensemble member {index} is a {type(model).__name__}, not a torch.nn.Module mapping "
                    "(B, 3, H, W) images in [0, 1] to (B, D) embeddings."
                )
        self.models = nn.ModuleList(models)

    def member_embeddings(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each member's embedding of ``images`` ``(B, 3, H, W)`` in ``[0, 1]``: ``(B, D_k)`` float32,
        unit L2 norm per row, one batched pass per member, in the members' order."""
        return [
            F.normalize(check_embeddings(call_model(model, images), len(images)).float(), dim=1)
            for model in self.models
        ]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images``, ``(B, 3, H, W)`` RGB in ``[0, 1]``: ``(B, sum_k D_k)`` float32, unit L2 norm per row."""
        parts = self.member_embeddings(images)
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


class MemberwiseEmbedder(EnsembleEmbedder):
    """An ensemble embedding with one equal block per member, so each member's similarity can be read apart.

    Row ``b`` of the output is ``K`` blocks of ``D = max_k D_k`` values: block
    ``k`` holds member ``k``'s L2-normalised embedding, zero-padded to ``D``;
    the whole row is divided by ``sqrt(K)``. As for :class:`EnsembleEmbedder`,
    rows have unit norm and the cosine similarity of two rows is the mean of
    the members' cosine similarities; :func:`member_similarities` gives each
    member's own. Parameters and attributes as :class:`EnsembleEmbedder`.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images``, ``(B, 3, H, W)`` RGB in ``[0, 1]``: ``(B, K * D)`` float32, unit L2 norm per row."""
        parts = self.member_embeddings(images)
        width = max(part.shape[1] for part in parts)
        blocks = torch.stack([F.pad(part, (0, width - part.shape[1])) for part in parts], dim=1)  # (B, K, D)
        return blocks.flatten(1) / math.sqrt(len(parts))


def member_similarities(first: torch.Tensor, second: torch.Tensor, n_members: int) -> torch.Tensor:
    """Each member's cosine similarity of two :class:`MemberwiseEmbedder` embeddings.

    Parameters
    ----------
    first, second : torch.Tensor
        ``(B, K * D)`` embeddings of ``K = n_members`` members (e.g. of perturbed and clean faces).
    n_members : int
        ``K``, the number of members, ``>= 1``.

    Returns
    -------
    torch.Tensor
        ``(B, K)`` in ``[-1, 1]``, column ``k`` member ``k``'s; differentiable.
    """
    if first.ndim != 2 or first.shape != second.shape or first.shape[1] % n_members:
        raise ValueError(
            f"embeddings {tuple(first.shape)} and {tuple(second.shape)} must both be (B, K * D), {n_members} "
            "equal blocks per row as MemberwiseEmbedder makes them."
        )
    return F.cosine_similarity(first.unflatten(1, (n_members, -1)), second.unflatten(1, (n_members, -1)), dim=2)
