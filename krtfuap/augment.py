"""Photo-pipeline transforms applied to the adversarial faces while fitting (robust fitting).

A cloaked photo does not reach a recogniser as the float tensor that was
fitted: it is saved in 8 bits, often as JPEG, and the recogniser detects and
aligns the face again, resampling it at another size and a slightly different
position. Fitting the perturbation through random, differentiable copies of
these steps, so that the loss is an expectation over transformations (Athalye
et al., ICML 2018, "Synthesizing Robust Adversarial Examples"), makes it
survive them.

The module has three layers:

* functions that apply one transform with given parameters, differentiable in
  the images: :func:`jpeg`, :func:`rescale`, :func:`similarity_warp`,
  :func:`quantize`, :func:`warp_to_face`, :func:`save_and_realign` (the simulated
  save that :func:`photo_round_trip` and :func:`krtfuap.refine.refine_on_photo`
  share), :func:`photo_round_trip`, and :func:`similarity_matrices` to build the
  warps;
* random transforms that draw those parameters and apply each to an image with
  probability ``p`` (:class:`RandomJPEG`, :class:`RandomRescale`,
  :class:`RandomRealign`, :class:`Quantize`, :class:`RandomPhotoRoundTrip`);
  called as ``transform(images, generator=None)``;
* :class:`PhotoAugment`, a sequence of random transforms sharing one
  ``torch.Generator``, with the presets :meth:`PhotoAugment.default`
  (``UAPAttack(augment="photo")``) and :meth:`PhotoAugment.round_trip`
  (``UAPAttack(augment="round_trip")``).

Images are ``(B, C, H, W)`` floats in ``[0, 1]`` (``C = 3`` for JPEG); every
output has the input's shape, device and dtype and stays in ``[0, 1]``. Random
parameters are drawn on the CPU from the generator given (the global torch RNG
without one) and then moved to the images' device.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia.enhance import jpeg_codec_differentiable
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

__all__ = [
    "jpeg",
    "rescale",
    "similarity_warp",
    "quantize",
    "similarity_matrices",
    "warp_to_face",
    "save_and_realign",
    "photo_round_trip",
    "RandomTransform",
    "RandomJPEG",
    "RandomRescale",
    "RandomRealign",
    "Quantize",
    "RandomPhotoRoundTrip",
    "PhotoAugment",
    "AUGMENT_PRESETS",
    "RESCALE_MODES",
    "PADDING_MODES",
    "resolve_augment",
]

#: Down-sampling filters of :func:`rescale`: ``"antialias"`` bilinear with an anti-aliasing
#: filter (as Pillow resizes), ``"bilinear"`` plain bilinear (as OpenCV's ``warpAffine`` aligns a
#: larger face), ``"area"`` pixel averaging.
RESCALE_MODES = ("antialias", "bilinear", "area")
#: Border handling of :func:`similarity_warp` (``torch.nn.functional.grid_sample`` names).
PADDING_MODES = ("reflection", "border", "zeros")


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} takes a float (B, C, H, W) tensor in [0, 1], got {shape}.")


def _check_range(value: tuple[float, float], name: str, low: float, high: float) -> tuple[float, float]:
    """``value`` as a ``(a, b)`` pair with ``low <= a <= b <= high``."""
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}.") from error
    if not (math.isfinite(a) and math.isfinite(b) and low <= a <= b <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got ({a}, {b}).")
    return a, b


def _check_bound(value: float, name: str, high: float) -> float:
    """``value`` as a float in ``[0, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
        raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}.")
    return float(value)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"quantize bits must be an integer >= 1, got {bits!r}.")
    return bits


def _compute_dtype(images: torch.Tensor) -> torch.dtype:
    """float16 and bfloat16 images are transformed in float32 (not every CPU kernel takes them)."""
    return images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32


