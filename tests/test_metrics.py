"""Tests for krtfuap.metrics: fooling rate, threshold calibration, image quality, LPIPS."""

from __future__ import annotations

import importlib.util
import math
import sys
from functools import partial

import pytest
import torch
import torchvision
from fakes import TinyEmbedder
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from krtfuap.metrics import (
    LPIPSMetric,
    calibrate_threshold,
    cosine_similarity,
    embed,
    fooled_by_similarity,
    fooling_rate,
    haarpsi,
    is_fooled,
    pair_similarities,
    psnr,
    ssim,
    tar_at_far,
)

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


TinyFace = partial(TinyEmbedder, dim=8)  # (B, 3, H, W) -> (B, 8); records batch sizes in .calls


# --------------------------------------------------------------------------- cosine / fooling rate


def test_cosine_similarity_rowwise():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[5.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [4.0, 3.0]])
    torch.testing.assert_close(cosine_similarity(a, b), torch.tensor([1.0, 0.0, -1.0, 0.6]))


def test_fooling_rate_counts_cosines_below_threshold():
    clean = torch.tensor([[1.0, 0.0]] * 5)
    # cosines with the clean embedding: 1, 0.8, 0, -1, 0.28
    adversarial = torch.tensor([[2.0, 0.0], [4.0, 3.0], [0.0, 1.0], [-1.0, 0.0], [7.0, 24.0]])
    assert fooling_rate(adversarial, clean, 0.5) == pytest.approx(3 / 5)
    assert fooling_rate(adversarial, clean, 0.9) == pytest.approx(4 / 5)
    assert fooling_rate(adversarial, clean, 0.1) == pytest.approx(2 / 5)
    assert fooling_rate(adversarial, clean, -1.5) == 0.0
    assert fooling_rate(adversarial, clean, 1.5) == 1.0
    assert isinstance(fooling_rate(adversarial, clean, 0.5), float)


def test_fooling_rate_strict_inequality():
    clean = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    adversarial = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # cos exactly 0 and 1
    assert fooling_rate(adversarial, clean, 0.0) == 0.0  # cos == t still matches
    assert fooling_rate(adversarial, clean, 1.0) == 0.5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), threshold=st.floats(-1.0, 1.0), scale=st.floats(0.01, 100.0))
def test_fooling_rate_matches_definition_and_ignores_scale(seed, threshold, scale):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    adversarial = clean + torch.randn(20, 6, generator=generator, dtype=torch.float64)
    cos = (clean * adversarial).sum(1) / (clean.norm(dim=1) * adversarial.norm(dim=1))
    assert fooling_rate(adversarial, clean, threshold) == pytest.approx((cos < threshold).double().mean().item())
    assert fooling_rate(adversarial * scale, clean, threshold) == pytest.approx(
        fooling_rate(adversarial, clean, threshold)
    )


def test_fooled_by_similarity_below_at_and_above_the_threshold():
    threshold = 0.3
    just_below, just_above = math.nextafter(threshold, -2.0), math.nextafter(threshold, 2.0)
    similarity = torch.tensor([just_below, threshold, just_above, -1.0, 1.0, math.nan], dtype=torch.float64)
    fooled = fooled_by_similarity(similarity, threshold)
    assert fooled.dtype == torch.bool and fooled.shape == (6,)
    assert fooled.tolist() == [True, False, False, True, False, False]  # equal still matches; NaN is never fooled


def test_fooled_by_similarity_keeps_the_shape_and_takes_a_plain_float():
    similarity = torch.tensor([[0.1, 0.5], [0.7, -0.2]])
    assert fooled_by_similarity(similarity, 0.4).tolist() == [[True, False], [False, True]]
    assert fooled_by_similarity(0.1, 0.4).shape == () and bool(fooled_by_similarity(0.1, 0.4))
    assert not bool(fooled_by_similarity(0.4, 0.4))
    with pytest.raises(ValueError, match="threshold is NaN"):
        fooled_by_similarity(similarity, math.nan)


