"""Refine a universal perturbation on one photo, through the path the photo takes to a recogniser.

A universal perturbation is fitted once, on aligned faces. Pasted into a photo
it is shrunk to the face's size, JPEG-coded there and enlarged again when a
recogniser re-detects and re-aligns the face, and it loses most of its effect
(``docs/robustness.rst``). :func:`refine_on_photo` starts from it and takes a
few gradient steps per face of one photo, with that path simulated
differentiably on the face's own region (:class:`krtfuap.photo_face.PhotoFace`):

paste (:func:`krtfuap.paste.warp_to_region`, feathered at the square's border)
-> the simulated save (:func:`krtfuap.augment.save_and_realign`: 8-bit rounding,
with ``downscale`` a resize to a random smaller size as a platform's, JPEG at a
random quality on the photo's 16-pixel macroblock grid, 8-bit rounding,
re-alignment with a little jitter) -> model.

The learnt change is blurred (``smoothing``, a Gaussian sigma in aligned-face
pixels) before it is added: a low-frequency change transfers better to
recognisers the refinement never saw and survives a resize better (measured in
``docs/cloak.rst``). With ``input_diversity`` each step's faces are also shrunk to a
random side scale and zero-padded back before the models
(:class:`krtfuap.diversity.RandomResizePad`), which holds better through a
platform's resize (``docs/cloak.rst``).

The loss per face (its *objective*) is the paper's direction loss between the
embedding of that result and the clean face's (with several surrogate models,
:func:`krtfuap.losses.worst_member_loss` over their cosine similarities instead, which
pushes the member that still matches the face most), plus ``stealth_weight`` times how
far the SSIM of the face's box (after the simulated save, against the clean
photo) falls below ``target_ssim``. The change stays inside each face's aligned
square, within ``[-epsilon, epsilon]``. With ``colour=False`` the learnt change is
one luminance change shared by R, G and B: it reads as fine grain rather than
coloured texture, and protects a little less (measured in ``docs/cloak.rst``).

**The best state, not the last.** Every state of a face's change (the start and
the state after each step) is scored when it goes through the simulated save;
each face keeps its best: one that fools the model (cosine similarity to the
clean face below ``threshold - margin``; with several models, every one of them
below its own) before one that does not, and between
two of the same kind the lower objective. Without a ``threshold`` the lower
objective decides alone. So a step that makes a face worse (a JPEG draw that
breaks it, an overshoot) is never what is returned.

**Several photos at once.** :func:`refine_on_photos` refines the faces of several
photos together: one batched pass per model and step over all their faces, which
on a CPU costs far less per face than a pass per photo (``benchmarks/RESULTS.md``).
Each photo keeps its own random draws (its own generator, and its own input-diversity
draw per step), so a photo's result is what :func:`refine_on_photo` gives it alone,
up to floating-point rounding of the batched passes.

Unlike the universal perturbation, the result is made for this photo and judged
by the models it was refined against (a white-box setting): a recogniser of
another family sees a weaker cloak (an ensemble of surrogates narrows the gap:
``docs/cloak.rst``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from kornia.filters import gaussian_blur2d
from torch import nn

from krtfuap._validation import Boolean, Interval, check_images, check_param, check_params
from krtfuap.augment import jpeg, quantize, save_and_realign, similarity_matrices, warp_to_face
from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.diversity import RandomResizePad
from krtfuap.engine import frozen
from krtfuap.losses import direction_loss, worst_member_loss
from krtfuap.metrics import cosine_similarity, fooled_by_similarity, ssim
from krtfuap.paste import feather_window, warp_to_region
from krtfuap.photo_face import PhotoFace, as_photo_faces

__all__ = ["ARGUMENT_CONSTRAINTS", "check_downscale", "refine_on_photo", "refine_on_photos"]

#: What the numeric and boolean arguments of :func:`refine_on_photo` accept (``PhotoCloak`` checks the
#: same names against these at construction).
ARGUMENT_CONSTRAINTS: dict[str, list] = {
    "epsilon": [Interval(float, 0.0, 1.0, closed="right", hint=" (images are in [0, 1])")],
    "threshold": [Interval(float, -1.0, 1.0, hint=" (a cosine similarity)"), None],
    "steps": [Interval(int, 0, None, hint=" (0: paste without refining)")],
    "lr": [Interval(float, 0.0, None, closed="right")],
    "target_ssim": [Interval(float, 0.0, 1.0, closed="right")],
    "stealth_weight": [Interval(float, 0.0, None)],
    "margin": [Interval(float, 0.0, None)],
    "colour": [Boolean()],
    "smoothing": [Interval(float, 0.0, None, hint=" (aligned-face pixels; 0: no smoothing)")],
    "input_diversity": [Interval(float, 0.0, 1.0, hint=" (a probability per step)")],
    "diversity_min_scale": [Interval(float, 0.0, 1.0, closed="right")],
}

_DEFAULTS = CLOAK_DEFAULTS


@dataclass
class _FaceWork:
    """One face's working state on its region ``(h, w)`` of the photo."""

    face: PhotoFace
    clean: torch.Tensor  # (3, h, w) the photo there
    start: torch.Tensor  # (3, h, w) the pasted starting perturbation (feathered), zero outside the square
    window: torch.Tensor  # (1, h, w) the feather window warped there, in [0, 1]
    to_face: torch.Tensor  # (3, 3) float32 region pixels -> aligned-face pixels
    box: tuple[slice, slice]  # the face's box in the region, at least 2 pixels a side (SSIM's smallest window)
    references: tuple[torch.Tensor, ...]  # per model, (1, D_m) the clean face's embedding
    smoothing: float  # Gaussian sigma of the learnt change in region pixels (0: none)


