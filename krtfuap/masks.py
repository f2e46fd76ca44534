"""Facial key-region masks from 68-point landmarks (KRT-FUAP Section 3.2).

Each face's mask ``M_i`` is the union of the convex hulls of its eyes, nose
and mouth landmarks (Eq. 2); the dataset mask ``M_0`` combines the faces'
masks, by intersection in the paper (Eq. 3).

Regions use iBUG 300-W landmark indices:

==============  =========  ====================================================
region          indices    what
==============  =========  ====================================================
``right_eye``   36-41      the subject's right eye (left in the image)
``left_eye``    42-47      the subject's left eye (right in the image)
``nose``        27-35      nose bridge 27-30 and lower nose 31-35
``mouth``       48-59      outer lip contour
==============  =========  ====================================================

``"eyes"`` stands for both eyes, each its own hull (one hull around both
eyes would also cover the bridge of the nose between them).

Pixel ``(row i, column j)`` has its centre at ``(x, y) = (j, i)``, the
landmark convention of :mod:`krtfuap.landmarks`; it is in the mask when its
centre is inside or on the boundary of a hull.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import shapely
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from krtfuap._batches import iter_image_batches
from krtfuap._validation import check_images, store_params
from krtfuap.landmarks import LandmarkBackend, TemplateLandmarks, check_landmarks, get_landmark_backend

__all__ = ["REGIONS", "REGION_GROUPS", "key_region_mask", "key_region_masks", "KeyRegionMasker"]

#: iBUG 300-W landmark indices of each key region (see the table above).
REGIONS: dict[str, tuple[int, ...]] = {
    "right_eye": tuple(range(36, 42)),
    "left_eye": tuple(range(42, 48)),
    "nose": tuple(range(27, 36)),
    "mouth": tuple(range(48, 60)),
}
#: Names that stand for several regions, each region getting its own hull.
REGION_GROUPS: dict[str, tuple[str, ...]] = {"eyes": ("right_eye", "left_eye")}
_COMBINE = ("intersection", "union", "vote")


def _expand_regions(regions: Sequence[str]) -> tuple[str, ...]:
    """Region and group names -> the list of single regions, each once."""
    if isinstance(regions, str):
        regions = (regions,)
    names: list[str] = []
    for region in regions:
        if region in REGION_GROUPS:
            parts = REGION_GROUPS[region]
        elif region in REGIONS:
            parts = (region,)
        else:
            raise ValueError(
                f"unknown region {region!r}; choose from {sorted(REGIONS) + sorted(REGION_GROUPS)}."
            )
        names.extend(p for p in parts if p not in names)
    if not names:
        raise ValueError("regions is empty; pass at least one region, e.g. ('eyes', 'nose', 'mouth').")
    return tuple(names)


def _check_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"image_size must be (H, W) with positive ints, got {image_size!r}.")
    return int(size[0]), int(size[1])


def _rasterise(points: np.ndarray, regions: tuple[str, ...], height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)`` union of the regions' convex hulls for one ``(68, 2)`` point set."""
    mask = np.zeros((height, width), dtype=bool)
    for region in regions:
        hull = shapely.convex_hull(shapely.multipoints(points[list(REGIONS[region])]))
        left, top, right, bottom = hull.bounds
        # Only pixel centres inside the hull's bounding box can be on the hull.
        x0, y0 = max(math.ceil(left), 0), max(math.ceil(top), 0)
        x1, y1 = min(math.floor(right), width - 1), min(math.floor(bottom), height - 1)
        if x1 < x0 or y1 < y0:
            continue
        xs, ys = np.meshgrid(np.arange(x0, x1 + 1), np.arange(y0, y1 + 1))
        shapely.prepare(hull)
        mask[y0 : y1 + 1, x0 : x1 + 1] |= shapely.intersects_xy(hull, xs, ys)
    return mask


