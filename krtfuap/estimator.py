"""``PerturbationEstimator``: the public surface every universal-perturbation estimator shares.

``UAPAttack`` and the baselines of :mod:`krtfuap.baselines` subclass it and
add only their own parameters and a :class:`krtfuap.engine.Solver` (their
update rule). Everything else lives here once:

* the parameters they share, declared once: their constraints
  (:data:`COMMON_CONSTRAINTS` for every estimator, :data:`FIT_LOOP_CONSTRAINTS`
  for those that learn, in the style of scikit-learn's
  ``_parameter_constraints``) and their documentation
  (:data:`PARAMETER_DOCS`, put into each subclass's docstring where it writes
  ``[[name]]``);
* the scikit-learn contract: ``get_params`` / ``set_params`` (which checks
  what it sets) / ``clone`` (which shares the face model, never copies it),
  learned attributes ending in ``_``;
* :meth:`~PerturbationEstimator.fit`: every parameter checked before any model
  call, the data checked and batched once (:class:`krtfuap._batches.FitData`),
  threshold calibration, the shared :class:`krtfuap.engine.FitLoop`, and restarts from several
  seeds (``n_init``), the best kept;
* :meth:`~PerturbationEstimator.transform`, :meth:`~PerturbationEstimator.evaluate`
  (through :mod:`krtfuap.scoring`), :meth:`~PerturbationEstimator.save` /
  :meth:`~PerturbationEstimator.load` (every parameter, a format and the library version).

Learned attributes are replaced only when a fit completes: a fit that fails
or is interrupted leaves the previous fitted state whole.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from krtfuap import __version__
from krtfuap._batches import FitData, ImageData
from krtfuap._files import replace_atomically
from krtfuap._ops import call_model
from krtfuap._validation import (
    Boolean,
    DeviceLike,
    FaceModelLike,
    InstanceOf,
    Interval,
    Options,
    PathLike,
    RandomStateLike,
    SequenceOf,
    check_embeddings,
    check_images,
    check_param,
    check_params,
)
from krtfuap.distributed import is_main_process
from krtfuap.engine import FitLoop, FitResult, Solver, frozen, in_memory_format, selection_key
from krtfuap.metrics import calibrate_threshold, member_count, pair_similarities
from krtfuap.models.ensemble import EnsembleEmbedder, MemberwiseEmbedder
from krtfuap.scoring import score_perturbation
from krtfuap.ssim_scaling import scale_to_ssim
from krtfuap.threads import torch_threads

__all__ = [
    "PerturbationEstimator",
    "NotSaved",
    "COMMON_CONSTRAINTS",
    "FIT_LOOP_CONSTRAINTS",
    "PARAMETER_DOCS",
    "PARAMETER_GROUPS",
    "fill_parameter_docs",
]

_FORMAT = "krtfuap.UAPAttack/2"
_FORMATS_READ = ("krtfuap.UAPAttack/1", _FORMAT)
_SAVED_TENSORS = ("perturbation_", "mask_", "warped_mask_", "flow_", "noise_")
_SAVED_FITTED = (
    "threshold_", "n_iter_", "n_epochs_", "fooling_rate_", "ssim_", "stop_reason_", "fit_time_", "best_epoch_",
    "init_scores_", "best_init_",
)
#: What ``init_scores_`` records of each restart, besides its ``random_state`` (learned attributes without the ``_``).
_INIT_SCORE_KEYS = ("fooling_rate", "ssim", "n_iter", "stop_reason")
#: Parameters about the machine that fitted, not about the perturbation: a saved file records them and
#: ``load`` sets them to ``None``, so a loaded attack runs where it is loaded.
_MACHINE_LOCAL = ("checkpoint_path", "device", "num_threads")
#: Parameters that may change between an interrupted fit and its resumption.
_NOT_FINGERPRINTED = ("max_epochs", "max_time", "max_steps", "target_fooling_rate", "checkpoint_path", "checkpoint_every",
                      "verbose", "device", "num_threads", "n_init")

#: A verification threshold: a cosine similarity.
_COSINE_THRESHOLD = Interval(float, -1, 1, hint=" (a cosine similarity)")
#: A verification threshold, or one per model of an ensemble.
_THRESHOLDS = [_COSINE_THRESHOLD, SequenceOf(_COSINE_THRESHOLD, description="a list of those (one per model)")]

#: Parameters of every estimator (scikit-learn ``_parameter_constraints`` style: name -> accepted kinds).
COMMON_CONSTRAINTS: dict[str, list] = {
    "model": [FaceModelLike()],
    "threshold": [*_THRESHOLDS, None],
    "epsilon": [Interval(float, 0, 1, closed="right", hint=" (images are in [0, 1])")],
    "batch_size": [Interval(int, 1)],
    "random_state": [RandomStateLike(), None],
    "device": [DeviceLike(), None],
    "amp": [Boolean()],
    "channels_last": [Boolean()],
    "num_threads": [Interval(int, 1), None],
    "verbose": [Boolean()],
}

#: Fit faces that score each epoch under ``score_size="auto"`` (a tensor ``X``, no ``validation``).
AUTO_SCORE_SIZE = 300

#: Parameters of every estimator that learns its perturbation in :class:`krtfuap.engine.FitLoop`.
FIT_LOOP_CONSTRAINTS: dict[str, list] = {
    "target_fooling_rate": [Interval(float, 0, 1)],
    "max_epochs": [Interval(int, 1)],
    "max_time": [Interval(float, 0, None, hint=" (seconds)"), None],
    "max_steps": [Interval(int, 1), None],
    "score_size": [Interval(int, 1), Options("auto"), None],
    "n_init": [Interval(int, 1)],
    "shuffle": [Boolean()],
    "checkpoint_path": [PathLike(), None],
    "checkpoint_every": [Interval(int, 1)],
}

#: Documentation of the shared parameters, NumPy style; a subclass docstring line ``[[name]]`` becomes the entry.
PARAMETER_DOCS: dict[str, str] = {
    "model": """\
model : torch.nn.Module or list of torch.nn.Module
    Face embedding model: ``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``(B, D)``.
    Put any other input convention inside the model (see
    :class:`krtfuap.models.FaceEmbedder`). Only its output is used; its
    weights, training flags and ``requires_grad`` are left as they were, and
    :func:`sklearn.base.clone` shares it (never copies it). A list fits one
    perturbation against an ensemble: with one threshold, judged on the mean
    of the members' cosine similarities
    (:class:`krtfuap.models.ensemble.EnsembleEmbedder`); with one threshold
    per model, each member on its own (see ``threshold``).""",
    "threshold": """\
