"""krtfuap: universal adversarial perturbations against face recognition (KRT-FUAP).

The main entry point is :class:`UAPAttack` (with :class:`KeyRegions`, the
options of the paper's key-region mechanism); its parts are usable alone:
:class:`KeyRegionMasker` (key-region mask ``M0``), :class:`FlowWarp` (learnable
flow field), :class:`MaskedPerturbation` (``v``), :class:`DirectionLoss` and
:class:`VGGStealthLoss` / :class:`SSIMStealthLoss` (the two loss terms).
Images are always ``(B, 3, H, W)`` RGB floats in ``[0, 1]``.

``import krtfuap`` itself loads nothing heavy: each name below is imported from
its module (and torch with it) the first time it is used, so the ``krtfuap``
command answers ``--help`` without loading torch. The applications built on
the algorithm (command line, demo, benchmark) live in :mod:`krtfuap.apps` and
are never imported from here.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Where each name of __all__ is defined: imported from there on first use.
_EXPORTS = {
    "UAPAttack": "krtfuap.attack",
    "KeyRegions": "krtfuap.key_regions",
    "KeyRegionMasker": "krtfuap.masks",
    "key_region_mask": "krtfuap.masks",
    "TemplateLandmarks": "krtfuap.landmarks",
    "DlibLandmarks": "krtfuap.landmarks",
    "FaceAlignmentLandmarks": "krtfuap.landmarks",
    "NoFaceFoundError": "krtfuap.landmarks",
    "FlowWarp": "krtfuap.flow",
    "warp_with_flow": "krtfuap.flow",
    "MaskedPerturbation": "krtfuap.perturbation",
    "rescale_mask": "krtfuap.perturbation",
    "DirectionLoss": "krtfuap.losses",
    "direction_loss": "krtfuap.losses",
    "cosine_loss": "krtfuap.losses",
    "euclidean_loss": "krtfuap.losses",
    "FeatureStealthLoss": "krtfuap.stealth",
    "VGGStealthLoss": "krtfuap.stealth",
    "SqueezeNetStealthLoss": "krtfuap.stealth",
    "SSIMStealthLoss": "krtfuap.stealth",
}

__all__ = [
    "UAPAttack",
    "KeyRegions",
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

if TYPE_CHECKING:  # what static tools (and readers) see; at run time __getattr__ imports on first use
    from krtfuap.attack import UAPAttack
    from krtfuap.key_regions import KeyRegions
    from krtfuap.flow import FlowWarp, warp_with_flow
    from krtfuap.landmarks import DlibLandmarks, FaceAlignmentLandmarks, NoFaceFoundError, TemplateLandmarks
    from krtfuap.losses import DirectionLoss, cosine_loss, direction_loss, euclidean_loss
    from krtfuap.masks import KeyRegionMasker, key_region_mask
    from krtfuap.perturbation import MaskedPerturbation, rescale_mask
    from krtfuap.stealth import FeatureStealthLoss, SqueezeNetStealthLoss, SSIMStealthLoss, VGGStealthLoss


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, e.g. ``krtfuap.metrics``) the first time it is used."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
