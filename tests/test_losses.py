import pytest
import torch
import torch.nn.functional as F

from krtfuap.losses import DirectionLoss, cosine_loss, direction_loss, euclidean_loss


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
