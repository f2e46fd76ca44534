"""Baseline universal perturbations for the comparison of the paper's Table 1.

Four baselines sit behind the estimator API of :class:`krtfuap.UAPAttack`
(``fit`` / ``transform`` / ``evaluate`` / ``save`` / ``load``), with the same
budget (an l_inf ball of radius ``epsilon`` on ``[0, 1]`` images), the same
fooling criterion (``cos(F(x + v), F(x)) < threshold_``) and the same stopping
rules (``target_fooling_rate`` over one epoch of the fit data, ``max_epochs``,
``max_time`` checked after every step):

* :class:`RandomNoiseUAP`: uniform noise, nothing learned;
* :class:`DeepFoolUAP`: the universal perturbation algorithm of
  Moosavi-Dezfooli et al. (CVPR 2017) with a DeepFool step adapted to
  verification (cross the cosine threshold instead of a class boundary);
* :class:`FGUAP`: a feature-level cosine attack with Adam in the spirit of
  FG-UAP (Ye et al., CVPR 2023), keeping the best epoch's perturbation;
* :class:`FrequencyUAP`: a low-frequency DCT-parameterised perturbation in the
  spirit of FTGAP (Deng and Karam); a re-implementation from the paper's
  description, as no public code exists.

All four subclass :class:`~krtfuap.attack.UAPAttack`, so ``transform``,
``evaluate``, ``save``, threshold calibration and scikit-learn's
``get_params`` / ``clone`` are inherited unchanged. ``fit`` sets the
attributes that ``save`` writes (``mask_`` and ``warped_mask_`` are all ones,
``flow_`` is zero, ``noise_`` equals ``perturbation_``).

Saving and loading: load a file with the class that saved it
(``DeepFoolUAP.load(path, model)``). :meth:`UAPAttack.load
<krtfuap.attack.UAPAttack.load>` builds ``UAPAttack(model, **saved_params)``,
so it reads a :class:`RandomNoiseUAP` file (whose parameters are all
``UAPAttack`` keywords) as a working ``UAPAttack``, but not a file of the
other baselines (their extra parameters such as ``overshoot`` are not
``UAPAttack`` keywords). Attributes specific to a baseline (``best_epoch_``,
``band_shape_``, ...) are not saved.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from sklearn.utils import check_random_state
from torch import nn
from tqdm.auto import tqdm

from krtfuap._batches import ImageData, iter_image_batches
from krtfuap._validation import check_embeddings
from krtfuap.attack import UAPAttack
from krtfuap.losses import direction_loss
from krtfuap.metrics import cosine_similarity, ssim

__all__ = [
    "RandomNoiseUAP",
    "DeepFoolUAP",
    "FGUAP",
    "FrequencyUAP",
    "deepfool_steps",
    "dct_matrix",
    "dct2",
    "idct2",
]

_DEEPFOOL_START = 1e-3  # scale of the starting noise of a DeepFool step (see deepfool_steps)


# ----------------------------------------------------------------------------- DCT
def dct_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` of size ``(n, n)``.

    ``D[k, m] = sqrt(2 / n) * c_k * cos(pi * (2 m + 1) * k / (2 n))`` with
    ``c_0 = 1 / sqrt(2)`` and ``c_k = 1`` otherwise, so ``D @ D.T`` is the
    identity. Row ``k`` is the ``k``-th frequency (0 = constant).

    Parameters
    ----------
    n : int
        Signal length, ``>= 1``.
    dtype, device
        Of the returned matrix (computed in float64 first).

    Returns
    -------
    torch.Tensor
        Shape ``(n, n)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    m = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype=dtype, device=device)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two axes: ``D_H @ x @ D_W.T``.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``(..., H, W)``, floating point.

    Returns
    -------
    torch.Tensor
        Coefficients of the same shape; ``[..., 0, 0]`` is the mean times
        ``sqrt(H * W)``, larger indices are higher frequencies.
    """
    height, width = x.shape[-2:]
    return dct_matrix(height, dtype=x.dtype, device=x.device) @ x @ dct_matrix(width, dtype=x.dtype, device=x.device).T


