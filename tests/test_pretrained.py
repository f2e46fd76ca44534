"""The ready cloak shipped in the package (krtfuap/pretrained.py)."""

from __future__ import annotations

import pytest
import torch

from krtfuap import pretrained
from krtfuap.attack import UAPAttack


def test_the_ready_cloak_ships_small_and_loads_inside_its_budget() -> None:
    path = pretrained.default_cloak_path()
    assert path.stat().st_size < 200 * 1024
    cloak = pretrained.default_cloak(model=None)
    assert isinstance(cloak, UAPAttack) and cloak.model is None
    assert cloak.perturbation_.shape == (3, 112, 112) and cloak.perturbation_.dtype == torch.float32
    assert cloak.epsilon == 0.08 and cloak.perturbation_.abs().max() <= cloak.epsilon
    assert cloak.perturbation_.abs().mean() > 0.01  # a fitted perturbation, not zeros
    assert -1 < cloak.threshold_ < 1 and cloak.target_ssim == 0.93 and cloak.n_iter_ >= 1000
    faces = torch.rand(2, 3, 112, 112)
    assert torch.equal(cloak.transform(faces), (faces + cloak.perturbation_).clamp(0, 1))


def test_the_ready_cloak_comes_with_the_model_it_was_fitted_against() -> None:
    cloak = pretrained.default_cloak()
    scores = cloak.evaluate(torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    assert 0 <= scores["fooling_rate"] <= 1 and scores["n_images"] == 4


def test_a_missing_cloak_file_says_how_to_get_it(monkeypatch) -> None:
    monkeypatch.setattr(pretrained, "DEFAULT_CLOAK_FILE", "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="reinstall krtfuap"):
        pretrained.default_cloak()
