"""Multi-process fitting on ``torch.distributed``: the helpers the fit loop (:mod:`krtfuap.engine`) calls.

Every function here is a no-op (it returns its input) unless a default process
group is initialised (``torch.distributed.init_process_group``, e.g. by
``torchrun``). When one is, :class:`krtfuap.UAPAttack` fits data-parallel, in the
style of ``DistributedDataParallel``:

* every rank starts from the same perturbation (:func:`broadcast_module_`);
* every rank reads its own shard of the data (:func:`shard`); shards interleave,
  so with ``W`` ranks of batch size ``b`` the global step ``k`` sees exactly the
  faces one process with batch size ``W * b`` sees at step ``k`` (with
  ``shuffle=False``; with ``shuffle=True`` each rank visits its own shard in a
  new order every epoch);
* after ``backward`` the gradients of the shared noise and flow are averaged
  over ranks (:func:`average_gradients`), so the identical Adam steps keep the
  perturbation identical on every rank;
* the per-step records (losses, fooling rate, SSIM) are averaged over ranks,
  weighted by batch size (:func:`mean_over_ranks`), so ``history_`` is global;
  the end-of-epoch score that drives stopping is summed over the ranks' shards
  (:meth:`krtfuap.scoring.PerturbationScore.sync`), so every rank stops at the
  same step (:func:`any_rank` for ``max_time``);
* only rank 0 writes checkpoints and saved files (:func:`is_main_process`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

#: What :func:`loader_with_sampler` keeps of a ``DataLoader`` besides its dataset.
_LOADER_SETTINGS = (
    "batch_size", "num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
    "multiprocessing_context", "prefetch_factor", "persistent_workers", "pin_memory_device",
)

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "shard_indices",
    "shard",
    "loader_with_sampler",
    "set_epoch",
    "broadcast_tensor_",
    "broadcast_module_",
    "average_gradients",
    "mean_over_ranks",
    "any_rank",
    "sum_over_ranks_",
]


def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that writes files."""
    return rank() == 0


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of rank ``rank``'s shard of ``n`` items, as ``DistributedSampler(shuffle=False)``.

    The indices ``0 .. n-1`` are padded by wrapping around to a multiple of
    ``world_size`` (so up to ``world_size - 1`` items appear twice), then rank
    ``r`` takes every ``world_size``-th index starting at ``r``. With per-rank
    batches of ``b``, batch ``k`` of every rank lies in the global batch
    ``[k * b * world_size, (k + 1) * b * world_size)``.

    Parameters
    ----------
    n : int
        Number of items, ``n >= 1``.
    rank, world_size : int
        ``0 <= rank < world_size``.

    Returns
    -------
    list of int
        ``ceil(n / world_size)`` indices in ``[0, n)``, the same count on every rank.
    """
    if n < 1:
        raise ValueError(f"Cannot shard an empty dataset (n={n}).")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
    total = math.ceil(n / world_size) * world_size
    indices = list(range(n)) * math.ceil(total / n)
    return indices[:total][rank::world_size]


def shard(data: torch.Tensor | Iterable) -> torch.Tensor | Iterable:
    """This rank's shard of the fit data; ``data`` itself when not distributed.

    Parameters
    ----------
    data : torch.Tensor or DataLoader
        A ``(N, 3, H, W)`` tensor: the rows :func:`shard_indices` picks (a copy of
        ``ceil(N / world_size)`` rows). A ``DataLoader`` whose sampler is already a
        ``DistributedSampler``: returned as is. A ``DataLoader`` over a map-style
        dataset with the default sequential or shuffling sampler: rebuilt with a
        ``DistributedSampler`` (``shuffle`` kept, ``drop_last=False``, seed 0) and
        the same batch size, workers and collate function.

    Returns
    -------
    torch.Tensor or DataLoader
        The shard; every rank gets the same number of batches.

    Raises
    ------
    TypeError
        For other iterables (lists of batches, iterable-style datasets, loaders
        with a custom sampler or batch sampler), which cannot be sharded evenly
        here: give such a ``DataLoader`` a ``DistributedSampler`` yourself.
    """
    if not is_distributed():
        return data
    if isinstance(data, torch.Tensor):
        return data[shard_indices(len(data), rank(), world_size())]
    if isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler):
        return data
    if (
        isinstance(data, DataLoader)
        and not isinstance(data.dataset, IterableDataset)
        and data.batch_size is not None
        and type(data.sampler) in (SequentialSampler, RandomSampler)
    ):
        sampler = DistributedSampler(data.dataset, shuffle=isinstance(data.sampler, RandomSampler), drop_last=False)
        return loader_with_sampler(data, sampler)
    raise TypeError(
        f"Distributed fitting cannot shard a {type(data).__name__} evenly across ranks. Pass a (N, 3, H, W) "
        "tensor, a DataLoader over a map-style Dataset (sequential or shuffled), or a DataLoader whose "
        "sampler is a torch.utils.data.DistributedSampler."
    )


def loader_with_sampler(loader: DataLoader, sampler: Iterable[int]) -> DataLoader:
    """A copy of ``loader`` that reads its dataset in the order of ``sampler`` (indices of the dataset).

    Batch size, workers, collate function and every other setting are kept, so
    it streams as ``loader`` does.
    """
    return DataLoader(loader.dataset, sampler=sampler, **{name: getattr(loader, name) for name in _LOADER_SETTINGS})


def set_epoch(data: object, epoch: int) -> None:
    """Call ``sampler.set_epoch(epoch)`` on a ``DataLoader`` with a ``DistributedSampler``.

    A shuffling ``DistributedSampler`` draws a new order only when told the epoch;
    for any other ``data`` this does nothing.
    """
    if isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler):
        data.sampler.set_epoch(epoch)


@torch.no_grad()
def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> None:
    """Copy rank ``src``'s ``tensor`` to every rank, in place; nothing when not distributed."""
    if is_distributed():
        dist.broadcast(tensor.data, src=src)


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src``'s ``module`` to every rank, in place."""
    for tensor in [*module.parameters(), *module.buffers()]:
        broadcast_tensor_(tensor, src=src)


