"""Tests for krtfuap.scoring: the one definition of fooling rate, similarity, SSIM and PSNR."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from fakes import TinyEmbedder, random_faces
from torch.utils.data import DataLoader, TensorDataset

from krtfuap.metrics import fooling_rate, is_fooled, psnr, ssim
from krtfuap.scoring import PerturbationScore, score_adversarial, score_batch, score_perturbation

SIZE = 24


faces = partial(random_faces, size=SIZE)


def perturbation(epsilon: float = 0.3, seed: int = 1) -> torch.Tensor:
    return (torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * epsilon


@pytest.fixture(scope="module")
def model() -> TinyEmbedder:
    return TinyEmbedder().eval()


def test_score_batch_matches_a_hand_computation(model):
    images, v = faces(), perturbation()
    adversarial = (images + v).clamp(0, 1)
    with torch.no_grad():
        expected_similarity = F.cosine_similarity(model(adversarial), model(images), dim=1)
    scores = score_batch(model, images, v)
    assert set(scores) == {"similarity", "ssim", "psnr"}
    for value in scores.values():
        assert value.shape == (len(images),) and value.dtype == torch.float32
    torch.testing.assert_close(scores["similarity"], expected_similarity)
    torch.testing.assert_close(scores["ssim"], ssim(adversarial, images))
    torch.testing.assert_close(scores["psnr"], psnr(adversarial, images))
    # The perturbation really changes something, so the test is not trivially about identical images.
    assert (scores["similarity"] < 0.999).any() and (scores["ssim"] < 0.99).all()


def test_score_batch_uses_given_clean_embeddings(model):
    images, v = faces(), perturbation()
    with torch.no_grad():
        clean = model(images)
    calls = []

    def counting(x):
        calls.append(len(x))
        return model(x)

    with_cache = score_batch(counting, images, v, clean_embeddings=clean)
    assert calls == [len(images)]  # only the adversarial pass
    for key, value in score_batch(model, images, v).items():
        torch.testing.assert_close(with_cache[key], value)
    # Other clean embeddings (e.g. another model's cache) are what the similarity is measured against.
    shifted = score_batch(model, images, v, clean_embeddings=-clean)
    torch.testing.assert_close(shifted["similarity"], -with_cache["similarity"])


def test_score_is_the_same_over_several_batches_and_one(model):
    images, v, threshold = faces(13), perturbation(), 0.97
    whole = PerturbationScore(threshold)
    whole.update(score_batch(model, images, v))
    parts = PerturbationScore(threshold)
    for chunk in images.split(4):
        parts.update(score_batch(model, chunk, v))
    one, several = whole.compute(), parts.compute()
    assert several["n_images"] == one["n_images"] == 13
    for key in ("fooling_rate", "mean_similarity", "ssim", "psnr"):
        assert several[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7)
    # And the means are the plain means of the per-face values.
    per_face = score_batch(model, images, v)
    assert one["fooling_rate"] == pytest.approx((per_face["similarity"] < threshold).double().mean().item())
    assert one["mean_similarity"] == pytest.approx(per_face["similarity"].double().mean().item())
    assert one["ssim"] == pytest.approx(per_face["ssim"].double().mean().item())
    assert one["psnr"] == pytest.approx(per_face["psnr"].double().mean().item())


def test_score_perturbation_same_for_tensor_list_and_loader(model):
    images, v = faces(11), perturbation()
    from_tensor = score_perturbation(model, images, v, 0.97, batch_size=4)
    from_list = score_perturbation(model, list(images.split(3)), v, 0.97)
    from_loader = score_perturbation(model, DataLoader(TensorDataset(images), batch_size=5), v, 0.97)
    assert set(from_tensor) == {"fooling_rate", "mean_similarity", "ssim", "psnr", "n_images"}
    for other in (from_list, from_loader):
        assert other["n_images"] == from_tensor["n_images"] == 11
        for key in ("fooling_rate", "mean_similarity", "ssim", "psnr"):
            assert other[key] == pytest.approx(from_tensor[key], rel=1e-6, abs=1e-7)


def test_empty_score_raises(model):
    with pytest.raises(ValueError, match="No faces"):
        PerturbationScore(0.5).compute()
    with pytest.raises(ValueError):
        score_perturbation(model, [], perturbation(), 0.5)
    with pytest.raises(ValueError):
        score_perturbation(model, torch.rand(0, 3, SIZE, SIZE), perturbation(), 0.5)


def test_zero_perturbation_fools_nobody_and_psnr_is_infinite(model):
    """A zero perturbation: similarity 1 (to float32 rounding), SSIM 1, fooling rate 0 for any
    threshold below 1. PSNR of identical images is +inf (MSE 0, kornia), so the mean PSNR is inf too."""
    images = faces(6)
    scores = score_batch(model, images, torch.zeros(3, SIZE, SIZE))
    torch.testing.assert_close(scores["similarity"], torch.ones(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(scores["ssim"], torch.ones(6), atol=1e-5, rtol=0)
    assert torch.isinf(scores["psnr"]).all() and (scores["psnr"] > 0).all()
    result = score_perturbation(model, images, torch.zeros(3, SIZE, SIZE), 0.999)
    assert result["fooling_rate"] == 0.0
    assert result["mean_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert result["psnr"] == math.inf


def test_a_score_with_one_threshold_per_member_counts_a_face_fooled_only_when_every_member_is():
    score = PerturbationScore(threshold=[0.3, 0.5])
    # Face 0 fools both members, face 1 only the first; face 2's mean similarity is below the mean
    # threshold, yet its first member still matches: not fooled.
    similarity = torch.tensor([[0.1, 0.2], [0.1, 0.9], [0.35, 0.3]])
    assert similarity[2].mean() < 0.4 and similarity[2, 0] >= 0.3
    score.update({"similarity": similarity, "ssim": torch.ones(3), "psnr": torch.full((3,), 30.0)})
    result = score.compute()
    assert result["fooling_rate"] == pytest.approx(1 / 3)
    assert result["mean_similarity"] == pytest.approx(similarity.double().mean().item())


def test_threshold_is_strict():
    """Fooled means similarity ``< t``: a face exactly at the threshold still matches."""
    score = PerturbationScore(threshold=0.5)
    similarity = torch.tensor([0.5, 0.25, 0.75, 0.5])
    score.update({"similarity": similarity, "ssim": torch.ones(4), "psnr": torch.full((4,), 30.0)})
    result = score.compute()
    assert result["fooling_rate"] == 0.25
    assert result["mean_similarity"] == 0.5 and result["ssim"] == 1.0 and result["psnr"] == 30.0
    score.reset()
    with pytest.raises(ValueError):
        score.compute()


def test_adversarial_images_are_clipped(model):
    """The scored image is ``clip(x + v, 0, 1)``: a huge perturbation scores as the clipped image."""
    images = faces(4)
    huge = torch.full((3, SIZE, SIZE), 5.0)
    ones = torch.ones_like(images)
    scores = score_batch(model, images, huge)
    torch.testing.assert_close(scores["ssim"], ssim(ones, images))
    torch.testing.assert_close(scores["psnr"], psnr(ones, images))


def test_score_adversarial_scores_each_face_against_its_own_original(model):
    images = faces(6)
    changed = (images + torch.stack([perturbation(seed=k) for k in range(6)])).clamp(0, 1)  # one change per face
    scores = score_adversarial(model, images, changed)
    with torch.no_grad():
        expected = F.cosine_similarity(model(changed), model(images), dim=1)
    torch.testing.assert_close(scores["similarity"], expected)
    torch.testing.assert_close(scores["ssim"], ssim(changed, images))
    torch.testing.assert_close(scores["psnr"], psnr(changed, images))
    # One universal perturbation scored either way gives the same numbers.
    v = perturbation()
    for key, value in score_batch(model, images, v).items():
        torch.testing.assert_close(score_adversarial(model, images, (images + v).clamp(0, 1))[key], value)
    with pytest.raises(ValueError, match="must have one shape"):
        score_adversarial(model, images, changed[:3])


@pytest.mark.parametrize("at_face", [0, 3])
def test_scoring_and_metrics_share_the_fooling_criterion(model, at_face):
    """PerturbationScore, metrics.fooling_rate and is_fooled count the same faces, also when the
    threshold equals a face's float32 similarity exactly (that face still matches everywhere)."""
    images, v = faces(12), perturbation()
    adversarial = (images + v).clamp(0, 1)
    with torch.no_grad():
        clean_embeddings, adversarial_embeddings = model(images), model(adversarial)
    similarity = score_batch(model, images, v)["similarity"]
    threshold = similarity[at_face].item()
    fooled = is_fooled(adversarial_embeddings, clean_embeddings, threshold)
    assert not fooled[at_face] and 0 < fooled.sum() < len(images)  # the threshold splits the faces
    meter = PerturbationScore(threshold)
    meter.update(score_batch(model, images, v))
    assert meter.compute()["fooling_rate"] == fooled.double().mean().item()
    assert fooling_rate(adversarial_embeddings, clean_embeddings, threshold) == fooled.float().mean().item()
    assert score_perturbation(model, images, v, threshold)["fooling_rate"] == fooled.double().mean().item()
