"""Input checks shared by every public entry point.

Each check raises an error that names the problem and says how to fix it.
Parameters are declared in a table per class, in the style of scikit-learn's
``_parameter_constraints`` (name -> list of :class:`Constraint`), and checked by
:func:`check_params`.
"""

from __future__ import annotations

import math
import numbers
import os
import pickle
import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "check_images",
    "check_embeddings",
    "load_torch_file",
    "torch_load_error",
    "Constraint",
    "Interval",
    "Options",
    "Boolean",
    "InstanceOf",
    "IsCallable",
    "PathLike",
    "RandomStateLike",
    "DeviceLike",
    "FaceModelLike",
    "SequenceOf",
    "check_param",
    "check_params",
    "store_params",
]


def check_images(images: object, *, name: str = "images") -> torch.Tensor:
    """Check that ``images`` is a batch of RGB images in ``[0, 1]``.

    Parameters
    ----------
    images : torch.Tensor
        Shape ``(B, 3, H, W)``, floating point, values in ``[0, 1]``.
    name : str
        Name used in error messages.

    Returns
    -------
    torch.Tensor
        The same tensor (not copied).

    Raises
    ------
    TypeError
        If ``images`` is not a tensor or is not floating point.
    ValueError
        If the shape is wrong, a value is NaN/inf or outside ``[0, 1]``.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, 3, H, W) in [0, 1], "
            f"got {type(images).__name__}; convert with torch.as_tensor(...)."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        hint = ""
        if images.ndim == 3:
            hint = " Add a batch dimension with images.unsqueeze(0)."
        elif images.ndim == 4 and images.shape[-1] == 3:
            hint = " The tensor looks channels-last; use images.permute(0, 3, 1, 2)."
        elif images.ndim == 4 and images.shape[1] in (1, 4):
            hint = " Convert grey or RGBA images to 3-channel RGB first."
        raise ValueError(
            f"{name} must have shape (B, 3, H, W), got {tuple(images.shape)}.{hint}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (B = 0); pass at least one image.")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be floating point in [0, 1], got dtype {images.dtype}; "
            "for uint8 images use images.float() / 255."
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf values; clean or drop those images.")
    low, high = images.min().item(), images.max().item()
    if low < 0.0 or high > 1.0:
        hint = " It looks like 0-255 data: divide by 255." if high > 1.0 + 1e-6 and high <= 255 else ""
        raise ValueError(
            f"{name} must be in [0, 1], got values in [{low:.9g}, {high:.9g}].{hint} "
            "If the model needs another normalisation, put it inside the model "
            "(see krtfuap.models.FaceEmbedder)."
        )
    return images


def check_embeddings(embeddings: object, batch_size: int, *, name: str = "model output") -> torch.Tensor:
    """Check that a face model returned one embedding per image.

    Parameters
    ----------
    embeddings : torch.Tensor
        Expected shape ``(B, D)``.
    batch_size : int
        The ``B`` of the input batch.
    name : str
        Name used in error messages.

    Returns
    -------
    torch.Tensor
        The same tensor.

    Raises
    ------
    TypeError
        If it is not a tensor, or not real floating point.
    ValueError
        If the shape is wrong, a value is NaN/inf, or an embedding is all zeros.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, D), got {type(embeddings).__name__}; "
            "wrap the model so that forward returns the embedding tensor only."
        )
    if embeddings.ndim != 2 or embeddings.shape[0] != batch_size:
        raise ValueError(
            f"{name} must have shape (B, D) = ({batch_size}, D), got {tuple(embeddings.shape)}; "
            "the face model must map (B, 3, H, W) images to (B, D) embeddings "
            "(flatten or select the embedding output in a wrapper)."
        )
    if not embeddings.is_floating_point():
        raise TypeError(
            f"{name} must be real floating point, got dtype {embeddings.dtype}; return the float embedding "
            "the model computes (not a rounded, integer or complex one)."
        )
    if not torch.isfinite(embeddings).all():
        raise ValueError(
            f"{name} contains NaN or inf; check the model weights and its input normalisation."
        )
    if (embeddings.detach().abs().amax(dim=1) == 0).any():
        raise ValueError(
            f"{name} has an all-zero embedding, whose cosine similarity is undefined; check the model "
            "weights and its input normalisation (a dead model fools everything trivially)."
        )
    return embeddings