def test_with_one_threshold_per_member_a_face_is_fooled_only_when_every_member_is():
    # (faces, members): face 0 fools both, face 1 fools member 0 only, face 2 is at member 1's threshold.
    similarity = torch.tensor([[0.1, 0.2], [0.1, 0.9], [0.2, 0.5], [0.6, 0.1]])
    thresholds = [0.3, 0.5]
    assert fooled_by_similarity(similarity, thresholds).tolist() == [True, False, False, False]
    # The mean similarity against the mean threshold would call face 2 fooled: its member 1 still matches.
    assert bool(similarity[2].mean() < sum(thresholds) / 2)
    assert fooled_by_similarity(similarity, tuple(thresholds)).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match=r"2 thresholds, one per ensemble member, need similarities of shape "
                                         r"\(\.\.\., 2\).*got shape \(4, 3\)"):
        fooled_by_similarity(torch.zeros(4, 3), thresholds)
    with pytest.raises(ValueError, match="threshold is NaN"):
        fooled_by_similarity(similarity, [0.3, math.nan])


@settings(max_examples=60, deadline=None)
@given(
    similarity=st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=3), min_size=1, max_size=6),
    thresholds=st.lists(st.floats(-1, 1), min_size=3, max_size=3),
)
def test_per_member_thresholds_fool_exactly_where_every_single_threshold_does(similarity, thresholds):
    similarity = torch.tensor(similarity, dtype=torch.float64)
    each = torch.stack([fooled_by_similarity(similarity[:, m], t) for m, t in enumerate(thresholds)], dim=1)
    assert fooled_by_similarity(similarity, thresholds).tolist() == each.all(dim=1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fooled_by_similarity_judges_low_precision_against_the_exact_threshold(dtype):
    """Comparing in the similarity's own dtype would round the threshold onto the similarity and
    call the face matched; the criterion compares the exact values."""
    similarity = torch.tensor([0.3], dtype=dtype)
    value = similarity.double().item()
    threshold = value + torch.finfo(dtype).eps * value / 4  # above the similarity, below half its spacing
    assert not bool(similarity < threshold)  # what a naive comparison in ``dtype`` says
    assert fooled_by_similarity(similarity, threshold).tolist() == [True]
    assert fooled_by_similarity(similarity, value).tolist() == [False]


def test_is_fooled_decides_per_face_from_embeddings():
    clean = torch.tensor([[1.0, 0.0]] * 5)
    adversarial = torch.tensor([[2.0, 0.0], [4.0, 3.0], [0.0, 1.0], [-1.0, 0.0], [7.0, 24.0]])  # cos 1, .8, 0, -1, .28
    fooled = is_fooled(adversarial, clean, 0.5)
    assert fooled.dtype == torch.bool and fooled.shape == (5,)
    assert fooled.tolist() == [False, False, True, True, True]
    assert is_fooled(adversarial, clean, 0.8).tolist() == [False, False, True, True, True]  # cos == t matches
    assert is_fooled(adversarial, clean, 0.81).tolist() == [False, True, True, True, True]
    assert is_fooled(clean, adversarial, 0.5).tolist() == fooled.tolist()  # the similarity is symmetric


@pytest.mark.parametrize(
    "adversarial, clean",
    [(torch.ones(3, 4), torch.ones(2, 4)), (torch.ones(3, 4), torch.ones(3, 5)), (torch.ones(4), torch.ones(4)),
     (torch.ones(1, 4), torch.ones(3, 4))],
)
def test_is_fooled_refuses_embeddings_of_other_shapes(adversarial, clean):
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        is_fooled(adversarial, clean, 0.5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), threshold=st.floats(-1.0, 1.0))
def test_is_fooled_and_fooling_rate_agree_with_the_similarity_criterion(seed, threshold):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(20, 6, generator=generator)
    adversarial = clean + torch.randn(20, 6, generator=generator)
    fooled = is_fooled(adversarial, clean, threshold)
    assert torch.equal(fooled, fooled_by_similarity(cosine_similarity(adversarial, clean), threshold))
    assert fooling_rate(adversarial, clean, threshold) == fooled.float().mean().item()
    # A threshold exactly at a face's similarity leaves that face matched.
    at_face = cosine_similarity(adversarial, clean)[0].item()
    assert not is_fooled(adversarial, clean, at_face)[0]


# --------------------------------------------------------------------------- calibrate_threshold


def _accuracy_at(similarities: torch.Tensor, same: torch.Tensor, threshold: float) -> float:
    """Accuracy of "same iff similarity >= threshold", compared in the similarities' own dtype."""
    return ((similarities >= threshold) == same.bool()).double().mean().item()


