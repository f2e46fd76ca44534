"""Scoring a perturbation: the one place that measures fooling rate, similarity, SSIM and PSNR.

Every caller (``evaluate`` of every estimator, the fit loop's stopping rule,
the demo, the benchmark and the scripts in ``benchmarks/``) goes through this
module, so all numbers share one definition:

* **similarity**: ``cos(F(clip(x + v, 0, 1)), F(x))`` per face;
* **fooling rate**: share of faces whose similarity is below the verification
  threshold ``t`` (paper Eq. 1), as :func:`krtfuap.metrics.fooled_by_similarity`
  decides it; with one threshold per ensemble member (the embeddings a
  :class:`krtfuap.models.ensemble.MemberwiseEmbedder`'s), every member's similarity
  below its own, and the mean similarity the mean over members;
* **SSIM**: the standard definition (Wang et al. 2004; Gaussian window 11,
  sigma 1.5, over the valid region only, as scikit-image computes it), the mean
  over the three channels, per face (:func:`krtfuap.metrics.ssim`);
* **PSNR** in dB on the ``[0, 1]`` scale, per face.

With ``per_face_ssim`` a universal perturbation is judged as
:func:`krtfuap.ssim_scaling.scale_to_ssim` applies it, scaled for each face to that SSIM.

:func:`score_adversarial` is the functional core (per-face tensors of adversarial
faces against their clean originals, however they were made); :func:`score_batch`
scores one universal perturbation with it; :class:`PerturbationScore` sums them
over batches (and over ranks when fitting distributed) in the style of a
torchmetrics metric; :func:`score_perturbation` runs both over a dataset.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from krtfuap._batches import ImageData, iter_image_batches
from krtfuap._ops import call_model
from krtfuap._validation import check_embeddings
from krtfuap.metrics import cosine_similarity, fooled_by_similarity, member_count, psnr, ssim
from krtfuap.models.ensemble import member_similarities
from krtfuap.ssim_scaling import scale_to_ssim

__all__ = ["score_adversarial", "score_batch", "PerturbationScore", "score_perturbation"]

#: A face model call: ``(B, 3, H, W)`` images in ``[0, 1]`` -> ``(B, D)`` embeddings.
Embed = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def score_adversarial(
    embed: Embed | nn.Module, images: torch.Tensor, adversarial: torch.Tensor, *,
    clean_embeddings: torch.Tensor | None = None, n_members: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-face scores of adversarial faces against their clean originals.

    Use it when each face has its own change (a photo pipeline, a per-face
    refinement); :func:`score_batch` covers one universal perturbation.

    Parameters
    ----------
    embed : callable or torch.nn.Module
        The face model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``; an
        ``nn.Module`` gets the batch cast to its floating dtype
        (:func:`krtfuap._ops.call_model`).
    images : torch.Tensor
        ``(B, 3, H, W)`` clean faces in ``[0, 1]``.
    adversarial : torch.Tensor
        ``(B, 3, H, W)`` the same faces changed, in ``[0, 1]``, on the images' device.
    clean_embeddings : torch.Tensor, optional
        ``(B, D)`` embeddings the similarity is measured against, when already
        known (saves a forward pass); default: those of ``images``.
    n_members : int, optional
        ``M`` when ``embed`` is a :class:`krtfuap.models.ensemble.MemberwiseEmbedder` of ``M``
        members whose similarities are judged apart; ``None``: one similarity per face.

    Returns
    -------
    dict of torch.Tensor
        ``similarity`` (``cos(F(adversarial), clean embedding)``; ``(B, M)``, each member's,
        with ``n_members``), ``ssim``, ``psnr`` (of ``adversarial`` against ``images``): each
        ``(B,)`` float32 on the images' device.
    """
    if adversarial.shape != images.shape:
        raise ValueError(
            f"adversarial {tuple(adversarial.shape)} and images {tuple(images.shape)} must have one shape: "
            "each adversarial face is scored against its own clean face."
        )
    if clean_embeddings is None:
        clean_embeddings = check_embeddings(call_model(embed, images), len(images))
    perturbed = check_embeddings(call_model(embed, adversarial), len(images))
    if n_members is None:
        similarity = cosine_similarity(perturbed.float(), clean_embeddings.float())
    else:
        similarity = member_similarities(perturbed.float(), clean_embeddings.float(), n_members)
    return {
        "similarity": similarity,
        "ssim": ssim(adversarial.float(), images.float()),
        "psnr": psnr(adversarial.float(), images.float()),
    }