def _uniform(count: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` draws uniform in ``[low, high]``, float64 on the CPU."""
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------- functions
def jpeg(images: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """Differentiable JPEG compression and decompression (kornia's codec).

    Baseline JPEG with 4:2:0 chroma subsampling and the standard quantisation
    tables scaled by ``quality`` as libjpeg (and so Pillow's default) scales
    them. The rounding of the DCT coefficients is replaced by a differentiable
    approximation (:func:`kornia.enhance.jpeg_codec_differentiable`), so the
    forward pass is close to, not equal to, a real save and load. Sizes that
    are not multiples of 16 (the 4:2:0 macroblock; 112 is one) are padded by
    the codec at the bottom and right by repeating the edge, as a JPEG encoder
    does, and cropped back.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` RGB in ``[0, 1]``.
    quality : float or torch.Tensor
        JPEG quality in ``[1, 100]``: one number, or ``(B,)`` per image.

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)`` in ``[0, 1]``, same device and dtype, differentiable
        with respect to ``images``.
    """
    _check_images(images, "jpeg")
    if images.shape[1] != 3:
        raise ValueError(f"jpeg needs RGB images (B, 3, H, W), got {images.shape[1]} channels.")
    compute = _compute_dtype(images)
    quality = torch.as_tensor(quality, dtype=compute, device=images.device).reshape(-1)
    if quality.numel() not in (1, len(images)):
        raise ValueError(f"jpeg quality must be one number or one per image ({len(images)}), got {quality.numel()}.")
    if quality.min() < 1 or quality.max() > 100:
        raise ValueError(f"jpeg quality must be in [1, 100], got {quality.min().item()}..{quality.max().item()}.")
    coded = jpeg_codec_differentiable(images.to(compute), quality.expand(len(images)))
    return coded.clamp(0.0, 1.0).to(images.dtype)


def rescale(images: torch.Tensor, factor: float, mode: str = "antialias") -> torch.Tensor:
    """Shrink the images by ``factor`` and enlarge them back to their size (bilinear).

    What a face goes through when the photo is resized, or when it is smaller
    in the photo than the aligned template: the detail finer than the smaller
    grid is lost.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)`` in ``[0, 1]``.
    factor : float
        Side scale of the small copy, in ``(0, 1]`` (its size is rounded, at
        least 1 pixel); ``1`` returns ``images`` itself.
    mode : {"antialias", "bilinear", "area"}
        Down-sampling filter (:data:`RESCALE_MODES`); the way back up is
        always bilinear.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)`` in ``[0, 1]``, differentiable with respect to ``images``.
    """
    _check_images(images, "rescale")
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"rescale factor must be in (0, 1], got {factor}.")
    if mode not in RESCALE_MODES:
        raise ValueError(f"rescale mode must be one of {RESCALE_MODES}, got {mode!r}.")
    height, width = images.shape[-2:]
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    if size == (height, width):
        return images
    work = images.to(_compute_dtype(images))
    if mode == "area":
        small = F.interpolate(work, size=size, mode="area")
    else:
        small = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=mode == "antialias")
    back = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return back.clamp(0.0, 1.0).to(images.dtype)


def similarity_warp(
    images: torch.Tensor,
    angle: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    padding_mode: str = "reflection",
) -> torch.Tensor:
    """Rotate, scale and shift each image about its centre (bilinear), as a re-alignment would.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)`` in ``[0, 1]``.
    angle : torch.Tensor
        ``(B,)`` rotations in degrees (counter-clockwise).
    scale : torch.Tensor
        ``(B,)`` zoom factors (``> 1`` enlarges the face).
    shift : torch.Tensor
        ``(B, 2)`` translations ``(x, y)`` in pixels (may be fractional).
    padding_mode : {"reflection", "border", "zeros"}
        What fills the pixels the warp brings in from outside the image.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)`` in ``[0, 1]``, differentiable with respect to ``images``.
    """
    _check_images(images, "similarity_warp")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"similarity_warp padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
    count = len(images)
    options = dict(device=images.device, dtype=images.dtype)
    angle, scale = angle.to(**options).reshape(count), scale.to(**options).reshape(count)
    shift = shift.to(**options).reshape(count, 2)
    height, width = images.shape[-2:]
    center = torch.tensor([(width - 1) / 2, (height - 1) / 2], **options).expand(count, 2)
    matrix = get_rotation_matrix2d(center, angle, scale[:, None].expand(count, 2))
    matrix = torch.cat([matrix[..., :2], matrix[..., 2:] + shift[..., None]], dim=-1)
    warped = warp_affine(images, matrix, (height, width), mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return warped.clamp(0.0, 1.0)


class _StraightThroughRound(torch.autograd.Function):
    """Clip to ``[0, 1]`` and round to a grid in the forward pass; pass the gradient through unchanged."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, levels: int) -> torch.Tensor:
        return (images.clamp(0.0, 1.0) * levels).round() / levels

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def quantize(images: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round to the nearest of ``2**bits`` levels (an 8-bit PNG save), with a straight-through gradient.

    Parameters
    ----------
    images : torch.Tensor
        ``(B, C, H, W)`` in ``[0, 1]``.
    bits : int
        Bits per channel, ``>= 1``.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)``: multiples of ``1 / (2**bits - 1)`` in ``[0, 1]``
        (values outside ``[0, 1]`` are clipped first). Its gradient with
        respect to ``images`` is the identity everywhere (Bengio et al. 2013's
        straight-through estimator), since rounding has zero gradient almost
        everywhere.
    """
    _check_images(images, "quantize")
    return _StraightThroughRound.apply(images, 2 ** _check_bits(bits) - 1)


def similarity_matrices(
    angle: torch.Tensor, scale: float, shift: torch.Tensor, source: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """Similarity transforms that turn, scale and shift a grid about its centre onto another grid.

    Parameters
    ----------
    angle : torch.Tensor
        ``(B,)`` turns in degrees, clockwise on screen.
    scale : float
        Zoom factor about the centre of the ``source`` grid.
    shift : torch.Tensor
        ``(B, 2)`` shifts ``(x, y)`` in ``target`` pixels, after the centre of ``source`` is put on the
        centre of ``target``.
    source, target : (int, int)
        ``(height, width)`` of the two grids.

    Returns
    -------
    torch.Tensor
        ``(B, 3, 3)`` float64 matrices, ``source`` pixels -> ``target`` pixels.
    """
    count = len(angle)
    source_centre = torch.tensor([(source[1] - 1) / 2, (source[0] - 1) / 2], dtype=torch.float64)
    target_centre = torch.tensor([(target[1] - 1) / 2, (target[0] - 1) / 2], dtype=torch.float64)
    rotation = get_rotation_matrix2d(
        source_centre.expand(count, 2), -angle.double(), torch.full((count, 2), scale, dtype=torch.float64)
    )
    translation = rotation[..., 2] + target_centre - source_centre + shift.double()
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(count, 1, 3)
    return torch.cat([torch.cat([rotation[..., :2], translation[..., None]], dim=-1), bottom], dim=1)


def warp_to_face(
    photos: torch.Tensor, to_face: torch.Tensor, size: tuple[int, int], padding_mode: str = "border"
) -> torch.Tensor:
    """Sample aligned faces from photos, as a recogniser's alignment does (bilinear).

    Parameters
    ----------
    photos : torch.Tensor
        ``(B, 3, h, w)`` in ``[0, 1]``.
    to_face : torch.Tensor
        ``(B, 3, 3)`` or ``(B, 2, 3)``: photo pixels -> aligned-face pixels.
    size : (int, int)
        ``(height, width)`` of the aligned faces.
    padding_mode : {"reflection", "border", "zeros"}
        What fills the face where it reaches outside the photo.

    Returns
    -------
    torch.Tensor
        ``(B, 3, *size)``, same dtype and device, clamped to ``[0, 1]`` (bilinear weights in
        float32 can sum to a hair above 1 and overshoot a white photo), differentiable with
        respect to ``photos``.
    """
    _check_images(photos, "warp_to_face")
    matrix = to_face[:, :2].to(photos)
    warped = warp_affine(photos, matrix, tuple(size), mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return warped.clamp(0.0, 1.0)


def save_and_realign(
    photos: torch.Tensor,
    to_face: torch.Tensor,
    size: tuple[int, int],
    quality: float | torch.Tensor | None = None,
    padding_mode: str = "border",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A photo's way to a recogniser, simulated: an 8-bit save, then the face aligned again from it.

    The save rounds to 8 bits; with ``scale < 1`` it then shrinks the photo (antialiased bilinear,
    as a platform's resize) and rounds again; with ``quality`` it JPEG-codes the photo at that size
    (on its own macroblock grid) and rounds the decoded photo again. Differentiable in the photos
    (straight-through rounding, kornia's JPEG).

    Parameters
    ----------
    photos : torch.Tensor
        ``(B, 3, h, w)`` RGB in ``[0, 1]`` (values outside are clipped by the rounding).
    to_face : torch.Tensor
        ``(B, 3, 3)`` or ``(B, 2, 3)``: photo pixels -> aligned-face pixels, as :func:`warp_to_face`.
    size : (int, int)
        ``(height, width)`` of the aligned faces.
    quality : float or torch.Tensor, optional
        JPEG quality in ``[1, 100]``, one or ``(B,)``; ``None``: a lossless save.
    padding_mode : {"reflection", "border", "zeros"}
        As :func:`warp_to_face`.
    scale : float
        Side scale of the saved photo, in ``(0, 1]`` (its size is rounded, at least 1 pixel);
        ``to_face`` still maps the full-size photo's pixels.

    Returns
    -------
    saved : torch.Tensor
        ``(B, 3, h', w')`` the photos as saved and read back (``h' = h`` unless shrunk), in ``[0, 1]``.
    faces : torch.Tensor
        ``(B, 3, *size)`` the faces aligned from them, in ``[0, 1]``.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"save_and_realign scale must be in (0, 1], got {scale}.")
    saved = quantize(photos)
    height, width = photos.shape[-2:]
    shrunk = (max(1, round(height * scale)), max(1, round(width * scale)))
    if shrunk != (height, width):
        work = saved.to(_compute_dtype(saved))
        saved = quantize(F.interpolate(work, size=shrunk, mode="bilinear", align_corners=False, antialias=True)
                         .clamp(0.0, 1.0).to(photos.dtype))
        to_face = _as_3x3(to_face) @ _shrunk_to_full(shrunk, (height, width), to_face)
    if quality is not None:
        saved = quantize(jpeg(saved, quality))
    return saved, warp_to_face(saved, to_face, size, padding_mode)


def _as_3x3(matrices: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` or ``(B, 3, 3)`` affine matrices as ``(B, 3, 3)``."""
    if matrices.shape[-2] == 3:
        return matrices
    last_row = matrices.new_tensor([0.0, 0.0, 1.0]).expand(len(matrices), 1, 3)
    return torch.cat([matrices, last_row], dim=1)


