"""``KeyRegions``: the options of KRT-FUAP's key-region mechanism, as one value.

``UAPAttack(key_regions=None)`` (the default) fits a global perturbation: the
whole budget at every pixel. ``UAPAttack(key_regions=KeyRegions(...))`` shapes
the noise by the facial key-region mask ``M0`` (eyes, nose, mouth), warped by a
learnable flow field (paper Sections 3.2-3.4). Every option here acts only
through key regions, so grouping them means none can be given and then ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from sklearn.base import clone

from krtfuap._validation import Boolean, InstanceOf, Interval, Options, check_params
from krtfuap.flow import FlowUnit
from krtfuap.masks import KeyRegionMasker

__all__ = ["KeyRegions"]


@dataclass(frozen=True)
class KeyRegions:
    """Shape the perturbation by facial key regions and a learned flow field (the paper's mechanism).

    Checked when made: a wrong option raises at once, naming it.

    Parameters
    ----------
    masker : KeyRegionMasker, torch.Tensor or None
        Source of the key-region mask ``M0``: an (un)fitted
        :class:`krtfuap.masks.KeyRegionMasker` (an unfitted one is cloned and
        fitted on the fit data, never changed), an ``(H, W)`` mask tensor in
        ``[0, 1]``, or ``None`` for the built-in landmark template of
        ArcFace-aligned faces (``KeyRegionMasker()``: no landmark model, no pass
        over the data).
    learn_flow : bool
        Learn the flow field that warps the mask (paper); ``False`` keeps the
        key regions fixed (ablation of Table 4).
    flow_bound : float
        Bound of the flow field values, ``>= 0`` (paper: 1).
    flow_unit : {"pixels", "normalized"}
        Unit of the flow field (see :mod:`krtfuap.flow`).
    flow_lr : float, optional
        Adam learning rate of the flow field, ``>= 0``; ``None`` uses the attack's ``lr``.

    Examples
    --------
    >>> from krtfuap import KeyRegions, UAPAttack
    >>> attack = UAPAttack(model, key_regions=KeyRegions(learn_flow=False))  # doctest: +SKIP
    """

    masker: KeyRegionMasker | torch.Tensor | None = None
    learn_flow: bool = True
    flow_bound: float = 1.0
    flow_unit: FlowUnit = "pixels"
    flow_lr: float | None = None

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "masker": [InstanceOf(KeyRegionMasker, torch.Tensor, description="a KeyRegionMasker, an (H, W) mask tensor"),
                   None],
        "learn_flow": [Boolean()],
        "flow_bound": [Interval(float, 0, None)],
        "flow_unit": [Options("pixels", "normalized")],
        "flow_lr": [Interval(float, 0, None), None],
    }

    def __post_init__(self) -> None:
        check_params(self.options(), self._parameter_constraints, prefix="KeyRegions.")

    def options(self) -> dict[str, object]:
        """The options as a dict (the masker as given)."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def mask(self, data: object, size: tuple[int, int]) -> torch.Tensor:
        """The key-region mask ``M0`` for faces of ``size``, ``(H, W)`` in ``[0, 1]`` on the CPU.

        Parameters
        ----------
        data : iterable
            The fit faces (batches ``(B, 3, H, W)``): read only by an unfitted
            masker with a landmark model.
        size : (int, int)
            ``(H, W)`` of the faces.
        """
        height, width = size
        if isinstance(self.masker, torch.Tensor):
            mask = self.masker.detach().float().cpu()
        elif self.masker is None:
            mask = KeyRegionMasker(image_size=size).fit().mask_
        elif hasattr(self.masker, "mask_"):
            mask = self.masker.mask_.detach().float().cpu()
        else:
            mask = clone(self.masker).fit(data).mask_.detach().float().cpu()
        if mask.shape != (height, width):
            raise ValueError(
                f"The key-region mask has shape {tuple(mask.shape)} but the images are {height}x{width}; "
                "fit the masker on images of the same size."
            )
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError("The key-region mask must hold values in [0, 1].")
        return mask
