"""Child processes in tests: one generous, configurable time limit for all of them.

Every ``subprocess.run``, ``Popen.communicate`` and spawned process group in the tests waits
at most :data:`TIMEOUT_S` seconds, so a hung child fails its test instead of hanging CI. The
limit is a safety net, not a measurement: tests wait on what the child does, never on the clock.
Set ``KRTFUAP_TEST_TIMEOUT`` (seconds) to change it, e.g. on a very slow or busy machine.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch.multiprocessing as mp


def _timeout_from_environment() -> float:
    text = os.environ.get("KRTFUAP_TEST_TIMEOUT", "900")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"KRTFUAP_TEST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return seconds


TIMEOUT_S = _timeout_from_environment()
"""Seconds any child process of a test may take (``KRTFUAP_TEST_TIMEOUT``, default 900)."""


def spawn(function: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> None:
    """``torch.multiprocessing.spawn(function, args, nprocs)``, stopped after :data:`TIMEOUT_S`.

    Raises what a worker raised, as ``spawn`` does, and ``TimeoutError`` (after killing the
    workers) when they have not all finished in time.
    """
    context = mp.start_processes(function, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            raise TimeoutError(
                f"{nprocs} spawned processes did not finish within {TIMEOUT_S:g} s; "
                "raise KRTFUAP_TEST_TIMEOUT if this machine is just slow"
            )
