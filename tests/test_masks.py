"""Tests for krtfuap.masks: key-region rasterisation and the KeyRegionMasker estimator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from krtfuap.landmarks import TemplateLandmarks
from krtfuap.masks import REGIONS, KeyRegionMasker, key_region_mask, key_region_masks

SIZE = 56  # small images keep the property tests fast
TEMPLATE = TemplateLandmarks().points((SIZE, SIZE))


def replay(landmarks: np.ndarray):
    """A landmark backend returning the given landmark sets, batch after batch, in order."""
    position = 0

    def backend(images: torch.Tensor) -> np.ndarray:
        nonlocal position
        out = landmarks[position : position + len(images)]
        position += len(images)
        return out

    return backend


def as_loader(n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches holding ``n`` blank SIZE x SIZE images."""
    return [
        (torch.zeros(min(batch, n - start), 3, SIZE, SIZE), torch.zeros(min(batch, n - start)))
        for start in range(0, n, batch)
    ]


def region_points(nose_square: tuple[float, float, float, float], elsewhere: tuple[float, float]) -> np.ndarray:
    """68 points: the nose on a square's corners, every other point at ``elsewhere``."""
    points = np.tile(np.asarray(elsewhere, dtype=float), (68, 1))
    x0, y0, x1, y1 = nose_square
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    for k, index in enumerate(REGIONS["nose"]):
        points[index] = corners[k % 4]
    return points


# --- single-face masks ------------------------------------------------------------------


def test_region_indices_follow_ibug() -> None:
    assert REGIONS["right_eye"] == tuple(range(36, 42))
    assert REGIONS["left_eye"] == tuple(range(42, 48))
    assert REGIONS["nose"] == tuple(range(27, 36))
    assert REGIONS["mouth"] == tuple(range(48, 60))


def test_pixels_on_the_hull_boundary_count() -> None:
    mask = key_region_mask(region_points((10, 12, 20, 30), (40, 41)), (48, 50))
    assert mask.shape == (48, 50) and mask.dtype == torch.float32
    expected = torch.zeros(48, 50)
    expected[12:31, 10:21] = 1  # nose square, edges included
    expected[41, 40] = 1  # all eye and mouth points on one pixel centre
    assert torch.equal(mask, expected)


def test_point_between_pixel_centres_covers_nothing() -> None:
    mask = key_region_mask(region_points((10.5, 10.5, 10.5, 10.5), (30.5, 30.5)), 40)
    assert mask.sum() == 0


def test_matches_per_pixel_reference() -> None:
    rng = np.random.default_rng(0)
    points = TEMPLATE + rng.normal(0, 1.5, TEMPLATE.shape)
    mask = key_region_mask(torch.from_numpy(points), SIZE).numpy()
    hulls = [shapely.MultiPoint(points[list(idx)]).convex_hull for idx in REGIONS.values()]
    reference = np.array(
        [[any(h.intersects(shapely.Point(x, y)) for h in hulls) for x in range(SIZE)] for y in range(SIZE)]
    )
    np.testing.assert_array_equal(mask, reference)


def test_regions_select_parts() -> None:
    eyes = key_region_mask(TEMPLATE, SIZE, regions=("eyes",))
    right = key_region_mask(TEMPLATE, SIZE, regions="right_eye")
    left = key_region_mask(TEMPLATE, SIZE, regions=("left_eye",))
    assert torch.equal(eyes, torch.maximum(right, left))
    assert right[:, : SIZE // 2].sum() == right.sum() > 0  # the subject's right eye is left in the image
    full = key_region_mask(TEMPLATE, SIZE)
    assert full.sum() > eyes.sum()


def test_landmarks_off_the_image_are_clipped() -> None:
    mask = key_region_mask(region_points((-5, -5, 3, 3), (500, 500)), 20)
    assert mask.sum() == 16  # pixels 0..3 x 0..3


def test_batch_equals_single_masks() -> None:
    points = np.stack([TEMPLATE, TEMPLATE + 2.0, TEMPLATE - 1.5])
    batch = key_region_masks(points, (SIZE, SIZE))
    assert batch.shape == (3, SIZE, SIZE)
    for k in range(3):
        assert torch.equal(batch[k], key_region_mask(points[k], (SIZE, SIZE)))


def test_mask_input_errors() -> None:
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        key_region_mask(np.zeros((5, 2)), 10)
    with pytest.raises(ValueError, match="unknown region"):
        key_region_mask(TEMPLATE, SIZE, regions=("ears",))
    with pytest.raises(ValueError, match="image_size"):
        key_region_mask(TEMPLATE, (0, 10))


# --- KeyRegionMasker --------------------------------------------------------------------


def test_template_fit_from_tensor_loader_or_size() -> None:
    expected = key_region_mask(TEMPLATE, SIZE)
    from_tensor = KeyRegionMasker().fit(torch.rand(2, 3, SIZE, SIZE))
    from_loader = KeyRegionMasker().fit(as_loader(5, 2))
    from_size = KeyRegionMasker(image_size=(SIZE, SIZE)).fit()
    for masker in (from_tensor, from_loader, from_size):
        assert torch.equal(masker.mask_, expected)
        assert masker.n_faces_ == 1
        assert masker.image_size_ == (SIZE, SIZE)
        assert masker.coverage_ == pytest.approx(float(expected.mean()))
        assert masker.get_mask() is masker.mask_


def test_template_coverage_at_112() -> None:
    masker = KeyRegionMasker(image_size=(112, 112)).fit()
    assert 0.03 < masker.coverage_ < 0.08


def test_not_fitted() -> None:
    masker = KeyRegionMasker()
    with pytest.raises(NotFittedError, match="fit"):
        masker.get_mask()
    with pytest.raises(NotFittedError):
        masker.transform()


def test_init_only_stores_params() -> None:
    masker = KeyRegionMasker(landmarks="no-such-backend", combine="bogus", vote=7)
    assert clone(masker).get_params()["combine"] == "bogus"
    with pytest.raises(ValueError, match="combine"):
        masker.fit(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="vote"):
        KeyRegionMasker(combine="vote", vote=0).fit(torch.rand(1, 3, 8, 8))


def test_transform_checks_size() -> None:
    masker = KeyRegionMasker().fit(torch.rand(1, 3, SIZE, SIZE))
    assert masker.transform(torch.rand(4, 3, SIZE, SIZE)) is masker.mask_
    with pytest.raises(ValueError, match="fitted for"):
        masker.transform(torch.rand(1, 3, 32, 32))


def test_fit_input_errors() -> None:
    with pytest.raises(ValueError, match="empty loader"):
        KeyRegionMasker().fit([])
    with pytest.raises(ValueError, match="empty loader"):
        KeyRegionMasker(image_size=(SIZE, SIZE)).fit(iter(()))
    with pytest.raises(ValueError, match="image_size"):
        KeyRegionMasker().fit()
    with pytest.raises(ValueError, match="32x32"):
        KeyRegionMasker(landmarks=replay(np.stack([TEMPLATE] * 2))).fit(
            [torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, 3, 32, 32)]
        )
    with pytest.raises(TypeError, match="iterable"):
        KeyRegionMasker().fit(3)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        KeyRegionMasker().fit(torch.zeros(3, SIZE, SIZE))