def key_region_masks(
    landmarks: np.ndarray | torch.Tensor,
    image_size: int | Sequence[int],
    regions: Sequence[str] = ("eyes", "nose", "mouth"),
) -> torch.Tensor:
    """Key-region masks of a batch of faces.

    Parameters
    ----------
    landmarks : np.ndarray or torch.Tensor
        Shape ``(B, 68, 2)``, ``(x, y)`` pixel coordinates in iBUG 300-W order.
    image_size : int or (int, int)
        ``(H, W)`` of the images (an int means square).
    regions : sequence of str
        Regions to include: ``"eyes"``, ``"right_eye"``, ``"left_eye"``,
        ``"nose"``, ``"mouth"`` (see the module docstring for the indices).

    Returns
    -------
    torch.Tensor
        Float tensor of shape ``(B, H, W)`` with values in ``{0, 1}``: 1 where
        the pixel centre is inside or on the convex hull of a region.
    """
    batch = len(landmarks)
    points = check_landmarks(landmarks, batch)
    height, width = _check_image_size(image_size)
    names = _expand_regions(regions)
    masks = np.zeros((batch, height, width), dtype=bool)
    for k, face in enumerate(points):
        masks[k] = _rasterise(face, names, height, width)
    return torch.from_numpy(masks).float()


def key_region_mask(
    landmarks: np.ndarray | torch.Tensor,
    image_size: int | Sequence[int],
    regions: Sequence[str] = ("eyes", "nose", "mouth"),
) -> torch.Tensor:
    """Key-region mask of one face: the union of its regions' convex hulls (Eq. 2).

    :func:`key_region_masks` for one face: ``landmarks`` of shape ``(68, 2)`` give
    a float ``(H, W)`` mask with values in ``{0, 1}``; ``image_size`` and
    ``regions`` as there.
    """
    if isinstance(landmarks, torch.Tensor):
        landmarks = landmarks.detach().cpu().numpy()
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(
            f"landmarks must have shape (68, 2) for one face, got {points.shape}; "
            "for a batch use key_region_masks."
        )
    return key_region_masks(points[None], image_size, regions)[0]