def check_perturbation(perturbation: object, size: tuple[int, int], *, name: str, fix: str = "") -> torch.Tensor:
    """Check that a perturbation is a finite float tensor of shape ``(3, H, W)`` with ``(H, W) = size``.

    Parameters
    ----------
    perturbation : torch.Tensor
        Expected shape ``(3, H, W)``, any floating dtype.
    size : tuple of int
        ``(H, W)`` of the faces it is added to.
    name : str
        Name used in error messages.
    fix : str
        What the user can do, appended to each message after ``"; "`` (empty: nothing appended).

    Returns
    -------
    torch.Tensor
        The same tensor.

    Raises
    ------
    ValueError
        If it is not a float tensor, has another shape, or holds NaN or inf.
    """
    shape = (3, *size)
    advice = f"; {fix}" if fix else ""
    if not isinstance(perturbation, torch.Tensor) or not perturbation.is_floating_point():
        got = f"dtype {perturbation.dtype}" if isinstance(perturbation, torch.Tensor) else type(perturbation).__name__
        raise ValueError(f"{name} must be a float tensor of shape {shape}, got {got}{advice}")
    if tuple(perturbation.shape) != shape:
        raise ValueError(f"{name} must be a tensor of shape {shape}, the faces' size, got "
                         f"{tuple(perturbation.shape)}{advice}")
    if not torch.isfinite(perturbation).all():
        raise ValueError(f"{name} holds NaN or infinite values{advice}")
    return perturbation


def torch_load_error(error: Exception, path: str | os.PathLike, *, what: str, fix: str) -> ValueError:
    """Turn an exception of ``torch.load(path, weights_only=True)`` into a clear ``ValueError``.

    A file holding pickled Python objects other than tensors (which could run
    code when unpickled) is reported as refused; anything else as truncated or
    corrupt. ``what`` names the file's role (e.g. ``"face-model weights"``),
    ``fix`` is a sentence saying how to get a good file.
    """
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(error, pickle.UnpicklingError) and found:  # weights_only refused to import a callable
        detail = f" (it references {found.group(1)})"
        return ValueError(
            f"Refused to load {what} {os.fspath(path)}: it holds pickled Python objects{detail}, not only "
            f"tensors, and unpickling them could run code. krtfuap never unpickles code; use a file that "
            f"holds plain tensors (e.g. torch.save(model.state_dict(), path)) from a source you trust. {fix}"
        )
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
    return ValueError(
        f"Cannot read {what} {os.fspath(path)}: the file is truncated, corrupt or not a torch.save file "
        f"({type(error).__name__}: {first_line or 'no details'}). {fix}"
    )


def load_torch_file(path: str | os.PathLike, *, what: str, fix: str) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say how to fix them.

    Parameters
    ----------
    path : path-like
        An existing file written by ``torch.save``.
    what : str
        The file's role, used in error messages (e.g. ``"checkpoint"``).
    fix : str
        A sentence telling the user how to get a good file.

    Returns
    -------
    object
        What the file holds (tensors and plain containers only).

    Raises
    ------
    ValueError
        If the file holds pickled code (refused, nothing is executed), or is
        truncated, empty or not a ``torch.save`` file.
    OSError
        If the file cannot be opened (missing, a folder, no permission).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ...
        raise torch_load_error(error, path, what=what, fix=fix) from error


# ------------------------------------------------------------------------ parameters
class Constraint:
    """One kind of value a parameter accepts: an entry of a ``_parameter_constraints`` list.

    A parameter's constraints are a list of these (``None`` in the list accepts
    ``None``); a value is accepted when one of them accepts it. See
    :func:`check_param`.
    """

    def admits_type(self, value: object) -> bool:
        """Whether ``value`` is of this constraint's kind (a number, a string, ...)."""
        raise NotImplementedError

    def problem(self, value: object) -> str | None:
        """Why a value of this kind is refused: ``None`` when it is accepted, ``""`` when it is outside
        what :meth:`describe` says, or a clause that follows the parameter's name in the error."""
        return None

    def describe(self) -> str:
        """What the constraint accepts, e.g. ``"an int >= 1"``."""
        raise NotImplementedError


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