def _shrunk_to_full(shrunk: tuple[int, int], full: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """``(1, 3, 3)``: pixels of a photo resized to ``shrunk`` -> pixels of the ``full``-size photo (pixel
    centres, as ``align_corners=False`` resizes)."""
    scale_y, scale_x = full[0] / shrunk[0], full[1] / shrunk[1]
    return like.new_tensor([[scale_x, 0.0, 0.5 * scale_x - 0.5],
                            [0.0, scale_y, 0.5 * scale_y - 0.5],
                            [0.0, 0.0, 1.0]])[None]


def photo_round_trip(
    images: torch.Tensor,
    scale: float,
    quality: float | torch.Tensor | None = None,
    paste_jitter: torch.Tensor | None = None,
    realign_jitter: torch.Tensor | None = None,
) -> torch.Tensor:
    """An aligned face pasted into a photo at ``scale``, saved, then detected and aligned again.

    The path a cloak takes from :class:`krtfuap.apps.cloak.PhotoCloak` to a
    recogniser, on the aligned face itself: the face is sampled bilinearly onto
    the photo's coarser grid (as the paste warps the perturbation and as the
    photo holds the face), rounded to 8 bits and, with ``quality``, JPEG-coded
    at that size (chroma subsampling and 8x8 blocks then cover more of the
    face than at the template's size), rounded again and sampled back onto the
    template with keypoints that are a little off. Differentiable in the
    images (straight-through rounding, kornia's JPEG).

    Parameters
    ----------
    images : torch.Tensor
        ``(B, 3, H, W)`` aligned faces in ``[0, 1]``.
    scale : float
        Photo pixels per template pixel, in ``(0, 1]`` (faces smaller than the
        template; the photo grid has ``round(H * scale) x round(W * scale)``
        pixels, at least 8 a side).
    quality : float or torch.Tensor, optional
        JPEG quality in ``[1, 100]``, one or ``(B,)``; ``None``: a lossless save.
    paste_jitter, realign_jitter : torch.Tensor, optional
        ``(B, 3)``: rotation (degrees) and ``(x, y)`` shift (photo pixels) of the
        face on the photo grid, and of the re-detected alignment against the
        true one. ``None``: zeros.

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)`` in ``[0, 1]``, same device and dtype.
    """
    _check_images(images, "photo_round_trip")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"photo_round_trip scale must be in (0, 1] (photo pixels per template pixel), got {scale}.")
    count, (height, width) = len(images), images.shape[-2:]
    small = (max(8, round(height * scale)), max(8, round(width * scale)))
    zeros = torch.zeros(count, 3, dtype=torch.float64)
    paste = zeros if paste_jitter is None else paste_jitter.double().reshape(count, 3)
    realign = zeros if realign_jitter is None else realign_jitter.double().reshape(count, 3)
    to_photo = similarity_matrices(paste[:, 0], small[1] / width, paste[:, 1:], (height, width), small)
    detected = similarity_matrices(realign[:, 0], 1.0, realign[:, 1:], small, small)
    to_face = torch.linalg.inv(detected @ to_photo)
    work = images.to(_compute_dtype(images))
    photo = warp_affine(work, to_photo[:, :2].to(work), small, mode="bilinear", padding_mode="border",
                        align_corners=True)
    _, faces = save_and_realign(photo, to_face, (height, width), quality, padding_mode="border")
    return faces.to(images.dtype)


