import pytest
import torch
import torch.nn.functional as F

from hypothesis import given, settings
from hypothesis import strategies as st

from krtfuap.losses import DirectionLoss, cosine_loss, direction_loss, euclidean_loss, worst_member_loss


def test_direction_loss_is_two_plus_two_cosine():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 16, generator=generator), torch.randn(5, 16, generator=generator)
    expected = 2 + 2 * F.cosine_similarity(a, b)
    torch.testing.assert_close(direction_loss(a, b, reduction="none"), expected)


def test_direction_loss_extremes():
    e = torch.randn(3, 8)
    torch.testing.assert_close(direction_loss(-2 * e, e), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(direction_loss(3 * e, e), torch.tensor(4.0))


def test_ablation_losses_fall_as_embeddings_part():
    e = torch.randn(4, 8)
    assert cosine_loss(-e, e) < cosine_loss(e + 0.1, e)
    assert euclidean_loss(-e, e) < euclidean_loss(e + 0.1, e)
    torch.testing.assert_close(euclidean_loss(-e, e), torch.tensor(-2.0))


@pytest.mark.parametrize("kind", ["direction", "cosine", "euclidean"])
def test_module_picks_the_loss_and_is_differentiable(kind):
    adversarial = torch.randn(4, 8, requires_grad=True)
    clean = torch.randn(4, 8)
    loss = DirectionLoss(kind)(adversarial, clean)
    loss.backward()
    assert loss.ndim == 0 and adversarial.grad.abs().sum() > 0
    assert DirectionLoss(kind, reduction="none")(adversarial, clean).shape == (4,)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind must be one of"):
        DirectionLoss("hinge")


# ------------------------------------------------------------------ ensembles: the worst member
def test_worst_member_loss_with_one_member_has_the_direction_loss_gradient():
    generator = torch.Generator().manual_seed(1)
    adversarial = torch.randn(4, 8, generator=generator, requires_grad=True)
    clean = torch.randn(4, 8, generator=generator)
    similarity = F.cosine_similarity(adversarial, clean)[:, None]
    worst = worst_member_loss(similarity, [0.3], margin=0.05, reduction="none")
    torch.testing.assert_close(worst, 2 * (similarity[:, 0] - 0.3 + 0.05))
    (ours,) = torch.autograd.grad(worst.sum(), adversarial)
    (paper,) = torch.autograd.grad(direction_loss(adversarial, clean, reduction="none").sum(), adversarial)
    torch.testing.assert_close(ours, paper)


def test_worst_member_loss_sends_the_gradient_to_the_member_still_matching():
    # Member 0 is fooled far below its threshold, member 1 still matches: the mean would reward
    # pushing member 0 further; the worst-member loss pushes member 1.
    similarities = torch.tensor([[-0.5, 0.6]], requires_grad=True)
    worst_member_loss(similarities, [0.2, 0.3]).backward()
    assert similarities.grad[0, 1] > 0.99 * similarities.grad.sum()
    assert similarities.grad[0, 0] < 1e-6


def test_worst_member_loss_reads_each_member_against_its_own_threshold():
    # The same similarities, but member 1's threshold is higher: it is the one already fooled.
    similarities = torch.tensor([[0.25, 0.25]], requires_grad=True)
    worst_member_loss(similarities, [0.1, 0.5]).backward()
    assert similarities.grad[0, 0] > 100 * similarities.grad[0, 1]


@settings(deadline=None, max_examples=50)
@given(
    similarities=st.lists(st.floats(-1, 1), min_size=1, max_size=5),
    thresholds=st.lists(st.floats(-1, 1), min_size=5, max_size=5),
    temperature=st.floats(1e-3, 1.0),
)
def test_worst_member_loss_lies_between_the_mean_and_the_worst_excess(similarities, thresholds, temperature):
    row = torch.tensor([similarities], dtype=torch.float64)
    limits = torch.tensor(thresholds[: row.shape[1]], dtype=torch.float64)
    loss = worst_member_loss(row, limits, temperature=temperature).item()
    excess = 2 * (row[0] - limits)
    assert excess.mean().item() - 1e-9 <= loss <= excess.max().item() + 1e-9


@pytest.mark.parametrize(
    "similarities, thresholds, keywords, message",
    [
        (torch.zeros(3), [0.2], {}, "shape \\(B, M\\)"),
        (torch.zeros(3, 2), [0.2], {}, "one value per model"),
        (torch.zeros(3, 1), [0.2], {"temperature": 0.0}, "temperature"),
        (torch.zeros(3, 1), [0.2], {"margin": -0.1}, "margin"),
    ],
)
def test_worst_member_loss_names_bad_arguments(similarities, thresholds, keywords, message):
    with pytest.raises(ValueError, match=message):
        worst_member_loss(similarities, thresholds, **keywords)
