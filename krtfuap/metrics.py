"""Attack and image-quality metrics.

* the fooling criterion, decided in one place (:func:`fooled_by_similarity`,
  :func:`is_fooled`): a face is fooled when ``cos(F(x + v), F(x)) < t``, the
  verification threshold (paper Eq. 1); with one threshold per ensemble member, when every
  member's similarity is below its own; the fooling rate is the share fooled;
* threshold calibration on genuine / impostor pairs (best accuracy, TAR at FAR);
* SSIM (standard definition, valid region; kornia) and PSNR; HaarPSI, a weight-free perceptual
  similarity (piq); LPIPS with the optional ``lpips`` package (``pip install "krtfuap[lpips]"``).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from kornia.metrics import psnr as kornia_psnr
from kornia.metrics import ssim as kornia_ssim
from piq import haarpsi as piq_haarpsi
from sklearn.metrics import roc_curve
from torch import nn

from krtfuap._ops import call_model
from krtfuap._validation import check_embeddings, check_images
from krtfuap.imagenet import load_imagenet_state_dict

__all__ = [
    "cosine_similarity",
    "member_count",
    "fooled_by_similarity",
    "is_fooled",
    "fooling_rate",
    "embed",
    "pair_similarities",
    "calibrate_threshold",
    "tar_at_far",
    "ssim",
    "psnr",
    "haarpsi",
    "HAARPSI_MIN_SIZE",
    "LPIPSMetric",
]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of ``(B, D)`` embeddings, shape ``(B,)`` in ``[-1, 1]``."""
    return F.cosine_similarity(a, b, dim=1)


def member_count(threshold: float | Sequence[float]) -> int | None:
    """How many ensemble members ``threshold`` judges apart: ``M`` for a list or tuple of ``M``
    thresholds (one per member), ``None`` for one number (one threshold for the whole model)."""
    return len(threshold) if isinstance(threshold, (list, tuple)) else None


def fooled_by_similarity(similarity: torch.Tensor | float, threshold: float | Sequence[float]) -> torch.Tensor:
    """The fooling criterion: which faces no longer match their clean selves (paper Eq. 1).

    Every part of the library that decides "fooled" calls this function (or
    :func:`is_fooled`, which computes the similarity first), so the fit loop,
    scoring, the baselines and the photo cloak share one definition.

    Parameters
    ----------
    similarity : torch.Tensor or float
        ``cos(F(x + v), F(x))`` per face, any shape (usually ``(B,)``), in ``[-1, 1]``. With
        ``M`` thresholds, ``(..., M)``: the last axis holds each ensemble member's similarity.
    threshold : float or sequence of float
        Verification threshold ``t`` on cosine similarity: same person when ``>= t``. A list
        or tuple gives each of ``M`` ensemble members its own: a face is fooled only when
        every member's similarity is below that member's threshold.

    Returns
    -------
    torch.Tensor
        Bool, the shape of ``similarity`` (without its member axis for ``M`` thresholds), on
        its device: True where ``similarity < t`` (strictly; a similarity equal to ``t``
        still matches, and NaN is never fooled). The comparison is made in float64, so a
        float32, float16 or bfloat16 similarity is judged against the threshold exactly as
        given, not against a rounded copy.

    Raises
    ------
    ValueError
        If a threshold is NaN (it would fool no face), or ``M`` thresholds meet a
        similarity whose last axis is not of length ``M``.
    """
    members = member_count(threshold)
    thresholds = [float(value) for value in (threshold if members is not None else [threshold])]
    if any(math.isnan(value) for value in thresholds):
        raise ValueError("threshold is NaN; give the verification threshold as a number, e.g. threshold=0.3.")
    similarity = torch.as_tensor(similarity, dtype=torch.float64)
    if members is None:
        return similarity < thresholds[0]
    if similarity.ndim == 0 or similarity.shape[-1] != members:
        raise ValueError(
            f"{members} thresholds, one per ensemble member, need similarities of shape (..., {members}), one "
            f"column per member; got shape {tuple(similarity.shape)}."
        )
    return (similarity < torch.tensor(thresholds, dtype=torch.float64, device=similarity.device)).all(dim=-1)


