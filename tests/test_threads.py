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


@pytest.fixture
def fresh_default():
    """default_num_threads computed anew in the test (it is taken once per process), and afterwards."""
    default_num_threads.cache_clear()
    yield default_num_threads
    default_num_threads.cache_clear()


@pytest.mark.parametrize(("cores", "load", "threads"), [
    (1, 0.0, 1), (2, 0.1, 2), (2, 0.7, 1), (2, 1.2, 1), (2, 3.5, 1), (16, 0.4, 16), (16, 5.6, 10), (16, 40.0, 1),
])
def test_the_default_is_the_cores_other_work_leaves_free(monkeypatch, fresh_default, cores: int, load: float,
                                                         threads: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert fresh_default() == threads


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (16, 8)])
def test_without_a_load_average_the_default_is_half_the_cores(monkeypatch, fresh_default, cores: int,
                                                              threads: int) -> None:
    def no_load_average():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert fresh_default() == threads


def test_the_default_is_taken_once_per_process(monkeypatch, fresh_default) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert fresh_default() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # the process's own work since
    assert fresh_default() == 2
