"""The fit loop every perturbation estimator runs on.

An estimator (``UAPAttack`` and each baseline) contributes a :class:`Solver`:
its learnable state, one update step on a batch and the perturbation it
currently holds. :class:`FitLoop` owns everything else, once for all of them:

* reading the fit data (a :class:`krtfuap._batches.FitData`, checked once by
  the estimator: this process's shard of a tensor or a streaming loader), in
  order or shuffled, on the model's device in float32 (the model call casts a
  batch to the model's own dtype, :func:`krtfuap._ops.call_model`);
* freezing the face model (:func:`frozen`) and restoring the exact
  ``training`` flag of every submodule and ``requires_grad`` of every
  parameter afterwards, also on error and Ctrl-C;
* **honest stopping**: after every epoch (and when a limit cuts one short)
  the current perturbation is scored without gradient on the fit data (or a
  validation set) with :mod:`krtfuap.scoring`; the stop check, the reported
  fooling rate and the choice of the returned perturbation all use that score;
* keeping the best perturbation seen (:func:`selection_key`);
* the ``max_epochs``, ``max_steps`` and ``max_time`` limits (:data:`STOP_REASONS`),
  ``history`` (:data:`STEP_RECORD_KEYS`), a progress bar;
* checkpoints written atomically after every ``checkpoint_every`` epochs, with
  a fingerprint of what determines the result, so a resume with other
  parameters or data is refused with the difference named; a checkpoint's
  fields are checked on resume like user input.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from krtfuap._batches import FitData
from krtfuap._files import replace_atomically
from krtfuap._ops import call_model
from krtfuap._validation import (
    InstanceOf, Interval, check_embeddings, check_params, check_perturbation, load_torch_file,
)
from krtfuap.distributed import any_rank, is_main_process, mean_over_ranks
from krtfuap.metrics import member_count
from krtfuap.scoring import PerturbationScore, score_batch

__all__ = ["frozen", "Solver", "FitLoop", "FitResult", "selection_key", "STEP_RECORD_KEYS",
           "STOP_REASONS"]

_CHECKPOINT_FORMAT = "krtfuap.checkpoint/2"

#: Keys of every record of ``history_``, for every estimator: the step's index in the fit, its epoch,
#: the seconds of the loop so far, and the batch's fooling rate, mean similarity and SSIM under the
#: perturbation before the step's update. An estimator may add its own (losses, ...).
STEP_RECORD_KEYS = ("step", "epoch", "time", "fooling_rate", "mean_similarity", "ssim")

#: Every value of ``stop_reason_``, and what it means.
STOP_REASONS = {
    "target_fooling_rate": "the scored fooling rate reached target_fooling_rate (and target_ssim was met)",
    "max_epochs": "max_epochs passes were done (also when a resumed checkpoint had done them already)",
    "max_time": "the loop ran max_time seconds",
    "max_steps": "max_steps update steps were done",
    "not_learned": "the perturbation is drawn, not learned (RandomNoiseUAP): scored once, no step",
}

#: What a checkpoint holds besides the solver's and the generators' states, checked on resume like user input.
_CHECKPOINT_FIELDS = {
    "n_epochs": [Interval(int, 1)],
    "n_iter": [Interval(int, 0)],
    "elapsed": [Interval(float, 0)],
    "history": [InstanceOf(list, description="a list of step records")],
    "epoch_scores": [InstanceOf(list, description="a list of epoch scores")],
    "best_score": [InstanceOf(dict, description="a dict of scores")],
    "best_epoch": [Interval(int, 0)],
    "best_snapshot": [InstanceOf(dict, description="a dict of tensors")],
}


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no weight gradients for ``model``; everything restored exactly on exit.

    The ``training`` flag of **every** submodule and the ``requires_grad`` of
    every parameter are recorded and put back afterwards, also when the body
    raises or is interrupted, so an ensemble of eval-mode members or a model
    with a frozen backbone comes back as it went in.

    Parameters
    ----------
    model : torch.nn.Module

    Yields
    ------
    torch.nn.Module
        ``model``, in eval mode with ``requires_grad=False`` on every parameter.
    """
    modes = [(module, module.training) for module in model.modules()]
    grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        model.eval()
        for parameter, _ in grads:
            parameter.requires_grad_(False)
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)


