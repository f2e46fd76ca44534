"""IResNet face backbones in the layout of InsightFace ``arcface_torch``.

Improved ResNets (pre-activation-style basic blocks with PReLU, a BN-FC-BN head)
as trained by InsightFace's ``recognition/arcface_torch``. Parameter names match
the public ArcFace checkpoints (``backbone.pth`` files, e.g. ``ms1mv3_arcface_r50``)
so they load with ``strict=True``. Input: 112x112 RGB normalised as
``(x - 0.5) / 0.5``; output: 512-d embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from krtfuap.models._loading import freeze, load_weights
from krtfuap.models.adapter import FaceEmbedder

__all__ = ["IResNet", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "load_iresnet"]

_BN_EPS = 1e-5
_FINAL_MAP = 7  # 112 / 2**4: the spatial size after the four stride-2 stages
_WHERE_TO_GET = (
    "IResNet weights are the InsightFace arcface_torch backbones (backbone.pth of e.g. ms1mv3_arcface_r50, "
    "see github.com/deepinsight/insightface/tree/master/recognition/arcface_torch); download one yourself "
    "and pass its path, with the matching depth."
)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _IBasicBlock(nn.Module):
    """BN, conv3x3, BN, PReLU, conv3x3 (strided), BN, plus a (projected) skip."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        out = self.bn3(out)
        skip = x if self.downsample is None else self.downsample(x)
        return out + skip


class IResNet(nn.Module):
    """IResNet backbone: ``(B, 3, 112, 112)`` normalised faces -> ``(B, embedding_size)``.

    Use :func:`load_iresnet` for a model that takes ``[0, 1]`` RGB images.

    Parameters
    ----------
    blocks_per_stage : sequence of 4 ints
        Number of basic blocks in ``layer1`` .. ``layer4`` (widths 64, 128, 256, 512).
    embedding_size : int
        Output dimension ``D``.
    dropout : float
        Dropout probability before the FC layer (only active in train mode).
    """

    def __init__(self, blocks_per_stage: Sequence[int], *, embedding_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if len(blocks_per_stage) != 4 or min(blocks_per_stage) < 1:
            raise ValueError(f"blocks_per_stage needs 4 positive counts, got {tuple(blocks_per_stage)!r}.")
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=_BN_EPS)
        self.prelu = nn.PReLU(64)
        in_channels = 64
        stages = []
        for channels, count in zip((64, 128, 256, 512), blocks_per_stage):
            blocks = [_IBasicBlock(in_channels, channels, stride=2)]
            blocks += [_IBasicBlock(channels, channels, stride=1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * _FINAL_MAP * _FINAL_MAP, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised faces.

        Parameters
        ----------
        x : torch.Tensor
            Shape ``(B, 3, 112, 112)``, RGB, ``(x - 0.5) / 0.5`` normalised.

        Returns
        -------
        torch.Tensor
            Shape ``(B, embedding_size)``, not L2-normalised.
        """
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def iresnet18(*, embedding_size: int = 512) -> IResNet:
    """IResNet-18 (blocks per stage 2, 2, 2, 2)."""
    return IResNet((2, 2, 2, 2), embedding_size=embedding_size)


def iresnet34(*, embedding_size: int = 512) -> IResNet:
    """IResNet-34 (blocks per stage 3, 4, 6, 3)."""
    return IResNet((3, 4, 6, 3), embedding_size=embedding_size)


def iresnet50(*, embedding_size: int = 512) -> IResNet:
    """IResNet-50 (blocks per stage 3, 4, 14, 3)."""
    return IResNet((3, 4, 14, 3), embedding_size=embedding_size)


def iresnet100(*, embedding_size: int = 512) -> IResNet:
    """IResNet-100 (blocks per stage 3, 13, 30, 3)."""
    return IResNet((3, 13, 30, 3), embedding_size=embedding_size)


_CONSTRUCTORS: dict[int, Callable[..., IResNet]] = {18: iresnet18, 34: iresnet34, 50: iresnet50, 100: iresnet100}


def load_iresnet(path: str | Path, depth: int = 50) -> FaceEmbedder:
    """Load an InsightFace ArcFace IResNet checkpoint as a frozen, eval-mode face model.

    Parameters
    ----------
    path : str or pathlib.Path
        A plain state_dict (``backbone.pth`` of arcface_torch).
    depth : {18, 34, 50, 100}
        Depth the checkpoint was trained with.

    Returns
    -------
    FaceEmbedder
        Takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` (resized to 112x112,
        ``(x - 0.5) / 0.5`` inside) and returns raw ``(B, 512)`` embeddings.

    Raises
    ------
    ValueError
        If ``depth`` is not supported, or the file's parameter names or shapes
        do not fit that depth.
    FileNotFoundError
        If ``path`` does not exist.
    """
    if depth not in _CONSTRUCTORS:
        raise ValueError(f"depth must be one of {sorted(_CONSTRUCTORS)}, got {depth!r}.")
    backbone = load_weights(_CONSTRUCTORS[depth](), path, where_to_get=_WHERE_TO_GET)
    model = FaceEmbedder(backbone, input_size=(112, 112), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return freeze(model)