threshold : float, list of float or None
    Verification threshold ``t`` on cosine similarity, in ``[-1, 1]``: a face
    is fooled when ``cos(F(x + v), F(x)) < t``. ``None`` calibrates it in
    ``fit`` from the ``pairs`` given there (best accuracy on
    genuine/impostor pairs; for a list of models, one threshold on their
    mean similarity). With a list of models, a list (or tuple) of thresholds,
    one per model in the same order, judges each member on its own: a face
    is fooled only when every member's similarity is below its own threshold
    (the fooling rate, the stopping rule, ``evaluate``). ``UAPAttack`` and
    ``RandomNoiseUAP`` take it; the other baselines take one threshold.""",
    "epsilon": """\
epsilon : float
    l_inf budget of the perturbation on ``[0, 1]`` images, in ``(0, 1]`` (paper: 0.08).""",
    "batch_size": """\
batch_size : int
    Faces per step and per scoring batch when ``X`` is one tensor (per process
    when fitting distributed: the global batch is ``batch_size * world_size``);
    a loader's batches are used as it yields them.""",
    "random_state": """\
random_state : int, numpy RandomState or None
    Seeds every random draw of the fit (the starting perturbation, the order of
    shuffled epochs, random transforms); an int makes ``fit`` repeatable on the CPU.""",
    "n_init": """\
n_init : int
    Fits from different seeds (all drawn from ``random_state``), the best one kept, as
    scikit-learn's ``KMeans(n_init=...)``: best by the same rule that picks the returned
    perturbation within a fit (the stealth target met first, then the highest fooling rate on
    the fit or ``validation`` faces). ``max_time`` is the whole fit's: each restart gets
    ``max_time / n_init``; ``max_steps`` and ``max_epochs`` hold for each restart. With
    ``checkpoint_path="fit.ckpt"`` restart ``k`` checkpoints to ``fit.init<k>.ckpt`` and
    ``fit(X, resume=True)`` resumes each restart from its own file.""",
    "device": """\
device : str or torch.device, optional
    Where to fit and evaluate, e.g. ``"cpu"`` or ``"cuda"`` (refused when that
    hardware is absent); ``None``: the device of the model's parameters.""",
    "amp": """\
amp : bool
    Run the face model's forward passes in :func:`torch.autocast` with
    bfloat16 during ``fit``; CUDA with bfloat16 only (``ValueError`` elsewhere).""",
    "channels_last": """\
channels_last : bool
    Pass the model's weights and the image batches in the
    ``torch.channels_last`` memory format during ``fit`` (the weights are
    put back in their layout afterwards). On the 2-core CPU it shortened an
    epoch of steps by 11-23 % (``benchmarks/RESULTS.md`` 9k); a model that
    cannot take that layout gets an error at the start of ``fit`` naming
    ``channels_last=False``.""",
    "num_threads": """\
num_threads : int, optional
    torch's intra-op CPU threads while ``fit`` and ``evaluate`` run
    (:func:`torch.set_num_threads`, restored afterwards); ``None`` leaves
    torch's setting as it is.""",
    "verbose": """\
verbose : bool
    Show a tqdm progress bar (on rank 0 only when distributed).""",
    "target_fooling_rate": """\
target_fooling_rate : float
    Stop once the fooling rate of the perturbation, scored after an epoch on
    the fit faces (or the ``validation`` faces), reaches this, in ``[0, 1]``
    (and ``target_ssim`` is met, where the estimator has one).""",
    "max_epochs": """\
max_epochs : int
    Hard stop on passes over the data. Resuming a checkpoint that has done as
    many ends the fit at once (its perturbation, ``stop_reason_ == "max_epochs"``).""",
    "max_time": """\
max_time : float, optional
    Hard stop on the loop's wall time in seconds (threshold calibration and
    mask fitting not counted), checked after every step; the perturbation is
    then scored once more.""",
    "max_steps": """\
max_steps : int, optional
    Stop after this many update steps in all (the epoch in progress is
    scored). Unlike ``max_time`` it does not depend on the machine, so a fit
    limited by it repeats exactly on the CPU.""",
    "score_size": """\
score_size : int, optional
    Score each epoch's perturbation (the stop check, the choice of the
    returned perturbation, ``fooling_rate_`` and ``ssim_``) on this many fit
    faces, drawn once from ``random_state``, instead of on all of them (at
    least as many as ``X`` holds: all). Scoring is one forward pass per face
    and epoch, about a quarter of a fit's time on a CPU (``UAPAttack`` at
    ``batch_size=10``, ``benchmarks/RESULTS.md`` 9k); with a time limit a few
    hundred faces leave most of it to steps, at the cost of a noisier score.
    Every restart of ``n_init`` scores on the same faces. ``X`` must be a
    tensor (for a loader pass ``fit(X, validation=...)``). ``"auto"``:
    :data:`AUTO_SCORE_SIZE` (300) faces when ``X`` is a tensor and no
    ``validation`` is given, else all. ``None``: all.""",
    "shuffle": """\
shuffle : bool
    Visit the faces in a new random order every epoch, drawn from
    ``random_state`` (saved in checkpoints): the faces of a tensor; a
    ``DataLoader`` over a map-style ``Dataset`` is rebuilt every epoch with a
    permuted sampler (it still streams; its own shuffling is replaced); a list
    of batches in a new order of its batches. Data that cannot be reordered
    without holding it (an iterable-style dataset, a custom sampler) is
    refused. ``False`` keeps the order given. For ``UAPAttack`` on 1232 faces
    of ``w600k_mbf`` (600 s, one core) shuffling reached held-out fooling rate
    0.7 in 496 steps instead of 744 (``benchmarks/RESULTS.md``, section 0f).""",
    "checkpoint_path": """\
checkpoint_path : path-like, optional
    Write the fit state there every ``checkpoint_every`` epochs, atomically.
    ``fit(X, resume=True)`` continues from it (refused, naming the
    difference, when the parameters or data differ, or when the file's
    fields are damaged); on CPU the result equals an uninterrupted fit.""",
    "checkpoint_every": """\
checkpoint_every : int
    Epochs between checkpoints, ``>= 1``.""",
}

#: Shared parameters documented together, in this order, by one line ``[[group]]``.
PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
    "stopping": ("target_fooling_rate", "max_epochs", "max_time", "max_steps", "score_size"),
    "fitting": ("batch_size", "shuffle", "random_state", "n_init", "device", "amp", "channels_last", "num_threads",
                "checkpoint_path", "checkpoint_every", "verbose"),
}

_PLACEHOLDER = re.compile(r"^(?P<indent>[ ]*)\[\[(?P<name>\w+)\]\][ ]*$", re.MULTILINE)


def fill_parameter_docs(doc: str | None) -> str | None:
    """``doc`` with every line ``[[name]]`` replaced by ``PARAMETER_DOCS[name]`` (``[[group]]``: the entries of
    ``PARAMETER_GROUPS[group]``), at that line's indentation."""
    if doc is None:
        return None

    def entries(match: re.Match) -> str:
        names = PARAMETER_GROUPS.get(match.group("name"), (match.group("name"),))
        lines = [line for name in names for line in PARAMETER_DOCS[name].splitlines()]
        return "\n".join(match.group("indent") + line if line else line for line in lines)

    return _PLACEHOLDER.sub(entries, doc)