def test_calibrate_threshold_separable():
    genuine = torch.tensor([0.61, 0.7, 0.9, 0.65, 0.8])
    impostor = torch.tensor([-0.2, 0.1, 0.3, 0.05])
    similarities = torch.cat([genuine, impostor])
    same = torch.tensor([1] * 5 + [0] * 4)
    threshold, accuracy = calibrate_threshold(similarities, same)
    assert accuracy == 1.0
    assert 0.3 < threshold < 0.61
    assert threshold == pytest.approx((0.3 + 0.61) / 2)
    assert _accuracy_at(similarities, same, threshold) == 1.0
    assert isinstance(threshold, float) and isinstance(accuracy, float)


def test_calibrate_threshold_accepts_lists_and_bool_labels():
    threshold, accuracy = calibrate_threshold([0.9, 0.1, 0.8, 0.2], [True, False, True, False])
    assert accuracy == 1.0 and 0.2 < threshold < 0.8


def test_calibrate_threshold_extremes():
    # All genuine below all impostors: best is to call everything the majority class.
    threshold, accuracy = calibrate_threshold(torch.tensor([0.1, 0.2, 0.8, 0.9, 0.95]), torch.tensor([1, 1, 0, 0, 0]))
    assert accuracy == pytest.approx(3 / 5)
    assert threshold > 0.95  # everything judged "different"
    threshold, accuracy = calibrate_threshold(torch.tensor([0.1, 0.2, 0.8, 0.9, 0.95]), torch.tensor([1, 1, 1, 0, 0]))
    assert accuracy == pytest.approx(3 / 5)
    assert threshold < 0.1  # everything judged "same"


