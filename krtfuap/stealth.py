"""Stealth losses: how visible the perturbation is (paper Section 3.5.2).

Every stealth loss is a callable ``(adversarial, clean) -> scalar tensor`` on
RGB images ``(B, 3, H, W)`` in ``[0, 1]``; smaller means less visible.

* :class:`VGGStealthLoss` -- the paper's loss: L2 distance between shallow VGG16
  feature maps (needs ImageNet VGG16 weights).
* :class:`SqueezeNetStealthLoss` -- the same idea on SqueezeNet 1.0 features,
  for offline use with a SqueezeNet weights file.
* :class:`SSIMStealthLoss` -- ``1 - SSIM``; needs no weights.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import torch
from torch import nn
from torchvision.models import squeezenet1_0, vgg16

from krtfuap._validation import load_torch_file
from krtfuap.imagenet import imagenet_normalize, load_imagenet_state_dict
from krtfuap.metrics import ssim

__all__ = [
    "FeatureStealthLoss",
    "VGGStealthLoss",
    "SqueezeNetStealthLoss",
    "SSIMStealthLoss",
    "FALLBACK_STEALTH_WEIGHT",
    "StealthLossLike",
    "resolve_stealth_loss",
]

#: A stealth loss given by name (``"vgg"``, ``"ssim"``) or as a callable ``(adversarial, clean) -> scalar``.
StealthLossLike = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

#: Layer name -> index (after that module) in ``torchvision.models.vgg16().features``.
VGG16_LAYERS = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8,
    "relu3_1": 11, "relu3_2": 13, "relu3_3": 15, "relu4_1": 18, "relu4_2": 20, "relu4_3": 22,
}
#: Layer name -> index in ``torchvision.models.squeezenet1_0().features``.
SQUEEZENET_LAYERS = {"relu1": 1, "fire2": 3, "fire3": 4, "fire4": 5, "fire5": 7}


class FeatureStealthLoss(nn.Module):
    """Distance between feature maps of clean and perturbed images.

    Per image: the sum over the chosen layers of ``|| phi_j(x) - phi_j(x + v) ||_2``
    (paper Eq. 10, un-squared L2 norm over all feature values); the batch mean
    is returned. Inputs are ImageNet-normalised inside.

    Parameters
    ----------
    features : torch.nn.Sequential
        The backbone's feature layers (frozen and put in eval mode here).
    layer_indices : sequence of int
        Indices in ``features`` whose outputs are compared; the network is
        truncated after the deepest one.
    """

    def __init__(self, features: nn.Sequential, layer_indices: Sequence[int]) -> None:
        super().__init__()
        if not layer_indices:
            raise ValueError("layer_indices must name at least one layer.")
        self.layer_indices = sorted(set(int(i) for i in layer_indices))
        self.features = features[: self.layer_indices[-1] + 1].eval()
        for parameter in self.features.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "FeatureStealthLoss":
        """Keep the frozen feature extractor in eval mode."""
        super().train(mode)
        self.features.eval()
        return self

    def _feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps, h = [], imagenet_normalize(images)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in self.layer_indices:
                maps.append(h)
        return maps

    def forward(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the feature distance; ``adversarial``, ``clean``: ``(B, 3, H, W)``."""
        with torch.no_grad():
            clean_maps = self._feature_maps(clean)
        adversarial_maps = self._feature_maps(adversarial)
        per_image = sum(
            (a - c).flatten(1).norm(dim=1) for a, c in zip(adversarial_maps, clean_maps)
        )
        return per_image.mean()


def _layer_indices(layers: Sequence[str], table: dict[str, int], network: str) -> list[int]:
    unknown = [name for name in layers if name not in table]
    if unknown:
        raise ValueError(f"Unknown {network} layer(s) {unknown}; choose from {list(table)}.")
    return [table[name] for name in layers]


def _load_backbone(network: nn.Module, state: object, expected: str, path: object) -> None:
    """``network.load_state_dict(state)`` with an error that names the file and the expected weights."""
    try:
        network.load_state_dict(state)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"The weights {path if path is not None else '(torch hub cache)'} do not fit {expected}: "
            f"{first_line}. Pass the ImageNet state_dict of exactly that network."
        ) from error


