"""Torch threads scoped to a run (krtfuap/threads.py)."""

from __future__ import annotations

import os

import pytest
import torch

from krtfuap.threads import default_num_threads, torch_threads


def test_the_count_is_set_inside_and_restored_after_even_on_error() -> None:
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    with torch_threads(wanted):
        assert torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(wanted):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_none_leaves_torch_alone() -> None:
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (16, 8)])
def test_the_default_is_half_the_cores_at_least_one(monkeypatch, cores: int, threads: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_num_threads() == threads
