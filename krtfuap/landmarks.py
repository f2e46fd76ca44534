"""68-point facial landmark backends (iBUG 300-W order).

Every backend is a callable ``backend(images) -> np.ndarray`` of shape
``(B, 68, 2)`` holding float ``(x, y)`` pixel coordinates, with the centre of
the pixel in column ``j`` and row ``i`` at ``(x, y) = (j, i)``. The 68 points
follow the iBUG 300-W convention: jaw 0-16, eyebrows 17-26, nose 27-35, the
subject's right eye 36-41 (left in the image), the subject's left eye 42-47,
outer lip 48-59 and inner lip 60-67.

Backends
--------
TemplateLandmarks
    The canonical landmarks of an ArcFace-aligned 112x112 face; needs no model.
DlibLandmarks
    dlib HOG face detector plus the 68-point iBUG shape predictor.
FaceAlignmentLandmarks
    The FAN 2D network of the ``face_alignment`` package.

Use :func:`get_landmark_backend` to turn a name or a callable into a backend,
and :func:`check_landmarks` to validate what a backend returned.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from krtfuap._validation import check_images, torch_load_error

__all__ = [
    "N_LANDMARKS",
    "NoFaceFoundError",
    "TemplateLandmarks",
    "DlibLandmarks",
    "FaceAlignmentLandmarks",
    "get_landmark_backend",
    "check_landmarks",
    "load_landmark_template",
]

#: Number of points in the iBUG 300-W landmark scheme every backend returns.
N_LANDMARKS = 68
_TEMPLATE_RESOURCE = "landmarks_arcface112.json"
_ALIGNED_HINT = (
    "For faces already aligned to the ArcFace 112x112 template, "
    "use TemplateLandmarks() (landmarks='template'), which needs no detector."
)

Box = tuple[float, float, float, float]
LandmarkBackend = Callable[[torch.Tensor], np.ndarray]


class NoFaceFoundError(ValueError):
    """A landmark backend found no face in some images of a batch.

    Parameters
    ----------
    indices : sequence of int
        Batch indices of the images without a face.
    backend : str
        Name of the backend that failed, used in the message.
    hint : str
        How to get around the problem.

    Attributes
    ----------
    indices : list of int
        Batch indices of the images without a face.
    """

    def __init__(self, indices: Sequence[int], backend: str, hint: str) -> None:
        self.indices = [int(i) for i in indices]
        super().__init__(
            f"{backend} found no face in {len(self.indices)} image(s), "
            f"batch indices {self.indices}. {hint}"
        )


@functools.cache
def _read_template_file() -> str:
    resource = importlib.resources.files("krtfuap") / "data" / _TEMPLATE_RESOURCE
    return resource.read_text(encoding="utf-8")


def load_landmark_template() -> dict[str, Any]:
    """Load the packaged 68-point template of an ArcFace-aligned 112x112 face.

    Returns
    -------
    dict
        The parsed ``krtfuap/data/landmarks_arcface112.json`` (a fresh copy):
        ``points`` (68 x 2 list, pixels), ``image_size`` ([H, W] = [112, 112]),
        ``mad`` (68 x 2 per-point median absolute deviation, pixels),
        ``face_box`` ([left, top, right, bottom], the median dlib detector box),
        ``source`` (how it was made) and ``five_point_check`` (distances to the
        ArcFace five-point template). See :class:`TemplateLandmarks`.
    """
    return json.loads(_read_template_file())


def _scale_points(points: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Rescale ``(..., 2)`` pixel-centre coordinates from one image size to another."""
    (h0, w0), (h1, w1) = from_size, to_size
    scale = np.array([w1 / w0, h1 / h0])
    return (points + 0.5) * scale - 0.5