class VGGStealthLoss(FeatureStealthLoss):
    """The paper's stealth loss on shallow ImageNet VGG16 features (default lambda 0.05).

    Parameters
    ----------
    layers : sequence of str
        VGG16 layers compared (default ``("relu2_2",)``: the output of the
        second block, a shallow layer of edges and textures at half resolution).
    weights : path-like, optional
        torchvision VGG16 ``state_dict``; default: ``vgg16-397923af.pth`` in the
        torch hub cache (see :func:`krtfuap.imagenet.load_imagenet_state_dict`).
    download : bool
        Let torchvision download the weights when they are missing (needs network).
    """

    default_weight = 0.05

    def __init__(
        self,
        layers: Sequence[str] = ("relu2_2",),
        *,
        weights: str | os.PathLike | None = None,
        download: bool = True,
    ) -> None:
        indices = _layer_indices(layers, VGG16_LAYERS, "VGG16")
        state = load_imagenet_state_dict("vgg16", weights, download=download)  # fail fast when missing
        network = vgg16()
        _load_backbone(network, state, "torchvision vgg16 (vgg16-397923af.pth)", weights)
        super().__init__(network.features, indices)
        self.layers = tuple(layers)


class SqueezeNetStealthLoss(FeatureStealthLoss):
    """Stealth loss on shallow SqueezeNet 1.0 features (an offline stand-in for VGG).

    Parameters
    ----------
    weights : path-like
        A torchvision-layout ``squeezenet1_0`` ImageNet ``state_dict``.
    layers : sequence of str
        Layers compared, from ``relu1, fire2, fire3, fire4, fire5``
        (default ``("relu1", "fire3")``).

    Its feature distances are large: lambda = 1e-5 (the default) already
    trades fooling rate for stealth, and lambda >= 1e-4 erased the attack in
    ``benchmarks/attack_quality.py`` (see README, "Stealth").
    """

    default_weight = 1e-5

    def __init__(self, weights: str | os.PathLike, layers: Sequence[str] = ("relu1", "fire3")) -> None:
        indices = _layer_indices(layers, SQUEEZENET_LAYERS, "SqueezeNet")
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"SqueezeNet 1.0 weights file {weights} does not exist; pass the path of a "
                "torchvision squeezenet1_0 state_dict."
            )
        fix = "Pass the path of a torchvision squeezenet1_0 ImageNet state_dict."
        state = load_torch_file(weights, what="SqueezeNet 1.0 weights", fix=fix)
        network = squeezenet1_0()
        _load_backbone(network, state, "torchvision squeezenet1_0", weights)
        super().__init__(network.features, indices)
        self.layers = tuple(layers)


class SSIMStealthLoss(nn.Module):
    """``1 - SSIM`` between perturbed and clean images, batch mean; needs no weights.

    The SSIM is :func:`krtfuap.metrics.ssim` (the standard definition: Gaussian
    window, sigma 1.5, valid region only), the same one every reported score
    uses, so the loss optimises exactly what is measured.

    Parameters
    ----------
    window_size : int
        Gaussian window of the SSIM (odd).

    The default weight (``default_weight``) is documented in the README
    ("Stealth losses and their cost").
    """

    default_weight = 3.0

    def __init__(self, window_size: int = 11) -> None:
        super().__init__()
        self.window_size = int(window_size)

    def forward(self, adversarial: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """``1 - mean SSIM``; ``adversarial``, ``clean``: ``(B, 3, H, W)`` in ``[0, 1]``."""
        return 1.0 - ssim(adversarial, clean, self.window_size).mean()


#: The lambda used for a callable that has no ``default_weight`` attribute.
FALLBACK_STEALTH_WEIGHT = 0.05


def resolve_stealth_loss(
    spec: StealthLossLike | None, weight: float | None
) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, float]:
    """Turn a ``stealth_loss`` argument into a loss callable and its weight.

    Parameters
    ----------
    spec : {"vgg", "ssim"}, callable or None
        A named loss, any callable ``(adversarial, clean) -> scalar``, or
        ``None`` for no stealth loss.
    weight : float or None
        The lambda; ``None`` picks the loss's ``default_weight`` attribute
        (0.05 for VGG as in the paper; measured values for the others), or
        :data:`FALLBACK_STEALTH_WEIGHT` for a callable without one.

    Returns
    -------
    (callable or None, float)
    """
    if spec is None:
        return None, 0.0
    if weight is not None and weight < 0:
        raise ValueError(f"stealth_weight must be >= 0, got {weight}.")
    if isinstance(spec, str):
        named = {"vgg": VGGStealthLoss, "ssim": SSIMStealthLoss}
        if spec not in named:
            raise ValueError(
                "stealth_loss must be 'vgg', 'ssim', a callable (adversarial, clean) -> scalar, or None; "
                f"got {spec!r}."
            )
        spec = named[spec]()
    elif not callable(spec):
        raise TypeError(f"stealth_loss must be a string, a callable or None, got {type(spec).__name__}.")
    if weight is None:
        weight = getattr(spec, "default_weight", FALLBACK_STEALTH_WEIGHT)
    return spec, float(weight)
