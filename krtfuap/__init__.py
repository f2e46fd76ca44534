"""krtfuap: universal adversarial perturbations against face recognition (KRT-FUAP).

The main entry point is :class:`UAPAttack`; its parts are usable alone:
:class:`KeyRegionMasker` (key-region mask ``M0``), :class:`FlowWarp` (learnable
flow field), :class:`MaskedPerturbation` (``v``), :class:`DirectionLoss` and
:class:`VGGStealthLoss` / :class:`SSIMStealthLoss` (the two loss terms).
Images are always ``(B, 3, H, W)`` RGB floats in ``[0, 1]``.
"""

from krtfuap.attack import UAPAttack
from krtfuap.flow import FlowWarp, warp_with_flow
from krtfuap.landmarks import DlibLandmarks, FaceAlignmentLandmarks, NoFaceFoundError, TemplateLandmarks
from krtfuap.losses import DirectionLoss, cosine_loss, direction_loss, euclidean_loss
from krtfuap.masks import KeyRegionMasker, key_region_mask
from krtfuap.perturbation import MaskedPerturbation, rescale_mask
from krtfuap.stealth import FeatureStealthLoss, SqueezeNetStealthLoss, SSIMStealthLoss, VGGStealthLoss

__version__ = "0.1.0"

__all__ = [
    "UAPAttack",
    "KeyRegionMasker",
    "key_region_mask",
    "TemplateLandmarks",
    "DlibLandmarks",
    "FaceAlignmentLandmarks",
    "NoFaceFoundError",
    "FlowWarp",
    "warp_with_flow",
    "MaskedPerturbation",
    "rescale_mask",
    "DirectionLoss",
    "direction_loss",
    "cosine_loss",
    "euclidean_loss",
    "FeatureStealthLoss",
    "VGGStealthLoss",
    "SqueezeNetStealthLoss",
    "SSIMStealthLoss",
]
