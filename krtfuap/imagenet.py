"""ImageNet backbone weights (VGG16, AlexNet, SqueezeNet): find, load safely, or explain.

Weights are looked up, in order, at a path the user gives, then in the torch hub
cache (``$TORCH_HOME/hub/checkpoints``, where torchvision itself stores them).
When they are missing and ``download=True``, torchvision's own download is tried
(it works when online); if that fails too, a :class:`FileNotFoundError` says
which file to get and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from krtfuap._validation import load_torch_file

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_WEIGHTS", "imagenet_normalize", "load_imagenet_state_dict"]

#: Per-channel RGB mean of ImageNet on the ``[0, 1]`` scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet on the ``[0, 1]`` scale.
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision's file name and download address for each backbone.
IMAGENET_WEIGHTS: dict[str, tuple[str, str]] = {
    "vgg16": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alexnet": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeezenet1_1": (
        "squeezenet1_1-b8a52dc0.pth",
        "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
    ),
}


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Apply ImageNet mean/std to RGB images ``(B, 3, H, W)`` in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_state_dict(path: Path, backbone: str, url: str) -> dict[str, torch.Tensor]:
    fix = f"Replace it with torchvision's {backbone} weights from {url}."
    state = load_torch_file(path, what=f"{backbone} weights", fix=fix)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a {backbone} state_dict (a mapping of names to tensors). {fix}")
    return state


def load_imagenet_state_dict(
    backbone: str, path: str | os.PathLike | None = None, *, download: bool = False
) -> dict[str, torch.Tensor]:
    """Load torchvision ImageNet weights for ``backbone`` without running pickled code.

    Parameters
    ----------
    backbone : {"vgg16", "alexnet", "squeezenet1_1"}
    path : path-like, optional
        An explicit weights file (a torchvision ``state_dict``). When ``None``,
        the torch hub cache is searched for torchvision's file name.
    download : bool
        When the file is missing, let torchvision download it (needs network).

    Returns
    -------
    dict
        The state dict, loaded with ``torch.load(..., weights_only=True)``.

    Raises
    ------
    FileNotFoundError
        When the weights are neither on disk nor downloadable; the message
        names the file, where to put it and where to get it.
    ValueError
        When the file is truncated, corrupt, not a state dict, or holds
        pickled code (refused, never run).
    """
    if backbone not in IMAGENET_WEIGHTS:
        raise ValueError(f"backbone must be one of {sorted(IMAGENET_WEIGHTS)}, got {backbone!r}.")
    file_name, url = IMAGENET_WEIGHTS[backbone]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{backbone} weights file {path} does not exist; download it from {url}.")
        return _load_state_dict(path, backbone, url)
    cached = _hub_checkpoint_dir() / file_name
    if cached.is_file():
        return _load_state_dict(cached, backbone, url)
    reason = ""
    if download:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True, progress=False)
        except Exception as error:  # no network, proxy, disk full: all end in the same advice
            reason = f" (download failed: {error})"
    raise FileNotFoundError(
        f"ImageNet {backbone} weights not found{reason}. Put {file_name} (from {url}) in "
        f"{_hub_checkpoint_dir()} (set TORCH_HOME to move it), or pass its path explicitly."
    )
