"""Turn what users pass as data into checked batches of images.

:func:`iter_image_batches` reads any accepted data once (scoring, mask
fitting); :class:`FitData` is the fit's own view of its faces, checked once
when made and then read every epoch by the fit loop, in order or shuffled.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from krtfuap._validation import check_images
from krtfuap.distributed import loader_with_sampler, set_epoch, shard

__all__ = ["ImageData", "iter_image_batches", "FitData"]

#: A ``(N, 3, H, W)`` tensor, or a re-iterable of ``(B, 3, H, W)`` tensors or
#: of tuples/lists/dicts whose first item (or ``"image"`` key) is such a tensor.
ImageData = Union[torch.Tensor, Iterable]


def _images_of(item: object) -> object:
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("The loader yielded an empty tuple; yield (images, ...) or images.")
        return item[0]
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"The loader yielded a dict without an 'image' key (keys: {sorted(item)}).")
        return item["image"]
    return item


def _check_loader(data: object, name: str, reiterable: bool) -> None:
    """Refuse, before reading anything, data that is neither a tensor nor a usable iterable of batches."""
    if type(data).__module__ == "numpy":
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, 3, H, W) in [0, 1], got a numpy array of shape "
            f"{getattr(data, 'shape', '?')}; convert with torch.from_numpy(...) (channels first, floats in [0, 1])."
        )
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, dict)):
        raise TypeError(
            f"{name} must be a (N, 3, H, W) tensor or an iterable of image batches "
            f"(e.g. a torch DataLoader), got {type(data).__name__}."
        )
    if reiterable and iter(data) is data:
        raise TypeError(
            f"{name} is a one-shot iterator (e.g. a generator); fitting reads the data several times. "
            "Pass a list of batches or a DataLoader instead."
        )


def _checked_items(items: Iterable, name: str) -> Iterator[torch.Tensor]:
    """The image batches of a loader, each checked, then a clear error if there were none."""
    count = 0
    for index, item in enumerate(items):
        yield check_images(_images_of(item), name=f"{name} batch {index}")
        count += 1
    if count == 0:
        raise ValueError(
            f"{name} is an empty loader: it yielded no batches. Check the dataset path and filters "
            "(and drop_last with fewer images than one batch)."
        )


def iter_image_batches(
    data: ImageData, batch_size: int = 32, *, name: str = "X", reiterable: bool = True
) -> Iterator[torch.Tensor]:
    """Yield checked image batches ``(B, 3, H, W)`` in ``[0, 1]`` from ``data``.

    Parameters
    ----------
    data : torch.Tensor or iterable
        A ``(N, 3, H, W)`` tensor (split into batches of ``batch_size``), or a
        re-iterable loader (e.g. a ``DataLoader``) of image batches or of tuples
        whose first item is the batch.
    batch_size : int
        Batch size used when ``data`` is a tensor.
    name : str
        Name used in error messages.
    reiterable : bool
        Refuse one-shot iterators (generators), for callers that read the
        data more than once.

    Raises
    ------
    ValueError
        When ``data`` yields nothing, or yields a batch of the wrong shape,
        range or with NaN; or when it is a one-shot iterator.
    """
    if isinstance(data, torch.Tensor):
        check_images(data, name=name)
        yield from data.split(int(batch_size))
        return
    _check_loader(data, name, reiterable)
    yield from _checked_items(data, name)


def _shuffles_faces(data: object) -> bool:
    """Whether :meth:`FitData.epoch` can visit the faces of this loader in a new order (a map-style
    ``DataLoader`` with a plain sampler, rebuilt with a permuted one)."""
    return (
        isinstance(data, DataLoader)
        and not isinstance(data.dataset, IterableDataset)
        and data.batch_size is not None
        and type(data.sampler) in (SequentialSampler, RandomSampler, DistributedSampler)
    )


class FitData:
    """The faces of a fit, checked once, read every epoch by :class:`krtfuap.engine.FitLoop`.

    A tensor is checked whole when this is made; a loader is type-checked and
    its first batch read (for the face size), and each batch it yields later
    is checked as it streams (a loader may yield new images every pass).
    Nothing is loaded into memory that was not there: a ``DataLoader`` stays
    a stream. When fitting distributed this holds this process's shard.

    Parameters
    ----------
    data : torch.Tensor or iterable
        ``(N, 3, H, W)`` faces in ``[0, 1]``, or a re-iterable loader of such
        batches (or of tuples whose first item is the batch).
    batch_size : int
        Batch size when ``data`` is a tensor.
    name : str
        Name used in error messages.
    shuffle : bool
        Whether epochs are read shuffled (:meth:`epoch` with a generator). A
        tensor's faces are permuted; a ``DataLoader`` over a map-style
        ``Dataset`` (sequential or shuffling sampler, or a ``DistributedSampler``)
        is rebuilt each epoch with a permuted sampler, so its faces come in a new
        order and it still streams; a list or tuple of batches is visited in a
        new order of its batches (the faces of a batch stay together). Other
        data (an ``IterableDataset``, a custom sampler) cannot be reordered
        without holding it, and is refused.
    size : (int, int), optional
        ``(H, W)`` every face must have (e.g. validation faces must match the fit faces).

    Attributes
    ----------
    source : torch.Tensor or iterable
        ``data`` as given (all of it).
    data : torch.Tensor or iterable
        This process's shard of it.
    size : (int, int)
        ``(H, W)`` of the faces.
    """

    def __init__(
        self, data: ImageData, batch_size: int, *, name: str = "X", shuffle: bool = False,
        size: tuple[int, int] | None = None,
    ) -> None:
        if isinstance(data, torch.Tensor):
            check_images(data, name=name)
        else:
            _check_loader(data, name, reiterable=True)
            if shuffle and not (isinstance(data, (list, tuple)) or _shuffles_faces(data)):
                raise ValueError(
                    f"shuffle=True cannot reorder the faces of {name}, a {type(data).__name__} (an iterable-style "
                    "dataset or a loader with its own sampler streams in its own order); pass a (N, 3, H, W) "
                    "tensor, a list of batches or a DataLoader over a map-style Dataset, or set shuffle=False "
                    "to keep the order it yields."
                )
        self.source, self.data = data, shard(data)
        self.batch_size, self.name = int(batch_size), name
        self.size: tuple[int, int] | None = size
        first = data.shape[-2:] if isinstance(data, torch.Tensor) else next(iter(self)).shape[-2:]
        self._check_size(first)

    @property
    def is_tensor(self) -> bool:
        """Whether the faces are one tensor (whose batches are the same every epoch)."""
        return isinstance(self.data, torch.Tensor)

    def _check_size(self, size: torch.Size) -> None:
        if self.size is None:
            self.size = (int(size[0]), int(size[1]))
        elif tuple(size) != tuple(self.size):
            raise ValueError(
                f"All faces must share one size; got {tuple(size)} after {tuple(self.size)}. "
                "Align every face to the same size (e.g. 112x112)."
            )

    def _sized(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for images in batches:
            self._check_size(images.shape[-2:])
            yield images

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The batches in the data's own order, each ``(B, 3, H, W)`` in ``[0, 1]``."""
        if self.is_tensor:
            return iter(self.data.split(self.batch_size))
        return self._sized(_checked_items(self.data, self.name))

    def epoch(
        self, epoch: int, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One pass: ``(images, rows)`` per batch.

        Parameters
        ----------
        epoch : int
            The epoch (a ``DistributedSampler`` draws its order from it).
        generator : torch.Generator or None
            Draws this epoch's order (see ``shuffle``); ``None``: the data's own order.

        Yields
        ------
        images : torch.Tensor
            ``(B, 3, H, W)`` in ``[0, 1]``.
        rows : torch.Tensor or None
            For tensor data, the rows of ``data`` in the batch (int64 ``(B,)``); ``None`` for a loader.
        """
        set_epoch(self.data, epoch)
        if self.is_tensor:
            count = len(self.data)
            order = torch.arange(count) if generator is None else torch.randperm(count, generator=generator)
            rows = order.split(self.batch_size)
            if generator is None:
                yield from zip(self.data.split(self.batch_size), rows)
            else:
                yield from ((self.data[batch.to(self.data.device)], batch) for batch in rows)
            return
        if generator is None:
            batches: Iterable = self.data
        elif isinstance(self.data, (list, tuple)):
            batches = [self.data[index] for index in torch.randperm(len(self.data), generator=generator).tolist()]
        else:
            if isinstance(self.data.sampler, DistributedSampler):
                indices = list(self.data.sampler)
            else:
                indices = list(range(len(self.data.dataset)))
            order = torch.randperm(len(indices), generator=generator).tolist()
            batches = loader_with_sampler(self.data, [indices[position] for position in order])
        for images in self._sized(_checked_items(batches, self.name)):
            yield images, None

    def digest(self) -> tuple[int, str]:
        """``(number of faces, hex digest)`` of all the faces (every process's shard), in any order.

        Rounded per-face statistics, sorted, so that the order a shuffling loader
        yields is not part of it; a shuffling loader's draws do not move torch's
        global generator.
        """
        rows, shapes = [], set()
        if isinstance(self.source, torch.Tensor):
            batches: Iterable[torch.Tensor] = self.source.split(self.batch_size)  # checked when this was made
        else:
            batches = _checked_items(self.source, self.name)
        with torch.random.fork_rng(devices=[]):
            for images in batches:
                shapes.add(tuple(images.shape[1:]))
                flat = images.detach().float().flatten(1)
                rows.append(torch.stack([flat.mean(1), flat.std(1), flat[:, :: max(1, flat.shape[1] // 64)].sum(1)], 1))
        stats = torch.cat(rows).double().cpu().numpy().round(5)
        stats = stats[np.lexsort(stats.T[::-1])]
        digest = hashlib.sha256(str(sorted(shapes)).encode())
        digest.update(stats.tobytes())
        return len(stats), digest.hexdigest()