def _prepare(
    photo: torch.Tensor, start: torch.Tensor, window: torch.Tensor, face: PhotoFace, models: Sequence[nn.Module],
    smoothing: float,
) -> _FaceWork:
    to_face = torch.as_tensor(face.region_to_face, dtype=torch.float32, device=photo.device)
    clean = photo[:, face.rows, face.cols]
    size = start.shape[-1]
    with torch.no_grad():
        aligned = warp_to_face(clean[None], to_face[None], (size, size), padding_mode="zeros")
        references = tuple(model(aligned) for model in models)
    top, left, bottom, right = face.box_in_region
    box = (slice(top, max(bottom, top + 2)), slice(left, max(right, left + 2)))
    face_pixels_per_region_pixel = math.sqrt(abs(np.linalg.det(face.region_to_face[:2, :2])))
    return _FaceWork(face, clean, warp_to_region(start * window, face), warp_to_region(window, face), to_face, box,
                     references, smoothing / face_pixels_per_region_pixel)


def _realign_jitter(size: int, shift: float, degrees: float, generator: torch.Generator | None) -> torch.Tensor:
    """A ``(1, 3, 3)`` small similarity of the aligned face: a turn about its centre and a shift, drawn uniformly."""
    counterclockwise = (torch.rand(1, generator=generator, dtype=torch.float64) * 2 - 1) * degrees
    offset = (torch.rand(1, 2, generator=generator, dtype=torch.float64) * 2 - 1) * shift
    return similarity_matrices(-counterclockwise, 1.0, offset, (size, size), (size, size))


