"""Pasting an aligned-face perturbation back into a photo (krtfuap/paste.py)."""

from __future__ import annotations

import numpy as np
from fakes import placed_keypoints
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.alignment import align_face
from krtfuap.paste import feather_window, paste_perturbation, warp_to_region
from krtfuap.photo_face import locate_face


def _smooth_perturbation(epsilon: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1) * epsilon
    return F.interpolate(coarse, size=(112, 112), mode="bilinear", align_corners=False)[0]


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
    keypoints = [placed_keypoints(scale, angle, (x, y)), placed_keypoints(scale, -angle, (x + 30, y + 10))]
    out = paste_perturbation(photo, perturbation, keypoints, epsilon=epsilon)
    assert out.shape == photo.shape and out.dtype == photo.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - photo).abs().max() <= epsilon + 1e-6  # overlapping faces are clipped back into the budget


@settings(max_examples=10, deadline=None)
@given(scale=st.floats(0.5, 3.0), angle=st.floats(-0.5, 0.5))
def test_zero_perturbation_is_the_identity(scale: float, angle: float) -> None:
    photo = torch.rand(3, 200, 200)
    out = paste_perturbation(photo, torch.zeros(3, 112, 112), [placed_keypoints(scale, angle, (20.0, 20.0))], epsilon=0.08)
    assert torch.equal(out, photo)


def test_only_the_aligned_square_changes() -> None:
    photo = torch.full((3, 300, 300), 0.5)
    keypoints = placed_keypoints(1.0, 0.0, (100.0, 80.0))  # the aligned square covers x 100..211, y 80..191
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
    keypoints = placed_keypoints(scale, angle, (90.0, 60.0))
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
        paste_perturbation(torch.rand(3, 10, 10), torch.zeros(3, 112, 112), [np.zeros((4, 2))], epsilon=0.08)
    with pytest.raises(ValueError, match="locate it again"):  # located for another photo size
        face = locate_face(placed_keypoints(1.0, 0.0, (10.0, 10.0)), (200, 200))
        paste_perturbation(torch.rand(3, 150, 200), torch.zeros(3, 112, 112), [face], epsilon=0.08)


def test_located_faces_and_keypoints_paste_alike() -> None:
    photo = torch.rand(3, 180, 220, generator=torch.Generator().manual_seed(2))
    keypoints = [placed_keypoints(1.3, 0.2, (40.0, 20.0)), placed_keypoints(0.6, -0.1, (150.0, 90.0))]
    boxes = [np.array([30.0, 10.0, 200.0, 190.0]), None]
    faces = [locate_face(points, (180, 220), box=box) for points, box in zip(keypoints, boxes)]
    perturbation = _smooth_perturbation(0.08, seed=3)
    by_keypoints = paste_perturbation(photo, perturbation, keypoints, epsilon=0.08)
    # the box widens the first face's region: the same warp from another origin, equal up to float32 rounding
    assert torch.allclose(paste_perturbation(photo, perturbation, faces, epsilon=0.08), by_keypoints, atol=1e-6)
    assert torch.equal(paste_perturbation(photo, perturbation, np.stack(keypoints), epsilon=0.08), by_keypoints)


def test_warp_to_region_puts_the_template_where_the_face_is() -> None:
    """A dot on the template lands, in the region, where the face's matrix maps it."""
    face = locate_face(placed_keypoints(1.5, 0.3, (60.0, 35.0)), (300, 320))
    dot = torch.zeros(1, 112, 112)
    dot[0, 40, 70] = 1.0  # (x, y) = (70, 40) on the template
    warped = warp_to_region(dot, face)
    assert warped.shape == (1, *face.region_size)
    x, y, _ = face.face_to_region @ np.array([70.0, 40.0, 1.0])
    row, col = divmod(int(warped[0].argmax()), warped.shape[-1])
    assert abs(row - y) <= 1 and abs(col - x) <= 1