def idct2(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2`: ``D_H.T @ c @ D_W``, shape ``(..., H, W)`` -> ``(..., H, W)``."""
    height, width = coefficients.shape[-2:]
    d_h = dct_matrix(height, dtype=coefficients.dtype, device=coefficients.device)
    d_w = dct_matrix(width, dtype=coefficients.dtype, device=coefficients.device)
    return d_h.T @ coefficients @ d_w


# ----------------------------------------------------------------------- helpers
@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode with frozen weights; restore both afterwards."""
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        model.train(was_training)
        for parameter in trainable:
            parameter.requires_grad_(True)


def _similarity(
    model: nn.Module, images: torch.Tensor, perturbation: torch.Tensor, clean: torch.Tensor
) -> torch.Tensor:
    """``cos(F(clip(x + v)), F(x))`` per face, shape ``(B,)``; differentiable in ``perturbation``."""
    adversarial = (images + perturbation).clamp(0.0, 1.0)
    return cosine_similarity(check_embeddings(model(adversarial), len(images)), clean)


def deepfool_steps(
    model: nn.Module,
    images: torch.Tensor,
    clean: torch.Tensor,
    perturbation: torch.Tensor,
    threshold: float,
    *,
    overshoot: float = 0.02,
    max_inner: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-face minimal steps ``r_i`` that push ``cos(F(x_i + v + r_i), F(x_i))`` below ``threshold``.

    DeepFool adapted to verification. A face is fooled when its similarity
    ``s_i`` falls below ``t``, i.e. when the chordal distance
    ``d_i = || F(x_i + v + r_i) / |F(.)| - F(x_i) / |F(x_i)| || = sqrt(2 - 2 s_i)``
    exceeds ``sqrt(2 - 2 t)``. ``d_i`` is linearised around the current
    ``r_i`` and the step solving the linear model for the target
    ``d* = sqrt(2 - 2 (t - overshoot))`` is taken,
    ``r_i <- r_i + (d* - d_i) * g_i / ||g_i||^2`` with ``g_i = d d_i / d r_i``;
    fooled faces stop moving. The distance is linearised rather than ``s_i``
    itself because ``s_i`` is at its maximum (zero gradient, quadratic) where
    the perturbed and clean embeddings agree, so Newton steps on ``s_i``
    explode there, whereas ``d_i`` grows linearly along any direction. For
    the same reason ``r`` starts from tiny uniform noise in
    ``[-1e-3, 1e-3]`` rather than from zero (where ``g_i`` is undefined).

    Parameters
    ----------
    model : torch.nn.Module
        Face model in eval mode (faces must not interact, e.g. no batch-norm
        in training mode), ``(B, 3, H, W)`` -> ``(B, D)``.
    images : torch.Tensor
        ``(B, 3, H, W)`` faces in ``[0, 1]``.
    clean : torch.Tensor
        ``(B, D)`` embeddings ``F(images)``.
    perturbation : torch.Tensor
        ``(3, H, W)`` current universal perturbation ``v``.
    threshold : float
        Verification threshold ``t`` on cosine similarity, in ``(-1, 1]``.
    overshoot : float
        Margin aimed below the threshold, in cosine-similarity units.
    max_inner : int
        Maximum linearisation steps.
    generator : torch.Generator, optional
        CPU generator of the starting noise (for repeatable results).

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)`` steps ``r`` (zero for faces fooled by ``v`` alone;
        unbounded, the caller projects).
    """
    start = (torch.rand(images.shape, generator=generator) * 2 - 1) * _DEEPFOOL_START
    steps = start.to(images.device, images.dtype)
    target = math.sqrt(max(2.0 - 2.0 * (threshold - overshoot), 0.0))
    clean_direction = F.normalize(clean, dim=1)
    moved = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    for _ in range(max_inner):
        steps.requires_grad_(True)
        adversarial = (images + perturbation + steps).clamp(0.0, 1.0)
        embeddings = check_embeddings(model(adversarial), len(images))
        with torch.no_grad():
            active = cosine_similarity(embeddings, clean) >= threshold
        if not active.any():
            break
        moved |= active
        distance = (F.normalize(embeddings, dim=1) - clean_direction).norm(dim=1)
        (gradient,) = torch.autograd.grad(distance.sum(), steps)
        squared_norm = gradient.flatten(1).pow(2).sum(dim=1).clamp_min(1e-20)
        scale = (target - distance.detach()) / squared_norm * active
        steps = steps.detach() + scale.view(-1, 1, 1, 1) * gradient
    return steps.detach() * moved.view(-1, 1, 1, 1)


class _BestPerturbation:
    """Keeps the perturbation with the highest score; the earliest wins ties.

    Scores are tuples compared lexicographically, e.g.
    ``(fooling_rate, -mean_similarity)``.
    """

    def __init__(self) -> None:
        self.score: tuple[float, ...] | None = None
        self.epoch = -1
        self.perturbation: torch.Tensor | None = None

    def offer(self, score: tuple[float, ...], perturbation: torch.Tensor, epoch: int) -> bool:
        """Keep a copy of ``perturbation`` when ``score`` beats the best so far; return whether it did."""
        if self.score is not None and score <= self.score:
            return False
        self.score, self.epoch = score, epoch
        self.perturbation = perturbation.detach().clone()
        return True


# ------------------------------------------------------------------ base class
class _BaselineUAP(UAPAttack):
    """Shared fitting machinery of the baselines (not public).

    Subclasses store their parameters in ``__init__`` and implement ``fit``
    with :meth:`_prepare`, :meth:`_run_epochs` and :meth:`_store`.
    """

    def _check_params(self) -> None:
        self._check_common_params()  # baselines write no checkpoints

    def _prepare(self, X: ImageData) -> tuple[float, torch.device, tuple[int, int], torch.Generator]:
        """Check parameters; return (start time, device, image size, seeded CPU generator)."""
        self._check_params()
        started = time.perf_counter()
        size = tuple(next(iter_image_batches(X, self.batch_size)).shape[-2:])
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        return started, self._device(), size, torch.Generator().manual_seed(seed)

    def _out_of_time(self, started: float) -> bool:
        return self.max_time is not None and time.perf_counter() - started > self.max_time

    def _batches(self, X: ImageData, device: torch.device, size: tuple[int, ...]) -> Iterator[torch.Tensor]:
        for images in iter_image_batches(X, self.batch_size):
            if tuple(images.shape[-2:]) != size:
                raise ValueError(
                    f"All faces must share one size; got {tuple(images.shape[-2:])} after {size}. "
                    "Align every face to the same size (e.g. 112x112)."
                )
            yield images.to(device, self._dtype())

    def _run_epochs(
        self,
        X: ImageData,
        device: torch.device,
        size: tuple[int, ...],
        started: float,
        step: Callable[[torch.Tensor], dict[str, float]],
        end_epoch: Callable[[int, float, float], None] | None = None,
    ) -> None:
        """The stopping logic of ``UAPAttack.fit`` around a per-batch ``step``.

        ``step(images)`` updates the perturbation and returns the batch record
        (with ``fooling_rate`` and ``mean_similarity`` measured before the
        update). ``end_epoch(epoch, fooling_rate, mean_similarity)`` runs after
        every epoch, a partial one cut by ``max_time`` included.
        """
        self.history_ = []
        self.n_iter_ = 0
        self.stop_reason_ = "max_epochs"
        epochs = tqdm(range(self.max_epochs), desc=f"{type(self).__name__} fit", disable=not self.verbose)
        for epoch in epochs:
            fooled, similarity_sum, seen = 0.0, 0.0, 0
            for images in self._batches(X, device, size):
                record = step(images)
                record.update(step=self.n_iter_, epoch=epoch, time=time.perf_counter() - started)
                self.history_.append(record)
                self.n_iter_ += 1
                fooled += record["fooling_rate"] * len(images)
                similarity_sum += record["mean_similarity"] * len(images)
                seen += len(images)
                if self._out_of_time(started):
                    self.stop_reason_ = "max_time"
                    break
            self.fooling_rate_ = fooled / seen
            self.n_epochs_ = epoch + 1
            epochs.set_postfix(fooling_rate=f"{self.fooling_rate_:.3f}")
            if end_epoch is not None:
                end_epoch(epoch, self.fooling_rate_, similarity_sum / seen)
            if self.stop_reason_ == "max_time":
                break
            if self.fooling_rate_ >= self.target_fooling_rate:
                self.stop_reason_ = "target_fooling_rate"
                break

    def _store(self, perturbation: torch.Tensor, started: float) -> None:
        """Set ``perturbation_`` and the attributes ``save`` writes for a global perturbation."""
        self.perturbation_ = perturbation.detach().cpu().clone()
        height, width = self.perturbation_.shape[-2:]
        self.noise_ = self.perturbation_.clone()
        self.mask_ = torch.ones(height, width)
        self.warped_mask_ = torch.ones(height, width)
        self.flow_ = torch.zeros(2, height, width)
        self.fit_time_ = time.perf_counter() - started

    def _record(self, images: torch.Tensor, perturbation: torch.Tensor, similarity: torch.Tensor) -> dict[str, float]:
        """Batch record: fooling rate, mean similarity and SSIM of ``clip(images + perturbation)``."""
        with torch.no_grad():
            adversarial = (images + perturbation.detach()).clamp(0.0, 1.0)
            return {
                "fooling_rate": (similarity.detach() < self.threshold_).float().mean().item(),
                "mean_similarity": similarity.detach().mean().item(),
                "ssim": ssim(adversarial, images).mean().item(),
            }


# --------------------------------------------------------------- random noise
class RandomNoiseUAP(_BaselineUAP):
    """Uniform random noise in ``[-epsilon, epsilon]``: the "Random" row of Table 1.

    Nothing is learned: ``fit`` draws the noise (seeded by ``random_state``),
    sets ``threshold_`` and measures the noise once on the fit data.

    Parameters
    ----------
    model : torch.nn.Module
        Face embedding model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``.
    threshold : float, optional
        Verification threshold on cosine similarity; ``None`` calibrates it
        from ``fit(..., pairs=...)`` as in :class:`~krtfuap.attack.UAPAttack`.
    epsilon : float
        l_inf budget on ``[0, 1]`` images.
    target_fooling_rate, max_epochs, max_time
        Only set ``stop_reason_``: the single measurement pass is reported as
        ``"max_time"`` when it took longer than ``max_time``, else
        ``"target_fooling_rate"`` when its fooling rate reaches the target, else
        ``"max_epochs"``.
    batch_size : int
        Batch size when ``X`` is one tensor.
    random_state : int, numpy RandomState or None
        Seeds the noise.
    device : str or torch.device, optional
        Where to measure; default: the device of the model.
    verbose : bool
        Accepted for API parity; there is no progress bar.

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)``, uniform in ``[-epsilon, epsilon]``, on the CPU.
    mask_, warped_mask_, flow_, noise_ : torch.Tensor
        Ones ``(H, W)``, ones ``(H, W)``, zeros ``(2, H, W)``, ``perturbation_``.
    threshold_ : float
    history_ : list of dict
        One record: ``step, epoch, fooling_rate, mean_similarity, ssim`` on the fit data.
    n_iter_ : int
        0 (no optimisation step).
    n_epochs_ : int
        1 (one measurement pass).
    fooling_rate_ : float
        Fooling rate of the noise on the fit data.
    stop_reason_ : str
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        target_fooling_rate: float = 0.8,
        max_epochs: int = 50,
        max_time: float | None = None,
        batch_size: int = 32,
        random_state: Any = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.epsilon = epsilon
        self.target_fooling_rate = target_fooling_rate
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def fit(self, X: ImageData, y: None = None, *, pairs: Iterable | None = None) -> "RandomNoiseUAP":
        """Draw the noise and measure it on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            ``(N, 3, H, W)`` faces in ``[0, 1]`` or a re-iterable loader of batches.
        y : None
            Ignored.
        pairs : iterable, optional
            ``(images_a, images_b, same)`` batches, used when ``threshold=None``.

        Returns
        -------
        RandomNoiseUAP
            ``self``, fitted.
        """
        started, device, size, generator = self._prepare(X)
        noise = (torch.rand(3, *size, generator=generator) * 2 - 1) * self.epsilon
        perturbation = noise.to(device)
        fooled, similarity_sum, ssim_sum, seen = 0.0, 0.0, 0.0, 0
        with _frozen(self._embedder()), torch.no_grad():
            self.threshold_ = self._calibrated_threshold(pairs)
            for images in self._batches(X, device, size):
                clean = check_embeddings(self._embedder()(images), len(images))
                record = self._record(images, perturbation, _similarity(self._embedder(), images, perturbation, clean))
                fooled += record["fooling_rate"] * len(images)
                similarity_sum += record["mean_similarity"] * len(images)
                ssim_sum += record["ssim"] * len(images)
                seen += len(images)
        self.fooling_rate_ = fooled / seen
        self.history_ = [
            {
                "step": 0,
                "epoch": 0,
                "fooling_rate": self.fooling_rate_,
                "mean_similarity": similarity_sum / seen,
                "ssim": ssim_sum / seen,
            }
        ]
        self.n_iter_, self.n_epochs_ = 0, 1
        if self._out_of_time(started):
            self.stop_reason_ = "max_time"
        elif self.fooling_rate_ >= self.target_fooling_rate:
            self.stop_reason_ = "target_fooling_rate"
        else:
            self.stop_reason_ = "max_epochs"
        self._store(noise, started)
        return self


# -------------------------------------------------------------------- DeepFool
class DeepFoolUAP(_BaselineUAP):
    """Universal perturbation of Moosavi-Dezfooli et al. (CVPR 2017), adapted to verification.

    The original algorithm visits the images one by one and, for each image
    the current ``v`` does not fool, adds the minimal DeepFool step that fools
    it, then projects ``v`` onto the l_inf ball. Here a face is fooled when
    ``cos(F(x + v), F(x)) < threshold_``, so the DeepFool step crosses that
    threshold (see :func:`deepfool_steps`, which linearises the chordal
    distance of the normalised embeddings instead of the similarity itself).

    Batched variant: the steps ``r_i`` of all not-yet-fooled faces of a batch
    are computed at the same ``v`` and **summed**, ``v <- clip(v + sum_i r_i,
    -epsilon, epsilon)``. The sum is the sequential accumulation of the
    original within a batch, except that each step is linearised at the
    batch's starting ``v`` instead of after the previous face's step (the
    projection is applied once per batch). ``batch_size=1`` gives the
    original sequential algorithm. ``v`` starts at zero.

    Parameters
    ----------
    model : torch.nn.Module
        Face embedding model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``,
        used in eval mode (faces must not interact inside a batch).
    threshold : float, optional
        Verification threshold; ``None`` calibrates it from ``fit(..., pairs=...)``.
    epsilon : float
        l_inf budget on ``[0, 1]`` images.
    overshoot : float
        Margin aimed below the threshold, in cosine-similarity units, ``>= 0``.
    max_inner : int
        Maximum DeepFool linearisation steps per batch, ``>= 1``.
    target_fooling_rate, max_epochs, max_time
        Stopping rules of :class:`~krtfuap.attack.UAPAttack` (one step = one batch).
    batch_size : int
        Batch size when ``X`` is one tensor.
    random_state : int, numpy RandomState or None
        Seeds the tiny starting noise of each DeepFool step (``v`` itself
        starts at zero).
    device : str or torch.device, optional
        Where to fit; default: the device of the model.
    verbose : bool
        Show a tqdm progress bar.

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)`` in ``[-epsilon, epsilon]``, on the CPU.
    mask_, warped_mask_, flow_, noise_ : torch.Tensor
        Ones, ones, zeros and ``perturbation_`` (a global perturbation).
    threshold_ : float
    history_ : list of dict
        Per batch: ``step, epoch, fooling_rate, mean_similarity, ssim``
        (before the update) and ``n_updated`` (faces that contributed a step).
    n_iter_, n_epochs_, fooling_rate_, stop_reason_
        As in :class:`~krtfuap.attack.UAPAttack`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        overshoot: float = 0.02,
        max_inner: int = 10,
        target_fooling_rate: float = 0.8,
        max_epochs: int = 50,
        max_time: float | None = None,
        batch_size: int = 32,
        random_state: Any = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.epsilon = epsilon
        self.overshoot = overshoot
        self.max_inner = max_inner
        self.target_fooling_rate = target_fooling_rate
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _check_params(self) -> None:
        super()._check_params()
        if self.overshoot < 0:
            raise ValueError(f"overshoot must be >= 0 (a margin below the threshold), got {self.overshoot}.")
        if self.max_inner < 1:
            raise ValueError(f"max_inner must be >= 1, got {self.max_inner}.")

    def fit(self, X: ImageData, y: None = None, *, pairs: Iterable | None = None) -> "DeepFoolUAP":
        """Learn the perturbation on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            ``(N, 3, H, W)`` faces in ``[0, 1]`` or a re-iterable loader of batches.
        y : None
            Ignored.
        pairs : iterable, optional
            ``(images_a, images_b, same)`` batches, used when ``threshold=None``.

        Returns
        -------
        DeepFoolUAP
            ``self``, fitted.
        """
        started, device, size, generator = self._prepare(X)
        perturbation = torch.zeros(3, *size, device=device)

        def step(images: torch.Tensor) -> dict[str, float]:
            nonlocal perturbation
            with torch.no_grad():
                clean = check_embeddings(self._embedder()(images), len(images))
                similarity = _similarity(self._embedder(), images, perturbation, clean)
            record = self._record(images, perturbation, similarity)
            todo = similarity >= self.threshold_
            record["n_updated"] = int(todo.sum())
            if todo.any():
                steps = deepfool_steps(
                    self._embedder(), images[todo], clean[todo], perturbation, self.threshold_,
                    overshoot=self.overshoot, max_inner=self.max_inner, generator=generator,
                )
                perturbation = (perturbation + steps.sum(dim=0)).clamp(-self.epsilon, self.epsilon)
            return record

        with _frozen(self._embedder()):
            self.threshold_ = self._calibrated_threshold(pairs)
            self._run_epochs(X, device, size, started, step)
        self._store(perturbation, started)
        return self


# ---------------------------------------------------------------------- FG-UAP
class FGUAP(_BaselineUAP):
    """Feature-level cosine UAP with best-epoch selection, after FG-UAP (Ye et al., CVPR 2023).

    FG-UAP minimises the cosine similarity between the features of clean and
    perturbed images. Adapted to face verification, the features are the face
    embeddings: a global (unmasked) perturbation ``v`` is optimised with Adam
    on ``mean_i cos(F(clip(x_i + v)), F(x_i))`` over every face of the batch,
    clipped to ``[-epsilon, epsilon]`` after each step. As in FG-UAP, the
    perturbation kept is the best one seen at the end of an epoch, not the
    last one.

    Parameters
    ----------
    model : torch.nn.Module
        Face embedding model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``.
    threshold : float, optional
        Verification threshold; ``None`` calibrates it from ``fit(..., pairs=...)``.
    epsilon : float
        l_inf budget on ``[0, 1]`` images.
    lr : float
        Adam learning rate (same default as :class:`~krtfuap.attack.UAPAttack`).
    target_fooling_rate, max_epochs, max_time
        Stopping rules of :class:`~krtfuap.attack.UAPAttack`, judged on the fit
        data's running fooling rate (whatever ``validation`` is).
    batch_size : int
        Batch size when ``X`` (and ``validation``) is one tensor.
    random_state : int, numpy RandomState or None
        Seeds the initial noise, uniform in ``[-epsilon, epsilon]``.
    device : str or torch.device, optional
        Where to fit; default: the device of the model.
    verbose : bool
        Show a tqdm progress bar.

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)`` in ``[-epsilon, epsilon]``: the best end-of-epoch perturbation.
    mask_, warped_mask_, flow_, noise_ : torch.Tensor
        Ones, ones, zeros and ``perturbation_`` (a global perturbation).
    threshold_ : float
    history_ : list of dict
        Per step: ``step, epoch, loss, fooling_rate, mean_similarity, ssim``
        (batch values before the update).
    epoch_scores_ : list of dict
        Per epoch: ``epoch, fooling_rate, mean_similarity`` of the selection score.
    best_epoch_ : int
        The epoch whose end-of-epoch perturbation is ``perturbation_``.
    n_iter_, n_epochs_, stop_reason_
        As in :class:`~krtfuap.attack.UAPAttack`.
    fooling_rate_ : float
        Running fooling rate over the last epoch of the fit data (as in
        ``UAPAttack``; it need not be the best epoch's).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        lr: float = 0.01,
        target_fooling_rate: float = 0.8,
        max_epochs: int = 50,
        max_time: float | None = None,
        batch_size: int = 32,
        random_state: Any = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.epsilon = epsilon
        self.lr = lr
        self.target_fooling_rate = target_fooling_rate
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _check_params(self) -> None:
        super()._check_params()
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")

    @torch.no_grad()
    def _score(
        self, validation: ImageData, perturbation: torch.Tensor, device: torch.device, size: tuple[int, ...]
    ) -> tuple[float, float]:
        """Fooling rate and mean similarity of ``perturbation`` on ``validation``."""
        similarities = []
        for images in self._batches(validation, device, size):
            clean = check_embeddings(self._embedder()(images), len(images))
            similarities.append(_similarity(self._embedder(), images, perturbation, clean))
        similarity = torch.cat(similarities)
        return (similarity < self.threshold_).float().mean().item(), similarity.mean().item()

    def fit(
        self, X: ImageData, y: None = None, *, pairs: Iterable | None = None, validation: ImageData | None = None
    ) -> "FGUAP":
        """Learn the perturbation on faces ``X``, keeping the best epoch.

        Parameters
        ----------
        X : torch.Tensor or iterable
            ``(N, 3, H, W)`` faces in ``[0, 1]`` or a re-iterable loader of batches.
        y : None
            Ignored.
        pairs : iterable, optional
            ``(images_a, images_b, same)`` batches, used when ``threshold=None``.
        validation : torch.Tensor or iterable, optional
            Faces that score each end-of-epoch perturbation (fooling rate, ties
            broken by lower mean similarity; the earliest epoch wins exact
            ties). ``None`` scores an epoch by the running fooling rate and mean
            similarity of the fit data during that epoch: a free proxy that
            measures the perturbations before each step of the epoch, not the
            end-of-epoch one.

        Returns
        -------
        FGUAP
            ``self``, fitted.
        """
        started, device, size, generator = self._prepare(X)
        initial = (torch.rand(3, *size, generator=generator) * 2 - 1) * self.epsilon
        perturbation = initial.to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([perturbation], lr=self.lr)
        best = _BestPerturbation()
        self.epoch_scores_ = []

        def step(images: torch.Tensor) -> dict[str, float]:
            with torch.no_grad():
                clean = check_embeddings(self._embedder()(images), len(images))
            similarity = _similarity(self._embedder(), images, perturbation, clean)
            loss = similarity.mean()
            record = self._record(images, perturbation, similarity)
            record["loss"] = loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                perturbation.clamp_(-self.epsilon, self.epsilon)
            return record

        def end_epoch(epoch: int, fooling_rate: float, mean_similarity: float) -> None:
            if validation is not None:
                fooling_rate, mean_similarity = self._score(validation, perturbation.detach(), device, size)
            self.epoch_scores_.append(
                {"epoch": epoch, "fooling_rate": fooling_rate, "mean_similarity": mean_similarity}
            )
            best.offer((fooling_rate, -mean_similarity), perturbation, epoch)

        with _frozen(self._embedder()):
            self.threshold_ = self._calibrated_threshold(pairs)
            self._run_epochs(X, device, size, started, step, end_epoch)
        self.best_epoch_ = best.epoch
        self._store(best.perturbation, started)
        return self


# ------------------------------------------------------------------- frequency
class _DCTPerturbation(nn.Module):
    """``v = s * idct2(b * theta)`` with ``theta`` in ``[-1, 1]`` on a low-frequency band.

    ``theta`` has shape ``(3, kh, kw)`` (the lowest ``kh`` x ``kw`` DCT
    frequencies; the others are zero), ``b`` is the coefficient bound and
    ``s = min(1, epsilon / max|idct2(b * theta)|)`` rescales the spatial
    perturbation into the l_inf ball without leaving the band (clipping would
    add high frequencies).
    """

    def __init__(
        self, size: tuple[int, ...], band: tuple[int, int], bound: float, epsilon: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        height, width = size
        rows, columns = band
        self.register_buffer("basis_h", dct_matrix(height)[:rows])
        self.register_buffer("basis_w", dct_matrix(width)[:columns])
        self.theta = nn.Parameter(torch.rand(3, rows, columns, generator=generator) * 2 - 1)
        self.bound = bound
        self.epsilon = epsilon

    def forward(self) -> torch.Tensor:
        spatial = self.basis_h.T @ (self.theta * self.bound) @ self.basis_w
        scale = (self.epsilon / spatial.abs().amax().clamp_min(1e-12)).clamp(max=1.0)
        return spatial * scale

    @torch.no_grad()
    def project_(self) -> None:
        self.theta.clamp_(-1.0, 1.0)


class FrequencyUAP(_BaselineUAP):
    """Low-frequency DCT universal perturbation in the spirit of FTGAP (Deng and Karam).

    A re-implementation from the FTGAP paper's idea, as no public code exists:
    the perturbation is parameterised by orthonormal 2-D DCT coefficients
    (:func:`dct2`, written with ``(H, H)`` and ``(W, W)`` DCT-II matrices), only
    the lowest ``ceil(keep_fraction * H)`` x ``ceil(keep_fraction * W)``
    frequencies are non-zero, and each coefficient is bounded in the frequency
    domain, ``|c| <= coefficient_bound``. The inverse DCT maps it back to
    pixels, where it is brought into the l_inf budget ``epsilon`` by a uniform
    rescaling (``v * min(1, epsilon / max|v|)``) rather than by clipping, so
    the result stays band-limited. The coefficients are optimised with Adam on
    :func:`krtfuap.losses.direction_loss` over every face of the batch.
    FTGAP's perceptual (JND) weighting of the frequencies and its block DCT are
    not reproduced.

    Parameters
    ----------
    model : torch.nn.Module
        Face embedding model, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, D)``.
    threshold : float, optional
        Verification threshold; ``None`` calibrates it from ``fit(..., pairs=...)``.
    epsilon : float
        Spatial l_inf budget on ``[0, 1]`` images.
    keep_fraction : float
        Share of the frequencies kept along each axis, in ``(0, 1]``.
    coefficient_bound : float, optional
        Bound on each DCT coefficient's absolute value. ``None`` uses
        ``epsilon * sqrt(H * W / (kh * kw))``: with every kept coefficient at
        the bound, the perturbation has the l2 energy of a ``+-epsilon``
        image (Parseval), independently of the image size.
    lr : float
        Adam learning rate on the normalised coefficients ``c / coefficient_bound``,
        which live in ``[-1, 1]``.
    target_fooling_rate, max_epochs, max_time
        Stopping rules of :class:`~krtfuap.attack.UAPAttack`.
    batch_size : int
        Batch size when ``X`` is one tensor.
    random_state : int, numpy RandomState or None
        Seeds the initial coefficients, uniform in ``[-bound, bound]``.
    device : str or torch.device, optional
        Where to fit; default: the device of the model.
    verbose : bool
        Show a tqdm progress bar.

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)`` in ``[-epsilon, epsilon]`` with no DCT energy outside the
        kept band (up to float rounding).
    mask_, warped_mask_, flow_, noise_ : torch.Tensor
        Ones, ones, zeros and ``perturbation_`` (a global perturbation).
    band_shape_ : tuple of int
        ``(kh, kw)``, the kept low-frequency block.
    coefficient_bound_ : float
        The bound used.
    threshold_ : float
    history_ : list of dict
        Per step: ``step, epoch, loss, fooling_rate, mean_similarity, ssim``
        (batch values before the update).
    n_iter_, n_epochs_, fooling_rate_, stop_reason_
        As in :class:`~krtfuap.attack.UAPAttack`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        keep_fraction: float = 0.25,
        coefficient_bound: float | None = None,
        lr: float = 0.05,
        target_fooling_rate: float = 0.8,
        max_epochs: int = 50,
        max_time: float | None = None,
        batch_size: int = 32,
        random_state: Any = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.model = model
        self.threshold = threshold
        self.epsilon = epsilon
        self.keep_fraction = keep_fraction
        self.coefficient_bound = coefficient_bound
        self.lr = lr
        self.target_fooling_rate = target_fooling_rate
        self.max_epochs = max_epochs
        self.max_time = max_time
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _check_params(self) -> None:
        super()._check_params()
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(
                f"keep_fraction must be in (0, 1] (share of frequencies per axis), got {self.keep_fraction}."
            )
        if self.coefficient_bound is not None and self.coefficient_bound <= 0:
            raise ValueError(f"coefficient_bound must be > 0 or None (automatic), got {self.coefficient_bound}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")

    def fit(self, X: ImageData, y: None = None, *, pairs: Iterable | None = None) -> "FrequencyUAP":
        """Learn the low-frequency perturbation on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            ``(N, 3, H, W)`` faces in ``[0, 1]`` or a re-iterable loader of batches.
        y : None
            Ignored.
        pairs : iterable, optional
            ``(images_a, images_b, same)`` batches, used when ``threshold=None``.

        Returns
        -------
        FrequencyUAP
            ``self``, fitted.
        """
        started, device, size, generator = self._prepare(X)
        height, width = size
        band = (math.ceil(self.keep_fraction * height), math.ceil(self.keep_fraction * width))
        bound = self.coefficient_bound
        if bound is None:
            bound = self.epsilon * math.sqrt(height * width / (band[0] * band[1]))
        self.band_shape_, self.coefficient_bound_ = band, float(bound)
        perturbation = _DCTPerturbation(size, band, float(bound), self.epsilon, generator).to(device)
        optimizer = torch.optim.Adam(perturbation.parameters(), lr=self.lr)

        def step(images: torch.Tensor) -> dict[str, float]:
            with torch.no_grad():
                clean = check_embeddings(self._embedder()(images), len(images))
            current = perturbation()
            adversarial = (images + current).clamp(0.0, 1.0)
            embeddings = check_embeddings(self._embedder()(adversarial), len(images))
            loss = direction_loss(embeddings, clean)
            record = self._record(images, current, cosine_similarity(embeddings, clean))
            record["loss"] = loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            perturbation.project_()
            return record

        with _frozen(self._embedder()):
            self.threshold_ = self._calibrated_threshold(pairs)
            self._run_epochs(X, device, size, started, step)
        with torch.no_grad():
            self._store(perturbation(), started)
        return self