@contextmanager
def in_memory_format(model: nn.Module, memory_format: torch.memory_format | None) -> Iterator[nn.Module]:
    """``model``'s 4-D weights in ``memory_format`` (e.g. ``torch.channels_last``); the originals put back on exit.

    Converting replaces each weight's storage (:meth:`torch.nn.Module.to`); the tensors it held before
    are recorded and restored afterwards, also when the body raises, so the caller's model leaves a fit
    in the layout it came in. Meant for frozen models (:func:`frozen`): weights changed inside are lost.

    Parameters
    ----------
    model : torch.nn.Module
    memory_format : torch.memory_format, optional
        ``None``: the model as it is.

    Yields
    ------
    torch.nn.Module
        ``model``.
    """
    if memory_format is None:
        yield model
        return
    weights = [(parameter, parameter.data) for parameter in model.parameters()]
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()]
    try:
        model.to(memory_format=memory_format)
        yield model
    finally:
        for parameter, data in weights:
            parameter.data = data
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


class Solver:
    """What an estimator adds to the fit loop: its learnable state and its update rule.

    Subclasses implement :meth:`step` and :meth:`perturbation`; the others
    have working defaults for a solver without learnable state.

    Attributes
    ----------
    learns : bool
        ``False`` for a perturbation that is drawn, not learned (random noise):
        the loop then only scores it once.
    """

    learns: bool = True

    def step(self, images: torch.Tensor, clean_embeddings: torch.Tensor) -> dict[str, float]:
        """Update the perturbation on one batch.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 3, H, W)`` clean faces in ``[0, 1]``, on the fit device.
        clean_embeddings : torch.Tensor
            ``(B, D)`` float32 embeddings of ``images`` (no gradient).

        Returns
        -------
        dict of str to float
            The batch's record for ``history_``: at least ``fooling_rate``,
            ``mean_similarity`` and ``ssim`` of the batch under the perturbation
            before the update (the loop adds ``step``, ``epoch`` and ``time``;
            :data:`STEP_RECORD_KEYS`), and any values of the solver's own (losses).
        """
        raise NotImplementedError

    def after_step(self, record: dict[str, float]) -> None:
        """Called with the step's record averaged over ranks (e.g. to adapt a loss weight).

        ``record["step"]`` is the 0-based index of this update in the whole fit
        (a resumed fit counts on from its checkpoint), ``record["time"]`` the
        seconds of the loop so far, as ``max_time`` counts them.
        """

    def perturbation(self) -> torch.Tensor:
        """The current perturbation, ``(3, H, W)``, detached, on the fit device."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies (on the CPU) of the learned tensors the estimator stores when this state is returned."""
        return {"perturbation_": self.perturbation().detach().cpu().clone()}

    def fitted_attributes(self) -> dict[str, Any]:
        """Extra learned attributes the estimator sets after the fit (e.g. an adapted loss weight)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue the fit exactly (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def initialise_(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set the starting state from the fit faces, once, before the first step of a fresh fit.

        ``batches`` yields ``(images, clean embeddings)`` as :meth:`step` gets them, in the data's
        order; take only what is needed. The time counts in ``max_time``. Default: the state as made.
        """

    def broadcast_(self) -> None:
        """Make every rank start from rank 0's state (distributed fitting)."""


