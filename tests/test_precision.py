"""bfloat16 convolutions with float32 at the edges (krtfuap/models/precision.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fakes import TinyEmbedder
from krtfuap.models.precision import PRECISIONS, BFloat16Autocast, fast_bfloat16, full_precision, use_bfloat16


class _RecordsDtype(nn.Module):
    """A conv net that records the dtype its convolution computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.conv(images)
        self.seen.append(features.dtype)
        return features.mean(dim=(2, 3))


def test_the_convolutions_run_in_bfloat16_and_the_embeddings_come_back_float32() -> None:
    model = _RecordsDtype()
    wrapped = BFloat16Autocast(model)
    embeddings = wrapped(torch.rand(2, 3, 8, 8))
    assert model.seen == [torch.bfloat16] and embeddings.dtype == torch.float32 and embeddings.shape == (2, 4)
    model(torch.rand(2, 3, 8, 8))
    assert model.seen[-1] == torch.float32  # outside the wrapper the model is as it was
    assert model.conv.weight.dtype == torch.float32


def test_embeddings_and_input_gradients_stay_close_to_float32() -> None:
    model = TinyEmbedder(seed=1, dim=32)
    wrapped = BFloat16Autocast(model)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    gradients, embeddings = [], []
    for candidate in (model, wrapped):
        x = images.clone().requires_grad_(True)
        out = candidate(x)
        (out * direction).sum().backward()
        gradients.append(x.grad.flatten(1))
        embeddings.append(out.detach())
    assert torch.nn.functional.cosine_similarity(*embeddings).min() > 0.99
    assert torch.nn.functional.cosine_similarity(*gradients).min() > 0.9
    assert not torch.equal(*embeddings)  # it really computed in another precision


def test_the_wrapper_keeps_the_models_mode() -> None:
    assert BFloat16Autocast(TinyEmbedder().eval()).training is False
    assert BFloat16Autocast(TinyEmbedder().train()).training is True


def test_full_precision_unwraps_and_leaves_other_models_alone() -> None:
    model = TinyEmbedder()
    assert full_precision(BFloat16Autocast(model)) is model
    assert full_precision(model) is model


def test_a_non_module_is_refused() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        BFloat16Autocast(lambda images: images)


def test_fast_bfloat16_follows_the_cpus_amx_tiles(monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert fast_bfloat16() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert fast_bfloat16() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert fast_bfloat16() is False  # a torch without the check: float32


@pytest.mark.parametrize("amx", [True, False])
def test_use_bfloat16_maps_each_precision_choice(amx: bool, monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert [use_bfloat16(choice) for choice in PRECISIONS] == [amx, True, False]
    with pytest.raises(ValueError, match="precision='half' is not one of"):
        use_bfloat16("half")


def test_the_cloak_command_takes_exactly_the_precision_choices(capsys) -> None:
    from krtfuap.apps.cli import build_parser

    parser = build_parser()
    for choice in PRECISIONS:
        assert parser.parse_args(["cloak", "in", "--output", "out", "--surrogate-precision", choice]
                                 ).surrogate_precision == choice
    with pytest.raises(SystemExit):
        parser.parse_args(["cloak", "in", "--output", "out", "--surrogate-precision", "half"])
    # argparse lists every choice it takes when it refuses one: no more than PRECISIONS.
    offered = ", ".join(repr(choice) for choice in PRECISIONS)
    assert f"(choose from {offered})" in capsys.readouterr().err