# ---------------------------------------------------------- random transforms
class RandomTransform:
    """Base of the random transforms: apply :meth:`apply` to each image with probability ``p``.

    Whether an image is transformed is drawn per image; subclasses say how
    their parameters are drawn. Images left out come back unchanged (the same
    values, and their gradient is the identity).

    Parameters
    ----------
    p : float
        Chance in ``[0, 1]`` that an image is transformed.
    """

    def __init__(self, p: float) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__} probability p must be a number in [0, 1], got {p!r}.")
        self.p = float(p)

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Transform every image of ``images`` (``(B, C, H, W)``), drawing parameters from ``generator``."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform each image with probability ``p``; ``(B, C, H, W)`` in ``[0, 1]`` in and out."""
        _check_images(images, type(self).__name__)
        if self.p == 0.0 or len(images) == 0:
            return images
        if self.p == 1.0:
            return self.apply(images, generator)
        chosen = torch.rand(len(images), generator=generator) < self.p
        if not chosen.any():
            return images
        if chosen.all():
            return self.apply(images, generator)
        index = chosen.nonzero().squeeze(1).to(images.device)
        return images.index_put((index,), self.apply(images[index], generator))

    def _settings(self) -> str:
        return f"p={self.p}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings()})"


class RandomJPEG(RandomTransform):
    """:func:`jpeg` at a quality drawn uniformly in ``quality``, **per image**.

    Parameters
    ----------
    quality : (float, float)
        Range of the JPEG quality, within ``[1, 100]``.
    p : float
        Chance per image of being compressed.
    """

    def __init__(self, quality: tuple[float, float] = (60.0, 95.0), p: float = 0.5) -> None:
        super().__init__(p)
        self.quality = _check_range(quality, "RandomJPEG quality", 1.0, 100.0)

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return jpeg(images, _uniform(len(images), *self.quality, generator))

    def _settings(self) -> str:
        return f"quality={self.quality}, p={self.p}"