def is_fooled(adversarial: torch.Tensor, clean: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which faces a perturbation fools, from their embeddings: ``cos(F(x + v), F(x)) < t``.

    Parameters
    ----------
    adversarial, clean : torch.Tensor
        Embeddings ``F(x + v)`` and ``F(x)``, both ``(B, D)``; the similarity is computed
        in float32 (float64 embeddings stay float64).
    threshold : float
        Verification threshold ``t`` on cosine similarity.

    Returns
    -------
    torch.Tensor
        ``(B,)`` bool on the embeddings' device, as :func:`fooled_by_similarity`.

    Raises
    ------
    ValueError
        If the two embeddings are not of one ``(B, D)`` shape.
    """
    if adversarial.ndim != 2 or adversarial.shape != clean.shape:
        raise ValueError(
            f"adversarial {tuple(adversarial.shape)} and clean {tuple(clean.shape)} embeddings must both be "
            "(B, D), one row per face in the same order."
        )
    similarity = cosine_similarity(_at_least_float32(adversarial), _at_least_float32(clean))
    return fooled_by_similarity(similarity, threshold)


def _at_least_float32(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings if embeddings.dtype == torch.float64 else embeddings.float()


def fooling_rate(adversarial: torch.Tensor, clean: torch.Tensor, threshold: float) -> float:
    """Share of faces whose perturbed embedding no longer matches the clean one.

    Parameters
    ----------
    adversarial, clean : torch.Tensor
        Embeddings ``F(x + v)`` and ``F(x)``, shape ``(B, D)``.
    threshold : float
        Verification threshold ``t`` on cosine similarity.

    Returns
    -------
    float
        In ``[0, 1]``: the share :func:`is_fooled` marks, ``cos(F(x + v), F(x)) < t``.
    """
    return is_fooled(adversarial, clean, threshold).float().mean().item()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Embeddings of ``images`` ``(N, 3, H, W)`` in ``[0, 1]``, shape ``(N, D)``, computed in batches.

    The images are moved to the device of the model's parameters (CPU for a
    model without parameters) and cast to its floating dtype
    (:func:`krtfuap._ops.call_model`); the result stays there, in the dtype
    the model returns.
    """
    check_images(images)
    device = next((p.device for p in model.parameters()), images.device)
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(device)
        outputs.append(check_embeddings(call_model(model, chunk), len(chunk)))
    return torch.cat(outputs)


@torch.no_grad()
def pair_similarities(
    model: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of verification pairs.

    Parameters
    ----------
    model : torch.nn.Module
        Face model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``.
    pairs : iterable of (images_a, images_b, same)
        Batches of ``(B, 3, H, W)`` image pairs and ``(B,)`` booleans (1 = same
        person), e.g. a ``DataLoader`` over :class:`krtfuap.datasets.PairDataset`.

    Returns
    -------
    (similarities, same) : (torch.Tensor, torch.Tensor)
        Shapes ``(N,)`` float32 on the CPU (computed in float32 also for a
        bfloat16 / float16 model) and ``(N,)`` bool.
    """
    similarities, labels = [], []
    for images_a, images_b, same in pairs:
        similarities.append(cosine_similarity(embed(model, images_a).float(), embed(model, images_b).float()).cpu())
        labels.append(torch.as_tensor(same).bool().cpu())
    if not similarities:
        raise ValueError("pairs is empty: give at least one genuine and one impostor pair.")
    return torch.cat(similarities), torch.cat(labels)


def _check_pairs(similarities: torch.Tensor, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    similarities = torch.as_tensor(similarities, dtype=torch.float64).flatten()
    same = torch.as_tensor(same).bool().flatten()
    if similarities.shape != same.shape:
        raise ValueError(f"similarities {tuple(similarities.shape)} and same {tuple(same.shape)} differ in length.")
    if same.all() or not same.any():
        raise ValueError("Calibration needs both genuine (same=1) and impostor (same=0) pairs.")
    if not torch.isfinite(similarities).all():
        raise ValueError("similarities must be finite; drop the pairs whose similarity is NaN or infinite.")
    return similarities, same


def _score_dtype(similarities: object) -> torch.dtype:
    """The dtype the caller's scores are compared in: thresholds must split them in that dtype too."""
    is_float = isinstance(similarities, torch.Tensor) and similarities.is_floating_point()
    return similarities.dtype if is_float else torch.float64


def _roc(similarities: torch.Tensor, same: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC of "same person iff similarity >= t" (:func:`sklearn.metrics.roc_curve`), as pair counts.

    Returns ``thresholds`` (``inf``, then every distinct similarity, highest
    first) and, at each, how many genuine and impostor pairs are accepted.
    """
    fpr, tpr, thresholds = roc_curve(same.cpu().numpy(), similarities.cpu().numpy(), drop_intermediate=False)
    n_genuine = int(same.sum())
    return thresholds, np.rint(tpr * n_genuine), np.rint(fpr * (len(same) - n_genuine))


def _just_above(value: float, dtype: torch.dtype) -> float:
    """The next number above ``value`` in ``dtype``: a threshold that rejects ``value`` there too."""
    value = torch.tensor(value, dtype=torch.float64).to(dtype)
    return float(torch.nextafter(value, torch.full_like(value, float("inf"))))


def calibrate_threshold(similarities: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """The verification threshold with the best accuracy on labelled pairs.

    A pair is judged "same person" when its similarity is ``>= t``. Every
    point of the ROC (:func:`sklearn.metrics.roc_curve`) is tried; the
    threshold returned lies midway between the two similarities it separates
    (below them all, or just above them all, at the ends). On a tie in
    accuracy the lowest threshold wins.

    Parameters
    ----------
    similarities : torch.Tensor
        Shape ``(N,)``, cosine similarities of pairs.
    same : torch.Tensor
        Shape ``(N,)``, True for genuine pairs.

    Returns
    -------
    (threshold, accuracy) : (float, float)
    """
    dtype = _score_dtype(similarities)  # thresholds must split in this dtype too
    similarities, same = _check_pairs(similarities, same)
    thresholds, genuine_accepted, impostors_accepted = _roc(similarities, same)
    accuracy = (genuine_accepted + (len(same) - same.sum().item()) - impostors_accepted) / len(same)
    best = len(accuracy) - 1 - int(np.argmax(accuracy[::-1]))  # the last ROC point is the lowest threshold
    if best == 0:  # reject every pair
        return _just_above(thresholds[1], dtype), float(accuracy[best])
    if best == len(thresholds) - 1:  # accept every pair
        return float(thresholds[best]) - 1e-6, float(accuracy[best])
    low = torch.tensor(thresholds[best + 1], dtype=torch.float64)  # the similarity just below the chosen one
    high = torch.tensor(thresholds[best], dtype=torch.float64)
    # A midpoint can round onto ``low`` (adjacent floats, or float32 scores compared with the
    # returned float); ``high`` itself then splits exactly.
    midpoint = ((low + high) / 2).to(dtype)
    threshold = midpoint if midpoint > low.to(dtype) else high.to(dtype)
    return float(threshold), float(accuracy[best])


def tar_at_far(similarities: torch.Tensor, same: torch.Tensor, far: float = 1e-3) -> tuple[float, float]:
    """True accept rate at a given false accept rate.

    Read off the ROC (:func:`sklearn.metrics.roc_curve`): the point with the
    most genuine pairs accepted among those accepting at most ``far`` of the
    impostor pairs.

    Parameters
    ----------
    similarities, same : torch.Tensor
        As in :func:`calibrate_threshold`.
    far : float
        Target false accept rate in ``(0, 1)``.

    Returns
    -------
    (tar, threshold) : (float, float)
        The threshold is the smallest one whose FAR on the impostor pairs is
        at most ``far``: the next float above the highest impostor similarity
        it rejects, in the similarities' own dtype (so comparing float32
        scores with it gives the same decisions as here).
    """
    dtype = _score_dtype(similarities)
    similarities, same = _check_pairs(similarities, same)
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}.")
    thresholds, genuine_accepted, impostors_accepted = _roc(similarities, same)
    allowed = int(far * int((~same).sum()))  # impostors allowed at or above the threshold (< their count)
    point = int(np.searchsorted(impostors_accepted, allowed, side="right")) - 1  # the lowest threshold allowed
    # The next ROC point accepts one impostor too many: its similarity is the highest impostor rejected.
    threshold = _just_above(thresholds[point + 1], dtype)
    return float(genuine_accepted[point] / int(same.sum())), threshold


def ssim(images: torch.Tensor, reference: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Per-image SSIM of ``(B, C, H, W)`` images in ``[0, 1]``, shape ``(B,)``; differentiable.

    The standard definition (Wang et al. 2004): a Gaussian window of
    ``window_size`` (11 by default) with sigma 1.5, constants ``K1 = 0.01``,
    ``K2 = 0.03`` for data range 1, the SSIM map taken over the **valid**
    region only (positions whose window would leave the image are dropped;
    kornia's default ``padding="same"`` instead pads the border by reflection
    and counts those windows), then the mean over channels and positions. With
    the defaults it equals ``skimage.metrics.structural_similarity(a, b,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1.0, channel_axis=0)`` per image.

    Images smaller than the window on a side (tiny test images) are scored
    with the largest odd window that fits, as ``win_size`` must be set for
    them in scikit-image.
    """
    window_size = int(window_size)
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}.")
    smallest = min(images.shape[-2:])
    if smallest < window_size:
        window_size = max(1, smallest - (1 - smallest % 2))
    return kornia_ssim(images, reference, window_size, padding="valid").flatten(1).mean(dim=1)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``(B, 3, H, W)`` images in ``[0, 1]``, shape ``(B,)``."""
    return torch.stack([kornia_psnr(a, b, 1.0) for a, b in zip(images, reference)])


#: Smallest side, in pixels, that :func:`haarpsi` can score.
HAARPSI_MIN_SIZE = 16


def haarpsi(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image HaarPSI of ``(B, 3, H, W)`` RGB images in ``[0, 1]``, ``H, W >= 16``, shape ``(B,)`` in
    ``[0, 1]`` (1: identical); differentiable.

    The Haar wavelet-based perceptual similarity index (Reisenhofer et al. 2018), computed by
    ``piq.haarpsi`` with its published constants (3 scales, ``C = 30``, ``alpha = 4.2``, images
    halved first): local frequency similarity of the luminance, weighted by where either image
    has structure, plus the two chrominance channels (YIQ), so a change of colour counts apart
    from a change of brightness. Needs no learned weights; its authors report closer agreement
    with human quality scores than SSIM on LIVE, TID2008, TID2013 and CSIQ. Shown beside SSIM
    as the stealth people would judge.
    """
    check_images(images)
    check_images(reference, name="reference")
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} must have the same shape."
        )
    if min(images.shape[-2:]) < HAARPSI_MIN_SIZE:
        raise ValueError(
            f"HaarPSI needs images of at least {HAARPSI_MIN_SIZE} pixels a side (its coarsest Haar filter), got "
            f"{tuple(images.shape[-2:])}; score a larger crop."
        )
    return piq_haarpsi(images, reference, reduction="none", data_range=1.0)