def selection_key(score: dict[str, float], target_ssim: float | None) -> tuple[float, ...]:
    """Order of preference of scored perturbations (larger is better).

    Without a stealth target: the highest fooling rate, ties broken by the
    lower mean similarity. With ``target_ssim``: any perturbation that meets
    it beats any that does not; among those that meet it, the highest fooling
    rate wins; among those that do not, the highest SSIM.
    """
    if target_ssim is None:
        return (score["fooling_rate"], -score["mean_similarity"])
    meets = score["ssim"] >= target_ssim
    return (float(meets), score["fooling_rate"] if meets else score["ssim"], -score["mean_similarity"])


@dataclass
class FitResult:
    """What :meth:`FitLoop.run` returns: the selected state and the fit's record.

    Attributes
    ----------
    snapshot : dict of str to torch.Tensor
        :meth:`Solver.snapshot` of the returned (best) perturbation.
    score : dict
        Its score on the scoring data (:meth:`krtfuap.scoring.PerturbationScore.compute`).
    best_epoch : int
        The epoch after which it was scored (0-based).
    history : list of dict
        One record per step.
    epoch_scores : list of dict
        One score per epoch (with ``epoch``, ``step`` and ``time``).
    n_iter, n_epochs : int
    stop_reason : str
        A key of :data:`STOP_REASONS`.
    elapsed : float
        Seconds in the loop (resumed runs included).
    """

    snapshot: dict[str, torch.Tensor]
    score: dict[str, float]
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    epoch_scores: list[dict] = field(default_factory=list)
    n_iter: int = 0
    n_epochs: int = 0
    stop_reason: str = "max_epochs"
    elapsed: float = 0.0


