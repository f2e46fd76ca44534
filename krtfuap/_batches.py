"""Turn what users pass as data into checked batches of images."""

from __future__ import annotations

from typing import Iterable, Iterator, Union

import torch

from krtfuap._validation import check_images

__all__ = ["ImageData", "iter_image_batches"]

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
        yield from data.split(batch_size)
        return
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
    count = 0
    for index, item in enumerate(data):
        yield check_images(_images_of(item), name=f"{name} batch {index}")
        count += 1
    if count == 0:
        raise ValueError(
            f"{name} is an empty loader: it yielded no batches. Check the dataset path and filters "
            "(and drop_last with fewer images than one batch)."
        )
