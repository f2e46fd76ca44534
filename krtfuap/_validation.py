"""Input checks shared by every public entry point.

Each check raises an error that names the problem and says how to fix it.
"""

from __future__ import annotations

import os
import pickle
import re

import torch

__all__ = ["check_images", "check_embeddings", "check_number", "load_torch_file", "torch_load_error"]


def check_images(images: object, *, name: str = "images") -> torch.Tensor:
    """Check that ``images`` is a batch of RGB images in ``[0, 1]``.

    Parameters
    ----------
    images : torch.Tensor
        Shape ``(B, 3, H, W)``, floating point, values in ``[0, 1]``.
    name : str
        Name used in error messages.

    Returns
    -------
    torch.Tensor
        The same tensor (not copied).

    Raises
    ------
    TypeError
        If ``images`` is not a tensor or is not floating point.
    ValueError
        If the shape is wrong, a value is NaN/inf or outside ``[0, 1]``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, 3, H, W) in [0, 1], "
            f"got {type(images).__name__}; convert with torch.as_tensor(...)."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        hint = ""
        if images.ndim == 3:
            hint = " Add a batch dimension with images.unsqueeze(0)."
        elif images.ndim == 4 and images.shape[-1] == 3:
            hint = " The tensor looks channels-last; use images.permute(0, 3, 1, 2)."
        elif images.ndim == 4 and images.shape[1] in (1, 4):
            hint = " Convert grey or RGBA images to 3-channel RGB first."
        raise ValueError(
            f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}.{hint}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0); pass at least one image.")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be floating point in [0, 1], got dtype {images.dtype}; "
            "for uint8 images use images.float() / 255."
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf values; clean or drop those images.")
    low, high = images.min().item(), images.max().item()
    if low < 0.0 or high > 1.0:
        hint = " It looks like 0-255 data: divide by 255." if high > 1.0 + 1e-6 and high <= 255 else ""
        raise ValueError(
            f"{name} must be in [0, 1], got values in [{low:.9g}, {high:.9g}].{hint} "
            "If the model needs another normalisation, put it inside the model "
            "(see krtfuap.models.FaceEmbedder)."
        )
    return images


def check_embeddings(embeddings: object, batch_size: int, *, name: str = "model output") -> torch.Tensor:
    """Check that a face model returned one embedding per image.

    Parameters
    ----------
    embeddings : torch.Tensor
        Expected shape ``(B, D)``.
    batch_size : int
        The ``B`` of the input batch.
    name : str
        Name used in error messages.

    Returns
    -------
    torch.Tensor
        The same tensor.

    Raises
    ------
    TypeError
        If it is not a tensor, or not real floating point.
    ValueError
        If the shape is wrong, a value is NaN/inf, or an embedding is all zeros.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, D), got {type(embeddings).__name__}; "
            "wrap the model so that forward returns the embedding tensor only."
        )
    if embeddings.ndim != 2 or embeddings.shape[0] != batch_size:
        raise ValueError(
            f"{name} must have shape (B, D) = ({batch_size}, D), got {tuple(embeddings.shape)}; "
            "the face model must map (B, 3, H, W) images to (B, D) embeddings "
            "(flatten or select the embedding output in a wrapper)."
        )
    if not embeddings.is_floating_point():
        raise TypeError(
            f"{name} must be real floating point, got dtype {embeddings.dtype}; return the float embedding "
            "the model computes (not a rounded, integer or complex one)."
        )
    if not torch.isfinite(embeddings).all():
        raise ValueError(
            f"{name} contains NaN or inf; check the model weights and its input normalisation."
        )
    if (embeddings.detach().abs().amax(dim=1) == 0).any():
        raise ValueError(
            f"{name} has an all-zero embedding, whose cosine similarity is undefined; check the model "
            "weights and its input normalisation (a dead model fools everything trivially)."
        )
    return embeddings


def torch_load_error(error: Exception, path: str | os.PathLike, *, what: str, fix: str) -> ValueError:
    """Turn an exception of ``torch.load(path, weights_only=True)`` into a clear ``ValueError``.

    A file holding pickled Python objects other than tensors (which could run
    code when unpickled) is reported as refused; anything else as truncated or
    corrupt. ``what`` names the file's role (e.g. ``"face-model weights"``),
    ``fix`` is a sentence saying how to get a good file.
    """
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(error, pickle.UnpicklingError) and found:  # weights_only refused to import a callable
        detail = f" (it references {found.group(1)})"
        return ValueError(
            f"Refused to load {what} {os.fspath(path)}: it holds pickled Python objects{detail}, not only "
            f"tensors, and unpickling them could run code. krtfuap never unpickles code; use a file that "
            f"holds plain tensors (e.g. torch.save(model.state_dict(), path)) from a source you trust. {fix}"
        )
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
    return ValueError(
        f"Cannot read {what} {os.fspath(path)}: the file is truncated, corrupt or not a torch.save file "
        f"({type(error).__name__}: {first_line or 'no details'}). {fix}"
    )


def load_torch_file(path: str | os.PathLike, *, what: str, fix: str) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say how to fix them.

    Parameters
    ----------
    path : path-like
        An existing file written by ``torch.save``.
    what : str
        The file's role, used in error messages (e.g. ``"checkpoint"``).
    fix : str
        A sentence telling the user how to get a good file.

    Returns
    -------
    object
        What the file holds (tensors and plain containers only).

    Raises
    ------
    ValueError
        If the file holds pickled code (refused, nothing is executed), or is
        truncated, empty or not a ``torch.save`` file.
    OSError
        If the file cannot be opened (missing, a folder, no permission).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ...
        raise torch_load_error(error, path, what=what, fix=fix) from error


def check_number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> None:
    """Check a numeric parameter: its type, that it is finite and that it lies in its range.

    Parameters
    ----------
    value : object
        The value given.
    name : str
        The parameter's name, used in the message.
    low, high : float, optional
        Bounds; ``None`` for none.
    low_open, high_open : bool
        Exclude the bound itself.
    integer : bool
        Require an ``int`` (``bool`` is refused).
    allow_none : bool
        Accept ``None``.
    hint : str
        Said after the range, e.g. ``" (images are in [0, 1])"``.

    Raises
    ------
    TypeError
        When the value is not a number of the right kind (strings, bools, tensors ...).
    ValueError
        When it is NaN, infinite or outside its range.
    """
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = "an int" if integer else "a number"
        hint = " or None" if allow_none else ""
        raise TypeError(f"{name} must be {wanted}{hint}, got {value!r} ({type(value).__name__}).")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    if low is not None and high is not None:
        interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        interval = f"{'>' if low_open else '>='} {low}"
    else:
        interval = f"{'<' if high_open else '<='} {high}"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {interval}{hint}, got {value!r}.")