def refine_on_photo(
    photo: torch.Tensor,
    perturbation: torch.Tensor,
    faces: Sequence[PhotoFace | np.ndarray] | np.ndarray,
    model: nn.Module | Sequence[nn.Module],
    *,
    epsilon: float,
    threshold: float | Sequence[float] | None = None,
    feather: float = _DEFAULTS.feather,
    steps: int = _DEFAULTS.refine_steps,
    lr: float = _DEFAULTS.lr,
    target_ssim: float = _DEFAULTS.target_ssim,
    stealth_weight: float = _DEFAULTS.stealth_weight,
    margin: float = _DEFAULTS.margin,
    quality: tuple[float, float] = _DEFAULTS.jpeg_quality,
    jitter: tuple[float, float] = _DEFAULTS.jitter,
    downscale: tuple[float, float] = _DEFAULTS.downscale,
    smoothing: float = _DEFAULTS.smoothing,
    input_diversity: float = _DEFAULTS.input_diversity,
    diversity_min_scale: float = _DEFAULTS.diversity_min_scale,
    colour: bool = _DEFAULTS.refine_colour,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Paste a perturbation onto each face of a photo and refine it there, as the module docstring says.

    Parameters
    ----------
    photo : torch.Tensor
        ``(3, H, W)`` RGB in ``[0, 1]``; the work happens on its device.
    perturbation : torch.Tensor
        ``(3, S, S)`` on the aligned template (``S = 112`` for ArcFace) in
        ``[-epsilon, epsilon]``: the starting point (zeros: refine from nothing).
    faces : sequence of PhotoFace or of numpy.ndarray
        The faces (:func:`krtfuap.photo_face.locate_face`; SSIM is held over each one's box), or one
        ``(5, 2)`` array of ``(x, y)`` photo pixels per face (eyes, nose, mouth corners; SSIM is then
        held over the aligned square).
    model : torch.nn.Module or sequence of torch.nn.Module
        Face model, ``(B, 3, S, S)`` in ``[0, 1]`` to ``(B, D)`` embeddings, on the photo's
        device; used in eval mode without weight gradients (restored afterwards). Several
        models: an ensemble of surrogates, one batched pass each per step, the loss
        :func:`krtfuap.losses.worst_member_loss` (each needs its threshold).
    epsilon : float
        l_inf budget of the change, in ``(0, 1]``.
    threshold : float or sequence of float, optional
        The model's verification threshold on cosine similarity, in ``[-1, 1]``: a state whose
        similarity falls below ``threshold - margin`` fools the model and is preferred (see the
        module docstring). None: the objective alone chooses. With several models, one threshold
        per model, in the same order (required).
    feather : float
        Width in aligned-face pixels of the border over which the change fades out.
    steps : int
        Adam steps (0: the plain paste, as :func:`krtfuap.paste.paste_perturbation`).
    lr : float
        Adam's learning rate, in image units (``> 0``).
    target_ssim : float
        SSIM of each face's box, after the simulated JPEG, below which the
        stealth penalty starts; in ``(0, 1]``. A real save lands about 0.01 lower.
    stealth_weight : float
        Weight of that penalty (``>= 0``) against the direction loss (``0..4``).
    margin : float
        How far below ``threshold`` a state's similarity must fall to count as fooling, ``>= 0``
        (with several models also how far below its threshold the loss pushes each).
    quality : (float, float)
        Range of the JPEG quality drawn at every step, within ``[1, 100]``.
    jitter : (float, float)
        Largest re-alignment shift (aligned-face pixels) and turn (degrees) drawn at every step.
    downscale : (float, float)
        Range, within ``(0, 1]``, of the side scale the simulated save shrinks the photo to at every
        step before its JPEG (a platform's resize; the recogniser re-aligns from the shrunk photo).
        ``(1, 1)``: no resize. The stealth penalty is always taken on the full-size save.
    smoothing : float
        Gaussian sigma, in aligned-face pixels, of a blur applied to the learnt change (a
        low-frequency change, which transfers to other recognisers and survives a resize better);
        ``0``: none.
    input_diversity : float
        Probability per step, in ``[0, 1]``, that the faces go to the models shrunk to a random side
        scale in ``[diversity_min_scale, 1]`` and zero-padded back (the same draw for all faces of
        the step; the scoring of states sees them so too). ``0``: never.
    diversity_min_scale : float
        Smallest side scale of that shrink, in ``(0, 1]``.
    colour : bool
        Learn a change per channel; False: one change shared by R, G and B (added to
        the starting perturbation, which keeps its own colour).
    generator : torch.Generator, optional
        CPU generator for those draws (reproducible results).

    Returns
    -------
    torch.Tensor
        ``(3, H, W)`` in ``[0, 1]``, same dtype and device as ``photo``; differs from
        it only inside the faces' aligned squares, by at most ``epsilon``; each face's
        change is its best scored state.
    """
    return refine_on_photos(
        [photo], perturbation, [faces], model, epsilon=epsilon, threshold=threshold, feather=feather, steps=steps,
        lr=lr, target_ssim=target_ssim, stealth_weight=stealth_weight, margin=margin, quality=quality, jitter=jitter,
        downscale=downscale, smoothing=smoothing, input_diversity=input_diversity,
        diversity_min_scale=diversity_min_scale, colour=colour, generators=[generator],
    )[0]


def refine_on_photos(
    photos: Sequence[torch.Tensor],
    perturbation: torch.Tensor,
    faces: Sequence[Sequence[PhotoFace | np.ndarray] | np.ndarray],
    model: nn.Module | Sequence[nn.Module],
    *,
    epsilon: float,
    threshold: float | Sequence[float] | None = None,
    feather: float = _DEFAULTS.feather,
    steps: int = _DEFAULTS.refine_steps,
    lr: float = _DEFAULTS.lr,
    target_ssim: float = _DEFAULTS.target_ssim,
    stealth_weight: float = _DEFAULTS.stealth_weight,
    margin: float = _DEFAULTS.margin,
    quality: tuple[float, float] = _DEFAULTS.jpeg_quality,
    jitter: tuple[float, float] = _DEFAULTS.jitter,
    downscale: tuple[float, float] = _DEFAULTS.downscale,
    smoothing: float = _DEFAULTS.smoothing,
    input_diversity: float = _DEFAULTS.input_diversity,
    diversity_min_scale: float = _DEFAULTS.diversity_min_scale,
    colour: bool = _DEFAULTS.refine_colour,
    generators: Sequence[torch.Generator | None] | None = None,
) -> list[torch.Tensor]:
    """:func:`refine_on_photo` for several photos at once: one batched pass per model and step over all their faces.

    Every keyword not described here is :func:`refine_on_photo`'s, with the same meaning and default.

    Parameters
    ----------
    photos : sequence of torch.Tensor
        ``(3, H_i, W_i)`` RGB in ``[0, 1]``, all on one device (sizes may differ).
    faces : sequence
        One entry per photo, each what :func:`refine_on_photo` takes as ``faces`` for it.
    generators : sequence of torch.Generator or None, optional
        One CPU generator per photo for its draws (None entries, or None: unseeded). With
        each photo's generator seeded as :func:`refine_on_photo`'s would be, each photo gets
        what :func:`refine_on_photo` gives it alone, up to floating-point rounding.

    Returns
    -------
    list of torch.Tensor
        One ``(3, H_i, W_i)`` in ``[0, 1]`` per photo, as :func:`refine_on_photo` returns it.

    Raises
    ------
    ValueError
        If ``faces`` or ``generators`` does not give one entry per photo, the photos are on different
        devices, or as :func:`refine_on_photo` says.
    """
    models, thresholds = _surrogates(model, threshold)
    if len(faces) != len(photos):
        raise ValueError(f"faces must give one entry (that photo's faces) per photo: {len(faces)} for "
                         f"{len(photos)} photos.")
    generators = [None] * len(photos) if generators is None else list(generators)
    if len(generators) != len(photos):
        raise ValueError(f"generators must give one generator (or None) per photo: {len(generators)} for "
                         f"{len(photos)} photos.")
    for index, photo in enumerate(photos):
        _check_photo(photo, name="photo" if len(photos) == 1 else f"photos[{index}]")
    if len({photo.device for photo in photos}) > 1:
        raise ValueError(f"photos must all be on one device, got {sorted({str(photo.device) for photo in photos})}.")
    _check_arguments(perturbation, epsilon, thresholds, steps, lr, target_ssim, stealth_weight, margin, quality,
                     jitter, downscale, smoothing, colour, input_diversity, diversity_min_scale)
    works = [photo.float() for photo in photos]
    device = works[0].device if works else torch.device("cpu")
    start = perturbation.to(device=device, dtype=torch.float32)
    window = feather_window(start.shape[-1], feather, device=device)
    located = [[face for face in as_photo_faces(photo_faces, work.shape[-2:], start.shape[-1])
                if face.region is not None] for work, photo_faces in zip(works, faces)]
    with ExitStack() as stack:
        for member in models:
            stack.enter_context(frozen(member))
        regions = [[_prepare(work, start, window, face, models, smoothing) for face in photo_faces]
                   for work, photo_faces in zip(works, located)]
        channels = 3 if colour else 1
        changes = [[torch.zeros(channels, *region.clean.shape[-2:], device=device) for region in photo_regions]
                   for photo_regions in regions]
        if steps and any(regions):
            settings = _Settings(epsilon, thresholds, target_ssim, stealth_weight, margin, quality, jitter,
                                 tuple(downscale))
            draws = [_PhotoDraws(generator, RandomResizePad(input_diversity, diversity_min_scale, generator))
                     for generator in generators]
            changes = _best_changes(regions, changes, models, settings, draws, steps, lr)
    refined = []
    for work, photo, photo_regions, photo_changes in zip(works, photos, regions, changes):
        delta = torch.zeros_like(work)
        with torch.no_grad():
            for region, change in zip(photo_regions, photo_changes):
                delta[:, region.face.rows, region.face.cols] += _perturb(region, change, epsilon)
        refined.append((work + delta.clamp_(-epsilon, epsilon)).clamp_(0.0, 1.0).to(photo.dtype))
    return refined


@dataclass(frozen=True)
class _Settings:
    """What each step of the refinement needs besides the faces (see :func:`refine_on_photo`)."""

    epsilon: float
    thresholds: tuple[float, ...] | None  # one per model
    target_ssim: float
    stealth_weight: float
    margin: float
    quality: tuple[float, float]
    jitter: tuple[float, float]
    downscale: tuple[float, float]


@dataclass(frozen=True)
class _PhotoDraws:
    """One photo's source of random draws: its save simulations, and what the models see of its faces."""

    generator: torch.Generator | None
    diversity: RandomResizePad  # one draw per step for all the photo's faces


def _best_changes(
    regions: list[list[_FaceWork]], changes: list[list[torch.Tensor]], models: Sequence[nn.Module],
    settings: _Settings, draws: Sequence[_PhotoDraws], steps: int, lr: float,
) -> list[list[torch.Tensor]]:
    """Adam steps on every face's change together (faces grouped by photo); each face's best scored state."""
    flat_regions = [region for photo_regions in regions for region in photo_regions]
    flat_changes = [change.requires_grad_(True) for photo_changes in changes for change in photo_changes]
    references = [torch.cat([region.references[index] for region in flat_regions]) for index in range(len(models))]
    optimizer = torch.optim.Adam(flat_changes, lr=lr)
    best = [change.detach().clone() for change in flat_changes]
    best_keys = [(True, math.inf)] * len(flat_regions)
    for step in range(steps + 1):  # the state before each step, and the last one
        batch, box_ssim = [], []
        for photo_regions, photo_changes, photo_draws in zip(regions, changes, draws):
            if not photo_regions:
                continue
            saved = [_through_the_save(region, change, settings, photo_draws.generator)
                     for region, change in zip(photo_regions, photo_changes)]
            batch.append(photo_draws.diversity(torch.cat([face for face, _ in saved])))
            box_ssim += [ssim_value for _, ssim_value in saved]
        faces = torch.cat(batch)
        embeddings = [model(faces) for model in models]  # one batched pass per model
        similarities = torch.stack([cosine_similarity(e.float(), r.float()) for e, r in zip(embeddings, references)],
                                   dim=1)  # (B, M)
        objective = _adversarial_objective(embeddings, references, similarities, settings)
        objective = objective + settings.stealth_weight * torch.relu(settings.target_ssim - torch.cat(box_ssim))
        for index, key in enumerate(_state_keys(similarities.detach(), objective.detach(), settings)):
            if key < best_keys[index]:
                best_keys[index], best[index] = key, flat_changes[index].detach().clone()
        if step == steps:
            break
        optimizer.zero_grad()
        objective.sum().backward()
        optimizer.step()
    grouped, taken = [], 0
    for photo_regions in regions:
        grouped.append(best[taken:taken + len(photo_regions)])
        taken += len(photo_regions)
    return grouped


def _adversarial_objective(
    embeddings: list[torch.Tensor], references: list[torch.Tensor], similarities: torch.Tensor, settings: _Settings
) -> torch.Tensor:
    """Per face ``(B,)``: the direction loss for one model; for several, the worst member's excess over its
    threshold (:func:`krtfuap.losses.worst_member_loss` on ``similarities``, ``(B, M)``, the same gradient as
    the direction loss for one)."""
    if len(embeddings) == 1:
        return direction_loss(embeddings[0], references[0], reduction="none")
    return worst_member_loss(similarities, list(settings.thresholds), margin=settings.margin, reduction="none")


def _state_keys(similarities: torch.Tensor, objective: torch.Tensor, settings: _Settings) -> list[tuple[bool, float]]:
    """Per face, a key that sorts better states first: (some model is not fooled by the margin, objective).

    ``similarities`` is ``(B, M)``, one column per model."""
    if settings.thresholds is None:
        misses = [False] * len(objective)
    else:
        margined = [threshold - settings.margin for threshold in settings.thresholds]
        misses = (~fooled_by_similarity(similarities, margined)).tolist()
    return list(zip(misses, objective.tolist()))


def _perturb(region: _FaceWork, change: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The face's change on its region: the pasted start plus the feathered (and smoothed) learnt change
    ``(1 or 3, h, w)``, within the budget."""
    if region.smoothing > 0:
        radius = max(1, math.ceil(3 * region.smoothing))
        change = gaussian_blur2d(change[None], 2 * radius + 1, (region.smoothing, region.smoothing))[0]
    return (region.start + region.window * change).clamp(-epsilon, epsilon)


def _through_the_save(
    region: _FaceWork, change: torch.Tensor, settings: _Settings, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The face as a recogniser receives it ``(1, 3, S, S)``, and its box's SSIM after the save ``(1,)``."""
    device, size = region.clean.device, region.face.size
    cloaked = (region.clean + _perturb(region, change, settings.epsilon)).clamp(0.0, 1.0)[None]
    low, high = settings.quality
    drawn_quality = (low + (high - low) * torch.rand(1, generator=generator)).to(device)
    realign = _realign_jitter(size, *settings.jitter, generator).to(device=device, dtype=torch.float32)
    smallest, largest = settings.downscale
    scale = 1.0  # no draw without a resize: results without one stay as they were
    if (smallest, largest) != (1.0, 1.0):
        scale = smallest + (largest - smallest) * torch.rand(1, generator=generator).item()
    decoded, face = save_and_realign(cloaked, realign @ region.to_face, (size, size), drawn_quality,
                                     padding_mode="zeros", scale=scale)
    if decoded.shape[-2:] != cloaked.shape[-2:]:  # shrunk: the stealth is judged on the full-size save
        decoded = quantize(jpeg(quantize(cloaked), drawn_quality))
    rows, cols = region.box
    return face, ssim(decoded[..., rows, cols], region.clean[None, :, rows, cols])


def _surrogates(
    model: nn.Module | Sequence[nn.Module], threshold: float | Sequence[float] | None
) -> tuple[list[nn.Module], tuple[float, ...] | None]:
    """The surrogate models as a list and their thresholds as a tuple of the same length (or None)."""
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not models or not all(isinstance(member, nn.Module) for member in models):
        raise TypeError("model must be a torch.nn.Module or a non-empty sequence of them (an ensemble of surrogates).")
    if threshold is None:
        if len(models) > 1:
            raise ValueError(f"threshold is None, but {len(models)} models were given: pass threshold= as one cosine "
                             "threshold per model, in the same order.")
        return models, None
    several = isinstance(threshold, Sequence) and not isinstance(threshold, str)
    thresholds = tuple(threshold) if several else (threshold,)
    if len(thresholds) != len(models):
        raise ValueError(f"threshold gives {len(thresholds)} value(s) for {len(models)} model(s); pass one cosine "
                         "threshold per model, in the same order.")
    return models, thresholds


def _check_photo(photo: torch.Tensor, *, name: str) -> None:
    if not isinstance(photo, torch.Tensor) or photo.ndim != 3 or photo.shape[0] != 3:
        shape = tuple(photo.shape) if isinstance(photo, torch.Tensor) else type(photo).__name__
        raise ValueError(f"{name} must have shape (3, H, W) (RGB), got {shape}.")
    check_images(photo[None], name=name)


def _check_arguments(
    perturbation: torch.Tensor, epsilon: float, thresholds: tuple[float, ...] | None, steps: int,
    lr: float, target_ssim: float, stealth_weight: float, margin: float, quality: tuple[float, float],
    jitter: tuple[float, float], downscale: tuple[float, float], smoothing: float, colour: bool,
    input_diversity: float, diversity_min_scale: float,
) -> None:
    if perturbation.ndim != 3 or perturbation.shape[0] != 3 or perturbation.shape[1] != perturbation.shape[2]:
        raise ValueError(f"perturbation must have shape (3, S, S), got {tuple(perturbation.shape)}.")
    if not torch.isfinite(perturbation).all():
        raise ValueError("perturbation contains NaN or inf values; pass a fitted attack's perturbation_.")
    check_params(
        dict(epsilon=epsilon, steps=steps, lr=lr, target_ssim=target_ssim, stealth_weight=stealth_weight,
             margin=margin, smoothing=smoothing, colour=colour, input_diversity=input_diversity,
             diversity_min_scale=diversity_min_scale),
        ARGUMENT_CONSTRAINTS,
    )
    for value in thresholds or [None]:
        check_param("threshold", value, ARGUMENT_CONSTRAINTS["threshold"])
    if not 1.0 <= quality[0] <= quality[1] <= 100.0:
        raise ValueError(f"quality must be a range (low, high) within [1, 100], got {quality}.")
    if min(jitter) < 0.0:
        raise ValueError(f"jitter (shift in pixels, turn in degrees) must be >= 0, got {jitter}.")
    check_downscale(downscale)


def check_downscale(downscale: Sequence[float]) -> None:
    """Refuse a ``downscale`` that is not a ``(low, high)`` range of side scales within ``(0, 1]``."""
    if len(downscale) != 2 or not 0.0 < downscale[0] <= downscale[1] <= 1.0:
        raise ValueError(f"downscale must be a range (low, high) within (0, 1] (side scales), got {downscale}.")
