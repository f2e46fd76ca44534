"""MobileFaceNet in the layout of the ``foamliu/MobileFaceNet`` checkpoint.

The network is a MobileNetV2-style stack of inverted residual blocks (ReLU6)
followed by a global depthwise convolution (GDConv) and a linear 1x1 projection
to a 128-d embedding. Parameter names follow the GitHub repository
``foamliu/MobileFaceNet`` (file ``weights/mobilefacenet.pt``, Apache-2.0), so its
state_dict (307 entries) loads with ``strict=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from krtfuap.models._loading import channels_last, freeze, load_weights
from krtfuap.models.adapter import FaceEmbedder

__all__ = ["MobileFaceNet", "load_foamliu_mobilefacenet"]

# (expansion t, output channels c, repeats n, first stride s) per stage.
_STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_WHERE_TO_GET = (
    "Get it from GitHub foamliu/MobileFaceNet (weights/mobilefacenet.pt); in this project a copy lives "
    "at ../shared/assets/models/foamliu_mobilefacenet_128d.pt. Pass that path."
)


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Bias-free convolution, batch norm, ReLU6 (padding keeps the size at stride 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class _DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))


class _GlobalDepthwise(nn.Module):
    """7x7 depthwise convolution without padding (7x7 map -> 1x1) + BN, no activation."""

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.depthwise(x))


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (ReLU6), linear 1x1 project, skip if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_skip = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            _conv_bn_relu6(in_channels, hidden, 1),
            _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_skip else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone (foamliu layout), 128-d embeddings.

    Input is an already-normalised face batch ``(B, 3, 112, 112)`` (ImageNet
    mean/std, RGB, for the foamliu weights); output is ``(B, 128)``, not
    L2-normalised. Use :func:`load_foamliu_mobilefacenet` to get a model that takes
    ``[0, 1]`` images.

    Parameters
    ----------
    embedding_size : int
        Output dimension ``D``.
    """

    def __init__(self, embedding_size: int = 128) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu6(3, 64, 3, stride=2)
        self.dw_conv = _DepthwiseSeparable(64)
        blocks: list[nn.Module] = []
        channels = 64
        for expansion, out_channels, repeats, stride in _STAGES:
            for index in range(repeats):
                blocks.append(_InvertedResidual(channels, out_channels, stride if index == 0 else 1, expansion))
                channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.conv2 = _conv_bn_relu6(channels, 512, 1)
        self.gdconv = _GlobalDepthwise(512)
        self.conv3 = nn.Conv2d(512, embedding_size, 1)
        self.bn = nn.BatchNorm2d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised faces.

        Parameters
        ----------
        x : torch.Tensor
            Shape ``(B, 3, 112, 112)``, normalised as the weights expect.

        Returns
        -------
        torch.Tensor
            Shape ``(B, embedding_size)``.
        """
        x = self.features(self.dw_conv(self.conv1(x)))
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return x.flatten(1)


def load_foamliu_mobilefacenet(path: str | Path) -> FaceEmbedder:
    """Load the foamliu MobileFaceNet weights as a frozen, eval-mode face model.

    Parameters
    ----------
    path : str or pathlib.Path
        The state_dict file ``foamliu_mobilefacenet_128d.pt`` (``weights/mobilefacenet.pt``
        of GitHub ``foamliu/MobileFaceNet``).

    Returns
    -------
    FaceEmbedder
        Takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` (resized to 112x112, ImageNet
        mean/std inside) and returns raw ``(B, 128)`` embeddings.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file's parameter names or shapes do not fit this architecture.
    """
    backbone = load_weights(MobileFaceNet(), path, where_to_get=_WHERE_TO_GET)
    model = FaceEmbedder(
        backbone, input_size=(112, 112), mean=_IMAGENET_MEAN, std=_IMAGENET_STD, channel_order="RGB"
    )
    return freeze(channels_last(model))
