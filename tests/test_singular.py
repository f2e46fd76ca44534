"""The singular start: the input direction that moves the faces' unit embeddings most."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fakes import TinyEmbedder, random_faces

from krtfuap.singular import top_singular_direction


def _exact_top_direction(unit_embed, faces: torch.Tensor) -> torch.Tensor:
    """The top eigenvector of ``sum_i J_i^T J_i`` from the Jacobians themselves (small faces only)."""
    gram = 0.0
    for face in faces:
        jacobian = torch.autograd.functional.jacobian(lambda x: unit_embed(x[None])[0], face).flatten(1)
        gram = gram + jacobian.T @ jacobian
    _, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, -1].float().reshape(faces.shape[1:])


def test_the_direction_is_the_top_singular_vector_of_the_stacked_jacobians() -> None:
    model, faces = TinyEmbedder(), random_faces(6, seed=2, size=8)
    direction = top_singular_direction(model, faces, n_iterations=60, generator=torch.Generator().manual_seed(0))
    exact = _exact_top_direction(lambda x: F.normalize(model(x), dim=1), faces)
    assert direction.shape == (3, 8, 8) and direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert abs((direction * exact).sum().item()) > 0.99


def test_each_ensemble_member_is_normalised_on_its_own() -> None:
    first, second, faces = TinyEmbedder(seed=1, dim=4), TinyEmbedder(seed=2, dim=6), random_faces(5, seed=3, size=8)

    def units(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(first(x), dim=1), F.normalize(second(x), dim=1)], dim=1)

    def padded(x: torch.Tensor) -> torch.Tensor:  # (B, 2 * 6): members of different scales, each padded to the
        # widest, as krtfuap.models.ensemble lays them out
        return torch.cat([F.pad(first(x), (0, 2)), 100.0 * second(x)], dim=1)

    direction = top_singular_direction(padded, faces, n_members=2, n_iterations=60,
                                       generator=torch.Generator().manual_seed(0))
    assert abs((direction * _exact_top_direction(units, faces)).sum().item()) > 0.99


def test_the_batch_size_changes_only_the_memory() -> None:
    model, faces = TinyEmbedder(), random_faces(7, seed=4, size=16)
    whole, in_threes = (top_singular_direction(model, faces, batch_size=size, n_iterations=5,
                                               generator=torch.Generator().manual_seed(1)) for size in (32, 3))
    torch.testing.assert_close(whole, in_threes, atol=1e-4, rtol=0)


def test_it_moves_the_embeddings_far_more_than_a_random_direction() -> None:
    model, faces = TinyEmbedder(), random_faces(8, seed=5, size=32)
    unit = lambda x: F.normalize(model(x), dim=1)  # noqa: E731

    def gain(direction: torch.Tensor) -> float:
        step = 1e-3
        return ((unit(faces + step * direction) - unit(faces - step * direction)) / (2 * step)).pow(2).sum().item()

    generator = torch.Generator().manual_seed(0)
    direction = top_singular_direction(model, faces, generator=generator)
    randoms = [gain(d / d.norm()) for d in torch.randn(20, 3, 32, 32, generator=generator)]
    assert gain(direction) > 10 * max(randoms)


def test_bad_input_is_named() -> None:
    model = TinyEmbedder()
    with pytest.raises(ValueError, match=r"faces must have shape \(N, 3, H, W\)"):
        top_singular_direction(model, torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="N >= 1"):
        top_singular_direction(model, torch.rand(0, 3, 16, 16))
    with pytest.raises(ValueError, match="n_iterations"):
        top_singular_direction(model, random_faces(2, size=16), n_iterations=0)

    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 4) + 0.0 * x.sum()

    with pytest.raises(ValueError, match="init='uniform'"):
        top_singular_direction(constant, random_faces(2, size=16), n_iterations=1)