@dataclasses.dataclass(frozen=True)
class NotSaved:
    """What :meth:`PerturbationEstimator.load` puts in a parameter whose value a file cannot hold.

    A face model, a callable, a tensor or a landmark masker cannot travel in a
    ``.safetensors`` file; the file records a description of it instead, and
    the loaded attack holds this in its place, so ``get_params`` tells what
    the fit used. ``fit`` refuses it: set the parameter again with
    ``set_params`` first.

    Attributes
    ----------
    description : str
        What the parameter held, e.g. ``"the callable mymodule.my_loss"``.
    """

    description: str


def _description(value: object) -> str:
    """A short readable account of a parameter value that a file cannot hold."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, nn.Module):
        return f"a {type(value).__module__}.{type(value).__qualname__} module"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={_description(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({fields})"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of [{', '.join(_description(item) for item in value)}]"
    if isinstance(value, np.random.RandomState):
        return "a numpy RandomState"
    if isinstance(value, BaseEstimator) or not callable(value):
        return repr(value)
    return f"the callable {getattr(value, '__module__', None)}.{getattr(value, '__qualname__', type(value).__name__)}"


def _json_param(value: object) -> object:
    """A parameter as a file holds it: JSON values as they are (numpy scalars as Python ones, a list or
    tuple of them as a list), paths and devices as strings, a dataclass of such values as
    ``{"type", "fields"}``, anything else as ``{"not_saved": description}``."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    plain = (bool, int, float, str, np.generic)
    if isinstance(value, (list, tuple)) and all(isinstance(item, plain) for item in value):
        return [_json_param(item) for item in value]
    if isinstance(value, (os.PathLike, torch.device)):
        return str(os.fspath(value)) if isinstance(value, os.PathLike) else str(value)
    if isinstance(value, NotSaved):
        return {"not_saved": value.description}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _json_param(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if not any(isinstance(field, dict) for field in fields.values()):
            return {"type": type(value).__name__, "fields": fields}
    return {"not_saved": _description(value)}


class PerturbationEstimator(TransformerMixin, BaseEstimator):
    """Base of every estimator that learns one universal perturbation ``v`` of shape ``(3, H, W)``.

    Subclasses define ``__init__`` (storing their keyword arguments), their
    ``_parameter_constraints`` (``{**PerturbationEstimator._parameter_constraints,
    ...}`` plus their own) and :meth:`_make_solver`. In their docstring a line
    ``[[name]]`` documents a shared parameter (:data:`PARAMETER_DOCS`), ``[[stopping]]``
    and ``[[fitting]]`` a group of them (:data:`PARAMETER_GROUPS`).

    Parameters
    ----------
    [[model]]
    [[threshold]]
    [[epsilon]]
    [[stopping]]
    [[fitting]]

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)`` in ``[-epsilon, epsilon]``, on the CPU: the best
        perturbation scored during the fit (see :func:`krtfuap.engine.selection_key`).
    mask_, warped_mask_, flow_, noise_ : torch.Tensor
        The key-region mask ``(H, W)``, the warped mask ``(H, W)``, the flow
        ``(2, H, W)`` and the noise ``(3, H, W)`` behind ``perturbation_``
        (ones, ones, zeros and ``perturbation_`` for a global perturbation).
    threshold_ : float or tuple of float
        The verification threshold used (one per model when ``threshold`` gave one per model).
    fooling_rate_, ssim_ : float
        Fooling rate and mean SSIM of ``perturbation_`` on the fit data (or
        the ``validation`` faces), measured without gradient after the
        updates: ``evaluate(X_fit)`` gives the same numbers (with ``amp=False``).
    best_epoch_ : int
        The epoch after which ``perturbation_`` was scored.
    history_ : list of dict
        One record per step, for every estimator with at least the keys
        ``step`` (0-based, counted over the whole fit), ``epoch``, ``time``
        (seconds of the loop so far), ``fooling_rate``, ``mean_similarity``
        and ``ssim`` (of the step's batch under the perturbation before the
        update; :data:`krtfuap.engine.STEP_RECORD_KEYS`); each estimator
        documents the values it adds.
    epoch_scores_ : list of dict
        The score of the perturbation after every epoch (``fooling_rate``,
        ``mean_similarity``, ``ssim``, ``psnr``, ``n_images``, ``epoch``,
        ``step``, ``time``).
    n_iter_, n_epochs_ : int
        Steps and passes over the data.
    stop_reason_ : str
        Why the fit ended (:data:`krtfuap.engine.STOP_REASONS`):
        ``"target_fooling_rate"``, ``"max_epochs"``, ``"max_time"``,
        ``"max_steps"``, or ``"not_learned"`` (:class:`~krtfuap.baselines.RandomNoiseUAP`).
    fit_time_ : float
        Seconds of the whole fit (threshold calibration and mask fitting included).
    init_scores_ : list of dict
        One entry per restart (``n_init``; one for a single fit): ``random_state`` (the seed
        that refits that restart alone, with ``n_init=1``), ``fooling_rate``, ``ssim``, ``n_iter``
        and ``stop_reason`` of its returned perturbation. :meth:`save` keeps it (a seed given
        as a generator comes back from :meth:`load` as a :class:`NotSaved`); a file saved
        before the restarts were kept loads without it.
    best_init_ : int
        The restart whose perturbation (and every other learned attribute) was kept.
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {**COMMON_CONSTRAINTS, **FIT_LOOP_CONSTRAINTS}
    #: Whether the update rule judges each model of a list on its own threshold (``threshold`` a list);
    #: the fit loop, scoring and persistence always can.
    _takes_member_thresholds: ClassVar[bool] = True
    #: Parameters added after format 2 that change nothing in a fit saved before they existed (e.g. one
    #: that acts only with values older files cannot hold): ``load`` gives them today's default silently.
    _silent_defaults: ClassVar[tuple[str, ...]] = ("n_init", "score_size")
    #: Parameters added after format 2 whose default is not what a fit before them did: ``load`` gives a
    #: file without one this value (the behaviour its fit had), silently.
    _values_before: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = fill_parameter_docs(cls.__doc__)

    # ---------------------------------------------------------- sklearn API
    def __sklearn_clone__(self) -> "PerturbationEstimator":
        """An unfitted copy with the same parameters, sharing the face model (never copying its weights)."""
        params = self.get_params(deep=False)
        model = params.pop("model")
        return type(self)(model=model, **{name: clone(value, safe=False) for name, value in params.items()})

    def set_params(self, **params: Any) -> "PerturbationEstimator":
        """Set parameters, each checked first (as ``fit`` checks them); nothing changes when one is refused.

        Rules between parameters (e.g. ``target_ssim`` needs a stealth loss) are checked by ``fit``.
        """
        check_params(params, self._parameter_constraints)
        return super().set_params(**params)

    # ---------------------------------------------------------------- checks
    def _validate_params(self) -> None:
        """Refuse, before any model call, a parameter of the wrong kind or value, naming it and the fix."""
        params = self.get_params(deep=False)
        missing = {name: value.description for name, value in params.items() if isinstance(value, NotSaved)}
        if missing:
            held = "; ".join(f"{name} was {description}" for name, description in missing.items())
            raise ValueError(
                f"{', '.join(missing)} could not be kept in the file this attack was loaded from ({held}); set "
                f"{'it' if len(missing) == 1 else 'them'} again with "
                f"set_params({', '.join(f'{name}=...' for name in missing)}) before fitting."
            )
        check_params(params, self._parameter_constraints)
        self._check_params_together()

    def _check_params_together(self) -> None:
        """Rules that involve several parameters (after each one is checked alone)."""
        if member_count(self.threshold) is not None and not self._takes_member_thresholds:
            raise ValueError(
                f"threshold gives one value per model, but {type(self).__name__} takes one threshold (judged on "
                "the ensemble's mean similarity); pass threshold=t, or fit UAPAttack to judge each model on its own."
            )
        _check_one_threshold_per_model(self.model, self.threshold, "threshold")
        if self.amp and not (self._device().type == "cuda" and torch.cuda.is_bf16_supported()):
            raise ValueError(
                f"amp=True needs a CUDA GPU with bfloat16 support (compute capability >= 8.0); fitting on "
                f"{self._device()} instead. Set amp=False."
            )

    # --------------------------------------------------------------- the model
    def _embedder(self, threshold: float | tuple[float, ...] | None = None) -> nn.Module:
        """The face model as fit and scoring call it: one model as it is; a list of models one
        :class:`~krtfuap.models.ensemble.EnsembleEmbedder` (the mean similarity), or a
        :class:`~krtfuap.models.ensemble.MemberwiseEmbedder` when ``threshold`` gives one value per model."""
        if not isinstance(self.model, (list, tuple)):
            return self.model
        if member_count(threshold) is None:
            return EnsembleEmbedder(self.model)
        return MemberwiseEmbedder(self.model)

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return next((p.device for p in self._embedder().parameters()), torch.device("cpu"))

    def _embed_function(self, model: nn.Module):
        """The model call used while fitting: ``(B, 3, H, W)`` float32 -> ``(B, D)`` float32 (with ``amp``,
        ``channels_last``).

        The batch is cast to the model's own dtype on the way in (:func:`krtfuap._ops.call_model`), so a
        bfloat16 or float16 model fits a float32 perturbation.
        """
        amp, channels_last = self.amp, self.channels_last

        def embed(images: torch.Tensor) -> torch.Tensor:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
                embeddings = call_model(model, images)
            embeddings = check_embeddings(embeddings, len(images))
            if images.requires_grad and torch.is_grad_enabled() and not embeddings.requires_grad:
                raise ValueError(
                    "The model's output does not depend differentiably on its input (it detaches, leaves "
                    "PyTorch, e.g. through numpy, or runs under no_grad inside forward), so no perturbation "
                    "can be learned from it. Use a differentiable PyTorch model, or RandomNoiseUAP."
                )
            return embeddings.float()

        return embed

    def _calibrated_threshold(self, pairs: Iterable | None) -> tuple[float | tuple[float, ...], float | None]:
        """``(threshold, accuracy on the pairs or None)``; one threshold per model as a tuple."""
        if member_count(self.threshold) is not None:
            return tuple(float(value) for value in self.threshold), None
        if self.threshold is not None:
            return float(self.threshold), None
        if pairs is None:
            raise ValueError(
                "threshold=None needs verification pairs to calibrate it: call fit(X, pairs=loader) with "
                "batches of (images_a, images_b, same), or set threshold=t (the model's verification "
                "threshold on cosine similarity)."
            )
        similarities, same = pair_similarities(self._embedder(), pairs)
        return calibrate_threshold(similarities, same)

    # ------------------------------------------------------------ to override
    def _make_solver(
        self, data: FitData, device: torch.device, generator: torch.Generator, embed,
        threshold: float | tuple[float, ...],
    ) -> tuple[Solver, dict[str, Any]]:
        """Build the update rule for faces of size ``data.size``; return it and extra learned attributes to
        set (e.g. ``mask_``). ``threshold`` is a tuple, one per model, when ``embed`` is a
        :class:`~krtfuap.models.ensemble.MemberwiseEmbedder`'s.

        Tensors among those attributes are fixed inputs of the fit and enter the checkpoint fingerprint.
        """
        raise NotImplementedError

    def _stealth_target(self) -> float | None:
        """The SSIM the returned perturbation must keep (selection and stop), or ``None`` (no target)."""
        return None

    def _restarts(self) -> int:
        """How many fits from different seeds ``fit`` runs (``n_init``)."""
        return int(self.n_init)

    def _score_size(self) -> int | Literal["auto"] | None:
        """How many fit faces score each epoch (``score_size``); ``None``: all."""
        return self.score_size if self.score_size in (None, "auto") else int(self.score_size)

    def _loop_settings(self) -> dict[str, Any]:
        """Keywords of :class:`~krtfuap.engine.FitLoop` from the fit-loop parameters (:data:`FIT_LOOP_CONSTRAINTS`)."""
        return {
            "max_epochs": int(self.max_epochs),
            "max_time": None if self.max_time is None else float(self.max_time),
            "max_steps": None if self.max_steps is None else int(self.max_steps),
            "target_fooling_rate": float(self.target_fooling_rate),
            "shuffle": bool(self.shuffle),
            "checkpoint_path": self.checkpoint_path,
            "checkpoint_every": int(self.checkpoint_every),
        }

    # ------------------------------------------------------------------- fit
    def fit(
        self,
        X: ImageData,
        y: None = None,
        *,
        pairs: Iterable | None = None,
        validation: ImageData | None = None,
        resume: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> "PerturbationEstimator":
        """Learn the universal perturbation on faces ``X``.

        Every parameter is checked first, then the data (once), all before the
        face model is called.

        Parameters
        ----------
        X : torch.Tensor or iterable
            Aligned faces: a ``(N, 3, H, W)`` tensor in ``[0, 1]`` RGB, or a
            re-iterable loader of such batches (or of tuples whose first item is
            the batch), such as a ``DataLoader``, read as a stream.
        y : None
            Ignored (scikit-learn API).
        pairs : iterable, optional
            Batches ``(images_a, images_b, same)`` of verification pairs, used
            only when ``threshold=None`` to calibrate ``threshold_``.
        validation : torch.Tensor or iterable, optional
            Faces that score the perturbation after every epoch (for the stop
            check, the choice of the returned perturbation and
            ``fooling_rate_``) instead of ``X``.
        resume : bool
            Continue from ``checkpoint_path`` when that file exists; refused
            with the difference named when it was written with other
            parameters or data, or holds damaged fields.
        on_epoch : callable, optional
            Called after every scored epoch with a dict ``epoch``, ``step``,
            ``time``, ``score`` (as ``epoch_scores_``) and ``perturbation`` (a
            CPU copy), e.g. to log a held-out curve (with ``n_init > 1`` also
            ``init``, the restart's index); its run time is not counted in
            ``max_time``.

        Returns
        -------
        self
            Fitted. Learned attributes change only when the fit completes.
        """
        self._validate_params()
        check_param("resume", resume, [Boolean()])
        settings = self._loop_settings()
        checkpoint_path = settings["checkpoint_path"]
        if resume and checkpoint_path is None:
            raise ValueError(
                "fit(resume=True) needs a checkpoint to resume from; set checkpoint_path= to the file the "
                "interrupted fit wrote (or call fit without resume=True)."
            )
        if checkpoint_path is not None:
            _check_writable(checkpoint_path, "checkpoint_path")
        try:
            if self._restarts() > 1:
                return self._fit_restarts(X, pairs=pairs, validation=validation, resume=resume, on_epoch=on_epoch)
            return self._fit_once(X, pairs=pairs, validation=validation, resume=resume, on_epoch=on_epoch)
        except KeyboardInterrupt:
            if checkpoint_path is not None:
                hint = f"continue with fit(X, resume=True) from {os.fspath(checkpoint_path)}"
            else:
                hint = "set checkpoint_path= to be able to resume an interrupted fit"
            print(f"{type(self).__name__}.fit interrupted; the previous fitted state is unchanged; {hint}.",
                  file=sys.stderr)
            raise

    def _fit_once(
        self, X: ImageData, *, pairs: Iterable | None, validation: ImageData | None, resume: bool,
        on_epoch: Callable[[dict[str, Any]], None] | None,
    ) -> "PerturbationEstimator":
        """One fit from ``random_state``: :meth:`fit` after its checks, without its Ctrl-C message."""
        settings = self._loop_settings()
        checkpoint_path = settings["checkpoint_path"]
        fit_started = time.perf_counter()
        data = FitData(X, self.batch_size, shuffle=settings["shuffle"])
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        validation = self._scoring_faces(X, validation, seed)
        checked_validation = None
        if validation is not None:
            checked_validation = FitData(validation, self.batch_size, name="validation", size=data.size)
        generator = torch.Generator().manual_seed(seed)
        device = self._device()
        model = self._embedder(self.threshold)
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        with torch_threads(self.num_threads), frozen(model):
            threshold, accuracy = self._calibrated_threshold(pairs)
            embed = self._embed_function(model)
            solver, learned = self._make_solver(data, device, generator, embed, threshold)
            with in_memory_format(model, torch.channels_last if self.channels_last else None):
                if self.channels_last:
                    _check_channels_last(model, data.size, device)
                loop = FitLoop(
                    embed=embed, threshold=threshold, device=device, target_ssim=self._stealth_target(),
                    memory_format=memory_format, generator=generator,
                    fingerprint=self._fingerprint(data, threshold, learned) if checkpoint_path is not None else {},
                    description=f"{type(self).__name__} fit", verbose=self.verbose, **settings,
                )
                result = loop.run(data, solver, validation=checked_validation, resume=resume, on_epoch=on_epoch)
        self._set_fitted(result, learned, threshold, accuracy, solver, time.perf_counter() - fit_started)
        return self

    def _scoring_faces(self, X: ImageData, validation: ImageData | None, seed: int) -> ImageData | None:
        """The faces that score each epoch: ``validation``, or under ``score_size`` that many rows of tensor
        ``X`` drawn with ``seed`` (by a generator of their own, so the fit's other draws do not move), or
        ``None`` (all of ``X``)."""
        score_size = self._score_size()
        if score_size == "auto":
            if validation is not None or not isinstance(X, torch.Tensor):
                return validation
            score_size = AUTO_SCORE_SIZE
        if score_size is None:
            return validation
        if validation is not None:
            raise ValueError(
                "score_size and fit(validation=...) both choose the faces that score each epoch; pass one of "
                "them (score_size=None to score on the validation faces)."
            )
        if not isinstance(X, torch.Tensor):
            raise ValueError(
                f"score_size={score_size} draws its faces from a (N, 3, H, W) tensor X; X is a "
                f"{type(X).__name__}. Pass the scoring faces as fit(X, validation=...), or set score_size=None."
            )
        if score_size >= len(X):
            return None
        rows = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:score_size]
        return X[rows.sort().values.to(X.device)]

    def _fit_restarts(
        self, X: ImageData, *, pairs: Iterable | None, validation: ImageData | None, resume: bool,
        on_epoch: Callable[[dict[str, Any]], None] | None,
    ) -> "PerturbationEstimator":
        """``n_init`` fits from seeds drawn from ``random_state``, each with ``max_time / n_init``; keep the best.

        A threshold calibrated on ``pairs`` by the first restart is given to the others (``pairs`` may be
        read once). Each restart checkpoints to its own file (:func:`_restart_checkpoint_path`) and resumes
        from it; a restart that had ended resumes at its limit at once, or within one epoch (a limit of
        time or steps stops a fit inside an epoch, after its last checkpoint). ``on_epoch`` events carry
        the restart's index as ``init``.
        """
        started = time.perf_counter()
        n_init = self._restarts()
        random_state = check_random_state(self.random_state)
        seeds = [int(random_state.randint(2**31 - 1)) for _ in range(n_init)]
        max_time = None if self.max_time is None else float(self.max_time) / n_init
        validation = self._scoring_faces(X, validation, seeds[0])  # every restart scores on the same faces
        restarts: list[PerturbationEstimator] = []
        threshold = self.threshold
        for index, seed in enumerate(seeds):
            checkpoint_path = self.checkpoint_path
            if checkpoint_path is not None:
                checkpoint_path = _restart_checkpoint_path(checkpoint_path, index)
            restart = clone(self).set_params(n_init=1, random_state=seed, max_time=max_time, threshold=threshold,
                                             checkpoint_path=checkpoint_path, score_size=None)
            hook = None if on_epoch is None else functools.partial(_tagged_event, on_epoch, index)
            restarts.append(restart._fit_once(X, pairs=pairs if threshold is None else None, validation=validation,
                                              resume=resume, on_epoch=hook))
            threshold = restart.threshold_  # calibrated once, by the first restart
        target = self._stealth_target()
        keys = [selection_key(_returned_score(restart), target) for restart in restarts]
        best_init = max(range(n_init), key=keys.__getitem__)
        state = {name: value for name, value in vars(restarts[best_init]).items()
                 if name.endswith("_") and not name.startswith("_")}
        if "threshold_accuracy_" in vars(restarts[0]):
            state["threshold_accuracy_"] = restarts[0].threshold_accuracy_
        state.update(
            init_scores_=[_init_score(seed, vars(restart)) for seed, restart in zip(seeds, restarts)],
            best_init_=best_init,
            fit_time_=time.perf_counter() - started,
        )
        for name, value in state.items():
            setattr(self, name, value)
        return self

    def _fingerprint(
        self, data: FitData, threshold: float | tuple[float, ...], learned: dict[str, Any]
    ) -> dict[str, Any]:
        """What determines the result of a fit: parameters, threshold, and one digest of the data, the tensor
        parameters (e.g. a tensor ``init``) and the fixed inputs."""
        values = self.get_params(deep=False)
        params = {
            name: _json_param(value) for name, value in values.items()
            if name not in _NOT_FINGERPRINTED and name != "model"
        }
        count, data_digest = data.digest()
        digest = hashlib.sha256(data_digest.encode())
        tensors = {name: value for name, value in {**values, **learned}.items() if isinstance(value, torch.Tensor)}
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].detach().float().cpu().numpy().round(6).tobytes())
        rounded = round(threshold, 9) if member_count(threshold) is None else [round(value, 9) for value in threshold]
        return {**params, "threshold_": rounded, "n_faces": count, "data_digest": digest.hexdigest()[:16]}

    def _set_fitted(
        self, result: FitResult, learned: dict[str, torch.Tensor], threshold: float | tuple[float, ...],
        accuracy: float | None, solver: Solver, fit_time: float,
    ) -> None:
        """Set every learned attribute at once, from a completed fit."""
        snapshot = dict(result.snapshot)
        perturbation = snapshot["perturbation_"]
        height, width = perturbation.shape[-2:]
        defaults = {
            "noise_": perturbation.clone(),
            "mask_": torch.ones(height, width),
            "warped_mask_": torch.ones(height, width),
            "flow_": torch.zeros(2, height, width),
        }
        state = {**defaults, **learned, **snapshot}
        state.update(
            threshold_=threshold,
            fooling_rate_=result.score["fooling_rate"],
            ssim_=result.score["ssim"],
            best_epoch_=result.best_epoch,
            history_=result.history,
            epoch_scores_=result.epoch_scores,
            n_iter_=result.n_iter,
            n_epochs_=result.n_epochs,
            stop_reason_=result.stop_reason,
            fit_time_=fit_time,
            best_init_=0,
            **solver.fitted_attributes(),
        )
        state["init_scores_"] = [_init_score(self.random_state, state)]
        if accuracy is not None:
            state["threshold_accuracy_"] = accuracy
        for name, value in state.items():
            setattr(self, name, value)

    # ------------------------------------------------------------- applying
    def transform(self, X: torch.Tensor, *, per_face_ssim: float | None = None) -> torch.Tensor:
        """Add the learned perturbation: ``clip(X + perturbation_, 0, 1)``.

        Parameters
        ----------
        X : torch.Tensor
            ``(B, 3, H, W)`` RGB in ``[0, 1]``, the size the perturbation was fitted on.
        per_face_ssim : float, optional
            In ``(0, 1)``: scale the perturbation for each face to the largest scale whose SSIM
            is still ``>= per_face_ssim`` (:func:`krtfuap.ssim_scaling.scale_to_ssim`, within the
            perturbation's own l_inf bound), so that no face falls below that stealth and faces
            whose texture hides the change take more of it. Default: the same change for every face.

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
        check_param("per_face_ssim", per_face_ssim, _PER_FACE_SSIM)
        perturbation = self.perturbation_.to(device=X.device, dtype=X.dtype)
        if per_face_ssim is not None:
            return scale_to_ssim(X, perturbation, per_face_ssim)[0]
        return (X + perturbation).clamp(0.0, 1.0)

    def evaluate(self, X: ImageData, *, per_face_ssim: float | None = None) -> dict[str, float]:
        """Fooling rate, mean similarity, SSIM and PSNR of the perturbation on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            Faces as in :meth:`fit`; judge on identities not used for fitting.
        per_face_ssim : float, optional
            Judge the perturbation as :meth:`transform` applies it with this ``per_face_ssim``.

        Returns
        -------
        dict
            ``fooling_rate`` (share with ``cos(F(x + v), F(x)) < threshold_``; with one
            threshold per model, every model below its own),
            ``mean_similarity``, ``ssim`` and ``psnr`` (means over faces; SSIM
            as scikit-image computes it) and ``n_images``
            (:func:`krtfuap.scoring.score_perturbation`).
        """
        check_is_fitted(self, "perturbation_")
        if self.model is None:
            raise ValueError(
                f"evaluate needs the face model: load the attack with {type(self).__name__}.load(path, model) "
                "or set attack.model = model first."
            )
        check_params({"model": self.model, "device": self.device, "num_threads": self.num_threads},
                     self._parameter_constraints)
        check_param("per_face_ssim", per_face_ssim, _PER_FACE_SSIM)
        _check_one_threshold_per_model(self.model, self.threshold_, "threshold_")
        model = self._embedder(self.threshold_)
        with torch_threads(self.num_threads), frozen(model):
            return score_perturbation(
                model, X, self.perturbation_, self.threshold_, batch_size=self.batch_size, device=self._device(),
                per_face_ssim=per_face_ssim,
            )

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, *, compact: bool = False) -> None:
        """Write the fitted perturbation to a ``.safetensors`` file (no pickle).

        Tensors (``perturbation_``, ``mask_``, ``warped_mask_``, ``flow_``,
        ``noise_``) go in the tensor section. The metadata holds the format
        (``krtfuap.UAPAttack/2``), the library version (``krtfuap_version``),
        the class, **every** parameter (values a file cannot hold, such as the
        model, a callable or a tensor, as a description: :class:`NotSaved`
        after :meth:`load`), the fit's summary (``threshold_``, ``fooling_rate_``,
        ``ssim_``, ``n_iter_``, ``stop_reason_``, ``init_scores_``, ...) and ``history_``. The file is
        written next to ``path`` and renamed into place, so a failed save
        leaves an existing file at ``path`` unchanged. When fitting
        distributed, only rank 0 writes.

        Parameters
        ----------
        path : path-like
            The file to write.
        compact : bool
            Write only ``perturbation_``, in float16 (shrunk by 0.1 % so that rounding
            keeps it inside the budget), and no ``history_``: a file for applying the
            perturbation (75 KB at 112x112), not for inspecting or continuing the fit.
        """
        check_is_fitted(self, "perturbation_")
        missing = [name for name in _SAVED_TENSORS if not hasattr(self, name)]
        if missing and not compact:
            raise ValueError(
                f"This attack has no {', '.join(missing)} (it was loaded from a compact file, which keeps only "
                "perturbation_); save it with compact=True."
            )
        if not is_main_process():
            return
        params = {name: _json_param(value) for name, value in self.get_params(deep=False).items()}
        fitted = {k: getattr(self, k) for k in _SAVED_FITTED if hasattr(self, k)}
        if "init_scores_" in fitted:  # a seed the user gave as a generator is described, as a parameter is
            fitted["init_scores_"] = [{**entry, "random_state": _json_param(entry["random_state"])}
                                      for entry in fitted["init_scores_"]]
        metadata = {
            "format": _FORMAT,
            "krtfuap_version": __version__,
            "class": type(self).__name__,
            "params": json.dumps(params),
            "fitted": json.dumps(fitted),
            "history": json.dumps([] if compact else self.history_),
        }
        if compact:
            # float16 rounds by at most 2**-11 relative: the shrink keeps |v| <= epsilon.
            shrunk = self.perturbation_.detach().float() * (1.0 - 2.0**-10)
            tensors = {"perturbation_": shrunk.half().contiguous()}
        else:
            tensors = {name: getattr(self, name).detach().float().contiguous() for name in _SAVED_TENSORS}
        path = os.fspath(path)
        if os.path.isdir(path) or path.endswith(os.sep):
            raise IsADirectoryError(f"Cannot save to {path}: it is a folder; pass a file path such as attack.safetensors.")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Cannot save to {path}: the folder {folder} does not exist; create it first.")
        # Write-then-rename: a failed save leaves an existing file at path untouched.
        replace_atomically(path, lambda partial: save_file(tensors, partial, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "PerturbationEstimator":
        """Read a perturbation written by :meth:`save`.

        Every parameter comes from the file, except ``model`` (given here) and
        the settings of the machine that fitted (``device``, ``checkpoint_path``,
        ``num_threads``: recorded in the file, set to ``None`` so the attack runs
        where it is loaded). A value the file holds only as a description
        becomes a :class:`NotSaved`. A parameter the file lacks (a file of
        format 1, or of another estimator class) takes today's default, with a
        warning that names it.

        Parameters
        ----------
        path : path-like
            A file written by :meth:`save`.
        model : torch.nn.Module, optional
            The face model, needed for :meth:`evaluate` or a new :meth:`fit`
            (not for :meth:`transform`).

        Returns
        -------
        PerturbationEstimator
            A fitted estimator of class ``cls``.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No saved attack at {path}; pass the path of a .safetensors file written by {cls.__name__}.save."
            )
        fix = f"Pass a .safetensors file written by {cls.__name__}.save, or save the fitted attack again."
        with open(path, "rb") as handle:
            head = handle.read(9)
        # A safetensors file starts with an 8-byte little-endian header length, then the JSON header "{".
        looks_like_safetensors = len(head) == 9 and head[8:9] == b"{"
        if not looks_like_safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
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
        file_format = metadata.get("format")
        if file_format not in _FORMATS_READ or set(tensors) not in (set(_SAVED_TENSORS), {"perturbation_"}):
            raise ValueError(
                f"{path} is a .safetensors file but not a krtfuap attack file (format {file_format!r}, "
                f"tensors {sorted(tensors)}). {fix}"
            )
        try:
            params = json.loads(metadata["params"])
            fitted = json.loads(metadata["fitted"])
            history = json.loads(metadata["history"])
            if not (isinstance(params, dict) and isinstance(fitted, dict) and isinstance(history, list)):
                raise ValueError("params and fitted must be JSON objects, history a list")
            if file_format != _FORMAT:
                params = cls._params_from_format_1(params)
            params = {name: cls._param_from_json(name, value) for name, value in params.items()}
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{path} has damaged krtfuap metadata ({type(error).__name__}: {error}). {fix}") from error
        params = {name: value for name, value in params.items() if name not in ("model", *_MACHINE_LOCAL)}
        unknown = sorted(set(params) - set(cls._get_param_names()))
        saved_by = metadata.get("class", "another attack class")
        if unknown:
            raise ValueError(
                f"{path} was saved by {saved_by}, another attack class (it has parameters {unknown} that "
                f"{cls.__name__} does not take); load it with {saved_by}.load."
            )
        missing = [
            name for name in cls._get_param_names()
            if name not in params
            and name not in ("model", *_MACHINE_LOCAL, *cls._silent_defaults, *cls._values_before)
        ]
        if missing:
            origin = "an older krtfuap (format 1)" if file_format != _FORMAT else saved_by
            warnings.warn(
                f"{path} was written by {origin} without the parameters {missing}; the loaded "
                f"{cls.__name__} takes today's defaults for them (they may differ from what the fit used).",
                UserWarning, stacklevel=2,
            )
        attack = cls(model, **{**cls._values_before, **params})
        try:
            attack._check_loaded_params()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} holds invalid parameters ({error}). {fix}") from error
        _check_loaded_tensors(tensors, attack.epsilon, path, fix)
        fitted = {name: value for name, value in fitted.items() if name in _SAVED_FITTED}
        try:
            check_params(fitted, _FITTED_CONSTRAINTS)
            check_param("threshold_", fitted.get("threshold_"), _FITTED_CONSTRAINTS["threshold_"])
            if "init_scores_" in fitted:
                fitted["init_scores_"] = cls._init_scores_from_json(fitted["init_scores_"], fitted.get("best_init_"))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} holds invalid fitted values ({error}). {fix}") from error
        if member_count(fitted.get("threshold_")) is not None:
            fitted["threshold_"] = tuple(fitted["threshold_"])  # JSON holds the per-model thresholds as a list
        for name, value in fitted.items():
            setattr(attack, name, value)
        attack.history_ = history
        for name, tensor in tensors.items():
            setattr(attack, name, tensor.float())
        return attack

    @classmethod
    def _params_from_format_1(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters of a format-1 file in today's terms (subclasses map what was renamed or removed)."""
        return params

    @classmethod
    def _param_from_json(cls, name: str, saved: object) -> object:
        """A parameter from its saved form (:func:`_json_param`): a described value becomes
        :class:`NotSaved`, a saved dataclass the class this parameter's constraints name."""
        if not isinstance(saved, dict) or name not in cls._parameter_constraints:
            return saved  # a parameter this class does not take is named by load
        if set(saved) == {"not_saved"}:
            return NotSaved(str(saved["not_saved"]))
        kinds = [kind for constraint in cls._parameter_constraints.get(name, []) if isinstance(constraint, InstanceOf)
                 for kind in constraint.types if dataclasses.is_dataclass(kind)]
        kind = next((kind for kind in kinds if kind.__name__ == saved.get("type")), None)
        if kind is None or not isinstance(saved.get("fields"), dict):
            raise ValueError(f"parameter {name} holds {saved!r}, which {cls.__name__} cannot read")
        return kind(**saved["fields"])

    @classmethod
    def _init_scores_from_json(cls, saved: list, best_init: int | None) -> list[dict[str, Any]]:
        """``init_scores_`` as a file holds it, checked entry by entry; each seed read as the parameter
        ``random_state`` is (:meth:`_param_from_json`: a described one becomes :class:`NotSaved`)."""
        keys = {"random_state", *_INIT_SCORE_KEYS}
        if not all(isinstance(entry, dict) and set(entry) == keys for entry in saved):
            raise ValueError(f"init_scores_ must be a list of entries with the keys {sorted(keys)}")
        if best_init is not None and best_init >= len(saved):
            raise ValueError(f"best_init_={best_init} names no entry of init_scores_ ({len(saved)} entries)")
        entries = []
        for entry in saved:
            check_params({f"{name}_": entry[name] for name in _INIT_SCORE_KEYS}, _FITTED_CONSTRAINTS)
            seed = cls._param_from_json("random_state", entry["random_state"])
            if not (seed is None or isinstance(seed, (int, NotSaved))):
                raise ValueError(f"init_scores_ holds the random_state {seed!r}, which is neither a seed nor a "
                                 "description")
            entries.append({**entry, "random_state": seed})
        return entries

    def _check_loaded_params(self) -> None:
        """Check what a file gave (not the model, which a loaded attack may lack, nor the machine's settings)."""
        params = {
            name: value for name, value in self.get_params(deep=False).items()
            if name not in ("model", *_MACHINE_LOCAL) and not isinstance(value, NotSaved)
        }
        check_params(params, self._parameter_constraints)


#: What :meth:`PerturbationEstimator.load` accepts for the fit's summary.
_FITTED_CONSTRAINTS = {
    "threshold_": _THRESHOLDS,
    "fooling_rate_": [Interval(float, -1, 1), None],
    "ssim_": [Interval(float, -1, 1), None],
    "n_iter_": [Interval(int, -1), None],
    "n_epochs_": [Interval(int, -1), None],
    "best_epoch_": [Interval(int, -1), None],
    "stop_reason_": [InstanceOf(str, description="a string"), None],
    "fit_time_": [Interval(float, 0), None],
    "best_init_": [Interval(int, 0), None],
    "init_scores_": [InstanceOf(list, description="a list")],
}


#: What ``transform`` and ``evaluate`` accept as ``per_face_ssim``.
_PER_FACE_SSIM = [Interval(float, 0, 1, closed="neither", hint=" (an SSIM such as 0.95)"), None]


def _restart_checkpoint_path(checkpoint_path: str | os.PathLike, index: int) -> Path:
    """Where restart ``index`` of a fit with ``n_init > 1`` checkpoints: ``fit.ckpt`` -> ``fit.init<index>.ckpt``."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.init{index}{path.suffix}")


def _tagged_event(on_epoch: Callable[[dict[str, Any]], None], index: int, event: dict[str, Any]) -> None:
    """Pass an ``on_epoch`` event of restart ``index`` on, with ``init`` set to that index."""
    on_epoch({**event, "init": index})


def _returned_score(restart: PerturbationEstimator) -> dict[str, float]:
    """The score of a fitted restart's returned perturbation (its entry of ``epoch_scores_``)."""
    return next(score for score in restart.epoch_scores_ if score["epoch"] == restart.best_epoch_)


def _init_score(random_state: Any, fitted: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``init_scores_`` from a fit's learned attributes."""
    return {"random_state": random_state, **{name: fitted[f"{name}_"] for name in _INIT_SCORE_KEYS}}


def _check_one_threshold_per_model(model: object, threshold: object, name: str) -> None:
    """Refuse thresholds given one per model (a list) that do not match the list of models one to one."""
    count = member_count(threshold)
    if count is None:
        return
    if not isinstance(model, (list, tuple)):
        other = " (or one number as threshold=t)" if name == "threshold" else ""
        raise ValueError(
            f"{name} gives {count} thresholds, one per model, but model is a single face model; pass model as the "
            f"list of the {count} models they belong to, in the same order{other}."
        )
    if len(model) != count:
        raise ValueError(
            f"{name} gives {count} thresholds for {len(model)} models; give one cosine threshold per model, in the "
            "order of the list of models."
        )


def _check_channels_last(model: nn.Module, size: tuple[int, int], device: torch.device) -> None:
    """Pass two blank faces through ``model`` in ``torch.channels_last``; a model that cannot take that layout
    (e.g. one that calls ``.view`` on a feature map) gets an error naming the fix instead of failing mid-fit."""
    probe = torch.zeros(2, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            call_model(model, probe)
    except RuntimeError as error:
        raise ValueError(
            f"The model failed on channels_last input ({error}); fit it with channels_last=False (or make it "
            "layout-agnostic, e.g. .reshape or torch.flatten instead of .view)."
        ) from error


def _check_writable(path: str | os.PathLike, name: str) -> None:
    """Refuse, before any work, a file path that cannot be written (empty, a folder, no folder, read-only)."""
    text = os.fspath(path)
    if not text or text.endswith(os.sep) or os.path.isdir(text):
        raise ValueError(f"{name}={text!r} is not a file path; pass a file such as 'fit.ckpt'.")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}={text!r}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise PermissionError(f"{name}={text!r} cannot be written (no permission); choose a writable place.")


def _check_loaded_tensors(tensors: dict[str, torch.Tensor], epsilon: float, path: str, fix: str) -> None:
    """Shapes, dtypes, finiteness and the budget of tensors read from a file."""
    perturbation = tensors["perturbation_"]
    if perturbation.ndim != 3 or perturbation.shape[0] != 3:
        raise ValueError(f"{path} holds a damaged perturbation (shape {tuple(perturbation.shape)}, expected (3, H, W)). {fix}")
    height, width = perturbation.shape[1:]
    expected = {"perturbation_": (3, height, width), "noise_": (3, height, width), "mask_": (height, width),
                "warped_mask_": (height, width), "flow_": (2, height, width)}
    for name, shape in expected.items():
        if name not in tensors:  # a compact file holds the perturbation only
            continue
        tensor = tensors[name]
        if not tensor.is_floating_point() or tuple(tensor.shape) != shape or not torch.isfinite(tensor).all():
            raise ValueError(
                f"{path} holds a damaged {name} (dtype {tensor.dtype}, shape {tuple(tensor.shape)}; expected "
                f"finite floats of shape {shape}). {fix}"
            )
    if perturbation.abs().max() > epsilon + 1e-6:
        raise ValueError(
            f"{path} holds a perturbation of l_inf size {perturbation.abs().max():.4g}, above its budget "
            f"epsilon={epsilon}. {fix}"
        )
    for name in ("mask_", "warped_mask_"):
        if name in tensors and (tensors[name].min() < -1e-4 or tensors[name].max() > 1 + 1e-4):  # a warp rounds by ~1e-7
            raise ValueError(f"{path} holds a {name} outside [0, 1]. {fix}")