@torch.no_grad()
def score_batch(
    embed: Embed | nn.Module,
    images: torch.Tensor,
    perturbation: torch.Tensor,
    *,
    clean_embeddings: torch.Tensor | None = None,
    n_members: int | None = None,
    per_face_ssim: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-face scores of one batch under one universal perturbation.

    :func:`score_adversarial` of the faces ``clip(images + perturbation, 0, 1)``;
    ``embed``, ``images``, ``clean_embeddings``, ``n_members`` and the result are as there.

    Parameters
    ----------
    perturbation : torch.Tensor
        ``(3, H, W)`` (or broadcastable), on the images' device.
    per_face_ssim : float, optional
        Score each face with the perturbation scaled to this SSIM instead
        (:func:`krtfuap.ssim_scaling.scale_to_ssim`, within the perturbation's own l_inf bound).
    """
    if per_face_ssim is None:
        adversarial = (images + perturbation.to(images.dtype)).clamp(0.0, 1.0)
    else:
        adversarial, _ = scale_to_ssim(images, perturbation, per_face_ssim)
    return score_adversarial(embed, images, adversarial, clean_embeddings=clean_embeddings, n_members=n_members)


class PerturbationScore:
    """Running sums of per-face scores; :meth:`compute` gives the dataset means.

    Parameters
    ----------
    threshold : float or sequence of float
        Verification threshold ``t``: a face is fooled when its similarity is ``< t``
        (:func:`krtfuap.metrics.fooled_by_similarity`). ``M`` thresholds, one per ensemble
        member: the batches' similarities are ``(B, M)``, a face is fooled when every member
        is below its own, and its similarity counts as the mean over members.

    Examples
    --------
    >>> score = PerturbationScore(threshold=0.3)
    >>> score.update(score_batch(model, images, v))  # doctest: +SKIP
    >>> score.compute()["fooling_rate"]  # doctest: +SKIP
    """

    _FIELDS = ("fooled", "similarity", "ssim", "psnr", "n_images")

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold) if member_count(threshold) is None else tuple(map(float, threshold))
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._sums = torch.zeros(len(self._FIELDS), dtype=torch.float64)

    def update(self, scores: dict[str, torch.Tensor]) -> None:
        """Add one batch's per-face ``similarity``, ``ssim`` and ``psnr`` (as :func:`score_adversarial` returns)."""
        similarity = scores["similarity"].detach().double().cpu()
        fooled = fooled_by_similarity(similarity, self.threshold)
        if similarity.ndim == 2:  # one column per member
            similarity = similarity.mean(dim=1)
        self._sums += torch.stack(
            [
                fooled.double().sum(),
                similarity.sum(),
                scores["ssim"].detach().double().cpu().sum(),
                scores["psnr"].detach().double().cpu().sum(),
                torch.tensor(float(len(similarity)), dtype=torch.float64),
            ]
        )

    def sync(self, device: torch.device | str = "cpu") -> None:
        """Sum the running totals over all ranks (no-op unless ``torch.distributed`` is initialised).

        ``device`` is where the collective runs (the CUDA device for NCCL).
        """
        if dist.is_available() and dist.is_initialized():
            sums = self._sums.to(device)
            dist.all_reduce(sums)
            self._sums = sums.cpu()

    def compute(self) -> dict[str, float]:
        """Dataset means.

        Returns
        -------
        dict
            ``fooling_rate`` in ``[0, 1]``, ``mean_similarity`` in ``[-1, 1]``,
            ``ssim`` (mean per-face SSIM), ``psnr`` (mean per-face PSNR, dB) and
            ``n_images``.

        Raises
        ------
        ValueError
            When no face was added.
        """
        fooled, similarity, ssim_sum, psnr_sum, count = self._sums.tolist()
        if count == 0:
            raise ValueError("No faces were scored; give at least one batch of images.")
        return {
            "fooling_rate": fooled / count,
            "mean_similarity": similarity / count,
            "ssim": ssim_sum / count,
            "psnr": psnr_sum / count,
            "n_images": int(count),
        }


@torch.no_grad()
def score_perturbation(
    embed: Embed | nn.Module,
    X: ImageData,
    perturbation: torch.Tensor,
    threshold: float | Sequence[float],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    per_face_ssim: float | None = None,
) -> dict[str, float]:
    """Fooling rate, mean similarity, SSIM and PSNR of ``perturbation`` on the faces ``X``.

    Parameters
    ----------
    embed : callable or torch.nn.Module
        The face model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``, in the
        state it should be judged in (eval mode for a network with batch norm).
    X : torch.Tensor or iterable
        ``(N, 3, H, W)`` faces in ``[0, 1]`` or a re-iterable loader of batches.
    perturbation : torch.Tensor
        ``(3, H, W)``.
    threshold : float or sequence of float
        Verification threshold on cosine similarity; ``M`` thresholds, one per member of the
        :class:`krtfuap.models.ensemble.MemberwiseEmbedder` ``embed`` (see :class:`PerturbationScore`).
    batch_size : int
        Batch size when ``X`` is one tensor.
    device : torch.device or str, optional
        Where the model runs; default: the device of the model's first
        parameter (the CPU without one). Faces and perturbation are added in
        float32 there; the model gets the batch in its own floating dtype
        (:func:`krtfuap._ops.call_model`), as when fitting.
    per_face_ssim : float, optional
        Judge each face with the perturbation scaled to its own SSIM ``per_face_ssim``
        (:func:`krtfuap.ssim_scaling.scale_to_ssim`); default: the perturbation as it is.

    Returns
    -------
    dict
        As :meth:`PerturbationScore.compute`.
    """
    if device is None and isinstance(embed, nn.Module):
        device = next((p.device for p in embed.parameters()), None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    perturbation = perturbation.to(device, torch.float32)
    score = PerturbationScore(threshold)
    for images in iter_image_batches(X, batch_size):
        if images.shape[-2:] != perturbation.shape[-2:]:
            raise ValueError(
                f"X has faces of size {tuple(images.shape[-2:])} but the perturbation was fitted on "
                f"{tuple(perturbation.shape[-2:])}; align the faces to that size first."
            )
        score.update(score_batch(embed, images.to(device, torch.float32), perturbation,
                                 n_members=member_count(threshold), per_face_ssim=per_face_ssim))
    return score.compute()