class Interval(Constraint):
    """A number (``kind=float``, numpy floats and ints included) or an int (``kind=int``, numpy ints
    included; never a bool) in a range.

    Parameters
    ----------
    kind : {int, float}
    low, high : float, optional
        Bounds; ``None`` for none.
    closed : {"both", "left", "right", "neither"}
        Which bounds belong to the range.
    hint : str
        Said after the range, e.g. ``" (images are in [0, 1])"``.
    """

    def __init__(self, kind: type, low: float | None = None, high: float | None = None, *,
                 closed: str = "both", hint: str = "") -> None:
        if kind not in (int, float) or closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"Interval(kind={kind!r}, closed={closed!r}): kind is int or float, closed one of "
                             "'both', 'left', 'right', 'neither'.")
        self.kind, self.low, self.high, self.closed, self.hint = kind, low, high, closed, hint

    def admits_type(self, value: object) -> bool:
        wanted = numbers.Integral if self.kind is int else numbers.Real
        return isinstance(value, wanted) and not _is_bool(value)

    def problem(self, value: object) -> str | None:
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):
            return f"must be a finite number, got {value}."
        low_open, high_open = self.closed in ("right", "neither"), self.closed in ("left", "neither")
        too_low = self.low is not None and (value <= self.low if low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if high_open else value > self.high)
        return "" if too_low or too_high else None

    def describe(self) -> str:
        low_open, high_open = self.closed in ("right", "neither"), self.closed in ("left", "neither")
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if low_open else '['}{self.low}, {self.high}{')' if high_open else ']'}"
        elif self.low is not None:
            bounds = f" {'>' if low_open else '>='} {self.low}"
        elif self.high is not None:
            bounds = f" {'<' if high_open else '<='} {self.high}"
        else:
            bounds = ""
        return f"{'an int' if self.kind is int else 'a number'}{bounds}{self.hint}"


class Options(Constraint):
    """One of a few strings."""

    def __init__(self, *values: str) -> None:
        self.values = tuple(sorted(values))

    def admits_type(self, value: object) -> bool:
        return isinstance(value, str)

    def problem(self, value: object) -> str | None:
        return None if value in self.values else ""

    def describe(self) -> str:
        return repr(self.values[0]) if len(self.values) == 1 else f"one of {list(self.values)}"


class Boolean(Constraint):
    """``True`` or ``False`` (a numpy bool too); never a number or a string."""

    def admits_type(self, value: object) -> bool:
        return _is_bool(value)

    def describe(self) -> str:
        return "True or False"


class InstanceOf(Constraint):
    """An instance of one of ``types``, described in messages by ``description``."""

    def __init__(self, *types: type, description: str) -> None:
        self.types, self.description = types, description

    def admits_type(self, value: object) -> bool:
        return isinstance(value, self.types)

    def describe(self) -> str:
        return self.description


class IsCallable(Constraint):
    """Any callable, described in messages by ``description``."""

    def __init__(self, description: str = "a callable") -> None:
        self.description = description

    def admits_type(self, value: object) -> bool:
        return callable(value)

    def describe(self) -> str:
        return self.description


class PathLike(Constraint):
    """A file path: a ``str`` or an ``os.PathLike`` (whether it can be written is checked where it is used)."""

    def admits_type(self, value: object) -> bool:
        return isinstance(value, (str, os.PathLike))

    def describe(self) -> str:
        return "a file path"


class RandomStateLike(Constraint):
    """What :func:`sklearn.utils.check_random_state` takes besides ``None``: a seed or a ``RandomState``."""

    def admits_type(self, value: object) -> bool:
        return (isinstance(value, numbers.Integral) and not _is_bool(value)) or isinstance(value, np.random.RandomState)

    def problem(self, value: object) -> str | None:
        return "" if isinstance(value, numbers.Integral) and not 0 <= value <= 2**32 - 1 else None

    def describe(self) -> str:
        return f"an int seed in [0, {2**32 - 1}] or a numpy.random.RandomState"


class DeviceLike(Constraint):
    """A ``torch.device`` or a device name torch knows, whose hardware exists here."""

    def admits_type(self, value: object) -> bool:
        return isinstance(value, (str, torch.device))

    def problem(self, value: object) -> str | None:
        try:
            device = torch.device(value)
        except (RuntimeError, ValueError):
            return f"must be a device torch knows, such as 'cpu', 'cuda' or 'cuda:1', got {value!r}."
        fix = "use 'cpu', or None for the device of the model's parameters"
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                return f"is {value!r}, but no CUDA GPU is available here (torch.cuda.is_available() is False); {fix}."
            if device.index is not None and device.index >= count:
                return f"is {value!r}, but this machine has {count} CUDA device(s), numbered from 0; {fix}."
        if device.type == "mps" and not torch.backends.mps.is_available():
            return f"is {value!r}, but Apple's MPS is not available here; {fix}."
        return None

    def describe(self) -> str:
        return "a torch.device or a device name such as 'cpu' or 'cuda'"


class FaceModelLike(Constraint):
    """A face model, ``nn.Module`` ``(B, 3, H, W)`` -> ``(B, D)``, or a non-empty list of them (an ensemble)."""

    def admits_type(self, value: object) -> bool:
        members = value if isinstance(value, (list, tuple)) else [value]
        return all(isinstance(member, nn.Module) for member in members)

    def problem(self, value: object) -> str | None:
        empty = isinstance(value, (list, tuple)) and not value
        return "is an empty list; pass at least one face model." if empty else None

    def describe(self) -> str:
        return ("a torch.nn.Module mapping (B, 3, H, W) images in [0, 1] to (B, D) embeddings "
                "(or a list of them)")


