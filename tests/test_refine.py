"""Per-photo refinement (krtfuap/refine.py): the plain paste at zero steps, change only on faces, within budget."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fakes import TinyEmbedder
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from krtfuap._validation import check_images
from krtfuap.alignment import ARCFACE_TEMPLATE_112, align_face, photo_to_tensor, tensor_to_photo
from krtfuap.metrics import cosine_similarity
from krtfuap.paste import paste_perturbation
from krtfuap.photo_face import face_to_photo_matrix, locate_face
from krtfuap.refine import refine_on_photo, refine_on_photos


def _keypoints(scale: float, x: float, y: float) -> np.ndarray:
    """Five keypoints of a face ``scale`` times the template's size with its template origin at ``(x, y)``."""
    return ARCFACE_TEMPLATE_112 * scale + np.array([x, y])


def _photo(height: int = 160, width: int = 200, seed: int = 0) -> torch.Tensor:
    """A smooth random photo ``(3, H, W)`` in [0, 1] (blocks of colour, as JPEG sees faces)."""
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def _inside(keypoints: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Photo pixels within one pixel of some face's aligned square."""
    mask = np.zeros((height, width), dtype=bool)
    for points in keypoints:
        corners = np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]]) @ face_to_photo_matrix(points).T
        (x1, y1), (x2, y2) = np.floor(corners.min(0)).astype(int) - 1, np.ceil(corners.max(0)).astype(int) + 2
        mask[max(y1, 0) : y2, max(x1, 0) : x2] = True
    return mask


def test_zero_steps_is_the_plain_paste() -> None:
    photo = _photo()
    perturbation = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.08
    faces = [_keypoints(0.7, 10, 20), _keypoints(0.5, 120, 70)]
    pasted = paste_perturbation(photo, perturbation, faces, epsilon=0.08)
    refined = refine_on_photo(photo, perturbation, faces, TinyEmbedder(), epsilon=0.08, steps=0)
    assert torch.allclose(refined, pasted, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(
    epsilon=st.floats(0.01, 0.1),
    scale=st.floats(0.35, 0.9),
    x=st.floats(-20.0, 120.0),
    y=st.floats(-20.0, 80.0),
    seed=st.integers(0, 2**16),
)
def test_the_change_stays_on_the_face_and_within_budget(epsilon: float, scale: float, x: float, y: float,
                                                        seed: int) -> None:
    photo = _photo(seed=seed)
    faces = [_keypoints(scale, x, y)]
    start = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * epsilon
    refined = refine_on_photo(photo, start, faces, TinyEmbedder(), epsilon=epsilon, steps=2, lr=0.05,
                              generator=torch.Generator().manual_seed(seed))
    change = (refined - photo).abs().amax(dim=0).numpy()
    assert refined.min() >= 0 and refined.max() <= 1
    assert change.max() <= epsilon + 1e-6
    assert change[~_inside(faces, *photo.shape[-2:])].max(initial=0.0) == 0.0


def test_refining_moves_the_face_away_after_a_real_jpeg_save() -> None:
    """From no perturbation at all, the refined photo's face (saved by Pillow as JPEG, aligned again) is
    far further from the clean face, for the model it was refined against, than with noise of the same budget."""
    model = TinyEmbedder()
    photo = _photo(seed=3)
    faces = [_keypoints(0.8, 40, 30)]
    zero = torch.zeros(3, 112, 112)

    def similarity(cloaked: torch.Tensor) -> float:
        buffer = io.BytesIO()
        Image.fromarray(tensor_to_photo(cloaked)).save(buffer, format="JPEG", quality=85)
        saved = np.asarray(Image.open(buffer).convert("RGB"))
        pair = np.stack([align_face(tensor_to_photo(photo), faces[0]), align_face(saved, faces[0])])
        with torch.no_grad():
            embeddings = model(photo_to_tensor(pair))
        return cosine_similarity(embeddings[:1], embeddings[1:]).item()

    refined = refine_on_photo(photo, zero, faces, model, epsilon=0.08, steps=20, lr=0.01, target_ssim=0.5,
                              generator=torch.Generator().manual_seed(0))
    noise = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.08
    noisy = paste_perturbation(photo, noise, faces, epsilon=0.08)
    assert similarity(refined) < 0.99  # the tiny model pools over the whole face: hard to move
    assert 1 - similarity(refined) > 100 * (1 - similarity(noisy))


def test_without_colour_one_luminance_change() -> None:
    photo, faces, zero = _photo(seed=6) * 0.8 + 0.1, [_keypoints(0.7, 40, 30)], torch.zeros(3, 112, 112)
    options = dict(epsilon=0.08, steps=3, lr=0.02, target_ssim=0.5)  # no SSIM penalty: every step is kept
    grey = refine_on_photo(photo, zero, faces, TinyEmbedder(), colour=False, **options) - photo
    coloured = refine_on_photo(photo, zero, faces, TinyEmbedder(), **options) - photo
    assert grey.abs().max() > 0.01 and (grey - grey[:1]).abs().max() < 1e-6  # photo kept off 0 and 1: no clipping
    assert (coloured - coloured[:1]).abs().max() > 0.01


def test_a_higher_ssim_target_changes_the_face_less() -> None:
    photo, faces, zero = _photo(seed=4), [_keypoints(0.8, 40, 30)], torch.zeros(3, 112, 112)
    changes = []
    for target in (0.5, 0.999):
        refined = refine_on_photo(photo, zero, faces, TinyEmbedder(), epsilon=0.08, steps=15, lr=0.01,
                                  target_ssim=target, generator=torch.Generator().manual_seed(0))
        changes.append((refined - photo).abs().mean().item())
    assert changes[1] < 0.5 * changes[0]


def test_reproducible_and_the_model_is_left_as_it_was() -> None:
    model = TinyEmbedder().train()
    photo, faces, start = _photo(seed=5), [_keypoints(0.6, 50, 40)], torch.full((3, 112, 112), 0.02)
    runs = [refine_on_photo(photo, start, faces, model, epsilon=0.08, steps=3,
                            generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert model.training and all(parameter.requires_grad for parameter in model.parameters())


def _high_frequency_share(change: torch.Tensor) -> float:
    """The share of a change's energy in differences between neighbouring pixels (0: constant)."""
    across = ((change[..., :, 1:] - change[..., :, :-1]).pow(2).mean()
              + (change[..., 1:, :] - change[..., :-1, :]).pow(2).mean())
    return (across / change.pow(2).mean()).item()


def test_smoothing_makes_a_low_frequency_change_within_budget() -> None:
    photo, faces, zero = _photo(seed=8) * 0.8 + 0.1, [_keypoints(0.8, 40, 30)], torch.zeros(3, 112, 112)
    options = dict(epsilon=0.06, steps=4, lr=0.02, target_ssim=0.5, input_diversity=0.0,
                   generator=torch.Generator().manual_seed(0))
    sharp = refine_on_photo(photo, zero, faces, TinyEmbedder(), **options) - photo
    options["generator"] = torch.Generator().manual_seed(0)
    smooth = refine_on_photo(photo, zero, faces, TinyEmbedder(), smoothing=2.0, **options) - photo
    assert smooth.abs().max() > 0.01 and smooth.abs().max() <= 0.06 + 1e-6
    assert _high_frequency_share(smooth) < 0.5 * _high_frequency_share(sharp)


def test_input_diversity_shows_the_models_shrunk_faces_and_keeps_the_budget() -> None:
    photo, faces, zero = _photo(seed=10), [_keypoints(0.9, 30, 20)], torch.zeros(3, 112, 112)
    seen: list[torch.Tensor] = []

    class Recording(TinyEmbedder):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(images.detach().clone())
            return super().forward(images)

    def refine(**options) -> torch.Tensor:
        seen.clear()
        return refine_on_photo(photo, zero, faces, Recording(), epsilon=0.05, steps=3, lr=0.02,
                               generator=torch.Generator().manual_seed(0), **options)

    def padded(images: torch.Tensor) -> bool:  # a zero row or column along some edge of every face
        edges = (images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1])
        return any(bool((edge == 0).all()) for edge in edges)

    plain = refine(input_diversity=0.0)
    assert not any(padded(images) for images in seen)
    varied = refine(input_diversity=1.0, diversity_min_scale=0.5)
    reference, *steps = seen  # the clean face's embedding is taken as it is, every step's faces shrunk
    assert not padded(reference) and len(steps) == 4 and all(padded(images) for images in steps)
    assert (varied - plain).abs().max() > 1e-3 and (varied - photo).abs().max() <= 0.05 + 1e-6


def test_a_simulated_resize_changes_the_refinement_and_keeps_the_budget() -> None:
    photo, faces, zero = _photo(seed=9), [_keypoints(0.9, 30, 20)], torch.zeros(3, 112, 112)

    def refine(**options) -> torch.Tensor:
        return refine_on_photo(photo, zero, faces, TinyEmbedder(), epsilon=0.05, steps=3, lr=0.02,
                               generator=torch.Generator().manual_seed(0), **options)

    plain, unshrunk, shrunk = refine(), refine(downscale=(1.0, 1.0)), refine(downscale=(0.5, 0.7))
    assert torch.equal(plain, unshrunk)
    assert (shrunk - plain).abs().max() > 1e-3
    assert (shrunk - photo).abs().max() <= 0.05 + 1e-6


def test_float64_photos_and_faces_outside_the_photo() -> None:
    photo = _photo().double()
    faces = [_keypoints(0.5, 400, 400), _keypoints(0.6, 30, 30)]  # the first lies wholly outside
    refined = refine_on_photo(photo, torch.zeros(3, 112, 112), faces, TinyEmbedder(), epsilon=0.05, steps=2)
    assert refined.dtype == torch.float64 and refined.shape == photo.shape
    assert (refined - photo).abs().max() <= 0.05 + 1e-9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epsilon": 0.0}, "epsilon must be a number in"),
        ({"steps": -1}, "steps must be an int >= 0"),
        ({"steps": 2.5}, "steps must be an int"),
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"target_ssim": 1.5}, "target_ssim must be a number in"),
        ({"stealth_weight": -1.0}, "stealth_weight must be"),
        ({"threshold": 1.5}, "threshold must be a number in"),
        ({"threshold": "0.2"}, "threshold must be a number"),
        ({"margin": -0.1}, "margin must be"),
        ({"quality": (90.0, 80.0)}, "quality must be a range"),
        ({"jitter": (-1.0, 0.0)}, "jitter"),
        ({"colour": 1}, "colour must be True or False"),
        ({"downscale": (0.0, 1.0)}, "downscale must be a range"),
        ({"downscale": (0.9, 0.5)}, "downscale must be a range"),
        ({"smoothing": -1.0}, "smoothing must be"),
        ({"input_diversity": 1.5}, "input_diversity must be"),
        ({"diversity_min_scale": 0.0}, "diversity_min_scale must be"),
    ],
)
def test_bad_arguments_are_named(options: dict, message: str) -> None:
    arguments = {"epsilon": 0.08, **options}
    with pytest.raises((TypeError, ValueError), match=message):
        refine_on_photo(_photo(), torch.zeros(3, 112, 112), [_keypoints(0.6, 30, 30)], TinyEmbedder(), **arguments)
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        refine_on_photo(torch.rand(1, 3, 8, 8), torch.zeros(3, 112, 112), [], TinyEmbedder(), epsilon=0.08)
    with pytest.raises(ValueError, match="divide by 255"):
        refine_on_photo(_photo() * 255, torch.zeros(3, 112, 112), [], TinyEmbedder(), epsilon=0.08)
    nan = _photo()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refine_on_photo(nan, torch.zeros(3, 112, 112), [], TinyEmbedder(), epsilon=0.08)
    with pytest.raises(ValueError, match="perturbation contains NaN"):
        refine_on_photo(_photo(), torch.full((3, 112, 112), float("nan")), [], TinyEmbedder(), epsilon=0.08)


class _ChecksItsInput(torch.nn.Module):
    """TinyEmbedder behind the library's input check, as the real face models are (FaceEmbedder)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyEmbedder()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(check_images(images))


@pytest.mark.parametrize("scale,angle,x,y", [(1.1, -0.2, 10.0, 5.0), (0.609, -0.202, 48.854, 3.677),
                                             (1.044, 0.308, 30.92, 11.432), (0.736, 0.426, 16.432, 2.402)])
def test_a_white_face_does_not_overshoot_into_the_model(scale: float, angle: float, x: float, y: float) -> None:
    """Bilinear weights in float32 can sum to a hair above 1: re-aligning a face at 1.0 gave 1.00000012 and a
    model that checks its input refused the refinement's own tensor (issue 21: a folder of photos stopped)."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    faces = [ARCFACE_TEMPLATE_112 @ (scale * rotation).T + np.array([x, y])]
    white = torch.ones(3, 160, 200)
    darker = torch.full((3, 112, 112), -0.04)
    refined = refine_on_photo(white, darker, faces, _ChecksItsInput(), epsilon=0.08, steps=2,
                              generator=torch.Generator().manual_seed(0))
    assert refined.max() == 1.0 and refined.min() < 1.0 - 0.03  # cloaked: the start at least was pasted


def test_the_best_state_is_kept_not_the_last(monkeypatch) -> None:
    """An optimiser whose last step throws the change away: the photo returned is the best earlier state,
    which fools the model, not the last (no change at all)."""
    steps = 6

    class ThrowsAwayAtTheEnd(torch.optim.Adam):
        taken = 0

        def step(self, closure=None):
            type(self).taken += 1
            if type(self).taken < steps:
                return super().step(closure)
            with torch.no_grad():
                for group in self.param_groups:
                    for parameter in group["params"]:
                        parameter.zero_()

    monkeypatch.setattr(torch.optim, "Adam", ThrowsAwayAtTheEnd)
    model, photo, faces = TinyEmbedder(), _photo(seed=8), [_keypoints(0.8, 40, 30)]
    arguments = dict(epsilon=0.08, steps=steps, lr=0.02, target_ssim=0.5, quality=(90.0, 90.0), jitter=(0.0, 0.0))
    refined = refine_on_photo(photo, torch.zeros(3, 112, 112), faces, model, threshold=0.9999, margin=0.0,
                              generator=torch.Generator().manual_seed(0), **arguments)
    assert ThrowsAwayAtTheEnd.taken == steps
    assert (refined - photo).abs().max() > 0.01  # an earlier state; the last one is the photo itself
    aligned = photo_to_tensor(np.stack([align_face(tensor_to_photo(image), faces[0]) for image in (photo, refined)]))
    with torch.no_grad():
        embeddings = model(aligned)
    assert cosine_similarity(embeddings[:1], embeddings[1:]).item() < 0.9999  # it fools the model
    ThrowsAwayAtTheEnd.taken = 0
    no_threshold = refine_on_photo(photo, torch.zeros(3, 112, 112), faces, model,
                                   generator=torch.Generator().manual_seed(0), **arguments)
    assert torch.equal(no_threshold, refined)  # without a threshold the objective alone chooses: the same state


def test_located_faces_hold_ssim_over_their_box() -> None:
    """A face given with its detector box is refined as the same face given by keypoints, except that SSIM is
    held over the box: a small box of a region that is free to change lets the rest change more."""
    photo, points = _photo(seed=9), _keypoints(0.8, 40, 30)
    tight = locate_face(points, photo.shape[-2:], box=np.array([70.0, 70.0, 80.0, 80.0]))
    arguments = dict(epsilon=0.08, steps=8, lr=0.01, target_ssim=0.99, generator=None)
    changes = []
    for face in (points, tight):
        refined = refine_on_photo(photo, torch.zeros(3, 112, 112), [face], TinyEmbedder(),
                                  **{**arguments, "generator": torch.Generator().manual_seed(0)})
        changes.append((refined - photo).abs().mean().item())
    assert changes[1] > 1.2 * changes[0]


# ------------------------------------------------------------------ several surrogates
def _aligned_similarity(model: torch.nn.Module, photo: torch.Tensor, cloaked: torch.Tensor, points: np.ndarray) -> float:
    pair = np.stack([align_face(tensor_to_photo(photo), points), align_face(tensor_to_photo(cloaked), points)])
    with torch.no_grad():
        embeddings = model(photo_to_tensor(pair))
    return cosine_similarity(embeddings[:1], embeddings[1:]).item()


def test_two_surrogates_are_both_moved_away() -> None:
    """Refined against an ensemble of two models, the face moves away from itself for each of them, far
    more than noise of the same budget moves it."""
    members = [TinyEmbedder(seed=0), TinyEmbedder(seed=1)]
    photo, faces = _photo(seed=3), [_keypoints(0.8, 40, 30)]
    refined = refine_on_photo(photo, torch.zeros(3, 112, 112), faces, members, threshold=[0.999, 0.999],
                              epsilon=0.08, steps=20, lr=0.01, target_ssim=0.5,
                              generator=torch.Generator().manual_seed(0))
    noise = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.08
    noisy = paste_perturbation(photo, noise, faces, epsilon=0.08)
    for member in members:
        moved = 1 - _aligned_similarity(member, photo, refined, faces[0])
        assert moved > 50 * (1 - _aligned_similarity(member, photo, noisy, faces[0]))


def test_one_surrogate_in_a_list_is_the_single_model_path() -> None:
    photo, faces, model = _photo(seed=4), [_keypoints(0.7, 30, 20)], TinyEmbedder()
    single = refine_on_photo(photo, torch.zeros(3, 112, 112), faces, model, threshold=0.9, epsilon=0.08, steps=4,
                             generator=torch.Generator().manual_seed(2))
    listed = refine_on_photo(photo, torch.zeros(3, 112, 112), faces, [model], threshold=[0.9], epsilon=0.08,
                             steps=4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(single, listed)
    assert not torch.equal(single, photo)


def test_a_member_far_below_its_threshold_adds_no_push() -> None:
    """The loss pushes the member that still matches most above its threshold: with one member far past its
    threshold, the ensemble's result is the other member's own refinement; swap the thresholds and it is the
    first member's."""
    first, second = TinyEmbedder(seed=0), TinyEmbedder(seed=1)
    photo, faces = _photo(seed=5), [_keypoints(0.7, 30, 20)]

    def refine(model, threshold) -> torch.Tensor:
        return refine_on_photo(photo, torch.zeros(3, 112, 112), faces, model, threshold=threshold, epsilon=0.08,
                               steps=5, target_ssim=0.5, generator=torch.Generator().manual_seed(1))

    # Similarities start at 1: 1 - (-1) = 2 above a threshold of -1, 0 above a threshold of 1. Adam turns
    # float noise in near-zero gradients into steps of up to lr on a few pixels (thread-count dependent),
    # so the results are compared by their mean difference against that of the two members' own results.
    by_first, by_second = refine(first, -1.0), refine(second, -1.0)
    apart = (by_first - by_second).abs().mean()
    assert apart > 1e-3
    assert (refine([first, second], [1.0, -1.0]) - by_second).abs().mean() < 0.05 * apart
    assert (refine([first, second], [-1.0, 1.0]) - by_first).abs().mean() < 0.05 * apart


def test_a_state_counts_as_fooling_only_when_every_member_is_fooled() -> None:
    from krtfuap.refine import _Settings, _state_keys

    settings = _Settings(0.08, (0.3, 0.5), 0.9, 1.0, 0.05, (80.0, 95.0), (1.0, 1.0), (1.0, 1.0))
    similarities = torch.tensor([[0.2, 0.4], [0.2, 0.46], [0.26, 0.1]])
    keys = _state_keys(similarities, torch.tensor([1.0, 0.5, 0.2]), settings)
    assert [miss for miss, _ in keys] == [False, True, True]


@pytest.mark.parametrize("models, threshold, error, message", [
    (2, None, ValueError, "threshold is None, but 2 models"),
    (2, [0.2], ValueError, r"threshold gives 1 value\(s\) for 2 model\(s\)"),
    (1, [0.2, 0.3], ValueError, r"threshold gives 2 value\(s\) for 1 model\(s\)"),
    (2, [0.2, 1.5], ValueError, "threshold must be a number in"),
    (0, None, TypeError, "non-empty sequence"),
])
def test_bad_surrogate_ensembles_are_named(models: int, threshold, error, message: str) -> None:
    members = [TinyEmbedder(seed=seed) for seed in range(models)]
    with pytest.raises(error, match=message):
        refine_on_photo(_photo(), torch.zeros(3, 112, 112), [_keypoints(0.6, 30, 30)], members, epsilon=0.08,
                        threshold=threshold)


class _RowWise(torch.nn.Module):
    """An embedder whose every row depends on that face alone, bit for bit, whatever the batch."""

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return torch.stack([faces[:, 0, ::4, ::4].mean((-2, -1)), faces[:, 1, 20:60, 30:90].mean((-2, -1)),
                            faces[:, 2, 50:, :56].mean((-2, -1)), faces[:, 0, 70:, 40:].mean((-2, -1))], dim=1)


def test_several_photos_at_once_give_each_what_it_gets_alone() -> None:
    photos = [_photo(seed=1), _photo(140, 180, seed=2), _photo(seed=3)]
    faces = [[_keypoints(0.6, 40, 30), _keypoints(0.4, 130, 60)], [], [_keypoints(0.7, 60, 10)]]
    options = dict(epsilon=0.06, steps=4, lr=0.02, threshold=0.9, input_diversity=0.7)
    alone = [refine_on_photo(photo, torch.zeros(3, 112, 112), photo_faces, _RowWise(),
                             generator=torch.Generator().manual_seed(3), **options)
             for photo, photo_faces in zip(photos, faces)]
    together = refine_on_photos(photos, torch.zeros(3, 112, 112), faces, _RowWise(),
                                generators=[torch.Generator().manual_seed(3) for _ in photos], **options)
    assert len(together) == 3
    for one, other, photo in zip(alone, together, photos):
        assert torch.allclose(one, other, atol=1e-6)
    assert torch.equal(together[1], photos[1])  # no face: unchanged
    assert (together[0] - photos[0]).abs().max() > 0.01


@pytest.mark.parametrize("arguments, message", [
    (dict(faces=[[]]), r"faces must give one entry .* 1 for 2 photos"),
    (dict(generators=[None]), r"generators must give one generator .* 1 for 2 photos"),
    (dict(photos=[_photo(), torch.rand(1, 8, 8)]), r"photos\[1\] must have shape \(3, H, W\)"),
])
def test_bad_photo_batches_are_named(arguments: dict, message: str) -> None:
    given = dict(photos=[_photo(), _photo(seed=1)], faces=[[], []]) | arguments
    with pytest.raises(ValueError, match=message):
        refine_on_photos(given.pop("photos"), torch.zeros(3, 112, 112), given.pop("faces"), TinyEmbedder(),
                         epsilon=0.08, **given)
