"""``UAPAttack``: learn one KRT-FUAP perturbation for a face model (paper Algorithm 1).

The estimator follows scikit-learn's conventions: ``__init__`` only stores its
arguments, :meth:`UAPAttack.fit` learns the attributes that end in ``_`` and
:meth:`UAPAttack.transform` adds the learned perturbation to new faces. The
loop, scoring, checkpoints and persistence are shared with every estimator
(:mod:`krtfuap.estimator`, :mod:`krtfuap.engine`); this module holds what is
KRT-FUAP's own: the masked, flow-warped perturbation and its losses.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Literal

import torch
from sklearn.base import clone
from torch import nn

from krtfuap._batches import ImageData
from krtfuap._validation import check_number
from krtfuap.augment import resolve_augment
from krtfuap.distributed import average_gradients, broadcast_module_
from krtfuap.diversity import RandomResizePad
from krtfuap.engine import Solver
from krtfuap.estimator import PerturbationEstimator
from krtfuap.flow import FlowUnit
from krtfuap.losses import ADVERSARIAL_LOSSES, DirectionLoss
from krtfuap.masks import KeyRegionMasker
from krtfuap.metrics import cosine_similarity, fooled_by_similarity, ssim
from krtfuap.perturbation import MaskedPerturbation
from krtfuap.stealth import StealthLossLike, resolve_stealth_loss

__all__ = ["UAPAttack", "AUTO_DECAY_STEPS", "adapt_stealth_weight", "cosine_decay", "decay_progress"]

#: Bounds of an adapted stealth weight.
_WEIGHT_RANGE = (1e-3, 1e4)
#: The adaptation aims this far above ``target_ssim``, so that the batch-to-batch swing of the
#: measured SSIM leaves most end-of-epoch states at or above the target.
_SSIM_MARGIN = 0.0025
#: Length of ``lr_decay_steps="auto"`` for a fit limited by neither ``max_steps`` nor ``max_time``.
AUTO_DECAY_STEPS = 600


def adapt_stealth_weight(weight: float, measured_ssim: float, target_ssim: float, rate: float) -> float:
    """One multiplicative dual-ascent step on the stealth weight.

    ``weight * exp(rate * (target_ssim - measured_ssim) / 0.01)``: the weight
    grows when the batch is less similar to the clean faces than the target
    (by ``exp(rate)`` per 0.01 of SSIM below it) and shrinks when it is more,
    so the fit settles where the measured SSIM meets the target. Clipped to
    ``[1e-3, 1e4]``.

    Parameters
    ----------
    weight : float
        Current stealth weight, ``> 0``.
    measured_ssim, target_ssim : float
        Mean SSIM of the batch just used, and the target, in ``[0, 1]``.
    rate : float
        Log-step per 0.01 of SSIM error, ``>= 0`` (0 keeps the weight fixed).

    Returns
    -------
    float
    """
    updated = weight * math.exp(rate * (target_ssim - measured_ssim) / 0.01)
    return min(max(updated, _WEIGHT_RANGE[0]), _WEIGHT_RANGE[1])


def cosine_decay(progress: float, final: float = 0.1) -> float:
    """Learning-rate factor of a cosine decay ``progress`` of the way through it.

    ``final + (1 - final) * (1 + cos(pi * min(progress, 1))) / 2``: 1 at the
    start, ``final`` from the end (``progress >= 1``) on.

    Parameters
    ----------
    progress : float
        Fraction of the decay done, ``>= 0`` (e.g. steps done / decay steps).
    final : float
        Factor at the end, in ``[0, 1]``.

    Returns
    -------
    float
    """
    progress = min(max(progress, 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_progress(
    steps_done: int,
    elapsed: float,
    decay_steps: int | Literal["auto"] | None,
    *,
    max_steps: int | None = None,
    max_time: float | None = None,
) -> float | None:
    """How far a fit is through its learning-rate decay, as a fraction (``>= 1``: decayed).

    Parameters
    ----------
    steps_done : int
        Update steps done, ``>= 0``.
    elapsed : float
        Seconds of the fit's loop so far (as ``max_time`` counts them).
    decay_steps : int, "auto" or None
        An int decays over that many steps. ``"auto"`` decays over the fit's
        own budget: ``steps_done / max_steps`` and ``elapsed / max_time``,
        whichever limit is nearer (so a fit limited by time ends decayed on a
        fast machine and on a slow one alike); with neither limit set, over
        :data:`AUTO_DECAY_STEPS` steps. ``None``: no decay.
    max_steps : int, optional
    max_time : float, optional
        The fit's limits.

    Returns
    -------
    float or None
        ``None`` when there is no decay.
    """
    if decay_steps is None:
        return None
    if decay_steps != "auto":
        return steps_done / decay_steps
    fractions = []
    if max_steps is not None:
        fractions.append(steps_done / max_steps)
    if max_time is not None:
        fractions.append(elapsed / max_time if max_time > 0 else math.inf)
    return max(fractions) if fractions else steps_done / AUTO_DECAY_STEPS


class UAPAttack(PerturbationEstimator):
    """KRT-FUAP: a universal perturbation under a stealth target, optionally focused on facial key regions.

    The defaults are the recipe measured fastest on real models and real
    faces (``docs/method.rst``, "Where the library departs from the paper");
    :meth:`paper` gives the paper's recipe.

    Parameters
    ----------
    model : torch.nn.Module or list of torch.nn.Module
        Face embedding model: ``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``(B, D)``.
        Put any other input convention inside the model (see
        :class:`krtfuap.models.FaceEmbedder`). Only its output is used; its
        weights, training flags and ``requires_grad`` are left as they were. A
        list fits one perturbation against an ensemble
        (:class:`krtfuap.models.ensemble.EnsembleEmbedder`: the similarity is
        the mean of the members' cosine similarities).
    threshold : float, optional
        Verification threshold ``t`` on cosine similarity: a face is fooled when
        ``cos(F(x + v), F(x)) < t``. ``None`` calibrates it in :meth:`fit` from
        the ``pairs`` given there (best accuracy on genuine/impostor pairs).
    epsilon : float
        l_inf budget of the perturbation on ``[0, 1]`` images (paper: 0.08).
    target_ssim : float, optional
        Stealth as a target, in ``(0, 1)``: the stealth weight adapts during the
        fit (:func:`adapt_stealth_weight`, driven by each batch's measured SSIM,
        aiming 0.0025 above the target) so that the returned perturbation keeps the mean SSIM over the fit faces
        at or above ``target_ssim`` while the fooling rate is maximised; the
        perturbation returned is the best one scored that meets it. Works with
        every ``stealth_loss``. ``None``: a fixed ``stealth_weight``.
    stealth_weight : float, optional
        ``lambda`` of the stealth loss (the starting value when ``target_ssim``
        is set); ``None`` uses the loss's default (3 for ``"ssim"``, 0.05
        for ``"vgg"`` as in the paper).
    stealth_loss : {"ssim", "vgg"}, callable or None
        ``"ssim"``: ``1 - SSIM`` (no weights needed); ``"vgg"``: the paper's
        shallow VGG16 feature loss (needs ImageNet VGG16 weights, see
        :class:`krtfuap.stealth.VGGStealthLoss`); any callable
        ``(adversarial, clean) -> scalar``; ``None``: no stealth term.
    stealth_adapt_rate : float
        Speed of the stealth-weight adaptation (log-step per 0.01 of SSIM error).
        0.05 made the measured SSIM swing by +-0.04 around a 0.90 target on
        foamliu MobileFaceNet; 0.02 settled on it (``benchmarks/RESULTS.md``, section 0).
    adversarial_loss : {"direction", "cosine", "euclidean"}
        The paper's direction loss or the ablations of Table 5 (see
        :mod:`krtfuap.losses`; on normalised embeddings ``"cosine"`` is the
        direction loss at half the weight).
    masker : KeyRegionMasker, torch.Tensor or None
        Source of the key-region mask ``M0``: an (un)fitted
        :class:`krtfuap.masks.KeyRegionMasker` (an unfitted one is cloned and
        fitted on the fit data), an ``(H, W)`` mask tensor in ``[0, 1]``, or
        ``None`` for ``KeyRegionMasker()`` (the built-in landmark template of
        ArcFace-aligned faces: no landmark model needed).
    use_key_regions : bool
        ``True`` shapes the noise by the (flow-warped) key-region mask, as in
        the paper (and :meth:`paper`); ``False``, the default, leaves the
        whole budget to every pixel (the paper's Table 3 ablation, a global
        perturbation). With a stealth target, the global perturbation reached
        a higher held-out fooling rate at the same SSIM in fewer steps on both
        real models measured (``docs/method.rst``, "Where the library departs
        from the paper"); ``masker``, ``learn_flow`` and the flow options act
        only when it is ``True``.
    learn_flow : bool
        Learn the flow field that warps the mask (paper); ``False`` keeps the
        key regions fixed (ablation of Table 4).
    flow_bound : float
        Bound of the flow field values (paper: 1).
    flow_unit : {"pixels", "normalized"}
        Unit of the flow field (see :mod:`krtfuap.flow`).
    skip_fooled : bool
        Algorithm 1, line 7: only faces that are not yet fooled contribute to
        the adversarial loss of a step (paper: True).
    target_fooling_rate : float
        Stop once the fooling rate of the perturbation, scored on the fit data
        after an epoch, reaches this (and ``target_ssim`` is met).
    max_epochs : int
        Hard stop on passes over the data.
    max_time : float, optional
        Hard stop on the loop's wall time in seconds (threshold calibration
        and mask fitting not counted), checked after every step; the
        perturbation is then scored once more.
    max_steps : int, optional
        Stop after this many update steps in all (the epoch in progress is scored).
        Unlike ``max_time`` it does not depend on the machine, so a fit limited by
        it repeats exactly on the CPU.
    lr : float
        Adam learning rate of the noise (paper: 0.01).
    flow_lr : float, optional
        Adam learning rate of the flow field; ``None`` uses ``lr``.
    lr_decay_steps : int, "auto" or None
        Cosine-decay both learning rates to a tenth over this many update
        steps, then hold them there (:func:`cosine_decay`). ``"auto"`` (the
        default) decays them over the fit's own budget: to a tenth at
        ``max_steps`` or at ``max_time``, whichever comes first, or over 600
        steps when neither is set (:func:`decay_progress`); by ``max_time``
        the rates follow the clock, so such a fit does not repeat exactly
        (as with any time limit). ``None`` keeps them constant (paper).
        In 600 s on one CPU core, decaying over the whole fit ended at a
        higher held-out fooling rate than a fixed 600-step decay or constant
        rates on both real models measured (``benchmarks/RESULTS.md``,
        sections 0d and 0e).
    input_diversity : float
        Probability per step of feeding the model a randomly shrunk and
        zero-padded copy of the adversarial batch (Xie et al. 2019, see
        :mod:`krtfuap.diversity`). ``0`` turns it off; meant to help transfer.
    diversity_min_scale : float
        Smallest shrink factor of input diversity, in ``(0, 1]``.
    augment : {"photo", "round_trip"}, callable or None
        Robust fitting (expectation over transformations, see
        :mod:`krtfuap.augment`): the adversarial batch goes through this
        random transform before the model at every step (before input
        diversity), so the perturbation learns to survive it. ``"photo"``:
        :meth:`krtfuap.augment.PhotoAugment.default` (re-alignment jitter,
        down-and-up rescaling, JPEG, 8-bit rounding). ``"round_trip"``:
        :meth:`krtfuap.augment.PhotoAugment.round_trip` (pasted into a photo
        at 0.55-0.85 of the template's size, 8-bit, JPEG at that size,
        aligned again; pair it with ``lowpass_size``). A
        :class:`~krtfuap.augment.PhotoAugment` or
        :class:`~krtfuap.augment.RandomTransform` draws from the fit's
        generator (seeded by ``random_state``, saved in checkpoints); any
        other callable ``(B, 3, H, W) -> (B, 3, H, W)`` is used as given.
        The clean embeddings, the stealth loss and the scoring after each
        epoch use the untransformed faces. ``None``: off.
    init_scale : float
        The noise starts uniform in ``[-init_scale * epsilon, init_scale * epsilon]``
        (paper: 1).
    lowpass_size : int, optional
        Band-limit the perturbation to a grid of this side (area-averaged down,
        enlarged back bilinearly at every step, :func:`krtfuap.perturbation.lowpass`),
        so it holds only the detail a face that much smaller than the template
        carries in a photo: it survives pasting into photos and re-alignment
        better (``benchmarks/RESULTS.md`` 7c-7d). ``None``: full resolution (paper).
    batch_size : int
        Batch size when ``X`` is given as one tensor (per process when fitting
        distributed: the global batch is ``batch_size * world_size``).
    shuffle : bool
        When ``X`` is one tensor, visit its faces in a new random order every
        epoch (drawn from ``random_state``; saved in checkpoints); ``False``
        keeps their order (paper preset). A loader keeps its own order (use
        ``DataLoader(shuffle=True)``). On 1232 faces of ``w600k_mbf`` (600 s,
        one core) shuffling reached held-out fooling rate 0.7 in 496 steps
        instead of 744 (``benchmarks/RESULTS.md``, section 0f).
    random_state : int, numpy RandomState or None
        Seeds the initial noise; an int makes ``fit`` repeatable on CPU.
    device : str or torch.device, optional
        Where to fit; default: the device of the model's parameters.
    amp : bool
        Run the face model's forward passes in :func:`torch.autocast` with
        bfloat16 during :meth:`fit`; CUDA with bfloat16 only (``ValueError``
        elsewhere).
    channels_last : bool
        Convert the model (in place; it stays converted) and the image batches
        to the ``torch.channels_last`` memory format during :meth:`fit`.
    checkpoint_path : path-like, optional
        Write the fit state there every ``checkpoint_every`` epochs, atomically.
        ``fit(X, resume=True)`` continues from it (refused, naming the
        difference, when the parameters or data differ); on CPU the result
        equals an uninterrupted fit. Never saved in, or restored from, an
        attack file.
    checkpoint_every : int
        Epochs between checkpoints.
    verbose : bool
        Show a tqdm progress bar (on rank 0 only when distributed).

    Notes
    -----
    **Distributed fitting.** When ``torch.distributed`` is initialised (e.g.
    under ``torchrun``), :meth:`fit` runs data-parallel with no extra argument
    (see :mod:`krtfuap.distributed`): every rank starts from rank 0's
    perturbation, reads its shard of ``X``, averages the gradients before each
    step and the records and scores over ranks, so all ranks hold the same
    perturbation and stop at the same step. Only rank 0 writes files.

    Attributes
    ----------
    perturbation_, mask_, warped_mask_, flow_, noise_, threshold_, fooling_rate_, ssim_, best_epoch_, history_, epoch_scores_, n_iter_, n_epochs_, stop_reason_, fit_time_
        See :class:`krtfuap.estimator.PerturbationEstimator`. ``mask_`` is
        ``M0``, ``warped_mask_`` is ``Mf`` and ``flow_`` the learned flow
        (zeros when ``learn_flow=False``). ``history_`` records per step
        ``loss, adversarial_loss, stealth_loss, stealth_weight,
        fooling_rate, ssim`` (batch values before the update).
    stealth_weight_ : float
        The stealth weight at the end of the fit (the adapted value when
        ``target_ssim`` is set).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        target_ssim: float | None = None,
        stealth_weight: float | None = None,
        stealth_loss: StealthLossLike | None = "ssim",
        stealth_adapt_rate: float = 0.02,
        adversarial_loss: str = "direction",
        masker: KeyRegionMasker | torch.Tensor | None = None,
        use_key_regions: bool = False,
        learn_flow: bool = True,
        flow_bound: float = 1.0,
        flow_unit: FlowUnit = "pixels",
        skip_fooled: bool = True,
        target_fooling_rate: float = 0.8,
        max_epochs: int = 50,
        max_time: float | None = None,
        max_steps: int | None = None,
        lr: float = 0.01,
        flow_lr: float | None = None,
        lr_decay_steps: int | Literal["auto"] | None = "auto",
        input_diversity: float = 0.0,
        diversity_min_scale: float = 0.9,
        augment: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        init_scale: float = 1.0,
        lowpass_size: int | None = None,
        batch_size: int = 10,
        shuffle: bool = True,
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
        self.target_ssim = target_ssim
        self.stealth_weight = stealth_weight
        self.stealth_loss = stealth_loss
        self.stealth_adapt_rate = stealth_adapt_rate
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
        self.max_steps = max_steps
        self.lr = lr
        self.flow_lr = flow_lr
        self.lr_decay_steps = lr_decay_steps
        self.input_diversity = input_diversity
        self.diversity_min_scale = diversity_min_scale
        self.augment = augment
        self.init_scale = init_scale
        self.lowpass_size = lowpass_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.random_state = random_state
        self.device = device
        self.amp = amp
        self.channels_last = channels_last
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.verbose = verbose

    @classmethod
    def paper(cls, model: nn.Module, **overrides: Any) -> "UAPAttack":
        """The paper's recipe (Jin et al. 2024, Algorithm 1), any keyword overridable.

        Key regions with a learned flow, VGG16 ``relu2_2`` stealth loss with ``lambda = 0.05``, noise starting
        uniform over the whole budget, only not-yet-fooled faces in the
        adversarial loss, Adam with a constant ``lr = 0.01`` for noise and flow, batches
        of 10 faces (paper Section 4.1) in the order given (the paper does not say; no
        shuffling), stop at fooling rate 0.8. Offline, where no VGG16 weights
        exist, pass ``stealth_loss="ssim", stealth_weight=3``.

        Returns
        -------
        UAPAttack
            Unfitted.
        """
        recipe = dict(
            stealth_loss="vgg", stealth_weight=0.05, target_ssim=None, use_key_regions=True, learn_flow=True,
            skip_fooled=True, init_scale=1.0, lowpass_size=None,
            lr=0.01, flow_lr=None, lr_decay_steps=None, batch_size=10, shuffle=False, target_fooling_rate=0.8,
            adversarial_loss="direction",
        )
        recipe.update(overrides)
        return cls(model, **recipe)

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        super()._check_params()
        check_number(self.target_ssim, "target_ssim", low=0, high=1, low_open=True, high_open=True, allow_none=True)
        check_number(self.stealth_weight, "stealth_weight", low=0, allow_none=True)
        check_number(self.stealth_adapt_rate, "stealth_adapt_rate", low=0)
        check_number(self.max_steps, "max_steps", low=1, integer=True, allow_none=True)
        check_number(self.flow_bound, "flow_bound", low=0)
        check_number(self.lr, "lr", low=0, low_open=True)
        check_number(self.flow_lr, "flow_lr", low=0, allow_none=True)
        if isinstance(self.lr_decay_steps, str) and self.lr_decay_steps != "auto":
            raise ValueError(
                f'lr_decay_steps must be a number of steps, "auto" (over the fit\'s max_steps / max_time) or None '
                f"(constant rates), got {self.lr_decay_steps!r}."
            )
        if self.lr_decay_steps != "auto":
            check_number(self.lr_decay_steps, "lr_decay_steps", low=1, integer=True, allow_none=True)
        check_number(self.init_scale, "init_scale", low=0)
        check_number(self.lowpass_size, "lowpass_size", low=1, integer=True, allow_none=True)
        if not isinstance(self.shuffle, bool):
            raise TypeError(f"shuffle must be True or False, got {self.shuffle!r}.")
        if self.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(
                f"adversarial_loss must be one of {sorted(ADVERSARIAL_LOSSES)}, got {self.adversarial_loss!r}."
            )
        if self.masker is not None and not self.use_key_regions:
            raise ValueError(
                "masker is set but use_key_regions=False (the default), so the mask would be ignored; pass "
                "use_key_regions=True to shape the perturbation by it."
            )
        if self.target_ssim is not None and self.stealth_loss is None:
            raise ValueError("target_ssim needs a stealth loss to adapt; set stealth_loss='ssim' (or another).")
        RandomResizePad(self.input_diversity, self.diversity_min_scale)  # checks both
        resolve_augment(self.augment, None)  # checks it
        device = self._device()
        if self.amp and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            raise ValueError(
                f"amp=True needs a CUDA GPU with bfloat16 support (compute capability >= 8.0); fitting on "
                f"{device} instead. Set amp=False."
            )

    def _check_params_of_loaded(self) -> None:
        super()._check_params_of_loaded()
        resolve_augment(self.augment, None)

    # ------------------------------------------------------------------- mask
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

    def _lr_progress(self, steps_done: int, elapsed: float) -> float | None:
        """Fraction of the learning-rate decay done (:func:`decay_progress` with this fit's limits)."""
        return decay_progress(steps_done, elapsed, self.lr_decay_steps, max_steps=self.max_steps,
                              max_time=self.max_time)

    def _make_solver(self, X, size, device, generator, embed, threshold):
        height, width = size
        mask = self._key_region_mask(X, height, width)
        stealth_loss, stealth_weight = resolve_stealth_loss(self.stealth_loss, self.stealth_weight)
        if isinstance(stealth_loss, nn.Module):
            stealth_loss = stealth_loss.to(device)
        perturbation = MaskedPerturbation(
            mask,
            epsilon=self.epsilon,
            learn_flow=self.learn_flow and self.use_key_regions,
            flow_bound=self.flow_bound,
            flow_unit=self.flow_unit,
            init_scale=self.init_scale,
            lowpass_size=self.lowpass_size,
            generator=generator,
            height=height,
            width=width,
        ).to(device)
        solver = _KeyRegionSolver(
            perturbation,
            embed=embed,
            threshold=threshold,
            adversarial_loss=DirectionLoss(self.adversarial_loss, reduction="none"),
            stealth_loss=stealth_loss,
            stealth_weight=stealth_weight,
            target_ssim=self.target_ssim,
            adapt_rate=self.stealth_adapt_rate,
            skip_fooled=self.skip_fooled,
            diversity=RandomResizePad(self.input_diversity, self.diversity_min_scale, generator=generator),
            augment=resolve_augment(self.augment, generator),
            lr=self.lr,
            flow_lr=self.lr if self.flow_lr is None else self.flow_lr,
            lr_progress=self._lr_progress,
        )
        learned = {"mask_": mask if mask is not None else torch.ones(height, width)}
        return solver, learned


