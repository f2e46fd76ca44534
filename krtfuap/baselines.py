"""Baseline universal perturbations for the comparison of the paper's Table 1.

Four baselines share the public surface of every estimator
(:class:`krtfuap.estimator.PerturbationEstimator`: ``fit`` / ``transform`` /
``evaluate`` / ``save`` / ``load``) and the fit loop of
:class:`krtfuap.UAPAttack` (:class:`krtfuap.engine.FitLoop`), so they have the
same budget (an l_inf ball of radius ``epsilon`` on ``[0, 1]`` images), the same
fooling criterion (``cos(F(x + v), F(x)) < threshold_``), the same honest
stopping rules (the perturbation is scored on the fit data after every epoch;
``target_fooling_rate``, ``max_epochs``, ``max_time``, ``max_steps``), the same
choice of the returned perturbation (the best one scored), ``shuffle``,
checkpoint/resume, distributed fitting and a progress bar; their shared
parameters are declared and documented once, in
:class:`~krtfuap.estimator.PerturbationEstimator`. Random noise learns nothing,
so it has none of the loop's parameters:

* :class:`RandomNoiseUAP`: uniform noise, nothing learned;
* :class:`DeepFoolUAP`: the universal perturbation algorithm of
  Moosavi-Dezfooli et al. (CVPR 2017) with a DeepFool step adapted to
  verification (cross the cosine threshold instead of a class boundary);
* :class:`FGUAP`: a feature-level cosine attack with Adam in the spirit of
  FG-UAP (Ye et al., CVPR 2023), keeping the best epoch's perturbation;
* :class:`FrequencyUAP`: a low-frequency DCT-parameterised perturbation in the
  spirit of FTGAP (Deng and Karam); a re-implementation from the paper's
  description, as no public code exists.

``fit`` sets the attributes that ``save`` writes (``mask_`` and
``warped_mask_`` are all ones, ``flow_`` is zero, ``noise_`` equals
``perturbation_``). Load a file with the class that saved it
(``DeepFoolUAP.load(path, model)``).
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from krtfuap._ops import call_model
from krtfuap._validation import Interval, check_embeddings, store_params
from krtfuap.distributed import average_gradients, broadcast_module_, broadcast_tensor_, sum_over_ranks_
from krtfuap.engine import Solver
from krtfuap.estimator import COMMON_CONSTRAINTS, PerturbationEstimator
from krtfuap.losses import direction_loss
from krtfuap.metrics import cosine_similarity, fooled_by_similarity, ssim

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


# ------------------------------------------------------------------- DeepFool step
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
        in training mode), ``(B, 3, H, W)`` -> ``(B, D)``, in any floating
        dtype (the batch is cast to it, :func:`krtfuap._ops.call_model`).
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
        embeddings = check_embeddings(call_model(model, adversarial), len(images))
        with torch.no_grad():
            active = ~fooled_by_similarity(cosine_similarity(embeddings, clean), threshold).to(images.device)
        if not active.any():
            break
        moved |= active
        distance = (F.normalize(embeddings, dim=1) - clean_direction).norm(dim=1)
        (gradient,) = torch.autograd.grad(distance.sum(), steps)
        squared_norm = gradient.flatten(1).pow(2).sum(dim=1).clamp_min(1e-20)
        scale = (target - distance.detach()) / squared_norm * active
        steps = steps.detach() + scale.view(-1, 1, 1, 1) * gradient
    return steps.detach() * moved.view(-1, 1, 1, 1)


# --------------------------------------------------------------------- solvers
def _batch_record(images: torch.Tensor, perturbation: torch.Tensor, similarity: torch.Tensor, threshold: float) -> dict[str, float]:
    """Fooling rate, mean similarity and SSIM of one batch under ``perturbation`` (before the update)."""
    with torch.no_grad():
        adversarial = (images + perturbation.detach()).clamp(0.0, 1.0)
        return {
            "fooling_rate": fooled_by_similarity(similarity.detach(), threshold).float().mean().item(),
            "mean_similarity": similarity.detach().mean().item(),
            "ssim": ssim(adversarial.float(), images.float()).mean().item(),
        }


class _TensorSolver(Solver):
    """A perturbation held as one tensor ``(3, H, W)``, with an optional Adam optimiser."""

    def __init__(self, perturbation: torch.Tensor, lr: float | None = None) -> None:
        self.tensor = perturbation.requires_grad_(lr is not None)
        self.optimizer = torch.optim.Adam([self.tensor], lr=lr) if lr is not None else None

    def perturbation(self) -> torch.Tensor:
        return self.tensor.detach()

    def state_dict(self) -> dict[str, Any]:
        state = {"perturbation": self.tensor.detach().clone()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.tensor.copy_(state["perturbation"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def broadcast_(self) -> None:
        broadcast_tensor_(self.tensor)


class _FixedNoiseSolver(_TensorSolver):
    """Random noise: nothing to learn, the loop only scores it."""

    learns = False


class _DeepFoolSolver(_TensorSolver):
    """Sums the DeepFool steps of a batch's unfooled faces into ``v`` and projects."""

    def __init__(self, size, device, *, embed, threshold, epsilon, overshoot, max_inner, generator) -> None:
        super().__init__(torch.zeros(3, *size, device=device))
        self.embed, self.threshold, self.epsilon = embed, threshold, epsilon
        self.overshoot, self.max_inner, self.generator = overshoot, max_inner, generator

    def step(self, images: torch.Tensor, clean_embeddings: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            similarity = cosine_similarity(self.embed((images + self.tensor).clamp(0.0, 1.0)), clean_embeddings)
        record = _batch_record(images, self.tensor, similarity, self.threshold)
        todo = ~fooled_by_similarity(similarity, self.threshold).to(similarity.device)
        record["n_updated"] = int(todo.sum())
        update = torch.zeros_like(self.tensor)
        if todo.any():
            steps = deepfool_steps(
                self.embed, images[todo], clean_embeddings[todo], self.tensor, self.threshold,
                overshoot=self.overshoot, max_inner=self.max_inner, generator=self.generator,
            )
            update = steps.sum(dim=0)
        sum_over_ranks_(update)  # the global batch's steps, when distributed
        with torch.no_grad():
            self.tensor.copy_((self.tensor + update).clamp(-self.epsilon, self.epsilon))
        return record


class _CosineAdamSolver(_TensorSolver):
    """FG-UAP's update: Adam on the mean cosine similarity of every face, clip to the budget."""

    def __init__(self, initial: torch.Tensor, *, embed, threshold, epsilon, lr) -> None:
        super().__init__(initial, lr=lr)
        self.embed, self.threshold, self.epsilon = embed, threshold, epsilon

    def step(self, images: torch.Tensor, clean_embeddings: torch.Tensor) -> dict[str, float]:
        similarity = cosine_similarity(self.embed((images + self.tensor).clamp(0.0, 1.0)), clean_embeddings)
        loss = similarity.mean()
        record = _batch_record(images, self.tensor, similarity, self.threshold)
        record["loss"] = loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients([self.tensor])
        self.optimizer.step()
        with torch.no_grad():
            self.tensor.clamp_(-self.epsilon, self.epsilon)
        return record


class _DCTPerturbation(nn.Module):
    """Low-frequency DCT perturbation: ``theta * bound`` in the kept band, inverse DCT, rescaled into the budget."""

    def __init__(
        self, size: tuple[int, int], band: tuple[int, int], bound: float, epsilon: float, generator: torch.Generator
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


class _FrequencySolver(Solver):
    """Adam on the DCT coefficients with the direction loss over every face."""

    def __init__(self, module: _DCTPerturbation, *, embed, threshold, lr) -> None:
        self.module, self.embed, self.threshold = module, embed, threshold
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr)

    def step(self, images: torch.Tensor, clean_embeddings: torch.Tensor) -> dict[str, float]:
        current = self.module()
        embeddings = self.embed((images + current).clamp(0.0, 1.0))
        loss = direction_loss(embeddings, clean_embeddings)
        record = _batch_record(images, current, cosine_similarity(embeddings, clean_embeddings), self.threshold)
        record["loss"] = loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.module.parameters())
        self.optimizer.step()
        self.module.project_()
        return record

    @torch.no_grad()
    def perturbation(self) -> torch.Tensor:
        return self.module().detach()

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

    def broadcast_(self) -> None:
        broadcast_module_(self.module)


