"""Pasting an aligned-face perturbation back into a photo (krtfuap/paste.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.alignment import ARCFACE_TEMPLATE_112, align_face
from krtfuap.paste import box_pixels, face_to_photo_matrix, feather_window, paste_perturbation


def _keypoints(scale: float, angle: float, shift: tuple[float, float]) -> np.ndarray:
    """The template placed in a photo by a known similarity transform."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ARCFACE_TEMPLATE_112 @ (scale * rotation).T + np.asarray(shift)


def _smooth_perturbation(epsilon: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1) * epsilon
    return F.interpolate(coarse, size=(112, 112), mode="bilinear", align_corners=False)[0]


def test_matrix_inverts_the_alignment() -> None:
    keypoints = _keypoints(1.7, 0.3, (40.0, 25.0))
    matrix = face_to_photo_matrix(keypoints)
    mapped = np.c_[ARCFACE_TEMPLATE_112, np.ones(5)] @ matrix.T
    np.testing.assert_allclose(mapped, keypoints, atol=1e-6)


def test_feather_window_ramps_from_border_to_one() -> None:
    window = feather_window(112, 6.0)
    assert window.shape == (1, 112, 112)
    assert window.min() > 0 and window.max() == 1.0
    assert window[0, 56, 56] == 1.0 and window[0, 0, 56] == pytest.approx(1 / 6)
    assert torch.equal(feather_window(20, 0.0), torch.ones(1, 20, 20))
    with pytest.raises(ValueError, match="feather"):
        feather_window(112, -1.0)


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.5, 3.0), angle=st.floats(-0.5, 0.5), epsilon=st.floats(0.0, 0.2),
    x=st.floats(-60.0, 200.0), y=st.floats(-60.0, 200.0),
)
def test_paste_stays_in_range_and_budget(scale: float, angle: float, epsilon: float, x: float, y: float) -> None:
    photo = torch.rand(3, 150, 180, generator=torch.Generator().manual_seed(1))
    perturbation = (torch.rand(3, 112, 112) * 2 - 1) * epsilon
    keypoints = [_keypoints(scale, angle, (x, y)), _keypoints(scale, -angle, (x + 30, y + 10))]
    out = paste_perturbation(photo, perturbation, keypoints, epsilon=epsilon)
    assert out.shape == photo.shape and out.dtype == photo.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - photo).abs().max() <= epsilon + 1e-6  # overlapping faces are clipped back into the budget


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(0.5, 3.0), angle=st.floats(-0.5, 0.5))
def test_zero_perturbation_is_the_identity(scale: float, angle: float) -> None:
    photo = torch.rand(3, 200, 200)
    out = paste_perturbation(photo, torch.zeros(3, 112, 112), [_keypoints(scale, angle, (20.0, 20.0))], epsilon=0.08)
    assert torch.equal(out, photo)


def test_only_the_aligned_square_changes() -> None:
    photo = torch.full((3, 300, 300), 0.5)
    keypoints = _keypoints(1.0, 0.0, (100.0, 80.0))  # the aligned square covers x 100..211, y 80..191
    out = paste_perturbation(photo, torch.full((3, 112, 112), 0.05), [keypoints], epsilon=0.08, feather=0.0)
    changed = (out != photo).any(dim=0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() >= 79 and rows.max() <= 192 and cols.min() >= 99 and cols.max() <= 212
    assert torch.allclose(out[:, 100:190, 120:200], torch.full((3, 90, 80), 0.55))
    assert paste_perturbation(photo, torch.full((3, 112, 112), 0.05), [], epsilon=0.08).equal(photo)


@pytest.mark.parametrize("scale,angle", [(1.0, 0.0), (2.2, 0.25), (1.4, -0.4)])
def test_aligning_the_cloaked_photo_gives_back_the_perturbation(scale: float, angle: float) -> None:
    """Round trip: paste into the photo, align as a recogniser does, and the perturbation is there."""
    rng = np.random.default_rng(0)
    photo = torch.from_numpy(rng.uniform(0.2, 0.8, (3, 320, 320))).float()
    keypoints = _keypoints(scale, angle, (90.0, 60.0))
    perturbation = _smooth_perturbation(0.08)
    out = paste_perturbation(photo, perturbation, [keypoints], epsilon=0.08, feather=6.0)

    def aligned(image: torch.Tensor) -> torch.Tensor:
        array = image.mul(255).round().byte().permute(1, 2, 0).numpy()
        return torch.from_numpy(align_face(array, keypoints).astype(np.float32) / 255).permute(2, 0, 1)

    recovered = aligned(out) - aligned(photo)
    inner = (slice(None), slice(10, -10), slice(10, -10))
    error = (recovered - perturbation)[inner].abs().mean().item()
    assert error < 0.25 * perturbation[inner].abs().mean().item()


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"photo must have shape \(3, H, W\)"):
        paste_perturbation(torch.rand(4, 10, 10), torch.zeros(3, 112, 112), [], epsilon=0.08)
    with pytest.raises(ValueError, match=r"perturbation must have shape \(3, S, S\)"):
        paste_perturbation(torch.rand(3, 10, 10), torch.zeros(3, 112, 100), [], epsilon=0.08)
    with pytest.raises(ValueError, match="keypoints must have shape"):
        face_to_photo_matrix(np.zeros((4, 2)))


def test_box_pixels_covers_the_touched_pixels_and_stays_in_the_photo() -> None:
    assert box_pixels(np.array([10.2, 5.7, 30.5, 40.0]), 100, 120) == (5, 10, 40, 31)
    assert box_pixels(np.array([-3.0, -1.5, 130.2, 99.9]), 100, 120) == (0, 0, 100, 120)
    top, left, bottom, right = box_pixels(np.array([200.0, 200.0, 220.0, 230.0]), 100, 120)
    assert bottom <= top or right <= left  # wholly outside: an empty rectangle