class LPIPSMetric(nn.Module):
    """LPIPS perceptual distance (Zhang et al. 2018) via the ``lpips`` package.

    The linear heads ship with ``lpips``; the ImageNet backbone is loaded with
    :func:`krtfuap.imagenet.load_imagenet_state_dict` (path, torch hub cache,
    or download), so a missing backbone gives a clear error instead of a
    network failure deep inside torchvision. ``lpips`` is optional (``pip
    install "krtfuap[lpips]"``); without it the constructor raises an
    ``ImportError`` that says so.

    Parameters
    ----------
    net : {"alex", "vgg"}
        Backbone (LPIPS's default is ``"alex"``).
    weights : path-like, optional
        The torchvision backbone weights file.
    download : bool
        Allow torchvision to download the backbone when missing.
    """

    _BACKBONES = {"alex": "alexnet", "vgg": "vgg16"}

    def __init__(self, net: str = "alex", *, weights: str | os.PathLike | None = None, download: bool = True) -> None:
        super().__init__()
        import warnings

        if net not in self._BACKBONES:
            raise ValueError(f"net must be one of {sorted(self._BACKBONES)}, got {net!r}.")
        try:
            import lpips
        except ImportError as error:
            raise ImportError(
                'LPIPSMetric needs the optional package lpips, which is not installed; install it with: '
                'pip install "krtfuap[lpips]"'
            ) from error
        state = load_imagenet_state_dict(self._BACKBONES[net], weights, download=download)
        with warnings.catch_warnings():  # lpips still calls torchvision with the deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        for slice_module in self.model.net.children():  # slices keep torchvision's layer indices as names
            own = {k: features[k] for k in slice_module.state_dict()}
            slice_module.load_state_dict(own)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS of ``(B, 3, H, W)`` images in ``[0, 1]``, shape ``(B,)``; lower is more similar."""
        return self.model(images, reference, normalize=True).flatten()