# --------------------------------------------------------------- random noise
class RandomNoiseUAP(PerturbationEstimator):
    """Uniform random noise in ``[-epsilon, epsilon]``: the "Random" row of Table 1.

    Nothing is learned: ``fit`` draws the noise (seeded by ``random_state``),
    sets ``threshold_`` and scores the noise once on the fit data, so it has
    no stopping rules, shuffling or checkpoints.

    Parameters
    ----------
    [[model]]
    [[threshold]]
    [[epsilon]]
    [[batch_size]]
    [[random_state]]
    [[device]]
    [[amp]]
    [[channels_last]]
    [[num_threads]]
    [[verbose]]

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)``, uniform in ``[-epsilon, epsilon]``, on the CPU.
    n_iter_, n_epochs_ : int
        0 and 1 (one scoring pass, no step).
    stop_reason_ : str
        ``"not_learned"``.
    history_ : list
        Empty (no step); the score is ``epoch_scores_[0]``.
    Others as in :class:`krtfuap.estimator.PerturbationEstimator`.
    """

    _parameter_constraints: ClassVar[dict[str, list]] = dict(COMMON_CONSTRAINTS)

    def __init__(
        self,
        model: nn.Module,
        *,
        threshold: float | None = None,
        epsilon: float = 0.08,
        batch_size: int = 32,
        random_state: Any = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        channels_last: bool = False,
        num_threads: int | None = None,
        verbose: bool = False,
    ) -> None:
        store_params(self, locals())

    def _restarts(self) -> int:
        """One draw: noise has nothing to restart."""
        return 1

    def _score_size(self) -> None:
        """All faces score the draw (there is no epoch to score cheaply)."""
        return None

    def _loop_settings(self) -> dict[str, Any]:
        """One scoring pass and nothing else (the loop does not step a solver that does not learn)."""
        return {"max_epochs": 1, "max_time": None, "max_steps": None, "target_fooling_rate": 1.0, "shuffle": False,
                "checkpoint_path": None, "checkpoint_every": 1}

    @classmethod
    def _params_from_format_1(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Format 1 had ``target_fooling_rate``, ``max_epochs`` and ``max_time``, which only named a stop reason."""
        return {name: value for name, value in params.items()
                if name not in ("target_fooling_rate", "max_epochs", "max_time")}

    def _make_solver(self, data, device, generator, embed, threshold):
        noise = (torch.rand(3, *data.size, generator=generator) * 2 - 1) * float(self.epsilon)
        return _FixedNoiseSolver(noise.to(device)), {}


# -------------------------------------------------------------------- DeepFool
class DeepFoolUAP(PerturbationEstimator):
    """Universal perturbation of Moosavi-Dezfooli et al. (CVPR 2017), adapted to verification.

    The original algorithm visits the images one by one and, for each image
    the current ``v`` does not fool, adds the minimal DeepFool step that fools
    it, then projects ``v`` onto the l_inf ball. Here a face is fooled when
    ``cos(F(x + v), F(x)) < threshold_``, so the DeepFool step crosses that
    threshold (see :func:`deepfool_steps`, which linearises the chordal
    distance of the normalised embeddings instead of the similarity itself).

    Batched variant: the steps ``r_i`` of all not-yet-fooled faces of a batch
    are computed at the same ``v`` and **summed**, ``v <- clip(v + sum_i r_i,
    -epsilon, epsilon)`` (over the global batch when fitting distributed).
    ``batch_size=1`` gives the original sequential algorithm. ``v`` starts at
    zero; ``random_state`` seeds the tiny starting noise of each DeepFool step
    (and the order of shuffled epochs). The face model is used in eval mode
    (faces must not interact inside a batch).

    Parameters
    ----------
    [[model]]
    [[threshold]]
    [[epsilon]]
    overshoot : float
        Margin aimed below the threshold, in cosine-similarity units, ``>= 0``.
    max_inner : int
        Maximum DeepFool linearisation steps per batch, ``>= 1``.
    [[stopping]]
    [[fitting]]

    Attributes
    ----------
    history_ : list of dict
        Per batch, besides the shared keys, ``n_updated`` (faces that contributed a step).
    Others as in :class:`krtfuap.estimator.PerturbationEstimator`.
    """

    _takes_member_thresholds: ClassVar[bool] = False  # its update judges the mean similarity only
    _parameter_constraints: ClassVar[dict[str, list]] = {
        **PerturbationEstimator._parameter_constraints,
        "overshoot": [Interval(float, 0, None, hint=" (a margin below the threshold)")],
        "max_inner": [Interval(int, 1)],
    }

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
        max_steps: int | None = None,
        score_size: int | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        random_state: Any = None,
        n_init: int = 1,
        device: str | torch.device | None = None,
        amp: bool = False,
        channels_last: bool = False,
        num_threads: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        verbose: bool = False,
    ) -> None:
        store_params(self, locals())

    def _make_solver(self, data, device, generator, embed, threshold):
        solver = _DeepFoolSolver(
            data.size, device, embed=embed, threshold=threshold, epsilon=float(self.epsilon),
            overshoot=float(self.overshoot), max_inner=int(self.max_inner), generator=generator,
        )
        return solver, {}


# ---------------------------------------------------------------------- FG-UAP
class FGUAP(PerturbationEstimator):
    """Feature-level cosine UAP with best-epoch selection, after FG-UAP (Ye et al., CVPR 2023).

    FG-UAP minimises the cosine similarity between the features of clean and
    perturbed images. Adapted to face verification, the features are the face
    embeddings: a global (unmasked) perturbation ``v`` is optimised with Adam
    on ``mean_i cos(F(clip(x_i + v)), F(x_i))`` over every face of the batch,
    clipped to ``[-epsilon, epsilon]`` after each step. As in FG-UAP, the
    perturbation kept is the best one scored at the end of an epoch (as for
    every estimator here; pass ``fit(X, validation=faces)`` to score on
    other faces). ``random_state`` seeds the initial noise, uniform in
    ``[-epsilon, epsilon]`` (and the order of shuffled epochs).

    Parameters
    ----------
    [[model]]
    [[threshold]]
    [[epsilon]]
    lr : float
        Adam learning rate, ``> 0``.
    [[stopping]]
    [[fitting]]

    Attributes
    ----------
    history_ : list of dict
        Per step, besides the shared keys, ``loss`` (the mean similarity the step minimised).
    Others as in :class:`krtfuap.estimator.PerturbationEstimator`.
    """

    _takes_member_thresholds: ClassVar[bool] = False  # its update judges the mean similarity only
    _parameter_constraints: ClassVar[dict[str, list]] = {
        **PerturbationEstimator._parameter_constraints,
        "lr": [Interval(float, 0, None, closed="neither")],
    }

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
        max_steps: int | None = None,
        score_size: int | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        random_state: Any = None,
        n_init: int = 1,
        device: str | torch.device | None = None,
        amp: bool = False,
        channels_last: bool = False,
        num_threads: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        verbose: bool = False,
    ) -> None:
        store_params(self, locals())

    def _make_solver(self, data, device, generator, embed, threshold):
        epsilon = float(self.epsilon)
        initial = ((torch.rand(3, *data.size, generator=generator) * 2 - 1) * epsilon).to(device)
        return _CosineAdamSolver(initial, embed=embed, threshold=threshold, epsilon=epsilon, lr=float(self.lr)), {}


# ------------------------------------------------------------------- frequency
class FrequencyUAP(PerturbationEstimator):
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
    not reproduced. ``random_state`` seeds the initial coefficients, uniform
    in ``[-bound, bound]`` (and the order of shuffled epochs).

    Parameters
    ----------
    [[model]]
    [[threshold]]
    [[epsilon]]
    keep_fraction : float
        Share of the frequencies kept along each axis, in ``(0, 1]``.
    coefficient_bound : float, optional
        Bound on each DCT coefficient's absolute value, ``> 0``. ``None`` uses
        ``epsilon * sqrt(H * W / (kh * kw))``: with every kept coefficient at
        the bound, the perturbation has the l2 energy of a ``+-epsilon``
        image (Parseval), independently of the image size.
    lr : float
        Adam learning rate on the normalised coefficients ``c / coefficient_bound``,
        which live in ``[-1, 1]``, ``> 0``.
    [[stopping]]
    [[fitting]]

    Attributes
    ----------
    band_shape_ : tuple of int
        ``(kh, kw)``, the kept low-frequency block.
    coefficient_bound_ : float
        The bound used.
    history_ : list of dict
        Per step, besides the shared keys, ``loss`` (the direction loss of the step).
    Others as in :class:`krtfuap.estimator.PerturbationEstimator`.
    """

    _takes_member_thresholds: ClassVar[bool] = False  # its update judges the mean similarity only
    _parameter_constraints: ClassVar[dict[str, list]] = {
        **PerturbationEstimator._parameter_constraints,
        "keep_fraction": [Interval(float, 0, 1, closed="right", hint=" (share of frequencies per axis)")],
        "coefficient_bound": [Interval(float, 0, None, closed="neither"), None],
        "lr": [Interval(float, 0, None, closed="neither")],
    }

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
        max_steps: int | None = None,
        score_size: int | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        random_state: Any = None,
        n_init: int = 1,
        device: str | torch.device | None = None,
        amp: bool = False,
        channels_last: bool = False,
        num_threads: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        verbose: bool = False,
    ) -> None:
        store_params(self, locals())

    def _band(self, size: tuple[int, int]) -> tuple[tuple[int, int], float]:
        """The kept block ``(kh, kw)`` and the coefficient bound for images of ``size``."""
        height, width = size
        band = (math.ceil(self.keep_fraction * height), math.ceil(self.keep_fraction * width))
        bound = self.coefficient_bound
        if bound is None:
            bound = self.epsilon * math.sqrt(height * width / (band[0] * band[1]))
        return band, float(bound)

    def _make_solver(self, data, device, generator, embed, threshold):
        band, bound = self._band(data.size)
        module = _DCTPerturbation(data.size, band, bound, float(self.epsilon), generator).to(device)
        solver = _FrequencySolver(module, embed=embed, threshold=threshold, lr=float(self.lr))
        return solver, {"band_shape_": band, "coefficient_bound_": bound}