class _KeyRegionSolver(Solver):
    """KRT-FUAP's update: Adam on noise and flow of a :class:`MaskedPerturbation`, loss = adversarial + lambda * stealth."""

    def __init__(
        self,
        perturbation: MaskedPerturbation,
        *,
        embed: Callable[[torch.Tensor], torch.Tensor],
        threshold: float,
        adversarial_loss: DirectionLoss,
        stealth_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        stealth_weight: float,
        target_ssim: float | None,
        adapt_rate: float,
        skip_fooled: bool,
        diversity: RandomResizePad,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
        lr: float,
        flow_lr: float,
        lr_progress: Callable[[int, float], float | None],
    ) -> None:
        self.module = perturbation
        self.embed = embed
        self.threshold = threshold
        self.adversarial_loss = adversarial_loss
        self.stealth_loss = stealth_loss
        self.stealth_weight = stealth_weight
        self.target_ssim = target_ssim
        self.adapt_rate = adapt_rate
        self.skip_fooled = skip_fooled
        self.diversity = diversity
        self.augment = augment
        groups = [{"params": [perturbation.noise], "lr": lr}]
        if perturbation.flow_warp is not None:
            groups.append({"params": list(perturbation.flow_warp.parameters()), "lr": flow_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.base_lrs = [group["lr"] for group in groups]
        self.lr_progress = lr_progress

    def step(self, images: torch.Tensor, clean_embeddings: torch.Tensor) -> dict[str, float]:
        adversarial = (images + self.module()).clamp(0.0, 1.0)
        embeddings = self.embed(self.diversity(self._augmented(adversarial)))
        similarity = cosine_similarity(embeddings.detach(), clean_embeddings)
        fooled = fooled_by_similarity(similarity, self.threshold)
        per_face = self.adversarial_loss(embeddings, clean_embeddings)
        if self.skip_fooled:
            per_face = per_face * (~fooled).to(per_face.dtype)
        adversarial_term = per_face.mean()
        if self.stealth_loss is not None:
            stealth_term = self.stealth_loss(adversarial, images)
        else:
            stealth_term = adversarial_term.new_zeros(())
        loss = adversarial_term + self.stealth_weight * stealth_term
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.module.parameters())
        self.optimizer.step()
        self.module.project_()
        with torch.no_grad():
            batch_ssim = ssim(adversarial.detach().float(), images.float()).mean().item()
        return {
            "loss": loss.item(),
            "adversarial_loss": adversarial_term.item(),
            "stealth_loss": stealth_term.item(),
            "stealth_weight": self.stealth_weight,
            "fooling_rate": fooled.float().mean().item(),
            "ssim": batch_ssim,
        }

    def _augmented(self, adversarial: torch.Tensor) -> torch.Tensor:
        """The adversarial batch as the photo pipeline of ``augment`` delivers it to the model."""
        if self.augment is None:
            return adversarial
        augmented = self.augment(adversarial)
        if not isinstance(augmented, torch.Tensor) or augmented.shape != adversarial.shape:
            got = tuple(augmented.shape) if isinstance(augmented, torch.Tensor) else type(augmented).__name__
            raise ValueError(
                f"augment must return images of the shape it is given, {tuple(adversarial.shape)}, got {got}; "
                "resize back inside the transform."
            )
        return augmented

    def after_step(self, record: dict[str, float]) -> None:
        progress = self.lr_progress(int(record["step"]) + 1, record["time"])
        if progress is not None:
            factor = cosine_decay(progress)
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base_lr * factor
        if self.target_ssim is not None:
            self.stealth_weight = adapt_stealth_weight(
                self.stealth_weight, record["ssim"], self.target_ssim + _SSIM_MARGIN, self.adapt_rate
            )

    @torch.no_grad()
    def perturbation(self) -> torch.Tensor:
        return self.module().detach()

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        flow_warp = self.module.flow_warp
        height, width = self.module.base_mask.shape
        return {
            "perturbation_": self.module().detach().cpu().clone(),
            "noise_": self.module.noise.detach().cpu().clone(),
            "warped_mask_": self.module.warped_mask().detach().cpu().clone(),
            "flow_": flow_warp.flow.detach().cpu().clone() if flow_warp is not None else torch.zeros(2, height, width),
        }

    def fitted_attributes(self) -> dict[str, Any]:
        return {"stealth_weight_": self.stealth_weight}

    def state_dict(self) -> dict[str, Any]:
        return {
            "perturbation": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "stealth_weight": self.stealth_weight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["perturbation"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stealth_weight = float(state["stealth_weight"])

    def broadcast_(self) -> None:
        broadcast_module_(self.module)
