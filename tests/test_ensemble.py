"""``EnsembleEmbedder``: several face models seen as one (``krtfuap.models.ensemble``)."""

import pytest
import torch
import torch.nn.functional as F
from fakes import LinearEmbedder

from krtfuap.attack import UAPAttack
from krtfuap.losses import direction_loss
from krtfuap.models.ensemble import EnsembleEmbedder


def members():
    """Three linear face models with embeddings of different sizes."""
    return [LinearEmbedder(dim=dim, seed=seed, bias=True) for dim, seed in ((5, 0), (7, 1), (3, 2))]


def test_cosine_of_the_ensemble_is_the_mean_member_cosine():
    models = members()
    ensemble = EnsembleEmbedder(models)
    a, b = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    expected = torch.stack([F.cosine_similarity(m(a), m(b)) for m in models]).mean(0)
    got = F.cosine_similarity(ensemble(a), ensemble(b))
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(ensemble(a).norm(dim=1), torch.ones(4), atol=1e-6)


def test_direction_loss_of_the_ensemble_is_the_mean_member_loss():
    models = members()
    ensemble = EnsembleEmbedder(models)
    a, b = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    expected = torch.stack([direction_loss(m(a), m(b), reduction="none") for m in models]).mean(0)
    got = direction_loss(ensemble(a), ensemble(b), reduction="none")
    assert torch.allclose(got, expected, atol=1e-5)


def test_bad_members_are_named():
    with pytest.raises(ValueError, match="at least one model"):
        EnsembleEmbedder([])
    with pytest.raises(TypeError, match="Ensemble member 1 is a str"):
        EnsembleEmbedder([LinearEmbedder(dim=3, bias=True), "resnet"])


def test_uapattack_accepts_a_list_of_models_and_moves_every_member():
    models = members()
    faces = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    attack = UAPAttack(
        models, threshold=0.5, stealth_loss=None, key_regions=None, max_epochs=2, batch_size=4, random_state=0
    ).fit(faces)
    result = attack.evaluate(faces)
    clean = torch.stack([F.cosine_similarity(m(attack.transform(faces)), m(faces)) for m in models]).mean(0)
    assert result["mean_similarity"] == pytest.approx(clean.mean().item(), abs=1e-5)
    assert all(p.requires_grad for m in models for p in m.parameters())  # unfrozen again after fit
    with pytest.raises(TypeError, match="or a list of them|Ensemble member 0"):
        UAPAttack([3], threshold=0.5).fit(faces)