class RandomRescale(RandomTransform):
    """:func:`rescale` by a factor drawn uniformly in ``factor``, **per call**.

    The factor and the down-sampling mode are drawn once per call and shared
    by the images transformed in it (one interpolation per batch).

    Parameters
    ----------
    factor : (float, float)
        Range of the side scale of the small copy, within ``(0, 1]``.
    modes : sequence of str
        Down-sampling filters (:data:`RESCALE_MODES`) to choose from, uniformly.
    p : float
        Chance per image of being rescaled.
    """

    def __init__(
        self, factor: tuple[float, float] = (0.5, 1.0), modes: Sequence[str] = ("antialias", "bilinear"), p: float = 0.5
    ) -> None:
        super().__init__(p)
        self.factor = _check_range(factor, "RandomRescale factor", 0.0, 1.0)
        if self.factor[0] == 0.0:
            raise ValueError("RandomRescale factor must be above 0 (a 0-pixel copy); use e.g. (0.5, 1.0).")
        modes = tuple(modes) if not isinstance(modes, str) else (modes,)
        if not modes or any(mode not in RESCALE_MODES for mode in modes):
            raise ValueError(f"RandomRescale modes must be a non-empty choice of {RESCALE_MODES}, got {modes!r}.")
        self.modes = modes

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        factor = _uniform(1, *self.factor, generator).item()
        mode = self.modes[int(torch.randint(len(self.modes), (), generator=generator))]
        return rescale(images, factor, mode)

    def _settings(self) -> str:
        return f"factor={self.factor}, modes={self.modes}, p={self.p}"