@dataclass
class FitLoop:
    """The loop: batches, limits, honest scoring, best-state selection, checkpoints.

    Parameters
    ----------
    embed : callable
        The frozen face model as called while fitting, ``(B, 3, H, W)`` ->
        ``(B, D)`` (with the estimator's mixed-precision and memory-format options).
    threshold : float or tuple of float
        Verification threshold of the fooling rate; a tuple, one per member of the
        :class:`krtfuap.models.ensemble.MemberwiseEmbedder` behind ``embed``: a face is
        fooled when every member is below its own (:class:`krtfuap.scoring.PerturbationScore`).
    device : torch.device
        Where batches go, as float32: the perturbation is added in float32 and
        ``embed`` casts to the model's dtype.
    max_epochs : int
    max_time : float or None
        Seconds; checked after every step. Scoring counts, threshold
        calibration and mask fitting (done before the loop) do not.
    max_steps : int or None
        Update steps in all; checked after every step. Unlike ``max_time`` it does
        not depend on the machine, so a fit limited by it repeats exactly.
    target_fooling_rate : float
        Stop once the scored fooling rate reaches it (and ``target_ssim`` is met).
    target_ssim : float or None
        Stealth target used by :func:`selection_key` and the stop check.
    memory_format : torch.memory_format
    checkpoint_path : path-like or None
    checkpoint_every : int
    fingerprint : dict
        JSON-like description of what determines the result; stored in
        checkpoints and compared on resume.
    generator : torch.Generator or None
        The estimator's CPU generator; saved in checkpoints.
    shuffle : bool
        Visit the faces in a new order every epoch, drawn from ``generator``
        (:meth:`krtfuap._batches.FitData.epoch`).
    description : str
        Progress bar label.
    verbose : bool
        Show a progress bar (rank 0 only).
    """

    embed: Callable[[torch.Tensor], torch.Tensor]
    threshold: float | tuple[float, ...]
    device: torch.device
    max_epochs: int
    max_time: float | None = None
    max_steps: int | None = None
    target_fooling_rate: float = 1.0
    target_ssim: float | None = None
    memory_format: torch.memory_format = torch.preserve_format
    checkpoint_path: str | os.PathLike | None = None
    checkpoint_every: int = 1
    fingerprint: dict = field(default_factory=dict)
    generator: torch.Generator | None = None
    shuffle: bool = False
    description: str = "fit"
    verbose: bool = False

    # ----------------------------------------------------------------- batches
    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch as the solver gets it: float32 on ``device``, in ``memory_format``."""
        return images.to(self.device, torch.float32, memory_format=self.memory_format)

    def _clean_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return check_embeddings(call_model(self.embed, images), len(images)).float()

    def _clean_batches(
        self, data: FitData, epoch: int, cache: list[torch.Tensor] | None, *, shuffled: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, clean embeddings)`` per batch of one pass, in the data's order or ``shuffled``.

        ``cache`` (for tensor data, whose batches never change) keeps the embeddings of the first
        pass in order, so later passes skip the clean forward; a shuffled pass over a tensor
        completes it first and gathers each face's own embedding.
        """
        if shuffled and cache is not None:
            if len(cache) < -(-len(data.data) // data.batch_size):
                for _ in self._clean_batches(data, epoch, cache):  # one pass in order computes what is missing
                    pass
            clean = torch.cat(cache)
            for images, rows in data.epoch(epoch, self.generator):
                yield self._to_device(images), clean[rows.to(clean.device)]
            return
        for index, (images, _) in enumerate(data.epoch(epoch, self.generator if shuffled else None)):
            images = self._to_device(images)
            if cache is not None and index < len(cache):
                yield images, cache[index]
                continue
            clean = self._clean_embeddings(images)
            if cache is not None:
                cache.append(clean)
            yield images, clean

    def _scorer(
        self, data: FitData, cache: list[torch.Tensor] | None
    ) -> Callable[[torch.Tensor, int], dict[str, float]]:
        """A function scoring a perturbation on ``data`` after an epoch (no gradient, summed over ranks)."""

        def score(perturbation: torch.Tensor, epoch: int) -> dict[str, float]:
            meter = PerturbationScore(self.threshold)
            for images, clean in self._clean_batches(data, epoch, cache):
                meter.update(score_batch(self.embed, images, perturbation, clean_embeddings=clean,
                                         n_members=member_count(self.threshold)))
            meter.sync(self.device)
            return meter.compute()

        return score

    # ------------------------------------------------------------- checkpoints
    def _write_checkpoint(self, solver: Solver, state: dict[str, Any]) -> None:
        payload = {
            "format": _CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "solver": solver.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state() if self.generator is not None else None,
            **state,
        }
        path = os.fspath(self.checkpoint_path)

        def write(partial: str) -> None:
            with open(partial, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())

        try:
            replace_atomically(path, write)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
            raise OSError(
                f"Cannot write checkpoint {path} ({' '.join(str(error).split())[:200]}); free disk space "
                "or choose another checkpoint_path. The previous checkpoint, if any, is unchanged."
            ) from error

    def _read_checkpoint(self, solver: Solver, size: tuple[int, int]) -> dict[str, Any]:
        """The checkpoint's state, checked like user input, with ``solver`` and the generators restored."""
        path = os.fspath(self.checkpoint_path)
        fix = (
            "Delete it (or pass resume=False) to start afresh, or fit with the parameters and data of the run "
            "that wrote it."
        )
        payload = load_torch_file(path, what="checkpoint", fix=fix)
        if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(
                f"Cannot resume from checkpoint {path}: it was not written by UAPAttack (or another krtfuap "
                f"estimator) of this version. {fix}"
            )
        saved = payload.get("fingerprint", {})
        saved = saved if isinstance(saved, dict) else {"fingerprint": saved}
        differences = [
            f"{key} (checkpoint: {saved.get(key)!r}, now: {self.fingerprint.get(key)!r})"
            for key in sorted(set(saved) | set(self.fingerprint))
            if saved.get(key) != self.fingerprint.get(key)
        ]
        if differences:
            raise ValueError(
                f"Cannot resume from checkpoint {path}: it was written by a fit with other settings or data; "
                f"differs in {'; '.join(differences)}. {fix}"
            )
        try:
            _check_checkpoint_state(payload, size)
            solver.load_state_dict(payload["solver"])
            if self.generator is not None and payload["generator"] is not None:
                self.generator.set_state(payload["generator"])
            torch.set_rng_state(payload["torch_rng"])
            check_perturbation(solver.perturbation(), size, name="the perturbation of its solver")
        except Exception as error:
            reason = f"missing entry {error}" if isinstance(error, KeyError) else " ".join(str(error).split())[:300]
            raise ValueError(f"Cannot resume from checkpoint {path}: {reason.rstrip('.')}. {fix}") from error
        return payload

    # -------------------------------------------------------------------- run
    def run(
        self,
        data: FitData,
        solver: Solver,
        *,
        validation: FitData | None = None,
        resume: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> FitResult:
        """Fit ``solver`` on ``data``; return the best state seen and the fit's record.

        Parameters
        ----------
        data : FitData
            The fit faces (this process's shard), of size ``data.size``.
        solver : Solver
        validation : FitData, optional
            Faces that score each epoch's perturbation instead of ``data``.
        resume : bool
            Continue from ``checkpoint_path`` when that file exists. A checkpoint
            that already reached ``max_epochs``, ``max_steps`` or ``max_time``
            ends the fit at once, with its counts, its best perturbation and that
            limit as the stop reason (no step is taken).
        on_epoch : callable, optional
            Called after every scored epoch with ``{"epoch", "step", "time",
            "score", "perturbation"}`` (the perturbation a ``(3, H, W)`` CPU
            copy), e.g. to log a held-out curve. Its run time is not counted
            in ``max_time`` nor in the ``time`` fields.
        """
        # A tensor's batches are the same every epoch: its clean embeddings are computed once.
        fit_cache = [] if data.is_tensor else None
        if validation is None:
            scorer = self._scorer(data, fit_cache)
        else:
            scorer = self._scorer(validation, [] if validation.is_tensor else None)
        history: list[dict] = []
        epoch_scores: list[dict] = []
        best: tuple[tuple[float, ...], dict[str, float], int, dict[str, torch.Tensor]] | None = None
        n_iter, first_epoch, elapsed_before = 0, 0, 0.0
        resumed = resume and self.checkpoint_path is not None and os.path.isfile(self.checkpoint_path)
        if resumed:
            state = self._read_checkpoint(solver, data.size)
            history, epoch_scores = state["history"], state["epoch_scores"]
            n_iter, first_epoch, elapsed_before = state["n_iter"], state["n_epochs"], float(state["elapsed"])
            best = (selection_key(state["best_score"], self.target_ssim), state["best_score"], state["best_epoch"],
                    state["best_snapshot"])
        started = time.perf_counter() - elapsed_before
        if not resumed:
            solver.initialise_(self._clean_batches(data, 0, fit_cache))
            solver.broadcast_()
        stop_reason = "max_epochs" if solver.learns else "not_learned"
        last_epoch = first_epoch - 1

        def out_of_time() -> bool:
            late = self.max_time is not None and time.perf_counter() - started > self.max_time
            return any_rank(late, self.device)

        epochs = range(first_epoch, self.max_epochs if solver.learns else 1)
        if resumed and self.max_steps is not None and n_iter >= self.max_steps:
            epochs, stop_reason = range(0), "max_steps"
        elif resumed and out_of_time():
            epochs, stop_reason = range(0), "max_time"
        progress = tqdm(epochs, desc=self.description, disable=not (self.verbose and is_main_process()))
        for epoch in progress:
            last_epoch = epoch
            if solver.learns:
                for images, clean in self._clean_batches(data, epoch, fit_cache, shuffled=self.shuffle):
                    record = solver.step(images, clean)
                    # The time is averaged over ranks with the rest, so a schedule reading it agrees on every rank.
                    record["time"] = time.perf_counter() - started
                    record, _ = mean_over_ranks(record, len(images), self.device)
                    record["step"] = n_iter
                    solver.after_step(record)
                    record["epoch"] = epoch
                    history.append(record)
                    n_iter += 1
                    if self.max_steps is not None and n_iter >= self.max_steps:
                        stop_reason = "max_steps"
                        break
                    if out_of_time():
                        stop_reason = "max_time"
                        break
            score = scorer(solver.perturbation(), epoch)
            epoch_scores.append({"epoch": epoch, "step": n_iter, "time": time.perf_counter() - started, **score})
            key = selection_key(score, self.target_ssim)
            if best is None or key > best[0]:
                best = (key, score, epoch, solver.snapshot())
            progress.set_postfix(fooling_rate=f"{score['fooling_rate']:.3f}", ssim=f"{score['ssim']:.3f}")
            if on_epoch is not None:
                paused = time.perf_counter()
                on_epoch({"epoch": epoch, "step": n_iter, "time": paused - started, "score": score,
                          "perturbation": solver.perturbation().detach().cpu().clone()})
                started += time.perf_counter() - paused
            if stop_reason == "max_epochs" and out_of_time():
                stop_reason = "max_time"
            if stop_reason in ("max_time", "max_steps", "not_learned"):
                break
            meets_stealth = self.target_ssim is None or score["ssim"] >= self.target_ssim
            if score["fooling_rate"] >= self.target_fooling_rate and meets_stealth:
                stop_reason = "target_fooling_rate"
                break
            if (
                self.checkpoint_path is not None
                and ((epoch + 1) % self.checkpoint_every == 0 or epoch + 1 == self.max_epochs)
                and is_main_process()
            ):
                self._write_checkpoint(
                    solver,
                    {
                        "n_epochs": epoch + 1, "n_iter": n_iter, "elapsed": time.perf_counter() - started,
                        "history": history, "epoch_scores": epoch_scores,
                        "best_score": best[1], "best_epoch": best[2], "best_snapshot": best[3],
                    },
                )
        progress.close()
        assert best is not None  # max_epochs >= 1, or a checkpoint held a scored state
        return FitResult(
            snapshot=best[3],
            score=best[1],
            best_epoch=best[2],
            history=history,
            epoch_scores=epoch_scores,
            n_iter=n_iter,
            n_epochs=last_epoch + 1,
            stop_reason=stop_reason,
            elapsed=time.perf_counter() - started,
        )


def _check_checkpoint_state(payload: dict[str, Any], size: tuple[int, int]) -> None:
    """Check the fit state a checkpoint holds, like user input (``TypeError``, ``ValueError`` or ``KeyError``)."""
    missing = [name for name in (*_CHECKPOINT_FIELDS, "solver", "torch_rng", "generator") if name not in payload]
    if missing:
        raise KeyError(missing[0])
    check_params(payload, _CHECKPOINT_FIELDS)
    n_epochs, n_iter = payload["n_epochs"], payload["n_iter"]
    if len(payload["history"]) != n_iter or not all(isinstance(record, dict) for record in payload["history"]):
        raise ValueError(f"history holds {len(payload['history'])} entries for n_iter={n_iter} steps")
    if len(payload["epoch_scores"]) != n_epochs:
        raise ValueError(f"epoch_scores holds {len(payload['epoch_scores'])} entries for n_epochs={n_epochs}")
    if payload["best_epoch"] >= n_epochs:
        raise ValueError(f"best_epoch={payload['best_epoch']} is not one of its {n_epochs} epochs")
    score = payload["best_score"]
    scored = ("fooling_rate", "mean_similarity", "ssim")
    if not all(name in score for name in scored):
        raise KeyError(f"best_score {next(name for name in scored if name not in score)}")
    check_params(score, {name: [Interval(float, -1, 1)] for name in scored}, prefix="best_score ")
    check_perturbation(payload["best_snapshot"].get("perturbation_"), size, name="its best perturbation")
