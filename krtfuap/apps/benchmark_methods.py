"""The benchmark's method and model names: :data:`METHODS` and :data:`MODELS`.

Kept apart from :mod:`krtfuap.apps.benchmark` because it imports nothing heavy:
the ``krtfuap`` command line lists these names in ``krtfuap benchmark --help``
without loading torch. Each :class:`Method` names its estimator class by import
path and imports it only when :meth:`Method.build` runs. Import them from
:mod:`krtfuap.apps.benchmark`, which re-exports them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Method", "METHODS", "MODELS"]


@dataclass(frozen=True)
class Method:
    """A named way to build a UAP estimator.

    Attributes
    ----------
    label : str
        Name in tables.
    table : str
        Which experiment of the paper it belongs to.
    estimator : str
        Import path of the estimator class, e.g. ``"krtfuap.attack.UAPAttack"``.
    options : mapping
        Keyword arguments that make this method (ablation switches), passed to the class;
        ``("KeyRegions", {...})`` stands for ``KeyRegions(...)``, built when the method is.
    stealth : bool
        Whether the method has a stealth term: it is then fitted with the SSIM
        stealth loss and ``stealth_weight``.
    """

    label: str
    table: str
    estimator: str
    options: Mapping[str, Any] = field(default_factory=dict)
    stealth: bool = False

    def build(self, model: Any, *, stealth_weight: float | None = None, **common: Any) -> Any:
        """A new, unfitted estimator of this method.

        Parameters
        ----------
        model : torch.nn.Module or list of them
            The face model(s) to fit against.
        stealth_weight : float, optional
            Weight of the SSIM stealth loss (methods with ``stealth`` only;
            ``None``: its default). Ignored by methods without a stealth term.
        **common
            ``threshold, epsilon, target_fooling_rate, max_epochs, max_time,
            batch_size, random_state, device``, shared by every method.

        Returns
        -------
        estimator
            With ``fit`` / ``evaluate`` (a :class:`krtfuap.estimator.PerturbationEstimator`).
        """
        module, _, name = self.estimator.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        options = {key: _built(value) for key, value in self.options.items()}
        # Random noise learns nothing: the loop's settings (stopping rules) are not among its parameters.
        common = {key: value for key, value in common.items() if key in inspect.signature(cls).parameters}
        if self.stealth:
            return cls(model, stealth_loss="ssim", stealth_weight=stealth_weight, **options, **common)
        return cls(model, **options, **common)


def _built(value: Any) -> Any:
    """An option as the estimator takes it: ``("KeyRegions", {...})`` becomes a :class:`krtfuap.KeyRegions`
    (imported only now, so listing the methods loads no torch)."""
    if isinstance(value, tuple) and value[:1] == ("KeyRegions",):
        from krtfuap.key_regions import KeyRegions

        return KeyRegions(**value[1])
    return value


def _krt(label: str, table: str, **switches: Any) -> Method:
    """A KRT-FUAP row: ``UAPAttack`` with the paper's key regions, start, l_inf budget alone and constant rates,
    scored on all fit faces like the baselines, unless ``switches`` differ."""
    options = {
        "key_regions": ("KeyRegions", {}), "lr_decay_steps": None, "init_scale": 1.0, "min_psnr": None,
        "score_size": None, "channels_last": False, **switches,
    }
    return Method(label, table, "krtfuap.attack.UAPAttack", options, stealth=True)


def _baseline(label: str, name: str) -> Method:
    return Method(label, "Table 1", f"krtfuap.baselines.{name}")


# Documented where they are used: krtfuap.apps.benchmark.METHODS and MODELS.
METHODS: dict[str, Method] = {
    "krt-fuap": _krt("KRT-FUAP", "Table 1"),
    "random-noise": _baseline("Random noise", "RandomNoiseUAP"),
    "uap": _baseline("UAP (DeepFool)", "DeepFoolUAP"),
    "fg-uap": _baseline("FG-UAP", "FGUAP"),
    "frequency-uap": _baseline("Frequency UAP (re-impl.)", "FrequencyUAP"),
    "no-key-regions": _krt("KRT-FUAP, global (no mask)", "Table 3", key_regions=None),
    "fixed-key-regions": _krt("KRT-FUAP, fixed regions (no flow)", "Table 4",
                              key_regions=("KeyRegions", {"learn_flow": False})),
    "cosine-loss": _krt("KRT-FUAP, cosine loss", "Table 5", adversarial_loss="cosine"),
    "euclidean-loss": _krt("KRT-FUAP, Euclidean loss", "Table 5", adversarial_loss="euclidean"),
    "krt-fuap-di": _krt("KRT-FUAP + input diversity", "Table 2", input_diversity=0.5),
}

MODELS = ("foamliu_mobilefacenet", "insightface_mbf", "dlib_resnet")