class SequenceOf(Constraint):
    """A non-empty list or tuple whose every item is of one kind, described in messages by ``description``.

    Parameters
    ----------
    admits : callable or Constraint
        ``item -> bool``: whether one item is of the wanted kind (e.g. a ``(model, threshold)`` pair); or a
        :class:`Constraint` every item must meet (its kind and its range, e.g. an :class:`Interval`), whose
        refusal of an item names the item's position.
    description : str
        What the sequence holds, e.g. ``"a list of (torch.nn.Module, float) pairs"``.
    """

    def __init__(self, admits, *, description: str) -> None:
        self.admits, self.description = admits, description

    def _admits_item(self, item: object) -> bool:
        return self.admits.admits_type(item) if isinstance(self.admits, Constraint) else self.admits(item)

    def admits_type(self, value: object) -> bool:
        return isinstance(value, (list, tuple)) and all(self._admits_item(item) for item in value)

    def problem(self, value: object) -> str | None:
        if not value:
            return "is an empty list; pass at least one item or None."
        if isinstance(self.admits, Constraint):
            for index, item in enumerate(value):
                problem = self.admits.problem(item)
                if problem is not None:
                    return f"item {index} {problem or f'must be {self.admits.describe()}, got {item!r}.'}"
        return None

    def describe(self) -> str:
        return self.description


def _alternatives(descriptions: list[str]) -> str:
    return descriptions[0] if len(descriptions) == 1 else f"{', '.join(descriptions[:-1])} or {descriptions[-1]}"


def check_param(name: str, value: object, constraints: list[Constraint | None]) -> None:
    """Check one parameter against its constraints; the error names it, what it accepts and what it got.

    Parameters
    ----------
    name : str
        The parameter's name, as the user wrote it (e.g. ``"epsilon"`` or ``"KeyRegions.flow_unit"``).
    value : object
        The value given.
    constraints : list of Constraint or None
        What the parameter accepts; ``None`` in the list accepts ``None``.

    Raises
    ------
    TypeError
        When the value is of no accepted kind (e.g. a string for a number, a number for a bool).
    ValueError
        When it is of an accepted kind but refused (out of range, NaN, an unknown option, a missing GPU).
    """
    if value is None and None in constraints:
        return
    kinds = [constraint for constraint in constraints if constraint is not None and constraint.admits_type(value)]
    problems = [constraint.problem(value) for constraint in kinds]
    if any(problem is None for problem in problems):
        return
    accepted = _alternatives([c.describe() for c in constraints if c is not None] + ["None"] * (None in constraints))
    if not kinds:
        if value is None:
            shown = "None"
        elif isinstance(value, (str, bytes, numbers.Number, np.bool_)):
            shown = f"{value!r} ({type(value).__name__})"
        else:
            shown = f"a {type(value).__name__}"
        raise TypeError(f"{name} must be {accepted}, got {shown}.")
    special = next((problem for problem in problems if problem), "")
    raise ValueError(f"{name} {special}" if special else f"{name} must be {accepted}, got {value!r}.")


def check_params(values: Mapping[str, object], constraints: Mapping[str, list], *, prefix: str = "") -> None:
    """Check every parameter of ``values`` that ``constraints`` declares (:func:`check_param`).

    Parameters
    ----------
    values : mapping
        Parameter name -> value (e.g. ``estimator.get_params(deep=False)``).
    constraints : mapping
        Parameter name -> list of constraints (the ``_parameter_constraints`` table of a class).
    prefix : str
        Put before each name in messages, e.g. ``"KeyRegions."``.
    """
    for name, allowed in constraints.items():
        if name in values:
            check_param(f"{prefix}{name}", values[name], allowed)


def store_params(instance: object, arguments: Mapping[str, object]) -> None:
    """Store each ``__init__`` argument as the attribute of the same name, as scikit-learn's ``get_params`` reads them.

    The whole body of a scikit-learn style ``__init__`` (which only stores its
    parameters, unchecked) is ``store_params(self, locals())``, written first so
    that ``locals()`` holds nothing but the arguments.

    Parameters
    ----------
    instance : object
        The object being initialised.
    arguments : mapping
        ``locals()`` at the top of ``__init__``: ``self`` (and the ``__class__``
        cell of a method that calls ``super()``) are skipped, every other entry is set.
    """
    for name, value in arguments.items():
        if name not in ("self", "__class__"):
            setattr(instance, name, value)
