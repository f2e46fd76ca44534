"""Small stand-in models shared by the tests (imported as ``from fakes import ...``)."""

import torch
from torch import nn


class TinyEmbedder(nn.Module):
    """A small fixed conv net: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, 16)``; same weights every time."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x):
        return self.net(x - 0.5)