class KeyRegionMasker(BaseEstimator):
    """Learn the dataset's facial key-region mask ``M_0`` (KRT-FUAP Eq. 2-3).

    For every face, the union of the convex hulls of its eye, nose and mouth
    landmarks gives a mask ``M_i``; a running per-pixel count of the faces
    covering each pixel is kept (never the masks themselves) and combined
    into one mask at the end.

    Parameters
    ----------
    landmarks : str or callable
        Landmark backend: ``"template"`` (the packaged ArcFace 112x112
        template, no model; fitting then needs only the image size and the
        template counts as one face), ``"dlib"``, ``"face_alignment"``, or a
        callable mapping ``(B, 3, H, W)`` images to ``(B, 68, 2)`` landmarks.
        See :func:`krtfuap.landmarks.get_landmark_backend`.
    combine : {"intersection", "union", "vote"}
        How the faces' masks are combined: ``"intersection"`` (the paper: a
        pixel is on when every face has it on), ``"union"`` (any face), or
        ``"vote"`` (at least ``ceil(vote * n_faces_)`` faces).
    vote : float
        Fraction of faces in ``(0, 1]`` for ``combine="vote"``.
    regions : sequence of str
        Regions in each face's mask; see :mod:`krtfuap.masks`.
    image_size : (int, int), optional
        ``(H, W)``. Required to fit the template without images; when images
        are given their size must match it.

    Attributes
    ----------
    mask_ : torch.Tensor
        Float ``(H, W)`` mask with values in ``{0, 1}``.
    face_masks_count_ : torch.Tensor
        Int64 ``(H, W)``: number of faces whose mask covers each pixel.
    n_faces_ : int
        Number of faces (landmark sets) combined.
    coverage_ : float
        Fraction of the image's pixels in ``mask_``.
    image_size_ : (int, int)
        ``(H, W)`` the mask was fitted for.

    Examples
    --------
    >>> import torch
    >>> masker = KeyRegionMasker().fit(torch.rand(4, 3, 112, 112))
    >>> masker.mask_.shape
    torch.Size([112, 112])
    """

    def __init__(
        self,
        landmarks: str | LandmarkBackend = "template",
        combine: str = "intersection",
        vote: float = 0.5,
        regions: Sequence[str] = ("eyes", "nose", "mouth"),
        image_size: tuple[int, int] | None = None,
    ) -> None:
        store_params(self, locals())

    def _check_params(self) -> tuple[str, ...]:
        if self.combine not in _COMBINE:
            raise ValueError(f"combine must be one of {_COMBINE}, got {self.combine!r}.")
        if not (isinstance(self.vote, (int, float)) and 0.0 < self.vote <= 1.0):
            raise ValueError(f"vote must be a fraction in (0, 1], got {self.vote!r}.")
        return _expand_regions(self.regions)

    def fit(self, images_or_loader: object = None) -> KeyRegionMasker:
        """Compute the dataset mask.

        Parameters
        ----------
        images_or_loader : torch.Tensor or iterable, optional
            A ``(B, 3, H, W)`` float tensor in ``[0, 1]``, or an iterable of
            such batches or of tuples whose first item is such a batch (e.g.
            a ``DataLoader`` yielding ``(images, labels)``). May be None with
            ``landmarks="template"`` and ``image_size`` set.

        Returns
        -------
        KeyRegionMasker
            ``self``, fitted.

        Raises
        ------
        ValueError
            If the loader is empty, image sizes disagree, or the combined
            mask is empty.
        """
        regions = self._check_params()
        size = None if self.image_size is None else _check_image_size(self.image_size)
        backend = get_landmark_backend(self.landmarks)
        template_only = isinstance(backend, TemplateLandmarks)
        if images_or_loader is None:
            if not (template_only and size is not None):
                raise ValueError(
                    "fit needs images (a (B, 3, H, W) tensor or a loader); only landmarks='template' "
                    "with image_size=(H, W) can be fitted without them."
                )
            batches: Iterable[torch.Tensor] = ()
        else:
            batches = iter_image_batches(images_or_loader, name="images", reiterable=False)

        count: torch.Tensor | None = None
        n_faces = 0
        for images in batches:
            batch_hw = tuple(images.shape[2:])
            if size is None:
                size = batch_hw
            elif batch_hw != size:
                raise ValueError(
                    f"all images must be {size[0]}x{size[1]} (H x W), got a batch of "
                    f"{batch_hw[0]}x{batch_hw[1]}; resize them or set image_size to match."
                )
            if template_only:
                break
            points = check_landmarks(backend(images), images.shape[0], name="landmark backend output")
            masks = key_region_masks(points, size, regions)
            batch_count = masks.sum(dim=0, dtype=torch.int64)
            count = batch_count if count is None else count + batch_count
            n_faces += images.shape[0]

        if template_only:
            template = TemplateLandmarks().points(size)
            count = key_region_masks(template[None], size, regions)[0].to(torch.int64)
            n_faces = 1

        # Faces needed to switch a pixel on; the tolerance keeps e.g. 0.3 * 10 from rounding up to 4.
        needed = {
            "intersection": n_faces,
            "union": 1,
            "vote": max(1, math.ceil(self.vote * n_faces - 1e-9)),
        }[self.combine]
        mask = (count >= needed).float()
        if not mask.any():
            if self.combine == "union":
                hint = "the landmarks lie outside the images; check the landmark backend"
            else:
                hint = (
                    f"the faces' {'/'.join(regions)} regions share no pixel; are the faces aligned? "
                    "Use combine='vote' with a lower vote (e.g. 0.5) or combine='union'"
                )
            raise ValueError(f"the {self.combine} of {n_faces} face masks is empty: {hint}.")

        self.face_masks_count_ = count
        self.n_faces_ = n_faces
        self.image_size_ = size
        self.mask_ = mask
        self.coverage_ = float(mask.mean())
        return self

    def get_mask(self) -> torch.Tensor:
        """Return the fitted mask.

        Returns
        -------
        torch.Tensor
            ``mask_``: float ``(H, W)`` with values in ``{0, 1}``.
        """
        if not hasattr(self, "mask_"):
            raise NotFittedError("This KeyRegionMasker is not fitted yet; call fit(images_or_loader) first.")
        return self.mask_

    def transform(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """Return the fitted mask, checking that it fits ``images`` when given.

        Parameters
        ----------
        images : torch.Tensor, optional
            ``(B, 3, H, W)`` float in ``[0, 1]``; only the size is checked.

        Returns
        -------
        torch.Tensor
            ``mask_``: float ``(H, W)`` with values in ``{0, 1}``.
        """
        mask = self.get_mask()
        if images is not None:
            images = check_images(images)
            if tuple(images.shape[2:]) != tuple(mask.shape):
                raise ValueError(
                    f"images are {tuple(images.shape[2:])} (H, W) but the mask was fitted for "
                    f"{tuple(mask.shape)}; fit on images of the same size."
                )
        return mask
