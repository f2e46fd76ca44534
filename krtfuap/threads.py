"""How many threads torch uses for a run, scoped to that run.

``torch.set_num_threads`` changes the whole process for good; :func:`torch_threads` sets it for
one block and puts the previous value back. :func:`default_num_threads` is the count the photo
cloak and the command line use when none is given: the cores other work leaves free. The module
loads torch only when :func:`torch_threads` runs, so the command line can show the default in
``--help`` without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

__all__ = ["default_num_threads", "torch_threads"]


@cache
def default_num_threads() -> int:
    """The cores this process may run on that other work left free when it first asked, at least 1.

    The cores less the 1-minute load average, rounded (where the system gives no load average:
    half the cores), taken once per process, so that the process's own work does not count as
    other work later and every run of one process gets the same count. On an idle machine that
    is every core: the photo cloak took 2.57 s per face with 2 threads against 3.74 s with 1 on
    the idle 2-core CPU (``benchmarks/cloak_speed.py``). Beside another process that keeps cores
    busy it is fewer, because a run whose threads outnumber the free cores slows down many times
    over: on that machine the cloak took 3 to 20 times longer with 2 threads than with 1 whenever
    other work ran (:doc:`cloak`). The count changes a cloak's pixels by floating-point rounding,
    so pass the thread count explicitly where a run must give the same photo as another.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        return max(1, cores // 2)
    return max(1, cores - busy)


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)`` and restore the previous count after it.

    Parameters
    ----------
    num_threads : int or None
        Threads, ``>= 1``; ``None`` leaves torch's setting alone.
    """
    import torch  # here, not at the top: see the module docstring

    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
