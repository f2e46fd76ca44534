"""Safe weight loading and freezing shared by the face-model loaders."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from krtfuap._validation import load_torch_file

__all__ = ["load_weights", "freeze"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def load_weights(model: ModuleT, path: str | Path, *, where_to_get: str) -> ModuleT:
    """Fill ``model`` with a plain state_dict read from disk without running pickled code.

    Parameters
    ----------
    model : torch.nn.Module
        Architecture whose parameter names and shapes match the file exactly.
    path : str or pathlib.Path
        File written by ``torch.save(model.state_dict(), path)``.
    where_to_get : str
        Sentence telling the user where the file comes from, used in errors.

    Returns
    -------
    torch.nn.Module
        The same ``model``, with the weights loaded.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    TypeError
        If the file does not hold a mapping of names to tensors.
    ValueError
        If the names or shapes do not match ``model``, or the file is
        truncated, corrupt or holds pickled code (refused, never run).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Face-model weights not found: {path}. {where_to_get}")
    state = load_torch_file(path, what="face-model weights", fix=where_to_get)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(
            f"{path} does not hold a plain state_dict (a mapping of names to tensors); "
            f"save it with torch.save(model.state_dict(), path). {where_to_get}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"{path} does not fit {type(model).__name__} (names or shapes differ; wrong model or depth?). "
            f"{where_to_get} ({' '.join(str(error).split())[:300]})"
        ) from error
    return model


def freeze(model: ModuleT) -> ModuleT:
    """Put ``model`` in eval mode and stop gradients to its parameters (in place).

    Gradients with respect to the model's *input* still flow.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        The same module.
    """
    model.eval()
    model.requires_grad_(False)
    return model
