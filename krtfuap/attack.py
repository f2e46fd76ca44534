"""``UAPAttack``: learn one KRT-FUAP perturbation for a face model (paper Algorithm 1).

The estimator follows scikit-learn's conventions: ``__init__`` only stores its
arguments, :meth:`UAPAttack.fit` learns the attributes that end in ``_`` and
:meth:`UAPAttack.transform` adds the learned perturbation to new faces.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from krtfuap._batches import ImageData, iter_image_batches
from krtfuap._validation import check_embeddings, check_images, load_torch_file
from krtfuap.distributed import (
    any_rank,
    average_gradients,
    broadcast_module_,
    is_main_process,
    mean_over_ranks,
    set_epoch,
    shard,
)
from krtfuap.diversity import RandomResizePad
from krtfuap.flow import FlowUnit
from krtfuap.losses import DirectionLoss
from krtfuap.masks import KeyRegionMasker
from krtfuap.models.ensemble import EnsembleEmbedder
from krtfuap.metrics import calibrate_threshold, cosine_similarity, pair_similarities, psnr, ssim
from krtfuap.perturbation import MaskedPerturbation
from krtfuap.stealth import StealthLossLike, resolve_stealth_loss

__all__ = ["UAPAttack"]

_FORMAT = "krtfuap.UAPAttack/1"
_SAVED_TENSORS = ("perturbation_", "mask_", "warped_mask_", "flow_", "noise_")


class UAPAttack(TransformerMixin, BaseEstimator):
    """KRT-FUAP: a universal perturbation focused on facial key regions.

    Parameters
    ----------
    model : torch.nn.Module or list of torch.nn.Module
        Face embedding model: ``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``(B, D)``.
        Put any other input convention inside the model (see
        :class:`krtfuap.models.FaceEmbedder`). Only its output is used; its
        weights are left untouched. A list fits one perturbation against an
        ensemble (:class:`krtfuap.models.ensemble.EnsembleEmbedder`: the
        similarity is the mean of the members' cosine similarities, and
        ``threshold`` applies to that mean).
    threshold : float, optional
        Verification threshold ``t`` on cosine similarity: a face is fooled when
        ``cos(F(x + v), F(x)) < t``. ``None`` calibrates it in :meth:`fit` from
        the ``pairs`` given there (best accuracy on genuine/impostor pairs).
    epsilon : float
        l_inf budget of the perturbation on ``[0, 1]`` images (paper: 0.08).
    stealth_weight : float, optional
        ``lambda`` of the stealth loss; ``None`` uses the loss's documented
        default (0.05 for ``"vgg"`` as in the paper, 3 for ``"ssim"``).
    stealth_loss : {"vgg", "ssim"}, callable or None
        ``"vgg"``: the paper's shallow VGG16 feature loss (needs ImageNet VGG16
        weights, see :class:`krtfuap.stealth.VGGStealthLoss`); ``"ssim"``:
        ``1 - SSIM`` (no weights needed); any callable
        ``(adversarial, clean) -> scalar``; ``None``: no stealth term.
    adversarial_loss : {"direction", "cosine", "euclidean"}
        The paper's direction loss, or the ablations of Table 5.
    masker : KeyRegionMasker, torch.Tensor or None
        Source of the key-region mask ``M0``: an (un)fitted
        :class:`krtfuap.masks.KeyRegionMasker` (an unfitted one is cloned and
        fitted on the fit data), an ``(H, W)`` mask tensor in ``[0, 1]``, or
        ``None`` for ``KeyRegionMasker()`` (the built-in landmark template of
        ArcFace-aligned faces: no landmark model needed).
    use_key_regions : bool
        ``False`` drops the mask: a global perturbation (ablation of Table 3).
    learn_flow : bool
        Learn the flow field that warps the mask (paper); ``False`` keeps the
        key regions fixed (ablation of Table 4).
    flow_bound : float
        Bound of the flow field values (paper: 1).
    flow_unit : {"pixels", "normalized"}
        Unit of the flow field (see :mod:`krtfuap.flow`).
    skip_fooled : bool
        Algorithm 1, line 7: only faces that are not yet fooled contribute to
        the adversarial loss of a step.
    target_fooling_rate : float
        Stop once the fooling rate over one epoch of the fit data reaches this.
    max_epochs : int
        Hard stop on passes over the data.
    max_time : float, optional
        Hard stop on optimisation wall time in seconds (threshold calibration
        and mask fitting not counted), checked after every step.
    lr : float
        Adam learning rate (paper: 0.01).
    input_diversity : float
        Probability per step of feeding the model a randomly shrunk and
        zero-padded copy of the adversarial batch (Xie et al. 2019, see
        :mod:`krtfuap.diversity`); the clean embeddings stay those of the
        untouched faces. ``0`` (default, as in the paper) turns it off; it is
        meant to help transfer to unseen models.
    diversity_min_scale : float
        Smallest shrink factor of input diversity, in ``(0, 1]``.
    init_scale : float
        The noise starts uniform in ``[-init_scale * epsilon, init_scale * epsilon]``.
    batch_size : int
        Batch size when ``X`` is given as one tensor (per process when fitting
        distributed: the global batch is ``batch_size * world_size``).
    random_state : int, numpy RandomState or None
        Seeds the initial noise; an int makes ``fit`` repeatable on CPU.
    device : str or torch.device, optional
        Where to fit; default: the device of the model's parameters.
    amp : bool
        Run the face model's forward passes in :func:`torch.autocast` with
        bfloat16 (mixed precision) during :meth:`fit`; the noise, the flow, the
        losses and Adam stay float32. CUDA only: ``fit`` raises ``ValueError`` on
        other devices and on GPUs without bfloat16 (compute capability < 8.0).
        float16 is not offered: its gradients would need loss scaling.
    channels_last : bool
        Convert the model (in place; it stays converted) and the image batches to
        the ``torch.channels_last`` memory format during :meth:`fit`, which speeds
        up convolutions on recent GPUs and CPUs. Same result as without, up to
        float rounding.
    checkpoint_path : path-like, optional
        Write the fit state (noise, flow, Adam state, random states, epoch,
        history) there every ``checkpoint_every`` epochs, atomically (write to
        a temporary file, then rename). ``fit(X, resume=True)`` continues
        from it; on CPU the result equals an uninterrupted fit.
    checkpoint_every : int
        Epochs between checkpoints.
    verbose : bool
        Show a tqdm progress bar (on rank 0 only when distributed).

    Notes
    -----
    **Distributed fitting.** When ``torch.distributed`` is initialised (e.g. the
    script runs under ``torchrun``), :meth:`fit` runs data-parallel with no
    extra argument (see :mod:`krtfuap.distributed`): every rank starts from rank
    0's initial perturbation, reads an interleaved shard of ``X`` (a tensor is
    split by rank; a ``DataLoader`` gets a ``DistributedSampler``), averages the
    noise and flow gradients over ranks before each Adam step, and records the
    rank-averaged losses and fooling rate in ``history_``, so all ranks hold the
    same perturbation and stop at the same step. With ``W`` ranks of
    ``batch_size=b`` and a sequential loader the result equals a one-process fit
    with ``batch_size=W * b`` up to float rounding. Only rank 0 writes
    checkpoints and :meth:`save` files; ``checkpoint_path`` must be visible to
    every rank for ``resume=True``. :meth:`evaluate` is not sharded.

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)``, values in ``[-epsilon, epsilon]``, on the CPU.
    mask_ : torch.Tensor
        Key-region mask ``M0``, ``(H, W)`` in ``[0, 1]``.
    warped_mask_ : torch.Tensor
        ``Mf``, the mask after the learned flow, ``(H, W)`` in ``[0, 1]``.
    flow_ : torch.Tensor
        ``(2, H, W)`` learned flow (zeros when ``learn_flow=False``).
    noise_ : torch.Tensor
        ``(3, H, W)`` learned noise before masking.
    threshold_ : float
        The threshold used.
    history_ : list of dict
        Per step: ``step, epoch, loss, adversarial_loss, stealth_loss,
        fooling_rate, ssim`` (batch values, measured before the step's update)
        and ``time`` (seconds of optimisation since the fit began, after the step).
    n_iter_ : int
        Optimisation steps taken.
    n_epochs_ : int
        Passes over the data.
    fooling_rate_ : float
        Fooling rate over the last epoch of the fit data.
    stop_reason_ : str
        ``"target_fooling_rate"``, ``"max_epochs"`` or ``"max_time"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        stealth_weight: float | None = None,
        stealth_loss: StealthLossLike | None = "vgg",
        adversarial_loss: str = "direction",
        masker: KeyRegionMasker | torch.Tensor | None = None,
        use_key_regions: bool = True,
        learn_flow: bool = True,
        flow_bound: float = 1.0,
        flow_unit: FlowUnit = "pixels",
        skip_fooled: bool = True,
        target_fooling_rate: float = 0.8,
        max_epochs: int = 50,
        max_time: float | None = None,
        lr: float = 0.01,
        input_diversity: float = 0.0,
        diversity_min_scale: float = 0.9,
        init_scale: float = 1.0,
        batch_size: int = 32,
        random_state: Any = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        channels_last: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.epsilon = epsilon
        self.stealth_weight = stealth_weight
        self.stealth_loss = stealth_loss
        self.adversarial_loss = adversarial_loss
        self.masker = masker
        self.use_key_regions = use_key_regions
        self.learn_flow = learn_flow
        self.flow_bound = flow_bound
        self.flow_unit = flow_unit
        self.skip_fooled = skip_fooled
        self.target_fooling_rate = target_fooling_rate
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.lr = lr
        self.input_diversity = input_diversity
        self.diversity_min_scale = diversity_min_scale
        self.init_scale = init_scale
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting
    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return next((p.device for p in self._embedder().parameters()), torch.device("cpu"))

    def _embedder(self) -> nn.Module:
        """The face model; a list of models becomes one :class:`~krtfuap.models.ensemble.EnsembleEmbedder`."""
        if isinstance(self.model, (list, tuple)):
            return EnsembleEmbedder(self.model)
        return self.model

    def _dtype(self) -> torch.dtype:
        """Floating dtype the model computes in (its first floating parameter; float32 without one)."""
        return next((p.dtype for p in self._embedder().parameters() if p.is_floating_point()), torch.float32)

    def _check_params(self) -> None:
        self._check_common_params()
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}.")
        RandomResizePad(self.input_diversity, self.diversity_min_scale)  # checks both
        device = self._device()
        if self.amp and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            raise ValueError(
                f"amp=True needs a CUDA GPU with bfloat16 support (compute capability >= 8.0); fitting on "
                f"{device} instead. Set amp=False."
            )

    def _check_common_params(self) -> None:
        """Checks shared with the baselines in :mod:`krtfuap.baselines`."""
        if isinstance(self.model, (list, tuple)):
            EnsembleEmbedder(self.model)  # checks every member
        elif not isinstance(self.model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module mapping (B, 3, H, W) images in [0, 1] to (B, D) "
                f"embeddings (or a list of them), got {type(self.model).__name__}."
            )
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1] (images are in [0, 1]), got {self.epsilon}.")
        if not 0 <= self.target_fooling_rate <= 1:
            raise ValueError(f"target_fooling_rate must be in [0, 1], got {self.target_fooling_rate}.")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}.")
        if self.max_time is not None and self.max_time < 0:
            raise ValueError(f"max_time must be >= 0 seconds or None, got {self.max_time}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity and must be in [-1, 1], got {self.threshold}.")

    def _key_region_mask(self, X: ImageData, height: int, width: int) -> torch.Tensor | None:
        if not self.use_key_regions:
            return None
        if isinstance(self.masker, torch.Tensor):
            mask = self.masker.detach().float().cpu()
        else:
            if self.masker is None:
                masker = KeyRegionMasker().fit(X)
            elif hasattr(self.masker, "mask_"):
                masker = self.masker
            else:
                masker = clone(self.masker).fit(X)
            mask = masker.mask_.detach().float().cpu()
        if mask.shape != (height, width):
            raise ValueError(
                f"The key-region mask has shape {tuple(mask.shape)} but the images are {height}x{width}; "
                "fit the masker on images of the same size."
            )
        if mask.min() < 0 or mask.max() > 1 or not torch.isfinite(mask).all():
            raise ValueError("The key-region mask must hold values in [0, 1].")
        return mask

    def _calibrated_threshold(self, pairs: Iterable | None) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        if pairs is None:
            raise ValueError(
                "threshold=None needs verification pairs to calibrate it: call fit(X, pairs=loader) with "
                "batches of (images_a, images_b, same), or set threshold=t (the model's verification "
                "threshold on cosine similarity)."
            )
        similarities, same = pair_similarities(self._embedder(), pairs)
        threshold, accuracy = calibrate_threshold(similarities, same)
        self.threshold_accuracy_ = accuracy
        return threshold

    def fit(
        self, X: ImageData, y: None = None, *, pairs: Iterable | None = None, resume: bool = False
    ) -> "UAPAttack":
        """Learn the universal perturbation on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            Aligned faces: a ``(N, 3, H, W)`` tensor in ``[0, 1]`` RGB, or a
            re-iterable loader of such batches (or of tuples whose first item is
            the batch), such as a ``DataLoader``.
        y : None
            Ignored (scikit-learn API).
        pairs : iterable, optional
            Batches ``(images_a, images_b, same)`` of verification pairs, used
            only when ``threshold=None`` to calibrate ``threshold_``.
        resume : bool
            Continue from ``checkpoint_path`` when that file exists (give the
            same data, in the same order, and the same parameters).

        Returns
        -------
        UAPAttack
            ``self``, fitted.
        """
        self._check_params()
        if resume and self.checkpoint_path is None:
            raise ValueError(
                "fit(resume=True) needs a checkpoint to resume from; set checkpoint_path= to the file the "
                "interrupted fit wrote (or call fit without resume=True)."
            )
        fit_started = time.perf_counter()
        device = self._device()
        first = next(iter_image_batches(X, self.batch_size))
        height, width = first.shape[-2:]
        mask = self._key_region_mask(X, height, width)
        shard_of_X = shard(X)

        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        diversity = RandomResizePad(self.input_diversity, self.diversity_min_scale, generator=generator)
        perturbation = MaskedPerturbation(
            mask,
            epsilon=self.epsilon,
            learn_flow=self.learn_flow and self.use_key_regions,
            flow_bound=self.flow_bound,
            flow_unit=self.flow_unit,
            init_scale=self.init_scale,
            generator=generator,
            height=height,
            width=width,
        ).to(device)
        adversarial_loss = DirectionLoss(self.adversarial_loss, reduction="none")
        stealth_loss, stealth_weight = resolve_stealth_loss(self.stealth_loss, self.stealth_weight)
        if isinstance(stealth_loss, nn.Module):
            stealth_loss = stealth_loss.to(device)
        optimizer = torch.optim.Adam(perturbation.parameters(), lr=self.lr)

        self.history_ = []
        self.n_iter_ = 0
        self.stop_reason_ = "max_epochs"
        first_epoch, elapsed_before = 0, 0.0
        if resume and self.checkpoint_path is not None and os.path.isfile(self.checkpoint_path):
            first_epoch, elapsed_before = self._restore_checkpoint(perturbation, optimizer, generator)
        broadcast_module_(perturbation)
        model = self._embedder()
        was_training = model.training
        frozen = [p for p in model.parameters() if p.requires_grad]
        model.eval()
        for parameter in frozen:
            parameter.requires_grad_(False)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            self.threshold_ = self._calibrated_threshold(pairs)
            started = time.perf_counter() - elapsed_before  # max_time counts optimisation only
            show_progress = self.verbose and is_main_process()
            epochs = tqdm(range(first_epoch, self.max_epochs), desc="KRT-FUAP fit", disable=not show_progress)
            for epoch in epochs:
                fooled, seen = 0, 0
                set_epoch(shard_of_X, epoch)
                for images in iter_image_batches(shard_of_X, self.batch_size):
                    images = images.to(device, self._dtype(), memory_format=memory_format)
                    if images.shape[-2:] != (height, width):
                        raise ValueError(
                            f"All faces must share one size; got {tuple(images.shape[-2:])} after "
                            f"{(height, width)}. Align every face to the same size (e.g. 112x112)."
                        )
                    record = self._step(
                        model, images, perturbation, diversity, adversarial_loss, stealth_loss, stealth_weight, optimizer
                    )
                    record, n_images = mean_over_ranks(record, len(images), device)
                    record.update(step=self.n_iter_, epoch=epoch, time=time.perf_counter() - started)
                    self.history_.append(record)
                    self.n_iter_ += 1
                    fooled += record["fooling_rate"] * n_images
                    seen += n_images
                    if self.max_time is not None and any_rank(time.perf_counter() - started > self.max_time, device):
                        self.stop_reason_ = "max_time"
                        break
                self.fooling_rate_ = fooled / seen
                self.n_epochs_ = epoch + 1
                epochs.set_postfix(fooling_rate=f"{self.fooling_rate_:.3f}")
                if self.stop_reason_ == "max_time":
                    break
                if self.fooling_rate_ >= self.target_fooling_rate:
                    self.stop_reason_ = "target_fooling_rate"
                    break
                if (
                    self.checkpoint_path is not None
                    and self.n_epochs_ % self.checkpoint_every == 0
                    and is_main_process()
                ):
                    self._write_checkpoint(perturbation, optimizer, generator, time.perf_counter() - started)
        finally:
            model.train(was_training)
            for parameter in frozen:
                parameter.requires_grad_(True)

        with torch.no_grad():
            self.perturbation_ = perturbation().detach().cpu()
            self.warped_mask_ = perturbation.warped_mask().detach().cpu()
            self.noise_ = perturbation.noise.detach().cpu()
            flow = perturbation.flow_warp
            self.flow_ = flow.flow.detach().cpu() if flow is not None else torch.zeros(2, height, width)
        self.mask_ = mask if mask is not None else torch.ones(height, width)
        self.fit_time_ = time.perf_counter() - fit_started
        return self

    def _write_checkpoint(
        self,
        perturbation: MaskedPerturbation,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        elapsed: float,
    ) -> None:
        """Save the state after a finished epoch; write-then-rename so a kill loses nothing."""
        state = {
            "format": _FORMAT,
            "perturbation": perturbation.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": generator.get_state(),
            "epoch": self.n_epochs_,
            "n_iter": self.n_iter_,
            "fooling_rate": self.fooling_rate_,
            "elapsed": elapsed,
            "history": self.history_,
        }
        path = os.fspath(self.checkpoint_path)
        partial = f"{path}.partial"
        with open(partial, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)

    def _restore_checkpoint(
        self, perturbation: MaskedPerturbation, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> tuple[int, float]:
        """Load a checkpoint written by :meth:`_write_checkpoint`; returns (next epoch, elapsed seconds)."""
        path = os.fspath(self.checkpoint_path)
        fix = (
            "Delete it (or pass resume=False) to start afresh, or fit with the same parameters and data "
            "as the run that wrote it."
        )
        state = load_torch_file(path, what="checkpoint", fix=fix)
        try:
            if not isinstance(state, dict) or state.get("format") != _FORMAT:
                raise ValueError("it was not written by UAPAttack")
            perturbation.load_state_dict(state["perturbation"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            restored = (state["epoch"], state["n_iter"], state["fooling_rate"], state["history"], state["elapsed"])
            torch.set_rng_state(state["torch_rng"])
        except Exception as error:
            reason = f"missing entry {error}" if isinstance(error, KeyError) else " ".join(str(error).split())[:300]
            raise ValueError(f"Cannot resume from checkpoint {path}: {reason}. {fix}") from error
        self.n_epochs_, self.n_iter_, self.fooling_rate_, self.history_, elapsed = restored
        return self.n_epochs_, elapsed

    def _step(
        self,
        model: nn.Module,
        images: torch.Tensor,
        perturbation: MaskedPerturbation,
        diversity: RandomResizePad,
        adversarial_loss: DirectionLoss,
        stealth_loss,
        stealth_weight: float,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, float]:
        """One Adam step on one batch; returns the batch's record for ``history_``."""
        with torch.no_grad():
            clean_embeddings = self._embed(model, images)
        adversarial = (images + perturbation()).clamp(0.0, 1.0)
        adversarial_embeddings = self._embed(model, diversity(adversarial))
        similarity = cosine_similarity(adversarial_embeddings.detach(), clean_embeddings)
        fooled = similarity < self.threshold_
        per_face = adversarial_loss(adversarial_embeddings, clean_embeddings)
        if self.skip_fooled:
            per_face = per_face * (~fooled).to(per_face.dtype)
        adversarial_term = per_face.mean()
        if stealth_loss is not None:
            stealth_term = stealth_loss(adversarial, images)
        else:
            stealth_term = adversarial_term.new_zeros(())
        loss = adversarial_term + stealth_weight * stealth_term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(perturbation.parameters())
        optimizer.step()
        perturbation.project_()
        with torch.no_grad():
            batch_ssim = ssim(adversarial.detach(), images).mean().item()
        return {
            "loss": loss.item(),
            "adversarial_loss": adversarial_term.item(),
            "stealth_loss": stealth_term.item(),
            "fooling_rate": fooled.float().mean().item(),
            "ssim": batch_ssim,
        }

    def _embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Face model forward with the ``amp`` and ``channels_last`` options: ``(B, D)`` float32."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            embeddings = model(images)
        return check_embeddings(embeddings, len(images)).float()

    # --------------------------------------------------------------- applying
    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Add the learned perturbation: ``clip(X + perturbation_, 0, 1)``.

        Parameters
        ----------
        X : torch.Tensor
            ``(B, 3, H, W)`` RGB in ``[0, 1]``, the size the attack was fitted on.

        Returns
        -------
        torch.Tensor
            Same shape, device and dtype as ``X``, values in ``[0, 1]``.
        """
        check_is_fitted(self, "perturbation_")
        check_images(X, name="X")
        if X.shape[-2:] != self.perturbation_.shape[-2:]:
            raise ValueError(
                f"X has size {tuple(X.shape[-2:])} but the perturbation was fitted on "
                f"{tuple(self.perturbation_.shape[-2:])}; align the faces to that size first."
            )
        return (X + self.perturbation_.to(device=X.device, dtype=X.dtype)).clamp(0.0, 1.0)

    @torch.no_grad()
    def evaluate(self, X: ImageData) -> dict[str, float]:
        """Fooling rate, SSIM and PSNR of the perturbation on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            Faces as in :meth:`fit`; judge on identities not used for fitting.

        Returns
        -------
        dict
            ``fooling_rate`` (share with ``cos(F(x + v), F(x)) < threshold_``),
            ``ssim`` and ``psnr`` (means over faces), ``mean_similarity`` and
            ``n_images``.
        """
        check_is_fitted(self, "perturbation_")
        device = self._device()
        model = self._embedder()
        was_training = model.training
        model.eval()
        similarities, ssims, psnrs = [], [], []
        try:
            for images in iter_image_batches(X, self.batch_size):
                images = images.to(device, self._dtype())
                adversarial = self.transform(images)
                clean = check_embeddings(model(images), len(images))
                perturbed = check_embeddings(model(adversarial), len(images))
                similarities.append(cosine_similarity(perturbed, clean).cpu())
                ssims.append(ssim(adversarial, images).cpu())
                psnrs.append(psnr(adversarial, images).cpu())
        finally:
            model.train(was_training)
        similarity = torch.cat(similarities)
        return {
            "fooling_rate": (similarity < self.threshold_).float().mean().item(),
            "ssim": torch.cat(ssims).mean().item(),
            "psnr": torch.cat(psnrs).mean().item(),
            "mean_similarity": similarity.mean().item(),
            "n_images": len(similarity),
        }

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted attack to a ``.safetensors`` file (no pickle).

        Tensors (``perturbation_``, ``mask_``, ``warped_mask_``, ``flow_``,
        ``noise_``) go in the tensor section; JSON-serialisable parameters,
        ``threshold_`` and ``history_`` go in the metadata. The model, a masker
        object and a callable stealth loss are not saved. The file is written
        next to ``path`` and renamed into place, so a failed save leaves an
        existing file at ``path`` unchanged. When fitting distributed, only
        rank 0 writes the file (the other ranks return).
        """
        check_is_fitted(self, "perturbation_")
        if not is_main_process():
            return
        params = {k: v for k, v in self.get_params(deep=False).items() if _is_json_scalar(v)}
        fitted = {
            k: getattr(self, k)
            for k in ("threshold_", "n_iter_", "n_epochs_", "fooling_rate_", "stop_reason_", "fit_time_")
        }
        metadata = {
            "format": _FORMAT,
            "class": type(self).__name__,
            "params": json.dumps(params),
            "fitted": json.dumps(fitted),
            "history": json.dumps(self.history_),
        }
        tensors = {name: getattr(self, name).contiguous() for name in _SAVED_TENSORS}
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"Cannot save to {path}: it is a folder; pass a file path such as attack.safetensors.")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Cannot save to {path}: the folder {folder} does not exist; create it first.")
        partial = f"{path}.partial"
        try:  # write-then-rename: a failed save leaves an existing file at path untouched
            save_file(tensors, partial, metadata=metadata)
            os.replace(partial, path)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "UAPAttack":
        """Read an attack written by :meth:`save`.

        Parameters
        ----------
        path : path-like
            A file written by :meth:`save`.
        model : torch.nn.Module, optional
            The face model, needed for :meth:`evaluate` or a new :meth:`fit`
            (not for :meth:`transform`).

        Returns
        -------
        UAPAttack
            A fitted attack.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No saved attack at {path}; pass the path of a .safetensors file written by {cls.__name__}.save."
            )
        fix = f"Pass a .safetensors file written by {cls.__name__}.save, or save the fitted attack again."
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise ValueError(
                f"{path} is a pickle / torch.save file, not a krtfuap attack file: load reads only .safetensors "
                f"files and never unpickles (pickles can run code). {fix}"
            )
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:
            raise ValueError(
                f"{path} is not a krtfuap attack file it can read: the .safetensors data is truncated or corrupt "
                f"({error}). {fix}"
            ) from error
        if metadata.get("format") != _FORMAT or set(tensors) != set(_SAVED_TENSORS):
            raise ValueError(
                f"{path} is a .safetensors file but not a krtfuap attack file (format {metadata.get('format')!r}, "
                f"tensors {sorted(tensors)}). {fix}"
            )
        perturbation = tensors["perturbation_"]
        if perturbation.ndim != 3 or perturbation.shape[0] != 3 or not torch.isfinite(perturbation).all():
            raise ValueError(
                f"{path} holds a damaged perturbation (shape {tuple(perturbation.shape)}, expected finite "
                f"(3, H, W) values). {fix}"
            )
        try:
            params = json.loads(metadata["params"])
            fitted = json.loads(metadata["fitted"])
            history = json.loads(metadata["history"])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path} has damaged krtfuap metadata ({type(error).__name__}: {error}). {fix}") from error
        unknown = sorted(set(params) - set(cls._get_param_names()))
        if unknown:
            saved_by = metadata.get("class", "another attack class")
            raise ValueError(
                f"{path} was saved by {saved_by}, another attack class (it has parameters {unknown} that "
                f"{cls.__name__} does not take); load it with {saved_by}.load."
            )
        attack = cls(model, **params)
        for name, value in fitted.items():
            setattr(attack, name, value)
        attack.history_ = history
        for name, tensor in tensors.items():
            setattr(attack, name, tensor)
        return attack


def _is_json_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
