"""Stand-ins shared by the tests: a tiny face model, random faces, a quick attack.

Imported as ``from fakes import ...`` (pytest puts ``tests/`` on ``sys.path``). Nothing here
touches the global torch RNG: every random draw comes from a local ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from krtfuap.alignment import ARCFACE_TEMPLATE_112
from krtfuap.attack import UAPAttack


class TinyEmbedder(nn.Module):
    """A small fixed conv net standing in for a face model.

    Two strided 3x3 convolutions (3 -> 8 -> ``dim`` channels, ReLU between) and a global
    average pool: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, dim)``, for ``H, W >= 7``.

    Parameters
    ----------
    seed : int
        The weights depend on it alone (PyTorch's default init, drawn from a local generator).
    dim : int
        Embedding size.

    Attributes
    ----------
    calls : list of int
        The batch size of every forward, for tests that count model calls.
    """

    def __init__(self, seed: int = 0, dim: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        first, second = (_seeded_conv(3, 8, generator), _seeded_conv(8, dim, generator))
        self.net = nn.Sequential(first, nn.ReLU(), second, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return self.net(images - 0.5)


class LinearEmbedder(nn.Module):
    """A linear toy face model: ``(B, 3, size, size)`` -> ``W vec(x) (+ b)`` of shape ``(B, dim)``.

    The weights depend on ``seed`` alone (PyTorch's default init, drawn from a local generator).
    """

    def __init__(self, size: int = 8, dim: int = 4, seed: int = 0, bias: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.linear = skip_init(nn.Linear, 3 * size * size, dim, bias=bias)
        _default_init(self.linear, generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))


def _seeded_conv(in_channels: int, out_channels: int, generator: torch.Generator) -> nn.Conv2d:
    conv = skip_init(nn.Conv2d, in_channels, out_channels, 3, stride=2)
    _default_init(conv, generator)
    return conv


def _default_init(layer: nn.Conv2d | nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default init of a conv or linear layer (``reset_parameters``), drawn from ``generator``."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if layer.bias is not None:
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def random_faces(n: int = 16, seed: int = 0, size: int = 32, margin: float = 0.0) -> torch.Tensor:
    """``n`` random RGB "faces", shape ``(n, 3, size, size)``, uniform in ``[margin, 1 - margin]``."""
    pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return pixels * (1 - 2 * margin) + margin


QUICK = dict(threshold=0.9, max_epochs=2, batch_size=8, random_state=0)
"""The settings of :func:`tiny_attack` that a test does not give: a short, repeatable fit."""


def tiny_attack(estimator: type = UAPAttack, model: nn.Module | None = None, **params: Any):
    """An unfitted ``estimator`` on ``model`` (default a new :class:`TinyEmbedder`).

    ``params`` override the :data:`QUICK` settings. Test modules bind their own settings with
    ``functools.partial(tiny_attack, UAPAttack, stealth_loss="ssim", ...)``.
    """
    taken = estimator._get_param_names()  # random noise learns nothing: it has no stopping rules
    settings = {key: value for key, value in QUICK.items() if key in taken}
    return estimator(model if model is not None else TinyEmbedder(), **{**settings, **params})


def untimed(history: list[dict]) -> list[dict]:
    """``history_`` without the wall-clock ``time`` field, which differs between runs."""
    return [{key: value for key, value in record.items() if key != "time"} for record in history]


def placed_keypoints(scale: float, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The five ArcFace template keypoints ``(5, 2)`` placed in a photo by a known similarity transform:
    scaled by ``scale``, turned by ``angle`` radians about the template's origin, moved by ``shift``."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ARCFACE_TEMPLATE_112 @ (scale * rotation).T + np.asarray(shift)
