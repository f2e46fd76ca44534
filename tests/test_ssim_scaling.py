"""Tests for krtfuap.ssim_scaling: one perturbation scaled for each face to an SSIM target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fakes import random_faces, tiny_attack
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.attack import UAPAttack
from krtfuap.metrics import ssim
from krtfuap.ssim_scaling import scale_to_ssim

SIZE = 32


def smooth_faces(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """``(n, 3, size, size)`` images in ``[0, 1]`` with flat and textured parts, as faces have."""
    generator = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=generator), size=(size, size), mode="bilinear")
    texture = torch.rand(n, 1, size, size, generator=generator) * torch.linspace(0, 0.4, size).view(1, 1, 1, size)
    return (0.6 * coarse + texture).clamp(0, 1)


def random_perturbation(seed: int, amplitude: float, size: int = SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(3, size, size, generator=generator) * 2 - 1) * amplitude


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    target=st.floats(0.5, 0.995),
    amplitude=st.floats(0.001, 0.3),
)
def test_every_face_meets_the_target_within_the_budget(seed, target, amplitude):
    images = smooth_faces(6, seed)
    perturbation = random_perturbation(seed + 1, amplitude)
    adversarial, scales = scale_to_ssim(images, perturbation, target)
    assert adversarial.shape == images.shape and scales.shape == (6,)
    assert (ssim(adversarial, images) >= target).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial - images).abs().max() <= perturbation.abs().max() + 1e-6
    assert (scales >= 0).all() and (scales <= 64).all()


def test_the_scale_is_the_largest_that_meets_the_target():
    images, perturbation, target = smooth_faces(8, 0), random_perturbation(1, 0.02), 0.9
    _, scales = scale_to_ssim(images, perturbation, target, epsilon=1.0)
    assert (scales > 0).all() and (scales < 64).all()
    just_above = (images + 1.001 * scales.view(-1, 1, 1, 1) * perturbation).clamp(0, 1)
    assert (ssim(just_above, images) < target).all()


def test_faces_get_different_scales_and_the_same_ssim():
    images, perturbation = smooth_faces(8, 3), random_perturbation(4, 0.05)
    adversarial, scales = scale_to_ssim(images, perturbation, 0.95)
    uniform = ssim((images + perturbation).clamp(0, 1), images)
    assert uniform.max() - uniform.min() > 0.01  # one change, different stealth per face
    assert scales.max() / scales.min() > 1.1
    assert torch.allclose(ssim(adversarial, images), torch.full((8,), 0.95), atol=2e-3)


def test_epsilon_bounds_the_change():
    images, perturbation = smooth_faces(4, 5), random_perturbation(6, 0.01)
    adversarial, _ = scale_to_ssim(images, perturbation, 0.5, epsilon=0.004)
    assert (adversarial - images).abs().max() <= 0.004 + 1e-6


def test_a_zero_perturbation_changes_nothing():
    images = smooth_faces(3, 7)
    adversarial, scales = scale_to_ssim(images, torch.zeros(3, SIZE, SIZE), 0.95)
    assert torch.equal(adversarial, images)
    assert torch.equal(scales, torch.full((3,), 64.0))


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (0.0, ValueError, r"target_ssim must be a number in \(0, 1\), got 0.0\."),
        (1.0, ValueError, r"target_ssim must be a number in \(0, 1\), got 1.0\."),
        (1.5, ValueError, r"target_ssim must be a number in \(0, 1\), got 1.5\."),
        (float("nan"), ValueError, r"target_ssim must be a finite number, got nan\."),
        ("0.9", TypeError, r"target_ssim must be a number in \(0, 1\), got '0.9' \(str\)\."),
    ],
)
def test_a_target_outside_zero_one_is_refused(target, error, message):
    with pytest.raises(error, match=message):
        scale_to_ssim(smooth_faces(2, 0), random_perturbation(0, 0.05), target)


def test_iterations_must_be_positive():
    with pytest.raises(ValueError, match=r"iterations must be an int >= 1, got 0\."):
        scale_to_ssim(smooth_faces(2, 0), random_perturbation(0, 0.05), 0.9, iterations=0)


@pytest.mark.real
def test_real_faces_all_meet_the_target(held_out_pairs):
    faces = held_out_pairs[0]
    generator = torch.Generator().manual_seed(0)
    perturbation = F.avg_pool2d(torch.randn(1, 3, 112, 112, generator=generator), 3, 1, 1)[0] * 0.05
    adversarial, scales = scale_to_ssim(faces, perturbation.clamp(-0.08, 0.08), 0.95)
    values = ssim(adversarial, faces)
    assert (values >= 0.95).all() and values.mean() < 0.951
    assert scales.max() / scales.min() > 1.2  # real faces differ in how much change they hide


# ------------------------------------------------------------------ the estimators' per_face_ssim
@pytest.fixture(scope="module")
def fitted() -> UAPAttack:
    return tiny_attack(UAPAttack, stealth_loss="ssim").fit(smooth_faces(16, 11))


def test_transform_with_per_face_ssim_is_scale_to_ssim(fitted):
    faces = smooth_faces(5, 12)
    expected, _ = scale_to_ssim(faces, fitted.perturbation_, 0.97)
    assert torch.equal(fitted.transform(faces, per_face_ssim=0.97), expected)
    assert torch.equal(fitted.transform(faces), (faces + fitted.perturbation_).clamp(0, 1))


def test_evaluate_with_per_face_ssim_judges_what_transform_gives(fitted):
    faces = smooth_faces(8, 13)
    scaled = fitted.evaluate(faces, per_face_ssim=0.97)
    assert scaled["ssim"] >= 0.97
    assert scaled["ssim"] == pytest.approx(ssim(fitted.transform(faces, per_face_ssim=0.97), faces).mean().item())
    assert fitted.evaluate(faces)["ssim"] == pytest.approx(ssim(fitted.transform(faces), faces).mean().item())


ACCEPTED = r"per_face_ssim must be a number in \(0, 1\) \(an SSIM such as 0.95\) or None, got "


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, ACCEPTED + r"0\."),
        (1, ValueError, ACCEPTED + r"1\."),
        (1.2, ValueError, ACCEPTED + r"1.2\."),
        (-0.5, ValueError, ACCEPTED + r"-0.5\."),
        (float("nan"), ValueError, r"per_face_ssim must be a finite number, got nan\."),
        (True, TypeError, ACCEPTED + r"True \(bool\)\."),
        ("0.95", TypeError, ACCEPTED + r"'0.95' \(str\)\."),
    ],
)
def test_per_face_ssim_outside_zero_one_is_refused(fitted, value, error, message):
    faces = random_faces(2, size=SIZE)
    with pytest.raises(error, match=message):
        fitted.transform(faces, per_face_ssim=value)
    with pytest.raises(error, match=message):
        fitted.evaluate(faces, per_face_ssim=value)
