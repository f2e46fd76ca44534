"""``UAPAttack(amp=..., channels_last=...)``: speed options that must not change the result."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from fakes import TinyEmbedder, tiny_attack
from fakes import random_faces as faces
from sklearn.base import clone
from torch import nn

from krtfuap.attack import UAPAttack


attack = partial(tiny_attack, UAPAttack, threshold=0.995, epsilon=0.08, stealth_loss="ssim", max_epochs=3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_channels_last_gives_the_same_fit_on_cpu(shuffle):
    plain = attack(channels_last=False, shuffle=shuffle).fit(faces())
    fast = attack(channels_last=True, shuffle=shuffle)
    fast.fit(faces())
    assert fast.model.net[0].weight.is_contiguous()  # the model's weights are put back in their layout
    # Convolutions in another memory format round differently, and Adam amplifies rounding over
    # the steps, by how much depends on the path and the CPU's kernels: agree to 1e-4 in the data's
    # order and to 5e-4 shuffled (epsilon is 0.08; measured shuffled: 1.1e-4 at most on one CPU,
    # 2.4e-4 on one element of 3072 on an AMD EPYC).
    torch.testing.assert_close(fast.perturbation_, plain.perturbation_, atol=5e-4 if shuffle else 1e-4, rtol=0)
    assert fast.perturbation_.is_contiguous()
    assert [r["fooling_rate"] for r in fast.history_] == [r["fooling_rate"] for r in plain.history_]


class _ViewFlattened(nn.Module):
    """Flattens its feature map with ``.view``, which a channels_last map refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.conv(images)
        return features.view(len(features), -1)


def test_a_model_that_cannot_take_channels_last_gets_an_error_naming_the_fix():
    model = _ViewFlattened()
    with pytest.raises(ValueError, match=r"failed on channels_last input .*fit it with channels_last=False"):
        attack(model=model).fit(faces())
    assert model.conv.weight.is_contiguous()  # put back in its layout after the error too
    assert attack(model=model, channels_last=False).fit(faces()).perturbation_.shape == faces().shape[1:]


def test_a_model_already_in_channels_last_stays_so_after_the_fit():
    model = TinyEmbedder().to(memory_format=torch.channels_last)
    attack(model=model, channels_last=True).fit(faces())
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_amp_on_cpu_raises_a_clear_error():
    with pytest.raises(ValueError, match="amp=True needs a CUDA GPU with bfloat16"):
        attack(amp=True).fit(faces())


def test_options_are_estimator_parameters():
    params = attack(amp=True, channels_last=True).get_params()
    assert params["amp"] is True and params["channels_last"] is True
    assert clone(attack(channels_last=True)).channels_last is True


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs a bf16 GPU")
def test_amp_on_cuda_keeps_float32_parameters_and_the_budget():
    fitted = attack(TinyEmbedder().cuda(), amp=True, channels_last=True).fit(faces())
    assert fitted.perturbation_.dtype == fitted.noise_.dtype == torch.float32
    assert torch.isfinite(fitted.perturbation_).all()
    assert fitted.perturbation_.abs().max() <= fitted.epsilon + 1e-7
    assert all(isinstance(record["loss"], float) for record in fitted.history_)
