"""Several face models seen as one (``krtfuap.models.ensemble``), and the universal attacks fitted against them:
judged on the mean similarity (one threshold) or each member on its own threshold (one per model)."""

import pytest
import torch
import torch.nn.functional as F
from fakes import LinearEmbedder, TinyEmbedder, random_faces, untimed
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from krtfuap.attack import UAPAttack
from krtfuap.baselines import FGUAP, RandomNoiseUAP
from krtfuap.losses import direction_loss
from krtfuap.models.ensemble import EnsembleEmbedder, MemberwiseEmbedder, member_similarities

SIZE = 16


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


# ----------------------------------------------------------- one threshold per member


def tiny_members():
    """Two tiny conv face models; the second, of 4 dimensions, is the easier to fool (measured)."""
    return [TinyEmbedder(0, dim=16), TinyEmbedder(1, dim=4)]


def member_cosines(models, adversarial, clean):
    """``(B, M)``: each model's own cosine similarity of the perturbed and the clean faces."""
    with torch.no_grad():
        return torch.stack([F.cosine_similarity(m(adversarial), m(clean)) for m in models], dim=1)


@settings(max_examples=25, deadline=None)
@given(dims=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_a_memberwise_embedding_gives_each_members_similarity_and_their_mean(dims, seed):
    models = [LinearEmbedder(dim=dim, seed=seed + index, bias=True) for index, dim in enumerate(dims)]
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.rand(3, 3, 8, 8, generator=generator), torch.rand(3, 3, 8, 8, generator=generator)
    memberwise = MemberwiseEmbedder(models)
    got = member_similarities(memberwise(a), memberwise(b), len(models))
    torch.testing.assert_close(got, member_cosines(models, a, b), atol=1e-5, rtol=0)
    # As a whole it is still an ensemble embedding: unit rows whose cosine is the members' mean.
    torch.testing.assert_close(memberwise(a).norm(dim=1), torch.ones(3))
    torch.testing.assert_close(F.cosine_similarity(memberwise(a), memberwise(b)), got.mean(dim=1), atol=1e-5, rtol=0)


def test_member_similarities_refuse_embeddings_that_do_not_split_into_the_members():
    with pytest.raises(ValueError, match=r"\(2, 7\) and \(2, 7\) must both be \(B, K \* D\), 2 equal blocks"):
        member_similarities(torch.ones(2, 7), torch.ones(2, 7), 2)


def test_one_threshold_per_model_is_kept_and_judges_the_fit():
    models, faces = tiny_members(), random_faces(16, size=SIZE)
    attack = UAPAttack(models, threshold=[0.99, 0.97], epsilon=0.2, max_epochs=2, batch_size=8, random_state=0)
    attack.fit(faces)
    assert attack.threshold_ == (0.99, 0.97)
    score = attack.evaluate(faces)
    assert score["fooling_rate"] == attack.fooling_rate_
    similarities = member_cosines(models, attack.transform(faces), faces)
    fooled = (similarities < torch.tensor([0.99, 0.97])).all(dim=1)
    assert score["fooling_rate"] == pytest.approx(fooled.double().mean().item())
    assert score["mean_similarity"] == pytest.approx(similarities.double().mean().item(), abs=1e-6)
    assert {"fooling_rate", "mean_similarity", "adversarial_loss"} <= set(attack.history_[0])


def test_a_face_counts_as_fooled_only_when_every_member_is_below_its_own_threshold():
    models, faces = tiny_members(), random_faces(16, size=SIZE)
    # Random noise does not depend on the thresholds: measure its similarities, then set thresholds on them.
    noise = RandomNoiseUAP(models, threshold=[0.5, 0.5], epsilon=0.2, random_state=0).fit(faces)
    similarities = member_cosines(models, noise.transform(faces), faces)
    first = similarities[:, 0].sort().values
    thresholds = [((first[7] + first[8]) / 2).item(), 1.0]  # the first member fools half the faces, the second all
    judged = RandomNoiseUAP(models, threshold=thresholds, epsilon=0.2, random_state=0).fit(faces)
    assert torch.equal(judged.perturbation_, noise.perturbation_)
    assert judged.fooling_rate_ == judged.evaluate(faces)["fooling_rate"] == 0.5
    # The mean similarity against the mean threshold would have called more faces fooled.
    by_the_mean = (similarities.mean(dim=1) < sum(thresholds) / 2).double().mean().item()
    assert by_the_mean > 0.5


def test_the_worst_member_fit_pushes_the_member_a_mean_leaves_behind():
    models, faces = tiny_members(), random_faces(16, size=SIZE)
    settings = dict(epsilon=0.2, init_scale=1.0, min_psnr=None, max_epochs=10, batch_size=8, random_state=0,
                    stealth_loss=None)
    # Thresholds out of reach, so that every step pushes every face.
    mean_fit = UAPAttack(models, threshold=-0.9, **settings).fit(faces)
    worst_fit = UAPAttack(models, threshold=[-0.9, -0.9], **settings).fit(faces)
    mean_members = member_cosines(models, mean_fit.transform(faces), faces).mean(dim=0)
    worst_members = member_cosines(models, worst_fit.transform(faces), faces).mean(dim=0)
    # The mean lets the easy 4-dimensional member carry it (measured: 0.97 and 0.27); the worst member
    # loss brings the other one down (0.88 and 0.78).
    assert mean_members.max() - mean_members.min() > 0.5
    assert worst_members.max() < mean_members.max() - 0.05


def test_the_ensemble_margin_keeps_pushing_faces_fooled_at_the_thresholds():
    models, faces = tiny_members(), random_faces(16, size=SIZE)
    # Thresholds that the starting noise already meets on every face: without a margin skip_fooled drops them all.
    settings = dict(threshold=[0.9999, 0.9999], epsilon=0.2, init_scale=1.0, min_psnr=None, max_epochs=1,
                    batch_size=4, random_state=0, stealth_loss=None, target_fooling_rate=1.0, skip_fooled=True)
    still = UAPAttack(models, ensemble_margin=0.0, **settings).fit(faces)
    pushed = UAPAttack(models, ensemble_margin=0.3, **settings).fit(faces)
    assert still.fooling_rate_ == pushed.fooling_rate_ == 1.0
    assert [record["adversarial_loss"] for record in still.history_] == [0.0] * 4
    assert all(record["adversarial_loss"] != 0.0 for record in pushed.history_)
    assert pushed.evaluate(faces)["mean_similarity"] < still.evaluate(faces)["mean_similarity"] - 0.01


def test_one_threshold_for_a_list_of_models_is_the_mean_ensemble_fit_bit_for_bit():
    models, faces = tiny_members(), random_faces(16, size=SIZE)
    settings = dict(threshold=0.97, epsilon=0.2, max_epochs=2, batch_size=8, random_state=0, input_diversity=0.5)
    listed = UAPAttack(models, **settings).fit(faces)
    ensemble = UAPAttack(EnsembleEmbedder(models), **settings).fit(faces)
    assert torch.equal(listed.perturbation_, ensemble.perturbation_)
    assert untimed(listed.history_) == untimed(ensemble.history_)
    assert listed.threshold_ == 0.97 and listed.evaluate(faces) == ensemble.evaluate(faces)


def test_thresholds_per_model_are_checked_against_the_models_before_any_model_call():
    models, faces = tiny_members(), random_faces(4, size=SIZE)
    cases = [
        (models[0], [0.3, 0.3], r"^threshold gives 2 thresholds, one per model, but model is a single face model; "
                                r"pass model as the list of the 2 models"),
        (models, [0.3, 0.3, 0.3], r"^threshold gives 3 thresholds for 2 models; give one cosine threshold per model"),
        (models, [0.3, 2.0], r"^threshold item 1 must be a number in \[-1, 1\] \(a cosine similarity\), got 2\.0"),
        (models, [], r"^threshold is an empty list"),
    ]
    for model, threshold, message in cases:
        with pytest.raises(ValueError, match=message):
            UAPAttack(model, threshold=threshold).fit(faces)
    with pytest.raises(TypeError, match=r"^threshold must be a number in \[-1, 1\].*, a list of those \(one per "
                                        r"model\) or None, got a list"):
        UAPAttack(models, threshold=[0.3, "0.3"]).fit(faces)
    with pytest.raises(ValueError, match=r"^adversarial_loss='cosine' applies to one threshold.*worst_member_loss"):
        UAPAttack(models, threshold=[0.3, 0.3], adversarial_loss="cosine").fit(faces)
    with pytest.raises(ValueError, match=r"^threshold gives one value per model, but FGUAP takes one threshold"):
        FGUAP(models, threshold=[0.3, 0.3]).fit(faces)
    with pytest.raises(ValueError, match=r"^ensemble_margin must be a number >= 0"):
        UAPAttack(models, threshold=[0.3, 0.3]).set_params(ensemble_margin=-0.1)
    assert all(model.calls == [] for model in models)


def test_thresholds_per_model_survive_clone_save_and_load(tmp_path):
    models, faces = tiny_members(), random_faces(8, size=SIZE)
    attack = UAPAttack(models, threshold=[0.99, 0.97], ensemble_margin=0.1, max_epochs=1, batch_size=4,
                       random_state=0)
    twin = clone(attack)
    assert twin.get_params()["threshold"] == [0.99, 0.97] and twin.model is models
    attack.fit(faces)
    path = tmp_path / "ensemble.safetensors"
    attack.save(path)
    loaded = UAPAttack.load(path, models)
    assert loaded.threshold_ == (0.99, 0.97) and loaded.threshold == [0.99, 0.97] and loaded.ensemble_margin == 0.1
    assert loaded.evaluate(faces) == attack.evaluate(faces)
    assert torch.equal(twin.fit(faces).perturbation_, attack.perturbation_)
    with pytest.raises(ValueError, match=r"^threshold_ gives 2 thresholds, one per model, but model is a single "
                                         r"face model"):
        UAPAttack.load(path, models[0]).evaluate(faces)


def test_a_fit_with_thresholds_per_model_resumes_exactly_and_refuses_other_thresholds(tmp_path):
    models, faces = tiny_members(), random_faces(16, size=SIZE)
    settings = dict(threshold=[0.99, 0.97], epsilon=0.2, batch_size=8, random_state=0, target_fooling_rate=1.0,
                    checkpoint_path=tmp_path / "fit.ckpt")
    UAPAttack(models, max_epochs=2, **settings).fit(faces)
    resumed = UAPAttack(models, max_epochs=4, **settings).fit(faces, resume=True)
    straight = UAPAttack(models, max_epochs=4, **{**settings, "checkpoint_path": None}).fit(faces)
    assert torch.equal(resumed.perturbation_, straight.perturbation_)
    assert untimed(resumed.history_) == untimed(straight.history_)
    other = r"differs in threshold \(checkpoint: \[0\.99, 0\.97\], now: \[0\.99, 0\.96\]\)"
    with pytest.raises(ValueError, match=other):
        UAPAttack(models, max_epochs=4, **{**settings, "threshold": [0.99, 0.96]}).fit(faces, resume=True)