def _scaled_template_box(height: int, width: int) -> Box:
    """The aligned-face box of the packaged template, rescaled to ``(height, width)``."""
    template = load_landmark_template()
    left, top, right, bottom = template["face_box"]
    corners = np.array([[left, top], [right, bottom]], dtype=np.float64)
    corners = _scale_points(corners, tuple(template["image_size"]), (height, width))
    return (corners[0, 0], corners[0, 1], corners[1, 0], corners[1, 1])


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` float in [0, 1] -> ``(B, H, W, 3)`` C-contiguous uint8."""
    array = (images.detach().to("cpu", torch.float32) * 255.0).round().clamp(0, 255)
    return np.ascontiguousarray(array.to(torch.uint8).permute(0, 2, 3, 1).numpy())


def check_landmarks(landmarks: object, batch_size: int, *, name: str = "landmarks") -> np.ndarray:
    """Check that a backend returned one set of 68 finite ``(x, y)`` points per image.

    Parameters
    ----------
    landmarks : array-like
        Expected shape ``(B, 68, 2)``, pixel coordinates.
    batch_size : int
        The ``B`` of the image batch given to the backend.
    name : str
        Name used in error messages.

    Returns
    -------
    np.ndarray
        ``float64`` array of shape ``(B, 68, 2)``.

    Raises
    ------
    ValueError
        If the shape is wrong or a coordinate is NaN/inf.
    """
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().cpu().numpy()
    array = np.asarray(landmarks, dtype=np.float64)
    if array.shape != (batch_size, N_LANDMARKS, 2):
        raise ValueError(
            f"{name} must have shape (B, 68, 2) = ({batch_size}, 68, 2) with (x, y) pixel "
            f"coordinates in iBUG 300-W order, got {array.shape}; a custom backend must map "
            "(B, 3, H, W) images to one 68-point set per image."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf coordinates; check the landmark backend.")
    return array


class TemplateLandmarks:
    """The canonical 68 landmarks of an ArcFace-aligned face, for every image.

    Faces aligned to the standard ArcFace 112x112 five-point template all have
    their eyes, nose and mouth at nearly the same pixels, so one fixed set of 68
    points describes them without running any model. For images that are not
    112x112 the template is rescaled to the image size (x by ``W / 112``, y by
    ``H / 112``, about pixel centres).

    How the template was made (``scripts/make_landmark_template.py``): dlib's
    HOG frontal face detector (no upsampling) and its 68-point iBUG shape
    predictor (``face_recognition_models``) were run over all 2407 real LFW
    faces aligned to ArcFace 112x112 in ``../shared/assets/faces``. Where the
    detector found no face, the predictor was given the median detector box
    of the other faces (see :class:`DlibLandmarks`). The template is the
    per-point, per-coordinate median over all faces; ``mad`` in the JSON file
    holds the per-point median absolute deviation. Its eye centres, nose tip
    and mouth corners lie within a few pixels of the ArcFace five-point
    template (``five_point_check`` in the JSON file).

    Examples
    --------
    >>> import torch
    >>> TemplateLandmarks()(torch.rand(2, 3, 112, 112)).shape
    (2, 68, 2)
    """

    def points(self, image_size: tuple[int, int]) -> np.ndarray:
        """The template for one image size.

        Parameters
        ----------
        image_size : tuple of int
            ``(H, W)`` in pixels.

        Returns
        -------
        np.ndarray
            Shape ``(68, 2)``, float ``(x, y)`` pixel coordinates.
        """
        template = load_landmark_template()
        points = np.asarray(template["points"], dtype=np.float64)
        return _scale_points(points, tuple(template["image_size"]), tuple(image_size))

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Return the template for each image.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 3, H, W)`` float RGB in ``[0, 1]``; only the shape is used.

        Returns
        -------
        np.ndarray
            Shape ``(B, 68, 2)``, float ``(x, y)`` pixel coordinates.
        """
        images = check_images(images)
        batch, _, height, width = images.shape
        return np.repeat(self.points((height, width))[None], batch, axis=0)

    def __repr__(self) -> str:
        return "TemplateLandmarks()"


class _DetectingLandmarks:
    """What the backends that detect a face share: their call, the aligned-box fallback and the no-face error.

    A subclass sets ``fallback_box``, a ``_no_face_hint`` and implements ``_landmarks``.
    """

    fallback_box: bool
    _no_face_hint: str

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """68 landmarks per image: ``(B, 3, H, W)`` float RGB in ``[0, 1]`` -> ``(B, 68, 2)`` float ``(x, y)`` pixels.

        Raises
        ------
        NoFaceFoundError
            If no face was found in some images and the fallback box does not apply
            (``fallback_box=False``, or the landmark model still found none inside it).
        """
        images = check_images(images)
        fallback = _scaled_template_box(images.shape[2], images.shape[3]) if self.fallback_box else None
        landmarks, missing = self._landmarks(images, fallback)
        if missing:
            raise NoFaceFoundError(missing, type(self).__name__, f"{self._no_face_hint} {_ALIGNED_HINT}")
        return landmarks

    def _landmarks(self, images: torch.Tensor, fallback: Box | None) -> tuple[np.ndarray, list[int]]:
        """``(B, 68, 2)`` landmarks (unset rows where a face is missing) and the indices of the images without a face."""
        raise NotImplementedError


class DlibLandmarks(_DetectingLandmarks):
    """dlib face detector + 68-point iBUG shape predictor.

    Aligned face crops are tight: dlib's HOG detector, trained on looser
    boxes, misses a few of them (about 2% of ArcFace 112x112 LFW faces).
    With ``fallback_box=True`` the predictor is then given the face box of an
    aligned face instead: the median dlib detector box over the 2407 aligned
    faces used for the template (``face_box`` in
    ``krtfuap/data/landmarks_arcface112.json``), rescaled to the image size.
    This only makes sense for images aligned like ArcFace crops (any size);
    for unaligned photos set ``fallback_box=False``.

    Parameters
    ----------
    predictor_path : str or Path, optional
        Path of a dlib 68-point shape predictor (``.dat``). Default: the iBUG
        model shipped by ``face_recognition_models``.
    upsample : int
        Times the detector upsamples the image before detecting; each level
        makes small faces easier to find and costs about 4x the time.
    fallback_box : bool
        Use the aligned-face box when the detector finds no face. When False,
        images without a detection raise :class:`NoFaceFoundError`.

    Raises
    ------
    ImportError
        If ``dlib`` or ``face_recognition_models`` is not installed.
    FileNotFoundError
        If ``predictor_path`` does not exist.
    """

    def __init__(
        self,
        predictor_path: str | os.PathLike[str] | None = None,
        upsample: int = 0,
        fallback_box: bool = True,
    ) -> None:
        if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 0:
            raise ValueError(f"upsample must be an int >= 0, got {upsample!r}.")
        try:
            import dlib
        except ImportError as error:
            raise ImportError(
                'DlibLandmarks needs dlib; install it with pip install "krtfuap[dlib]".'
            ) from error
        if predictor_path is None:
            try:
                import face_recognition_models
            except ImportError as error:
                raise ImportError(
                    "DlibLandmarks needs the 68-point predictor from face_recognition_models; "
                    'install it with pip install "krtfuap[dlib]" or pass predictor_path=.'
                ) from error
            predictor_path = face_recognition_models.pose_predictor_model_location()
        if not Path(predictor_path).is_file():
            raise FileNotFoundError(
                f"dlib shape predictor not found at {predictor_path}; pass the path of "
                "shape_predictor_68_face_landmarks.dat as predictor_path=."
            )
        self.predictor_path = str(predictor_path)
        self.upsample = upsample
        self.fallback_box = fallback_box
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        try:
            self._predictor = dlib.shape_predictor(self.predictor_path)
        except RuntimeError as error:
            raise ValueError(
                f"{self.predictor_path} is not a readable dlib shape predictor ({error}); pass the path of "
                "shape_predictor_68_face_landmarks.dat (e.g. from face_recognition_models) as predictor_path=."
            ) from error

    def detect(self, images: torch.Tensor) -> list[Box | None]:
        """Detect the largest face in each image.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 3, H, W)`` float RGB in ``[0, 1]``.

        Returns
        -------
        list of (tuple of 4 float) or None
            Per image, ``(left, top, right, bottom)`` in pixels, or None when
            the detector found no face.
        """
        boxes: list[Box | None] = []
        for image in _to_uint8_hwc(check_images(images)):
            found = self._detector(image, self.upsample)
            if len(found) == 0:
                boxes.append(None)
                continue
            best = max(found, key=lambda r: r.width() * r.height())
            boxes.append((float(best.left()), float(best.top()), float(best.right()), float(best.bottom())))
        return boxes

    def predict(self, images: torch.Tensor, boxes: Sequence[Box]) -> np.ndarray:
        """Run the shape predictor inside given face boxes.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 3, H, W)`` float RGB in ``[0, 1]``.
        boxes : sequence of (tuple of 4 float)
            One ``(left, top, right, bottom)`` box per image, in pixels.

        Returns
        -------
        np.ndarray
            Shape ``(B, 68, 2)``, float ``(x, y)`` pixel coordinates.
        """
        arrays = _to_uint8_hwc(check_images(images))
        if len(boxes) != len(arrays):
            raise ValueError(f"predict needs one box per image: got {len(boxes)} boxes for {len(arrays)} images.")
        out = np.empty((len(arrays), N_LANDMARKS, 2), dtype=np.float64)
        for k, (image, box) in enumerate(zip(arrays, boxes)):
            rect = self._dlib.rectangle(*(int(round(v)) for v in box))
            shape = self._predictor(image, rect)
            out[k] = [(shape.part(i).x, shape.part(i).y) for i in range(N_LANDMARKS)]
        return out

    _no_face_hint = "Try upsample=1 or 2, or fallback_box=True for aligned face crops."

    def _landmarks(self, images: torch.Tensor, fallback: Box | None) -> tuple[np.ndarray, list[int]]:
        boxes = self.detect(images)
        missing = [k for k, box in enumerate(boxes) if box is None]
        if missing and fallback is None:
            return np.empty((len(images), N_LANDMARKS, 2), dtype=np.float64), missing
        return self.predict(images, [fallback if box is None else box for box in boxes]), []

    def __repr__(self) -> str:
        return (
            f"DlibLandmarks(predictor_path={self.predictor_path!r}, upsample={self.upsample}, "
            f"fallback_box={self.fallback_box})"
        )


def _face_alignment_weights() -> dict[str, str]:
    """File name -> download URL of the weights face-alignment downloads (FAN 2D + S3FD)."""
    from face_alignment.api import models_urls as fan_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls

    urls = [fan_urls["2DFAN-4"], sfd_urls["s3fd"]]
    return {os.path.basename(urlparse(url).path): url for url in urls}


@contextmanager
def _fan_weights_from(folder: Path) -> Iterator[None]:
    """Make face_alignment load its FAN weights from ``folder`` instead of the torch hub cache."""
    import face_alignment.api

    original = face_alignment.api.load_file_from_url
    face_alignment.api.load_file_from_url = functools.partial(original, model_dir=str(folder))
    try:
        yield
    finally:
        face_alignment.api.load_file_from_url = original


class FaceAlignmentLandmarks(_DetectingLandmarks):
    """FAN 2D landmarks from the ``face_alignment`` package (S3FD face detector).

    face-alignment downloads its weights on first use, which fails offline.
    This class first checks that both weight files are in ``weights_dir`` and
    otherwise raises a :class:`FileNotFoundError` naming each missing file, its
    download URL and the folder to put it in. The file names and URLs are read
    from the installed face-alignment package; for face-alignment 1.5.0 they
    are ``2DFAN4-11f355bf06.pth.tar`` and ``s3fd-619a316812.pth`` from
    ``https://www.adrianbulat.com/downloads/python-fan/``.

    When S3FD finds no face (tight aligned crops) and ``fallback_box=True``,
    FAN is given the aligned-face box used by :class:`DlibLandmarks`. FAN's
    crop is centred on the box, so a box from another detector only needs
    the right position and about the right size; this fallback has not been
    checked against S3FD boxes offline.

    Parameters
    ----------
    device : str
        Torch device for the networks, e.g. ``"cpu"`` or ``"cuda"``.
    weights_dir : str or Path, optional
        Folder holding the two weight files. Default:
        ``torch.hub.get_dir() / "checkpoints"`` (set ``TORCH_HOME`` to move it),
        where face-alignment itself caches them.
    fallback_box : bool
        Use the aligned-face box when S3FD finds no face; when False such
        images raise :class:`NoFaceFoundError`.

    Raises
    ------
    ImportError
        If ``face_alignment`` is not installed.
    FileNotFoundError
        If a weight file is missing from ``weights_dir``.
    """

    def __init__(
        self,
        device: str = "cpu",
        weights_dir: str | os.PathLike[str] | None = None,
        fallback_box: bool = True,
    ) -> None:
        try:
            import face_alignment
        except ImportError as error:
            raise ImportError(
                "FaceAlignmentLandmarks needs the face_alignment package; "
                "install it with pip install face-alignment."
            ) from error
        folder = Path(weights_dir) if weights_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
        weights = _face_alignment_weights()
        missing = [(name, url) for name, url in weights.items() if not (folder / name).is_file()]
        if missing:
            lines = "\n".join(f"  {name}  <-  {url}" for name, url in missing)
            raise FileNotFoundError(
                f"face-alignment weights missing from {folder}:\n{lines}\n"
                f"Download each file and put it in {folder} (or pass weights_dir= the folder that "
                "holds them); face-alignment cannot download them without network access."
            )
        self.device = device
        self.weights_dir = str(folder)
        self.fallback_box = fallback_box
        sfd_name = next(name for name in weights if name.startswith("s3fd"))
        kwargs: dict[str, Any] = {
            "device": device,
            "face_detector": "sfd",
            "face_detector_kwargs": {"path_to_detector": str(folder / sfd_name)},
        }
        if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters:
            # torch.compile adds minutes of warm-up for the few images landmarks are needed on.
            kwargs["compile"] = False
        try:
            with _fan_weights_from(folder):
                self._model = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as error:
            names = ", ".join(weights)
            raise torch_load_error(
                error, folder, what="face-alignment weights (one of " + names + ") in",
                fix=f"Download them again from {', '.join(weights.values())} into {folder}.",
            ) from error

    _no_face_hint = "Try fallback_box=True for aligned face crops."

    def _landmarks(self, images: torch.Tensor, fallback: Box | None) -> tuple[np.ndarray, list[int]]:
        out = np.empty((images.shape[0], N_LANDMARKS, 2), dtype=np.float64)
        missing: list[int] = []
        for k, image in enumerate(_to_uint8_hwc(images)):
            found = self._model.face_detector.detect_from_image(image.copy())
            if len(found):
                best = max(found, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
                box = np.asarray(best[:4], dtype=np.float64)
            elif fallback is not None:
                box = np.asarray(fallback, dtype=np.float64)
            else:
                missing.append(k)
                continue
            predicted = self._model.get_landmarks_from_image(image, detected_faces=[box])
            if not predicted:
                missing.append(k)
                continue
            out[k] = np.asarray(predicted[0], dtype=np.float64)[:, :2]
        return out, missing

    def __repr__(self) -> str:
        return (
            f"FaceAlignmentLandmarks(device={self.device!r}, weights_dir={self.weights_dir!r}, "
            f"fallback_box={self.fallback_box})"
        )


_BACKENDS: dict[str, Callable[[], LandmarkBackend]] = {
    "template": TemplateLandmarks,
    "dlib": DlibLandmarks,
    "face_alignment": FaceAlignmentLandmarks,
}


def get_landmark_backend(name_or_obj: str | LandmarkBackend) -> LandmarkBackend:
    """Turn a backend name or a callable into a landmark backend.

    Parameters
    ----------
    name_or_obj : str or callable
        ``"template"``, ``"dlib"`` or ``"face_alignment"`` (built with default
        arguments), or any callable mapping ``(B, 3, H, W)`` images in
        ``[0, 1]`` to a ``(B, 68, 2)`` array of ``(x, y)`` pixel coordinates,
        returned as is.

    Returns
    -------
    callable
        The backend.

    Raises
    ------
    ValueError
        If the name is unknown.
    TypeError
        If ``name_or_obj`` is neither a string nor callable.
    """
    if isinstance(name_or_obj, str):
        key = name_or_obj.strip().lower().replace("-", "_")
        if key not in _BACKENDS:
            raise ValueError(
                f"unknown landmark backend {name_or_obj!r}; choose one of {sorted(_BACKENDS)} "
                "or pass a callable returning (B, 68, 2) landmarks."
            )
        return _BACKENDS[key]()
    if callable(name_or_obj):
        return name_or_obj
    raise TypeError(
        f"landmarks must be a backend name {sorted(_BACKENDS)} or a callable, "
        f"got {type(name_or_obj).__name__}."
    )
