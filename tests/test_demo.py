"""Tests for :mod:`krtfuap.apps.demo`'s split of faces into people: ``group_faces`` and ``split_groups``.

The demo itself runs end to end through the command line in ``tests/test_cli.py``.
"""

from __future__ import annotations

import pytest
import torch

from krtfuap.apps.demo import group_faces, split_groups


def _similarity(links: list[tuple[int, int]], count: int) -> torch.Tensor:
    """A symmetric similarity matrix: 0.9 on ``links`` and the diagonal, 0.1 elsewhere."""
    similarity = torch.full((count, count), 0.1)
    similarity.fill_diagonal_(1.0)
    for a, b in links:
        similarity[a, b] = similarity[b, a] = 0.9
    return similarity


def test_group_faces_joins_chains_into_one_person() -> None:
    similarity = _similarity([(0, 3), (3, 5), (1, 2)], 7)
    groups = group_faces(similarity, threshold=0.5)
    assert groups.tolist() == [0, 1, 1, 0, 2, 0, 3]
    assert group_faces(similarity, threshold=0.95).tolist() == list(range(7))
    with pytest.raises(ValueError, match="square"):
        group_faces(torch.zeros(3, 4), 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_split_groups_keeps_each_person_on_one_side(seed: int) -> None:
    groups = group_faces(_similarity([(0, 3), (3, 5), (1, 2), (7, 8), (8, 9), (9, 10)], 12), threshold=0.5)
    fit_index, heldout_index = split_groups(groups, random_state=seed)
    assert sorted(fit_index.tolist() + heldout_index.tolist()) == list(range(12))
    assert not set(groups[fit_index].tolist()) & set(groups[heldout_index].tolist())
    assert abs(len(fit_index) - len(heldout_index)) <= 2
    again = split_groups(groups, random_state=seed)
    assert torch.equal(again[0], fit_index) and torch.equal(again[1], heldout_index)


def test_split_groups_needs_two_people() -> None:
    with pytest.raises(ValueError, match="at least two people"):
        split_groups(torch.zeros(5, dtype=torch.int64))


def _closure_groups(links: torch.Tensor) -> list[int]:
    """Reference grouping: the transitive closure of the links, groups numbered by first face."""
    count = len(links)
    reach = links | links.T | torch.eye(count, dtype=torch.bool)
    for _ in range(max(count.bit_length(), 1)):
        reach = reach | ((reach.double() @ reach.double()) > 0)
    numbering: dict[tuple, int] = {}
    return [numbering.setdefault(tuple(reach[face].tolist()), len(numbering)) for face in range(count)]


@pytest.mark.parametrize("seed", range(8))
def test_group_faces_matches_the_transitive_closure(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for count in (0, 1, 2, 7, 30):
        similarity = torch.rand(count, count, generator=generator) * 2 - 1
        if seed % 2:
            similarity = (similarity + similarity.T) / 2
        threshold = 0.2 + 0.1 * (seed % 4)
        expected = _closure_groups(similarity >= threshold)
        groups = group_faces(similarity, threshold)
        assert groups.dtype == torch.int64 and groups.tolist() == expected
