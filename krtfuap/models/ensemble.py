"""Several face models seen as one, for fitting a perturbation that transfers.

:class:`EnsembleEmbedder` L2-normalises each model's embedding, concatenates
them and divides by ``sqrt(K)``. The result has unit norm, and for two images
the cosine similarity of the ensemble embeddings is the **mean** of the
per-model cosine similarities; the direction loss on it is the mean of the
per-model direction losses. So any code written for one model (``UAPAttack``,
the baselines, the metrics) fits and judges an ensemble unchanged, with the
verification threshold read as a threshold on the mean similarity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from krtfuap._ops import call_model
from krtfuap._validation import check_embeddings

__all__ = ["EnsembleEmbedder"]


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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images``, ``(B, 3, H, W)`` RGB in ``[0, 1]``: ``(B, sum_k D_k)`` float32, unit L2 norm per row."""
        parts = [
            F.normalize(check_embeddings(call_model(model, images), len(images)).float(), dim=1)
            for model in self.models
        ]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))