def test_calibrate_threshold_ties_report_achievable_accuracy():
    """Regression: a split between equal similarities used to be reported (accuracy 1.0 here)."""
    similarities = torch.tensor([0.5, 0.5])
    same = torch.tensor([0, 1])
    threshold, accuracy = calibrate_threshold(similarities, same)
    assert accuracy == 0.5
    assert _accuracy_at(similarities, same, threshold) == accuracy

    similarities = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.9])
    same = torch.tensor([0, 1, 0, 1, 1])
    threshold, accuracy = calibrate_threshold(similarities, same)
    assert accuracy == pytest.approx(4 / 5)
    assert _accuracy_at(similarities, same, threshold) == pytest.approx(accuracy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("low", [0.0, 0.5, 0.75])
def test_calibrate_threshold_adjacent_floats(dtype, low):
    """Regression: the float64 midpoint of two neighbouring scores can round back onto the lower one."""
    low = torch.tensor([low], dtype=dtype)
    high = torch.nextafter(low, torch.ones_like(low))
    similarities = torch.cat([high, low])
    same = torch.tensor([1, 0])
    threshold, accuracy = calibrate_threshold(similarities, same)
    assert accuracy == 1.0
    assert _accuracy_at(similarities, same, threshold) == 1.0
    # Reversed labels: the best is "all same" or "all different", realisable in the dtype too.
    reversed_same = torch.tensor([0, 1])
    threshold, accuracy = calibrate_threshold(similarities, reversed_same)
    assert accuracy == 0.5
    assert _accuracy_at(similarities, reversed_same, threshold) == accuracy


@pytest.mark.parametrize("same", [[1, 1, 1], [0, 0, 0], [True], [False]])
def test_calibrate_threshold_needs_both_classes(same):
    with pytest.raises(ValueError, match=r"needs both genuine \(same=1\) and impostor \(same=0\) pairs"):
        calibrate_threshold(torch.rand(len(same)), torch.tensor(same))


def test_calibrate_threshold_length_mismatch():
    with pytest.raises(ValueError, match=r"similarities \(3,\) and same \(2,\) differ in length"):
        calibrate_threshold(torch.rand(3), torch.tensor([0, 1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("function", [calibrate_threshold, tar_at_far])
def test_threshold_search_refuses_non_finite_similarities(function, bad):
    with pytest.raises(ValueError, match="similarities must be finite"):
        function(torch.tensor([0.1, bad, 0.9]), torch.tensor([0, 1, 1]))


# Similarities drawn from a small grid (many ties) or as free floats.
_similarity = st.one_of(
    st.sampled_from([-0.5, 0.0, 0.25, 0.5, 0.75, 1.0]),
    st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=True),
)


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(st.tuples(_similarity, st.booleans()), min_size=2, max_size=30).filter(
        lambda p: any(s for _, s in p) and not all(s for _, s in p)
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_calibrate_threshold_matches_brute_force(pairs, dtype):
    similarities = torch.tensor([s for s, _ in pairs], dtype=dtype)
    same = torch.tensor([g for _, g in pairs])
    threshold, accuracy = calibrate_threshold(similarities, same)
    # Every achievable decision is "similarity >= t" for t one of the values, or t above them all.
    candidates = sorted(set(similarities.tolist())) + [2.0]
    best = max(_accuracy_at(similarities, same, t) for t in candidates)
    assert accuracy == pytest.approx(best, abs=1e-12)
    assert _accuracy_at(similarities, same, threshold) == pytest.approx(accuracy, abs=1e-12)


# --------------------------------------------------------------------------- tar_at_far


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tar_at_far_constructed(dtype):
    """With float32 scores the old ``+ 1e-9`` vanished and one impostor too many was accepted."""
    impostor = torch.linspace(-0.5, 0.5, 1000, dtype=dtype)  # distinct values
    genuine = torch.linspace(0.0, 1.0, 101, dtype=dtype)
    similarities = torch.cat([genuine, impostor])
    same = torch.cat([torch.ones(101, dtype=torch.bool), torch.zeros(1000, dtype=torch.bool)])

    tar, threshold = tar_at_far(similarities, same, far=0.01)
    # At most 10 impostors may be accepted: the threshold sits just above the 11th highest.
    eleventh = impostor.sort(descending=True).values[10].item()
    assert threshold == pytest.approx(eleventh, abs=1e-6)
    assert threshold > eleventh
    assert (impostor >= threshold).sum().item() == 10
    assert tar == pytest.approx((genuine >= threshold).double().mean().item())
    assert isinstance(tar, float) and isinstance(threshold, float)


def test_tar_at_far_perfect_separation():
    similarities = torch.tensor([0.9, 0.8, 0.85, 0.1, 0.2, 0.0, -0.1])
    same = torch.tensor([1, 1, 1, 0, 0, 0, 0])
    tar, threshold = tar_at_far(similarities, same, far=0.1)  # 0.1 * 4 -> no impostor allowed
    assert tar == 1.0
    assert 0.2 < threshold < 0.8


def test_tar_at_far_with_ties_at_threshold():
    # Three impostors tie at 0.5; with far=0.5 two may pass but no threshold lets exactly two through.
    similarities = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.5, 0.6])
    same = torch.tensor([0, 0, 0, 0, 1, 1])
    tar, threshold = tar_at_far(similarities, same, far=0.5)
    assert (similarities[:4] >= threshold).double().mean().item() <= 0.5
    assert threshold > 0.5
    assert tar == 0.5


@pytest.mark.parametrize("far", [0.0, 1.0, -0.1, 2.0])
def test_tar_at_far_rejects_bad_far(far):
    with pytest.raises(ValueError, match=r"far must be in \(0, 1\)"):
        tar_at_far(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), far=far)


def test_tar_at_far_needs_both_classes():
    with pytest.raises(ValueError, match="both genuine"):
        tar_at_far(torch.tensor([0.1, 0.9]), torch.tensor([1, 1]))


@settings(max_examples=80, deadline=None)
@given(
    pairs=st.lists(st.tuples(_similarity, st.booleans()), min_size=2, max_size=60).filter(
        lambda p: any(s for _, s in p) and not all(s for _, s in p)
    ),
    far=st.floats(0.001, 0.999),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_tar_at_far_respects_far_and_is_smallest(pairs, far, dtype):
    similarities = torch.tensor([s for s, _ in pairs], dtype=dtype)
    same = torch.tensor([g for _, g in pairs])
    tar, threshold = tar_at_far(similarities, same, far=far)
    impostor, genuine = similarities[~same], similarities[same]
    assert (impostor >= threshold).double().mean().item() <= far
    assert tar == pytest.approx((genuine >= threshold).double().mean().item())
    # Any threshold at or below the highest rejected impostor would exceed the FAR.
    rejected = impostor[impostor < threshold]
    if len(rejected):
        assert (impostor >= rejected.max()).double().mean().item() > far


# --------------------------------------------------------------------------- ssim / psnr


@pytest.mark.parametrize("similarity", [ssim, haarpsi])
def test_image_similarity_of_identical_images_is_one_per_image(similarity):
    images = torch.rand(3, 3, 16, 16)
    out = similarity(images, images.clone())
    assert out.shape == (3,)
    torch.testing.assert_close(out, torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("similarity", [ssim, haarpsi])
def test_image_similarity_decreases_with_noise_per_image(similarity):
    torch.manual_seed(0)
    reference = torch.rand(1, 3, 24, 24).repeat(3, 1, 1, 1)
    noise = torch.randn(1, 3, 24, 24)
    images = (reference + noise * torch.tensor([0.0, 0.05, 0.3]).view(3, 1, 1, 1)).clamp(0, 1)
    out = similarity(images, reference)
    assert out.shape == (3,)
    assert out[0] > out[1] > out[2]
    assert (out <= 1 + 1e-5).all()


def test_haarpsi_sees_a_change_of_colour_that_keeps_the_brightness():
    torch.manual_seed(0)
    reference = (0.3 + 0.4 * torch.rand(1, 3, 48, 48))
    # Y = 0.299 R + 0.587 G + 0.114 B is unchanged by this shift: only the chrominance moves.
    shift = torch.tensor([0.587, -0.299, 0.0]).view(1, 3, 1, 1) * 0.2
    assert (shift.flatten() @ torch.tensor([0.299, 0.587, 0.114])).abs() < 1e-6
    coloured = (reference + shift * torch.randn(1, 1, 48, 48)).clamp(0, 1)
    assert haarpsi(coloured, reference).item() < 0.99


def test_haarpsi_is_differentiable_in_the_images():
    reference = torch.rand(2, 3, 32, 32)
    images = (reference + 0.05 * torch.randn_like(reference)).clamp(0, 1).requires_grad_(True)
    haarpsi(images, reference).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize(("images", "reference", "message"), [
    (torch.rand(1, 3, 16, 16) * 2, torch.rand(1, 3, 16, 16), r"images must be in \[0, 1\]"),
    (torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16), "reference must have shape"),
    (torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16), "must have the same shape"),
    (torch.rand(1, 3, 15, 64), torch.rand(1, 3, 15, 64), "at least 16 pixels a side"),
])
def test_haarpsi_refuses_inputs_it_cannot_score(images, reference, message):
    with pytest.raises(ValueError, match=message):
        haarpsi(images, reference)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.integers(16, 40), amount=st.floats(0.0, 1.0))