class RandomRealign(RandomTransform):
    """:func:`similarity_warp` by a small rotation, zoom and shift drawn **per image**: re-alignment jitter.

    A recogniser that detects the face again finds keypoints a little off,
    so its aligned crop is rotated, scaled and shifted by small amounts
    against the one the perturbation was fitted on.

    Parameters
    ----------
    angle : float
        Rotations are uniform in ``[-angle, angle]`` degrees; ``angle`` in ``[0, 180]``.
    scale : (float, float)
        Range of the zoom factor, within ``(0, 2]``.
    shift : float
        Each of the x and y shifts is uniform in ``[-shift, shift]`` pixels; ``shift`` in ``[0, 16]``.
    padding_mode : {"reflection", "border", "zeros"}
        What fills the border the warp brings in.
    p : float
        Chance per image of being warped.
    """

    def __init__(
        self,
        angle: float = 2.0,
        scale: tuple[float, float] = (0.97, 1.03),
        shift: float = 1.5,
        padding_mode: str = "reflection",
        p: float = 0.5,
    ) -> None:
        super().__init__(p)
        self.angle = _check_bound(angle, "RandomRealign angle (degrees)", 180.0)
        self.scale = _check_range(scale, "RandomRealign scale", 0.0, 2.0)
        if self.scale[0] == 0.0:
            raise ValueError("RandomRealign scale must be above 0; use e.g. (0.97, 1.03).")
        self.shift = _check_bound(shift, "RandomRealign shift (pixels)", 16.0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"RandomRealign padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
        self.padding_mode = padding_mode

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        count = len(images)
        angle = _uniform(count, -self.angle, self.angle, generator)
        scale = _uniform(count, *self.scale, generator)
        shift = _uniform(2 * count, -self.shift, self.shift, generator).reshape(count, 2)
        return similarity_warp(images, angle, scale, shift, self.padding_mode)

    def _settings(self) -> str:
        return f"angle={self.angle}, scale={self.scale}, shift={self.shift}, padding_mode={self.padding_mode!r}, p={self.p}"


class Quantize(RandomTransform):
    """:func:`quantize` (no random parameter): an 8-bit save, with a straight-through gradient.

    Parameters
    ----------
    bits : int
        Bits per channel.
    p : float
        Chance per image of being rounded.
    """

    def __init__(self, bits: int = 8, p: float = 1.0) -> None:
        super().__init__(p)
        self.bits = _check_bits(bits)

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return quantize(images, self.bits)

    def _settings(self) -> str:
        return f"bits={self.bits}, p={self.p}"


class RandomPhotoRoundTrip(RandomTransform):
    """:func:`photo_round_trip` at a face scale drawn **per call**, JPEG quality and jitters **per image**.

    Parameters
    ----------
    scale : (float, float)
        Range of photo pixels per template pixel, within ``(0, 1]`` (150 held-out LFW
        photos: quartiles 0.64 / 0.68 / 0.71).
    quality : (float, float)
        Range of the JPEG quality, within ``[1, 100]``.
    jpeg_p : float
        Chance per call that the photo is saved as JPEG (else losslessly).
    angle : float
        Rotations of the paste and of the re-alignment, uniform in ``[-angle, angle]`` degrees.
    shift : float
        Their x and y shifts, uniform in ``[-shift, shift]`` photo pixels, ``shift`` in ``[0, 16]``.
    p : float
        Chance per image of the round trip.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.55, 0.85),
        quality: tuple[float, float] = (75.0, 95.0),
        jpeg_p: float = 1.0,
        angle: float = 1.5,
        shift: float = 0.75,
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        self.scale = _check_range(scale, "RandomPhotoRoundTrip scale", 0.0, 1.0)
        if self.scale[0] == 0.0:
            raise ValueError("RandomPhotoRoundTrip scale must be above 0; use e.g. (0.55, 0.85).")
        self.quality = _check_range(quality, "RandomPhotoRoundTrip quality", 1.0, 100.0)
        self.jpeg_p = _check_bound(jpeg_p, "RandomPhotoRoundTrip jpeg_p", 1.0)
        self.angle = _check_bound(angle, "RandomPhotoRoundTrip angle (degrees)", 180.0)
        self.shift = _check_bound(shift, "RandomPhotoRoundTrip shift (pixels)", 16.0)

    def _jitter(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        angle = _uniform(count, -self.angle, self.angle, generator)[:, None]
        return torch.cat([angle, _uniform(2 * count, -self.shift, self.shift, generator).reshape(count, 2)], dim=1)

    def apply(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        count = len(images)
        scale = _uniform(1, *self.scale, generator).item()
        saved_as_jpeg = torch.rand((), generator=generator).item() < self.jpeg_p
        quality = _uniform(count, *self.quality, generator) if saved_as_jpeg else None
        return photo_round_trip(images, scale, quality, self._jitter(count, generator), self._jitter(count, generator))

    def _settings(self) -> str:
        return (f"scale={self.scale}, quality={self.quality}, jpeg_p={self.jpeg_p}, angle={self.angle}, "
                f"shift={self.shift}, p={self.p}")


class PhotoAugment:
    """Apply random transforms in sequence, all drawing from one generator.

    Parameters
    ----------
    transforms : sequence of RandomTransform
        Applied in order; each decides per image whether it applies (its ``p``).
    generator : torch.Generator, optional
        CPU source of every random draw; a seeded one makes the sequence of
        outputs repeatable. ``None`` draws from the global torch RNG.

    Examples
    --------
    >>> augment = PhotoAugment([RandomJPEG((70, 90), p=1.0), Quantize()],
    ...                        generator=torch.Generator().manual_seed(0))
    >>> augment(torch.rand(2, 3, 112, 112)).shape
    torch.Size([2, 3, 112, 112])
    """

    def __init__(self, transforms: Sequence[RandomTransform], generator: torch.Generator | None = None) -> None:
        transforms = list(transforms)
        wrong = [type(t).__name__ for t in transforms if not isinstance(t, RandomTransform)]
        if wrong:
            raise ValueError(
                "PhotoAugment takes RandomTransform objects (RandomJPEG, RandomRescale, RandomRealign, Quantize, "
                f"RandomPhotoRoundTrip), got {wrong}; wrap other functions in a RandomTransform subclass."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"PhotoAugment generator must be a torch.Generator or None, got {type(generator).__name__}.")
        self.transforms = transforms
        self.generator = generator

    @classmethod
    def default(cls, generator: torch.Generator | None = None) -> "PhotoAugment":
        """The ``"photo"`` preset: a re-aligned, resized, JPEG-saved, 8-bit face.

        In order: :class:`RandomRealign` (``p=0.5``; up to 2 degrees, zoom
        0.97-1.03, up to 1.5 px shift), :class:`RandomRescale` (``p=0.5``;
        factor 0.5-1, antialiased or plain bilinear), :class:`RandomJPEG`
        (``p=0.5``; quality 60-95) and :class:`Quantize` (always, 8 bits).
        """
        return cls([RandomRealign(p=0.5), RandomRescale(p=0.5), RandomJPEG(p=0.5), Quantize(p=1.0)], generator)

    @classmethod
    def round_trip(cls, generator: torch.Generator | None = None) -> "PhotoAugment":
        """The ``"round_trip"`` preset: every face pasted into a photo, saved and aligned again.

        :class:`RandomPhotoRoundTrip` with its defaults (face scale 0.55-0.85, JPEG
        quality 75-95, paste and re-alignment jitter up to 1.5 degrees and 0.75
        photo pixels) on every face at every step.
        """
        return cls([RandomPhotoRoundTrip()], generator)

    def with_generator(self, generator: torch.Generator | None) -> "PhotoAugment":
        """The same transforms drawing from ``generator`` (``self`` is left unchanged)."""
        return type(self)(self.transforms, generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in ``[0, 1]`` in and out, differentiable with respect to ``images``."""
        for transform in self.transforms:
            images = transform(images, self.generator)
        return images

    def __repr__(self) -> str:
        return f"{type(self).__name__}([{', '.join(map(repr, self.transforms))}])"


#: Named presets of ``UAPAttack(augment=...)``.
AUGMENT_PRESETS: dict[str, Callable[[torch.Generator | None], PhotoAugment]] = {
    "photo": PhotoAugment.default,
    "round_trip": PhotoAugment.round_trip,
}


def resolve_augment(
    augment: str | Callable[[torch.Tensor], torch.Tensor] | None, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The transform a fit applies, drawing from the fit's ``generator`` where it can.

    Parameters
    ----------
    augment : str, callable or None
        ``None`` (no transform), a name in :data:`AUGMENT_PRESETS`, a
        :class:`PhotoAugment` or :class:`RandomTransform` (re-bound to
        ``generator``), or any other callable ``images -> images`` (used as
        given; its randomness is its own).
    generator : torch.Generator or None

    Returns
    -------
    callable or None

    Raises
    ------
    ValueError
        For an unknown name or a value that is not callable.
    """
    if augment is None:
        return None
    if isinstance(augment, str):
        if augment not in AUGMENT_PRESETS:
            raise ValueError(
                f"augment must be None, one of {sorted(AUGMENT_PRESETS)} or a callable images -> images, "
                f"got {augment!r}."
            )
        return AUGMENT_PRESETS[augment](generator)
    if isinstance(augment, PhotoAugment):
        return augment.with_generator(generator)
    if isinstance(augment, RandomTransform):
        return PhotoAugment([augment], generator)
    if not callable(augment):
        raise ValueError(
            f"augment must be None, one of {sorted(AUGMENT_PRESETS)} or a callable images -> images, "
            f"got {type(augment).__name__}."
        )
    return augment