def test_backend_output_is_checked() -> None:
    masker = KeyRegionMasker(landmarks=lambda images: np.zeros((len(images), 5, 2)))
    with pytest.raises(ValueError, match="landmark backend output"):
        masker.fit(torch.zeros(2, 3, SIZE, SIZE))


def test_empty_intersection_suggests_vote() -> None:
    points = np.stack([TEMPLATE, TEMPLATE + [SIZE / 2, 0]])
    with pytest.raises(ValueError, match="combine='vote'"):
        KeyRegionMasker(landmarks=replay(points)).fit(torch.zeros(2, 3, SIZE, SIZE))


def jittered_faces(n_max: int = 7) -> st.SearchStrategy[np.ndarray]:
    """1..n_max landmark sets: the template, shifted and jittered by a few pixels."""

    def build(args: tuple[int, int, float]) -> np.ndarray:
        n, seed, scale = args
        rng = np.random.default_rng(seed)
        shift = rng.normal(0, scale, (n, 1, 2))
        jitter = rng.normal(0, scale / 2, (n, 68, 2))
        return TEMPLATE[None] + shift + jitter

    return st.tuples(st.integers(1, n_max), st.integers(0, 2**32 - 1), st.floats(0.0, 4.0)).map(build)


def fit_or_empty(masker: KeyRegionMasker, faces: np.ndarray, batch: int, expected: torch.Tensor) -> None:
    """Fit on ``faces`` in batches; check the mask equals ``expected``, or the error when that is empty."""
    loader = as_loader(len(faces), batch)
    if not expected.any():
        with pytest.raises(ValueError, match="is empty"):
            masker.set_params(landmarks=replay(faces)).fit(loader)
        return
    masker.set_params(landmarks=replay(faces)).fit(loader)
    assert torch.equal(masker.mask_, expected.float())
    assert masker.mask_.shape == (SIZE, SIZE) and masker.mask_.dtype == torch.float32
    assert set(masker.mask_.unique().tolist()) <= {0.0, 1.0}
    assert masker.n_faces_ == len(faces)
    assert masker.coverage_ == pytest.approx(float(masker.mask_.mean()))


@settings(max_examples=30, deadline=None)
@given(faces=jittered_faces(), batch=st.integers(1, 4), vote=st.floats(0.01, 1.0))
def test_combine_matches_logical_and_or_vote(faces: np.ndarray, batch: int, vote: float) -> None:
    per_face = key_region_masks(faces, SIZE).bool()
    every, anyone = per_face.all(dim=0), per_face.any(dim=0)
    count = per_face.sum(dim=0)
    voted = count >= max(1, math.ceil(vote * len(faces) - 1e-9))
    assert (every <= voted).all() and (voted <= anyone).all()

    union = KeyRegionMasker(combine="union")
    fit_or_empty(union, faces, batch, anyone)
    assert torch.equal(union.face_masks_count_, count)
    fit_or_empty(KeyRegionMasker(combine="vote", vote=vote), faces, batch, voted)
    fit_or_empty(KeyRegionMasker(combine="intersection"), faces, batch, every)
    fit_or_empty(KeyRegionMasker(combine="vote", vote=1.0), faces, batch, every)


@pytest.mark.real
def test_dlib_masks_on_real_faces(shared_assets: Path) -> None:
    from krtfuap.landmarks import DlibLandmarks

    pytest.importorskip("dlib", reason="dlib not installed: pip install 'krtfuap[dlib]'")
    paths = sorted((shared_assets / "faces").glob("*/*.jpg"))[::240][:10]
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    faces = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0
    landmarks = DlibLandmarks()(faces)  # run dlib once; replay its output to each masker
    coverage = {}
    for combine in ("intersection", "vote", "union"):
        masker = KeyRegionMasker(landmarks=replay(landmarks), combine=combine).fit(torch.split(faces, 4))
        assert masker.n_faces_ == 10
        coverage[combine] = masker
    assert 0 < coverage["intersection"].coverage_ < coverage["vote"].coverage_ < coverage["union"].coverage_
    template = KeyRegionMasker(image_size=(112, 112)).fit().mask_.bool()
    voted = coverage["vote"].mask_.bool()
    iou = (voted & template).sum() / (voted | template).sum()
    assert iou > 0.6, iou