def test_haarpsi_is_symmetric_and_within_zero_and_one(seed, size, amount):
    generator = torch.Generator().manual_seed(seed)
    reference = torch.rand(2, 3, size, size, generator=generator)
    images = (reference + amount * (torch.rand(reference.shape, generator=generator) - 0.5)).clamp(0, 1)
    forward, backward = haarpsi(images, reference), haarpsi(reference, images)
    torch.testing.assert_close(forward, backward, atol=1e-5, rtol=0)
    assert ((forward >= 0) & (forward <= 1 + 1e-5)).all()


def test_ssim_window_size():
    torch.manual_seed(1)
    reference = torch.rand(2, 3, 16, 16)
    images = (reference + 0.1 * torch.randn_like(reference)).clamp(0, 1)
    assert not torch.allclose(ssim(images, reference, 3), ssim(images, reference, 11))


def _structured_images() -> torch.Tensor:
    """Smooth gradients, stripes and a disc: image-like content, ``(2, 3, 40, 48)`` float64."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 40, dtype=torch.float64), torch.linspace(0, 1, 48, dtype=torch.float64),
                          indexing="ij")
    disc = (((x - 0.5) ** 2 + (y - 0.5) ** 2) < 0.08).double()
    first = torch.stack([0.2 + 0.6 * x, 0.5 + 0.4 * torch.sin(12 * x) * y, 0.3 + 0.5 * disc])
    second = torch.stack([disc, 1 - y, 0.5 + 0.5 * torch.cos(9 * y) * torch.cos(7 * x)]).clamp(0, 1)
    return torch.stack([first, second])


def test_ssim_matches_scikit_image_standard_definition():
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    generator = torch.Generator().manual_seed(3)
    random = torch.rand(3, 3, 33, 27, generator=generator, dtype=torch.float64)
    structured = _structured_images()
    cases = [
        (random, (random + 0.1 * torch.randn(random.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)),
        (random, torch.rand(random.shape, generator=generator, dtype=torch.float64)),  # unrelated: SSIM near 0
        (structured, (structured + 0.05 * torch.randn(structured.shape, generator=generator,
                                                      dtype=torch.float64)).clamp(0, 1)),
        (structured, (structured * 0.7 + 0.1).clamp(0, 1)),  # contrast / brightness change, no noise
    ]
    for reference, images in cases:
        expected = torch.tensor([
            structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0, channel_axis=0)
            for a, b in zip(images, reference)
        ], dtype=torch.float64)
        for dtype in (torch.float64, torch.float32):
            out = ssim(images.to(dtype), reference.to(dtype))
            assert out.shape == (len(images),)
            torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=0)


def test_ssim_uses_only_the_valid_region():
    """Padded border windows are not counted: a perturbation inside the image (as the key-region mask
    puts it) leaves the border windows identical, so counting them (kornia's ``padding="same"``,
    which reflects the border) reads higher than the standard valid-region SSIM."""
    from kornia.metrics import ssim as kornia_ssim

    reference = _structured_images().float()
    generator = torch.Generator().manual_seed(0)
    perturbation = (torch.rand(3, 40, 48, generator=generator) * 2 - 1) * 0.08
    inside = torch.zeros(40, 48)
    inside[12:28, 14:34] = 1.0
    images = (reference + perturbation * inside).clamp(0, 1)
    same_padding = kornia_ssim(images, reference, 11).flatten(1).mean(dim=1)
    valid = kornia_ssim(images, reference, 11, padding="valid").flatten(1).mean(dim=1)
    torch.testing.assert_close(ssim(images, reference), valid)
    assert (ssim(images, reference) < same_padding - 1e-3).all()


def test_ssim_small_images_use_the_largest_window_that_fits():
    reference = torch.rand(2, 3, 8, 9, generator=torch.Generator().manual_seed(0))
    images = (reference + 0.1).clamp(0, 1)
    torch.testing.assert_close(ssim(images, reference), ssim(images, reference, window_size=7))
    assert torch.isfinite(ssim(images[:, :, :1, :1], reference[:, :, :1, :1])).all()
    with pytest.raises(ValueError, match="odd"):
        ssim(images, reference, window_size=4)


def test_psnr_identical_is_infinite():
    images = torch.rand(2, 3, 8, 8)
    out = psnr(images, images.clone())
    assert out.shape == (2,)
    assert torch.isinf(out).all() and (out > 0).all()


def test_psnr_known_mse_per_image():
    reference = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    images = reference.clone()
    images[0] += 0.1  # MSE 1e-2 -> 20 dB
    images[1] += 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(images, reference), torch.tensor([20.0, 40.0], dtype=torch.float64))


def test_psnr_is_per_image_not_batch():
    reference = torch.zeros(2, 3, 4, 4)
    images = reference.clone()
    images[1, :, :2] = 1.0  # only the second image differs: MSE 0.5 -> ~3.01 dB
    out = psnr(images, reference)
    assert torch.isinf(out[0])
    assert out[1].item() == pytest.approx(10 * math.log10(2), rel=1e-5)


# --------------------------------------------------------------------------- embed / pair_similarities


def test_embed_batches_and_matches_direct_call():
    model = TinyFace().eval()
    images = torch.rand(7, 3, 12, 12)
    out = embed(model, images, batch_size=3)
    assert model.calls == [3, 3, 1]
    assert out.shape == (7, 8)
    assert not out.requires_grad
    with torch.no_grad():
        direct = model(images)
    torch.testing.assert_close(out, direct, atol=1e-6, rtol=1e-5)


def test_embed_model_without_parameters():
    images = torch.rand(4, 3, 5, 5)
    out = embed(nn.Flatten(), images, batch_size=2)
    torch.testing.assert_close(out, images.flatten(1))


def test_embed_checks_images_and_outputs():
    model = TinyFace()
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\].*divide by 255"):
        embed(model, torch.rand(2, 3, 12, 12) * 255)
    with pytest.raises(ValueError, match=r"model output must have shape \(B, D\) = \(2, D\), got \(2, 4, 6, 6\)"):
        embed(nn.Conv2d(3, 4, 1), torch.rand(2, 3, 6, 6))
    with pytest.raises(TypeError, match="model output must be a torch.Tensor"):
        embed(lambda_module(lambda x: (x.flatten(1),)), torch.rand(2, 3, 6, 6))


def lambda_module(function) -> nn.Module:
    class Wrap(nn.Module):
        def forward(self, x):
            return function(x)

    return Wrap()


def test_pair_similarities_list_of_batches():
    model = TinyFace().eval()
    torch.manual_seed(3)
    a1, b1 = torch.rand(3, 3, 12, 12), torch.rand(3, 3, 12, 12)
    a2, b2 = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    batches = [(a1, a1.clone(), torch.tensor([1, 1, 1])), (a2, b2, [0, 1])]
    similarities, same = pair_similarities(model, batches)
    assert similarities.shape == (5,) and same.shape == (5,)
    assert same.dtype == torch.bool and similarities.device.type == "cpu"
    assert same.tolist() == [True, True, True, False, True]
    torch.testing.assert_close(similarities[:3], torch.ones(3), atol=1e-5, rtol=0)
    with torch.no_grad():
        expected = cosine_similarity(model(a2), model(b2))
    torch.testing.assert_close(similarities[3:], expected, atol=1e-6, rtol=1e-5)
    del b1


def test_pair_similarities_dataloader_feeds_calibration():
    model = TinyFace().eval()
    torch.manual_seed(4)
    a = torch.rand(6, 3, 12, 12)
    b = torch.where(torch.arange(6).view(6, 1, 1, 1) < 3, a, torch.rand(6, 3, 12, 12))
    same = torch.tensor([1, 1, 1, 0, 0, 0])
    similarities, labels = pair_similarities(model, DataLoader(TensorDataset(a, b, same), batch_size=4))
    assert torch.equal(labels, same.bool())
    threshold, accuracy = calibrate_threshold(similarities, labels)
    # Pairs of one image (the first three) against pairs of unrelated images: the threshold separates them.
    assert accuracy == 1.0
    assert similarities[3:].max() < threshold <= similarities[:3].min()


def test_pair_similarities_empty():
    with pytest.raises(ValueError, match="pairs is empty"):
        pair_similarities(TinyFace(), [])


# --------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def alexnet_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random torchvision AlexNet weights under torchvision's name."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.alexnet().state_dict()
    # LPIPS uses only the convolutional features; the big classifier is stored as broadcast
    # zeros to keep the file small (it still has the right keys and shapes).
    state = {k: (v if k.startswith("features.") else torch.zeros(()).expand(v.shape)) for k, v in state.items()}
    torch.save(state, checkpoints / ALEXNET_FILE)
    return home, state


needs_lpips = pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason='needs pip install "krtfuap[lpips]"')


def test_lpips_without_the_package_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "krtfuap\[lpips\]"'):
        LPIPSMetric(download=False)


@needs_lpips
def test_lpips_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        LPIPSMetric(download=False)
    assert ALEXNET_FILE in str(info.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)


@needs_lpips
def test_lpips_missing_explicit_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        LPIPSMetric(weights=tmp_path / "missing.pth", download=False)


def test_lpips_unknown_net():
    with pytest.raises(ValueError, match=r"net must be one of \['alex', 'vgg'\], got 'squeeze'"):
        LPIPSMetric("squeeze", download=False)


@needs_lpips
def test_lpips_with_cached_random_alexnet(alexnet_home, monkeypatch):
    home, state = alexnet_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    metric = LPIPSMetric(download=False)
    # The backbone really is the cached file, not lpips's own random init.
    torch.testing.assert_close(metric.model.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(metric.model.net.slice5, "10").bias, state["features.10.bias"])
    assert not any(p.requires_grad for p in metric.parameters())

    torch.manual_seed(6)
    images = torch.rand(2, 3, 64, 64)
    same = metric(images, images.clone())
    assert same.shape == (2,)
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-6, rtol=0)
    other = metric(images, torch.rand(2, 3, 64, 64))
    assert other.shape == (2,) and (other > 0).all()
    slightly = metric(images, (images + 0.02 * torch.randn_like(images)).clamp(0, 1))
    assert (slightly < other).all()