@torch.no_grad()
def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks, in place (one ``all_reduce``).

    Call after ``backward`` and before the optimiser step. A parameter without a
    gradient counts as a zero gradient (and gets one), so that every rank sends a
    buffer of the same size.
    """
    if not is_distributed():
        return
    parameters = list(parameters)
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in parameters])
    dist.all_reduce(flat)
    flat /= world_size()
    for parameter, chunk in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad.copy_(chunk.view_as(parameter.grad))


def mean_over_ranks(
    values: dict[str, float], count: int, device: torch.device | str = "cpu"
) -> tuple[dict[str, float], int]:
    """Count-weighted mean of per-batch values over ranks, and the total count.

    Parameters
    ----------
    values : dict of str to float
        Per-batch means on this rank (e.g. loss, fooling rate); the same keys on
        every rank.
    count : int
        Number of faces in this rank's batch.
    device : torch.device or str
        Device of the reduction buffer (``"cuda"`` for the NCCL backend).

    Returns
    -------
    dict of str to float, int
        ``sum_r count_r * values_r / sum_r count_r`` per key and ``sum_r count_r``;
        ``(values, count)`` unchanged when not distributed.
    """
    if not is_distributed():
        return values, count
    keys = list(values)
    buffer = torch.tensor([values[key] * count for key in keys] + [count], dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    total = buffer[-1].item()
    return {key: (buffer[i] / total).item() for i, key in enumerate(keys)}, int(total)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one rank; ``flag`` when not distributed."""
    if not is_distributed():
        return flag
    buffer = torch.tensor([float(flag)], device=device)
    dist.all_reduce(buffer)
    return buffer.item() > 0


@torch.no_grad()
def sum_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` by its sum over ranks, in place (one ``all_reduce``); unchanged when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor
