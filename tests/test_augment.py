"""Robust fitting: the photo-pipeline transforms of ``krtfuap.augment`` and ``UAPAttack(augment=...)``."""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import TinyEmbedder, random_faces, tiny_attack
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions
from krtfuap.augment import (
    PhotoAugment,
    Quantize,
    RandomJPEG,
    RandomPhotoRoundTrip,
    RandomRealign,
    RandomRescale,
    jpeg,
    photo_round_trip,
    quantize,
    rescale,
    resolve_augment,
    save_and_realign,
    similarity_matrices,
    similarity_warp,
    warp_to_face,
)


def every_transform() -> list:
    """One of each random transform, always applied, and the presets."""
    return [RandomJPEG(p=1.0), RandomRescale(p=1.0), RandomRealign(p=1.0), Quantize(), PhotoAugment.default(),
            RandomPhotoRoundTrip(), PhotoAugment.round_trip()]


def call(transform, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if isinstance(transform, PhotoAugment):
        return transform.with_generator(generator)(images)
    return transform(images, generator)


def synthetic_face(height: int = 112, width: int = 112, seed: int = 0) -> torch.Tensor:
    """A photo-like ``(1, 3, H, W)`` 8-bit image: smooth shapes plus fine grain."""
    generator = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=(height, width), mode="bicubic")
    image = (0.15 + 0.7 * smooth + 0.04 * torch.randn(1, 3, height, width, generator=generator)).clamp(0, 1)
    return (image * 255).round() / 255


def pil_jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Save ``(1, 3, H, W)`` as a JPEG with Pillow (its defaults: 4:2:0) and read it back."""
    pixels = (image[0].permute(1, 2, 0) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    decoded = np.array(Image.open(buffer).convert("RGB"))
    return torch.from_numpy(decoded).permute(2, 0, 1)[None].float() / 255


# ------------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None)
@given(
    index=st.integers(0, 6), batch=st.integers(1, 3), height=st.integers(8, 40), width=st.integers(8, 40),
    seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_transforms_keep_shape_dtype_and_range(index, batch, height, width, seed, dtype):
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    out = call(every_transform()[index], images, seed)
    assert out.shape == images.shape and out.dtype == dtype
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("transform", every_transform(), ids=lambda t: type(t).__name__)
def test_gradients_flow_and_are_finite(transform):
    images = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1).requires_grad_()
    weights = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    (call(transform, images) * weights).sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("transform", [
    RandomJPEG(p=0.0), RandomRescale(p=0.0), RandomRealign(p=0.0), Quantize(p=0.0),
    PhotoAugment([RandomJPEG(p=0.0), RandomRescale(p=0.0), RandomRealign(p=0.0), Quantize(p=0.0)]),
], ids=lambda t: type(t).__name__)
def test_probability_zero_is_the_identity(transform):
    images = torch.rand(4, 3, 24, 24)
    assert call(transform, images) is images


def test_neutral_parameters_are_close_to_the_identity():
    images = torch.rand(2, 3, 30, 30)
    assert rescale(images, 1.0) is images
    still = similarity_warp(images, torch.zeros(2), torch.ones(2), torch.zeros(2, 2))
    assert (still - images).abs().max() < 1e-4
    smooth = F.interpolate(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=(112, 112),
                           mode="bilinear")
    assert (jpeg(smooth, 100) - smooth).abs().mean() < 1 / 255


def test_a_one_pixel_shift_moves_the_image_by_one_pixel():
    images = torch.rand(2, 3, 20, 20)
    moved = similarity_warp(images, torch.zeros(2), torch.ones(2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(moved[0, :, :, 1:], images[0, :, :, :-1], atol=1e-4)
    assert torch.allclose(moved[1, :, 1:, :], images[1, :, :-1, :], atol=1e-4)


def test_rescale_loses_detail_and_keeps_smooth_images():
    stripes = torch.zeros(1, 3, 32, 32)
    stripes[..., ::2] = 1.0
    flat = torch.full((1, 3, 32, 32), 0.3)
    for mode in ("antialias", "bilinear", "area"):
        assert (rescale(stripes, 0.5, mode)[..., 4:-4] - 0.5).abs().max() < 1e-6  # one-pixel stripes average out
        assert torch.allclose(rescale(flat, 0.6, mode), flat, atol=1e-6)


def test_the_photo_round_trip_keeps_smooth_faces_loses_fine_detail_and_is_exact_at_full_size():
    face = synthetic_face()
    assert (photo_round_trip(face, 1.0) - face).abs().max() < 1e-4  # already 8-bit: nothing to round
    stripes = torch.zeros(1, 3, 112, 112)
    stripes[..., ::2] = 1.0
    smooth = F.interpolate(torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(3)), size=(112, 112),
                           mode="bilinear", align_corners=False)
    assert (photo_round_trip(stripes, 0.5)[..., 8:-8, 8:-8] - 0.5).abs().max() < 0.01
    assert (photo_round_trip(smooth, 0.6, quality=90) - smooth)[..., 4:-4, 4:-4].abs().mean() < 3 / 255


def test_the_photo_round_trip_codes_the_jpeg_at_the_photos_size_as_pillow_does():
    face = synthetic_face()
    small = F.interpolate(face, size=(67, 67), mode="bilinear", align_corners=True)
    by_pillow = F.interpolate(pil_jpeg((small * 255).round() / 255, 80), size=(112, 112), mode="bilinear",
                              align_corners=True)
    ours = photo_round_trip(face, 0.6, quality=80)  # 112 * 0.6 -> a 67-pixel face
    lossless = photo_round_trip(face, 0.6)
    assert (ours - by_pillow).abs().mean() < 0.6 * (lossless - by_pillow).abs().mean()


def test_the_photo_round_trip_realigns_with_the_jitter_given():
    ramp = torch.linspace(0.2, 0.8, 112).expand(1, 3, 112, 112).contiguous()
    off = photo_round_trip(ramp, 0.5, realign_jitter=torch.tensor([[0.0, 1.0, 0.0]]))
    # keypoints found 1 photo pixel to the right: the aligned face moves 2 template pixels to the left
    assert torch.allclose(off[..., 10:-10, 10:-10], ramp[..., 10:-10, 12:-8], atol=2 / 255)


@settings(max_examples=30, deadline=None)
@given(angle=st.floats(-20.0, 20.0), scale=st.floats(0.5, 2.0), x=st.floats(-3.0, 3.0), y=st.floats(-3.0, 3.0))
@example(angle=7.5, scale=0.7, x=0.3, y=-0.7)  # unclamped, bilinear sampling gives 1.00000012 here
def test_aligning_a_white_photo_stays_white(angle, scale, x, y):
    """Bilinear weights in float32 may sum to a hair above 1; the aligned face is clamped back into [0, 1]."""
    white = torch.ones(1, 3, 96, 80)
    to_face = similarity_matrices(torch.tensor([angle]), scale, torch.tensor([[x, y]]), (96, 80), (64, 64))
    face = warp_to_face(white, to_face, (64, 64))
    assert face.max() == 1.0 and face.min() > 1.0 - 1e-6


def test_the_simulated_save_rounds_codes_rounds_and_realigns():
    photo = synthetic_face(96, 80, seed=4) * 0.9 + 0.05 + 0.3 / 255  # off the 8-bit grid
    to_face = similarity_matrices(torch.tensor([3.0]), 1.2, torch.tensor([[1.5, -0.5]]), (96, 80), (112, 112))
    saved, face = save_and_realign(photo, to_face, (112, 112), quality=85)
    assert torch.equal(saved, quantize(jpeg(quantize(photo), 85)))
    assert torch.equal(face, warp_to_face(saved, to_face, (112, 112)))
    lossless, _ = save_and_realign(photo, to_face, (112, 112))
    assert torch.equal(lossless, quantize(photo)) and not torch.equal(lossless, saved)


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(0.4, 0.95), angle=st.floats(-10.0, 10.0), zoom=st.floats(0.8, 1.3))
def test_a_shrunk_save_realigns_the_same_face(scale, angle, zoom):
    """The face aligned from the shrunk photo is the one aligned from the full-size photo, less its fine
    detail: the alignment follows the photo's new pixel grid."""
    photo = synthetic_face(96, 80, seed=5)
    smooth = torch.nn.functional.avg_pool2d(photo, 9, stride=1, padding=4, count_include_pad=False)
    to_face = similarity_matrices(torch.tensor([angle]), zoom, torch.tensor([[0.5, -1.0]]), (96, 80), (112, 112))
    saved, face = save_and_realign(smooth, to_face, (112, 112), scale=scale)
    _, full_size_face = save_and_realign(smooth, to_face, (112, 112))
    assert saved.shape[-2:] == (round(96 * scale), round(80 * scale))
    inner = (slice(None), slice(None), slice(16, 96), slice(16, 96))  # away from the photo's edge
    assert (face - full_size_face)[inner].abs().mean() < 0.008  # half a pixel off: 0.013
    assert (face - full_size_face)[inner].abs().mean() < 0.25 * (full_size_face - smooth.mean())[inner].abs().mean()


