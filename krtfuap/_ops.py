"""Small tensor operations shared by the modules."""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

__all__ = ["straight_through_clamp", "model_input_dtype", "call_model"]


def straight_through_clamp(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp the values into ``[low, high]`` but pass the gradient through unchanged.

    ``torch.clamp`` has zero gradient at and beyond its bounds, so a parameter
    projected exactly onto a bound (or a binary mask sitting at 0 and 1) would
    never receive a gradient again. The forward value is exactly the clamped
    one (``values - values.detach()`` is exactly zero).
    """
    return values.detach().clamp(low, high) + (values - values.detach())


def model_input_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype ``model`` takes its input in.

    ``model.input_dtype`` when the model declares one (an
    :class:`~krtfuap.models.ensemble.EnsembleEmbedder`, whose members may
    differ, takes float32 and casts for each member); otherwise the dtype of
    its first floating parameter or buffer; ``None`` for a model without any.
    """
    declared = getattr(model, "input_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), None)


def call_model(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``model(images)``, with the images cast to the model's floating dtype on the way in.

    This is the model boundary: images, perturbations, losses and optimiser
    state stay float32, and only the batch handed to the face model takes its
    dtype, so a model converted with ``.to(torch.bfloat16)`` or ``.half()``
    works with float32 faces and a float32 perturbation (gradients flow back
    through the cast). A module gets a copy of the batch, so one that changes
    its input in place never changes the caller's images. A plain callable
    (not an ``nn.Module``) is called as is. The output is returned unchanged
    (check it with :func:`krtfuap._validation.check_embeddings`).
    """
    if not isinstance(model, nn.Module):
        return model(images)
    return model(images.to(model_input_dtype(model) or images.dtype, copy=True))
