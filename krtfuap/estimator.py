"""``PerturbationEstimator``: the public surface every universal-perturbation estimator shares.

``UAPAttack`` and the baselines of :mod:`krtfuap.baselines` subclass it and
add only their parameters and a :class:`krtfuap.engine.Solver` (their update
rule). Everything else lives here once: the scikit-learn contract
(``get_params`` / ``set_params`` / ``clone``, learned attributes ending in
``_``), parameter checks, threshold calibration, :meth:`fit` on the shared
:class:`krtfuap.engine.FitLoop`, :meth:`transform`, :meth:`evaluate` (through
:mod:`krtfuap.scoring`) and :meth:`save` / :meth:`load`.

Learned attributes are replaced only when a fit completes: a fit that fails
or is interrupted leaves the previous fitted state whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from torch import nn

from krtfuap._batches import ImageData, iter_image_batches
from krtfuap._files import replace_atomically
from krtfuap._ops import call_model
from krtfuap._validation import check_embeddings, check_images, check_number
from krtfuap.distributed import is_main_process
from krtfuap.engine import FitLoop, FitResult, Solver, frozen
from krtfuap.metrics import calibrate_threshold, pair_similarities
from krtfuap.models.ensemble import EnsembleEmbedder
from krtfuap.scoring import score_perturbation

__all__ = ["PerturbationEstimator"]

_FORMAT = "krtfuap.UAPAttack/1"
_SAVED_TENSORS = ("perturbation_", "mask_", "warped_mask_", "flow_", "noise_")
_SAVED_FITTED = ("threshold_", "n_iter_", "n_epochs_", "fooling_rate_", "ssim_", "stop_reason_", "fit_time_", "best_epoch_")
#: Parameters that never travel in a saved file (they have side effects on the machine that loads it).
_NOT_SAVED = ("checkpoint_path", "device")
#: Parameters that may change between an interrupted fit and its resumption.
_NOT_FINGERPRINTED = ("max_epochs", "max_time", "max_steps", "target_fooling_rate", "checkpoint_path", "checkpoint_every",
                      "verbose", "device")


class PerturbationEstimator(TransformerMixin, BaseEstimator):
    """Base of every estimator that learns one universal perturbation ``v`` of shape ``(3, H, W)``.

    Subclasses define ``__init__`` (storing their keyword arguments, which
    must include ``model``, ``threshold``, ``epsilon``, ``target_fooling_rate``,
    ``max_epochs``, ``max_time``, ``batch_size``, ``random_state``, ``device``
    and ``verbose``) and :meth:`_make_solver`.

    Attributes
    ----------
    perturbation_ : torch.Tensor
        ``(3, H, W)`` in ``[-epsilon, epsilon]``, on the CPU: the best
        perturbation scored during the fit (see :func:`krtfuap.engine.selection_key`).
    mask_, warped_mask_, flow_, noise_ : torch.Tensor
        The key-region mask ``(H, W)``, the warped mask ``(H, W)``, the flow
        ``(2, H, W)`` and the noise ``(3, H, W)`` behind ``perturbation_``
        (ones, ones, zeros and ``perturbation_`` for a global perturbation).
    threshold_ : float
        The verification threshold used.
    fooling_rate_, ssim_ : float
        Fooling rate and mean SSIM of ``perturbation_`` on the fit data (or
        the ``validation`` faces), measured without gradient after the
        updates: ``evaluate(X_fit)`` gives the same numbers.
    best_epoch_ : int
        The epoch after which ``perturbation_`` was scored.
    history_ : list of dict
        One record per step (batch values before the step's update, and
        ``step``, ``epoch``, ``time``).
    epoch_scores_ : list of dict
        The score of the perturbation after every epoch (``fooling_rate``,
        ``mean_similarity``, ``ssim``, ``psnr``, ``n_images``, ``epoch``,
        ``step``, ``time``).
    n_iter_, n_epochs_ : int
        Steps and passes over the data.
    stop_reason_ : str
        ``"target_fooling_rate"``, ``"max_epochs"`` or ``"max_time"``.
    fit_time_ : float
        Seconds of the whole fit (threshold calibration and mask fitting included).
    """

    # --------------------------------------------------------------- the model
    def _embedder(self) -> nn.Module:
        """The face model; a list of models becomes one :class:`~krtfuap.models.ensemble.EnsembleEmbedder`."""
        if isinstance(self.model, (list, tuple)):
            return EnsembleEmbedder(self.model)
        return self.model

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return next((p.device for p in self._embedder().parameters()), torch.device("cpu"))

    def _embed_function(self, model: nn.Module):
        """The model call used while fitting: ``(B, 3, H, W)`` float32 -> ``(B, D)`` float32 (options of subclasses).

        The batch is cast to the model's own dtype on the way in (:func:`krtfuap._ops.call_model`), so a
        bfloat16 or float16 model fits a float32 perturbation.
        """
        amp = getattr(self, "amp", False)
        channels_last = getattr(self, "channels_last", False)

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

    # ---------------------------------------------------------------- checks
    def _check_params(self) -> None:
        """Refuse mistyped, non-finite or out-of-range parameters before any work."""
        if isinstance(self.model, (list, tuple)):
            EnsembleEmbedder(self.model)  # checks every member
        elif not isinstance(self.model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module mapping (B, 3, H, W) images in [0, 1] to (B, D) "
                f"embeddings (or a list of them), got {type(self.model).__name__}."
            )
        check_number(self.epsilon, "epsilon", low=0, high=1, low_open=True, hint=" (images are in [0, 1])")
        check_number(self.target_fooling_rate, "target_fooling_rate", low=0, high=1)
        check_number(self.max_epochs, "max_epochs", low=1, integer=True)
        check_number(self.max_time, "max_time", low=0, allow_none=True, hint=" seconds or None")
        check_number(self.batch_size, "batch_size", low=1, integer=True)
        check_number(self.threshold, "threshold", low=-1, high=1, allow_none=True, hint=" (a cosine similarity)")
        if "checkpoint_every" in self._get_param_names():
            check_number(self.checkpoint_every, "checkpoint_every", low=1, integer=True)

    def _calibrated_threshold(self, pairs: Iterable | None) -> tuple[float, float | None]:
        """``(threshold, accuracy on the pairs or None)``."""
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
        self, X: ImageData, size: tuple[int, int], device: torch.device, generator: torch.Generator,
        embed, threshold: float,
    ) -> tuple[Solver, dict[str, Any]]:
        """Build the update rule; return it and extra learned attributes to set (e.g. ``mask_``).

        Tensors among those attributes are fixed inputs of the fit and enter the checkpoint fingerprint.
        """
        raise NotImplementedError

    def _fit_options(self) -> dict[str, Any]:
        """Keywords of :class:`~krtfuap.engine.FitLoop` that only some estimators take (checkpoints, ``max_steps``,
        ``shuffle``)."""
        return {
            "checkpoint_path": getattr(self, "checkpoint_path", None),
            "checkpoint_every": getattr(self, "checkpoint_every", 1),
            "max_steps": getattr(self, "max_steps", None),
            "shuffle": getattr(self, "shuffle", False),
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
        validation : torch.Tensor or iterable, optional
            Faces that score the perturbation after every epoch (for the stop
            check, the choice of the returned perturbation and
            ``fooling_rate_``) instead of ``X``.
        resume : bool
            Continue from ``checkpoint_path`` when that file exists; refused
            with the difference named when it was written with other
            parameters or data.
        on_epoch : callable, optional
            Called after every scored epoch with a dict ``epoch``, ``step``,
            ``time``, ``score`` (as ``epoch_scores_``) and ``perturbation`` (a
            CPU copy), e.g. to log a held-out curve; its run time is not
            counted in ``max_time``.

        Returns
        -------
        self
            Fitted. Learned attributes change only when the fit completes.
        """
        self._check_params()
        options = self._fit_options()
        if resume and options.get("checkpoint_path") is None:
            raise ValueError(
                "fit(resume=True) needs a checkpoint to resume from; set checkpoint_path= to the file the "
                "interrupted fit wrote (or call fit without resume=True)."
            )
        if options.get("checkpoint_path") is not None:
            _check_writable(options["checkpoint_path"], "checkpoint_path")
        fit_started = time.perf_counter()
        device = self._device()
        first = next(iter_image_batches(X, self.batch_size))
        size = tuple(first.shape[-2:])
        if validation is not None:
            next(iter_image_batches(validation, self.batch_size, name="validation"))
        seed = int(check_random_state(self.random_state).randint(2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        model = self._embedder()
        memory_format = torch.channels_last if getattr(self, "channels_last", False) else torch.preserve_format
        try:
            with frozen(model):
                threshold, accuracy = self._calibrated_threshold(pairs)
                embed = self._embed_function(model)
                solver, learned = self._make_solver(X, size, device, generator, embed, threshold)
                if memory_format is torch.channels_last:
                    model.to(memory_format=torch.channels_last)
                loop = FitLoop(
                    embed=embed, threshold=threshold, device=device, batch_size=self.batch_size,
                    max_epochs=self.max_epochs, max_time=self.max_time,
                    target_fooling_rate=self.target_fooling_rate, target_ssim=getattr(self, "target_ssim", None),
                    memory_format=memory_format, generator=generator,
                    fingerprint=self._fingerprint(X, threshold, learned) if options.get("checkpoint_path") else {},
                    description=f"{type(self).__name__} fit", verbose=self.verbose, **options,
                )
                result = loop.run(X, solver, size, validation=validation, resume=resume, on_epoch=on_epoch)
        except KeyboardInterrupt:
            where = options.get("checkpoint_path")
            hint = (f"continue with fit(X, resume=True) from {os.fspath(where)}" if where is not None
                    else "set checkpoint_path= to be able to resume an interrupted fit")
            print(f"{type(self).__name__}.fit interrupted; the previous fitted state is unchanged; {hint}.",
                  file=sys.stderr)
            raise
        self._set_fitted(result, learned, threshold, accuracy, solver, time.perf_counter() - fit_started)
        return self

    def _fingerprint(self, X: ImageData, threshold: float, learned: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What determines the result of a fit: parameters, threshold, fixed inputs and a digest of the data."""
        params = {
            key: value if _is_json_scalar(value) else type(value).__name__
            for key, value in self.get_params(deep=False).items()
            if key not in _NOT_FINGERPRINTED and key != "model"
        }
        digest = hashlib.sha256()
        rows, shapes = [], set()
        with torch.random.fork_rng(devices=[]):  # a shuffling loader must not move the global RNG
            for images in iter_image_batches(X, self.batch_size):
                shapes.add(tuple(images.shape[1:]))
                flat = images.detach().float().flatten(1)
                rows.append(torch.stack([flat.mean(1), flat.std(1), flat[:, :: max(1, flat.shape[1] // 64)].sum(1)], 1))
        stats = torch.cat(rows).double().cpu().numpy().round(5)
        count = len(stats)
        stats = stats[np.lexsort(stats.T[::-1])]  # the order a shuffling loader yields is not part of the data
        digest.update(str(sorted(shapes)).encode())
        digest.update(stats.tobytes())
        for name in sorted(k for k, v in learned.items() if isinstance(v, torch.Tensor)):
            digest.update(name.encode())
            digest.update(learned[name].detach().float().cpu().numpy().round(6).tobytes())
        return {**params, "threshold_": round(threshold, 9), "n_faces": count, "data_digest": digest.hexdigest()[:16]}

    def _set_fitted(
        self, result: FitResult, learned: dict[str, torch.Tensor], threshold: float, accuracy: float | None,
        solver: Solver, fit_time: float,
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
            **solver.fitted_attributes(),
        )
        if accuracy is not None:
            state["threshold_accuracy_"] = accuracy
        for name, value in state.items():
            setattr(self, name, value)

    # ------------------------------------------------------------- applying
    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Add the learned perturbation: ``clip(X + perturbation_, 0, 1)``.

        Parameters
        ----------
        X : torch.Tensor
            ``(B, 3, H, W)`` RGB in ``[0, 1]``, the size the perturbation was fitted on.

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

    def evaluate(self, X: ImageData) -> dict[str, float]:
        """Fooling rate, mean similarity, SSIM and PSNR of the perturbation on faces ``X``.

        Parameters
        ----------
        X : torch.Tensor or iterable
            Faces as in :meth:`fit`; judge on identities not used for fitting.

        Returns
        -------
        dict
            ``fooling_rate`` (share with ``cos(F(x + v), F(x)) < threshold_``),
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
        model = self._embedder()
        with frozen(model):
            return score_perturbation(
                model, X, self.perturbation_, self.threshold_, batch_size=self.batch_size, device=self._device(),
            )

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, *, compact: bool = False) -> None:
        """Write the fitted perturbation to a ``.safetensors`` file (no pickle).

        Tensors (``perturbation_``, ``mask_``, ``warped_mask_``, ``flow_``,
        ``noise_``) go in the tensor section; JSON-serialisable parameters
        (not ``checkpoint_path`` or ``device``), the fit's summary and
        ``history_`` go in the metadata. The model, a masker object and a
        callable stealth loss are not saved. The file is written next to
        ``path`` and renamed into place, so a failed save leaves an existing
        file at ``path`` unchanged. When fitting distributed, only rank 0 writes.

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
        if not is_main_process():
            return
        params = {
            k: v for k, v in self.get_params(deep=False).items() if _is_json_scalar(v) and k not in _NOT_SAVED
        }
        fitted = {k: getattr(self, k) for k in _SAVED_FITTED if hasattr(self, k)}
        metadata = {
            "format": _FORMAT,
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
        if metadata.get("format") != _FORMAT or set(tensors) not in (set(_SAVED_TENSORS), {"perturbation_"}):
            raise ValueError(
                f"{path} is a .safetensors file but not a krtfuap attack file (format {metadata.get('format')!r}, "
                f"tensors {sorted(tensors)}). {fix}"
            )
        try:
            params = json.loads(metadata["params"])
            fitted = json.loads(metadata["fitted"])
            history = json.loads(metadata["history"])
            if not (isinstance(params, dict) and isinstance(fitted, dict) and isinstance(history, list)):
                raise ValueError("params and fitted must be JSON objects, history a list")
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path} has damaged krtfuap metadata ({type(error).__name__}: {error}). {fix}") from error
        params = {k: v for k, v in params.items() if k not in _NOT_SAVED}
        unknown = sorted(set(params) - set(cls._get_param_names()))
        if unknown:
            saved_by = metadata.get("class", "another attack class")
            raise ValueError(
                f"{path} was saved by {saved_by}, another attack class (it has parameters {unknown} that "
                f"{cls.__name__} does not take); load it with {saved_by}.load."
            )
        attack = cls(model, **params)
        try:
            attack._check_params_of_loaded()
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} holds invalid parameters ({error}). {fix}") from error
        _check_loaded_tensors(tensors, attack.epsilon, path, fix)
        fitted = {name: value for name, value in fitted.items() if name in _SAVED_FITTED}
        try:
            check_number(fitted.get("threshold_"), "threshold_", low=-1, high=1)
            for name in ("fooling_rate_", "ssim_"):
                check_number(fitted.get(name), name, low=-1, high=1, allow_none=True)
            for name in ("n_iter_", "n_epochs_", "best_epoch_"):
                check_number(fitted.get(name), name, low=-1, integer=True, allow_none=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} holds invalid fitted values ({error}). {fix}") from error
        for name, value in fitted.items():
            setattr(attack, name, value)
        attack.history_ = history
        for name, tensor in tensors.items():
            setattr(attack, name, tensor.float())
        return attack

    def _check_params_of_loaded(self) -> None:
        """Parameter checks that do not need the model (a loaded attack may have none)."""
        check_number(self.epsilon, "epsilon", low=0, high=1, low_open=True)
        check_number(self.threshold, "threshold", low=-1, high=1, allow_none=True)
        check_number(self.batch_size, "batch_size", low=1, integer=True)


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


def _is_json_scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