def test_save_and_realign_names_a_bad_scale():
    photo = synthetic_face(32, 32, seed=1)
    to_face = similarity_matrices(torch.tensor([0.0]), 1.0, torch.zeros(1, 2), (32, 32), (32, 32))
    for scale in (0.0, 1.5):
        with pytest.raises(ValueError, match="scale must be in"):
            save_and_realign(photo, to_face, (32, 32), scale=scale)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=1, max_size=40))
def test_quantize_rounds_to_8_bits_with_a_straight_through_gradient(values):
    images = torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1).requires_grad_()
    out = quantize(images)
    levels = out.detach() * 255
    assert torch.equal(levels, levels.round())
    assert out.min() >= 0 and out.max() <= 1
    assert ((out - images.clamp(0, 1)).abs() <= 0.5 / 255 + 1e-12).all()
    out.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))


# ------------------------------------------------------------ random draws
@pytest.mark.parametrize("transform", every_transform(), ids=lambda t: type(t).__name__)
def test_a_seeded_generator_repeats_the_draws(transform):
    images = torch.rand(4, 3, 32, 32)
    first, again = call(transform, images, seed=5), call(transform, images, seed=5)
    assert torch.equal(first, again)


def test_other_seeds_draw_other_transforms():
    images = torch.rand(4, 3, 32, 32)
    augment = PhotoAugment([RandomRealign(p=1.0), RandomJPEG(p=1.0)])
    assert not torch.equal(call(augment, images, seed=1), call(augment, images, seed=2))


def test_parameters_are_drawn_per_image_or_per_call_as_documented():
    same = torch.rand(1, 3, 32, 32).expand(4, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    jpegged, warped, rescaled = (RandomJPEG(p=1.0)(same, generator), RandomRealign(p=1.0)(same, generator),
                                 RandomRescale(p=1.0)(same, generator))
    assert not torch.equal(jpegged[0], jpegged[1])  # quality per image
    assert not torch.equal(warped[0], warped[1])  # angle, zoom and shift per image
    assert all(torch.equal(rescaled[0], rescaled[i]) for i in range(4))  # factor per call


def test_probability_is_drawn_per_image():
    images = torch.rand(64, 3, 16, 16)
    out = RandomRealign(p=0.5)(images, torch.Generator().manual_seed(0))
    changed = (out != images).flatten(1).any(1)
    assert 10 < changed.sum() < 54
    assert torch.equal(out[~changed], images[~changed])


# ------------------------------------------------------------ JPEG against Pillow
@pytest.mark.parametrize("size", [(112, 112), (100, 90)])
@pytest.mark.parametrize("quality", [50, 75, 95])
def test_jpeg_is_close_to_a_real_pillow_save(size, quality):
    image = synthetic_face(*size)
    saved = pil_jpeg(image, quality)
    coded = jpeg(image, quality)
    assert coded.shape == image.shape
    error, effect = (coded - saved).abs().mean(), (image - saved).abs().mean()
    assert error < 0.3 * effect, (error, effect)
    assert error < 3 / 255


@pytest.mark.parametrize("quality", [75, 85])
def test_jpeg_matches_pillow_on_a_real_cloaked_face(shared_assets, quality):
    path = sorted((shared_assets / "faces").glob("*/*.jpg"))[0]
    face = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    assert face.shape[-2:] == (112, 112)
    noise = (torch.rand(face.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.03
    cloaked = ((face + noise).clamp(0, 1) * 255).round() / 255
    saved = pil_jpeg(cloaked, quality)
    error, effect = (jpeg(cloaked, quality) - saved).abs().mean(), (cloaked - saved).abs().mean()
    assert error < 0.5 * effect and error < 2 / 255, (error, effect)


# ------------------------------------------------------------ checks
@pytest.mark.parametrize("make, message", [
    (lambda: RandomJPEG(p=1.5), "probability p must be a number in \\[0, 1\\]"),
    (lambda: RandomJPEG(quality=(0, 90)), "quality must satisfy 1.0 <= low <= high <= 100.0"),
    (lambda: RandomJPEG(quality=(90, 60)), "quality must satisfy"),
    (lambda: RandomRescale(factor=(0.0, 1.0)), "factor must be above 0"),
    (lambda: RandomRescale(modes=("nearest",)), "modes must be a non-empty choice of"),
    (lambda: RandomRealign(angle=-1), "angle \\(degrees\\) must be a number in \\[0, 180.0\\]"),
    (lambda: RandomRealign(padding_mode="wrap"), "padding_mode must be one of"),
    (lambda: Quantize(bits=0), "bits must be an integer >= 1"),
    (lambda: RandomPhotoRoundTrip(scale=(0.0, 0.8)), "scale must be above 0"),
    (lambda: RandomPhotoRoundTrip(scale=(0.5, 1.2)), "scale must satisfy"),
    (lambda: RandomPhotoRoundTrip(jpeg_p=2.0), "jpeg_p must be a number in \\[0, 1.0\\]"),
    (lambda: photo_round_trip(torch.rand(1, 3, 16, 16), 1.5), "scale must be in \\(0, 1\\]"),
    (lambda: PhotoAugment([lambda x: x]), "takes RandomTransform objects"),
    (lambda: jpeg(torch.rand(1, 3, 16, 16), 101), "quality must be in \\[1, 100\\]"),
    (lambda: jpeg(torch.rand(1, 1, 16, 16), 80), "needs RGB images"),
    (lambda: rescale(torch.rand(1, 3, 16, 16), 1.5), "factor must be in \\(0, 1\\]"),
    (lambda: quantize(torch.rand(3, 16, 16)), "takes a float \\(B, C, H, W\\) tensor"),
    (lambda: resolve_augment("jpeg", None), "augment must be None, one of \\['photo', 'round_trip'\\] or a callable"),
    (lambda: resolve_augment(3, None), "augment must be None, one of \\['photo', 'round_trip'\\] or a callable"),
])
def test_bad_settings_are_refused_with_the_problem_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------ UAPAttack(augment=...)
SIZE = 32


faces = partial(random_faces, margin=0.1)
attack = partial(tiny_attack, UAPAttack, threshold=-1.0, target_fooling_rate=1.0,
                 key_regions=KeyRegions(masker=torch.full((SIZE, SIZE), 0.5)), augment="photo")


def test_fit_with_the_photo_preset_runs_changes_the_fit_and_repeats():
    robust, again, plain = attack().fit(faces()), attack().fit(faces()), attack(augment=None).fit(faces())
    assert torch.equal(robust.perturbation_, again.perturbation_)
    assert not torch.equal(robust.perturbation_, plain.perturbation_)
    assert robust.perturbation_.abs().max() <= robust.epsilon + 1e-7
    assert robust.get_params()["augment"] == "photo"


def test_fit_with_the_round_trip_preset_and_a_lowpass_repeats_and_keeps_the_budget():
    robust = attack(augment="round_trip", lowpass_size=16).fit(faces())
    again = attack(augment="round_trip", lowpass_size=16).fit(faces())
    assert torch.equal(robust.perturbation_, again.perturbation_)
    assert not torch.equal(robust.perturbation_, attack(augment=None, lowpass_size=16).fit(faces()).perturbation_)
    assert robust.perturbation_.abs().max() <= robust.epsilon + 1e-7
    assert robust.get_params()["augment"] == "round_trip"


def test_a_transform_object_draws_from_the_fits_generator():
    augment = PhotoAugment.default()  # no generator of its own: the fit binds its own
    first = attack(augment=augment).fit(faces())
    torch.rand(100)  # moving the global RNG changes nothing
    second = attack(augment=augment).fit(faces())
    assert torch.equal(first.perturbation_, second.perturbation_)
    assert augment.generator is None


def test_only_the_update_steps_see_the_transform():
    calls = []

    def spy(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.flip(-1)

    fitted = attack(augment=spy).fit(faces())
    assert len(calls) == fitted.n_iter_ == 4  # one call per step; none to score or embed the clean faces
    # The epoch scores, and so fooling_rate_ and ssim_, are those of the untransformed faces.
    score = fitted.evaluate(faces())
    assert score["fooling_rate"] == fitted.fooling_rate_ and score["ssim"] == pytest.approx(fitted.ssim_)


def test_resume_with_augment_is_bit_identical(tmp_path):
    path = tmp_path / "fit.ckpt"
    attack(checkpoint_path=path, max_epochs=2).fit(faces())
    resumed = attack(checkpoint_path=path, max_epochs=3).fit(faces(), resume=True)
    straight = attack(max_epochs=3).fit(faces())
    assert resumed.n_iter_ == straight.n_iter_ == 6
    assert torch.equal(resumed.perturbation_, straight.perturbation_)
    assert torch.equal(resumed.flow_, straight.flow_)
    untimed = [[{k: v for k, v in r.items() if k != "time"} for r in fit.history_] for fit in (resumed, straight)]
    assert untimed[0] == untimed[1]


def test_resume_without_the_augment_of_the_checkpoint_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    attack(checkpoint_path=path).fit(faces())
    with pytest.raises(ValueError, match="differs in augment \\(checkpoint: 'photo', now: None\\)"):
        attack(checkpoint_path=path, augment=None, max_epochs=3).fit(faces(), resume=True)


def test_save_and_load_keep_the_augment_setting(tmp_path):
    fitted = attack().fit(faces())
    fitted.save(tmp_path / "attack.safetensors")
    loaded = UAPAttack.load(tmp_path / "attack.safetensors", TinyEmbedder())
    assert loaded.augment == "photo"
    assert torch.equal(loaded.perturbation_, fitted.perturbation_)


@pytest.mark.parametrize("augment, error, message", [
    ("jpeg", ValueError, r"augment must be one of \['photo', 'round_trip'\], a callable .* or None, got 'jpeg'"),
    (0.5, TypeError, r"augment must be one of \['photo', 'round_trip'\], a callable .* or None, got 0.5 \(float\)"),
])
def test_uapattack_refuses_a_bad_augment_before_fitting(augment, error, message):
    with pytest.raises(error, match=message):
        attack(augment=augment).fit(faces())


def test_an_augment_that_changes_the_size_is_refused():
    with pytest.raises(ValueError, match="augment must return images of the shape it is given"):
        attack(augment=lambda images: images[..., :-2, :-2]).fit(faces())
