"""How many threads torch uses for a run, scoped to that run.

``torch.set_num_threads`` changes the whole process for good; :func:`torch_threads` sets it for
one block and puts the previous value back. :func:`default_num_threads` is the count the photo
cloak uses when none is given. The module loads torch only when :func:`torch_threads` runs, so the
command line can show the default in ``--help`` without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["default_num_threads", "torch_threads"]


def default_num_threads() -> int:
    """Half the cores this process may run on, at least 1.

    Beside another process that uses every core, a run that also takes every core oversubscribes
    the CPU and slows down many times over: on the 2-core machine the photo cloak took 3 to 20 times
    longer per photo with 2 threads than with 1 whenever other work ran, and 1.91 s per photo with 1
    thread near idle (``benchmarks/cloak_speed.py``, :doc:`cloak`).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)


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
