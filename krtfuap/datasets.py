"""Aligned face datasets on disk: identity folders, identity splits and verification pairs.

The layout is the one used by ``../shared/assets/faces`` (LFW aligned to the ArcFace
112x112 template)::

    <root>/<identity>/<file>.jpg|.jpeg|.png
    <root>/pairs.csv            # columns path_a,path_b,same (paths relative to <root>)

Every image leaves this module as a ``(3, H, W)`` float32 RGB tensor in ``[0, 1]``,
decoded lazily from disk with PIL (nothing is cached in memory), so a
:class:`torch.utils.data.DataLoader` batches them to ``(B, 3, H, W)``. Batching
needs one size: :class:`FaceFolder` and :class:`PairDataset` check every image
against theirs (the first image's, unless ``size`` is given) and name the file
that differs, instead of leaving ``DataLoader`` to fail without one.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "is_image_file",
    "load_image",
    "FaceFolder",
    "split_identities",
    "read_pairs",
    "filter_pairs",
    "PairDataset",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""File suffixes (case-insensitive) that count as images."""

Transform = Callable[[torch.Tensor], torch.Tensor]
Pair = tuple[str, str, bool]


MAX_IMAGE_PIXELS = 64_000_000
"""Largest image (width x height) :func:`load_image` decodes; larger files are refused before decoding."""


def load_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode one image file to an RGB float tensor.

    Parameters
    ----------
    path : str or os.PathLike
        Image file in any format PIL reads (JPEG, PNG, ...). Grey, palette,
        CMYK and RGBA images are converted to RGB (alpha is dropped); 16-bit
        images keep their full range; the EXIF orientation is applied.
    max_pixels : int
        Refuse images with more pixels than this (decompression bombs),
        before decoding them.

    Returns
    -------
    torch.Tensor
        Shape ``(3, H, W)``, dtype float32, values in ``[0, 1]``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is too large, or exists but cannot be decoded as an image
        (truncated, corrupt, not an image); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}; check the path (and the dataset root).")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"image file {path} is {width}x{height} pixels, more than the {max_pixels} allowed "
                    "(a decompression bomb or a huge photo); downscale it, or pass a larger max_pixels "
                    "if you trust the file."
                )
            image = ImageOps.exif_transpose(image)
            if image.mode in _SIXTEEN_BIT_MODES:
                grey = np.asarray(image, dtype=np.float64) / 65535.0
                return torch.from_numpy(np.clip(grey, 0.0, 1.0)).float().expand(3, -1, -1).clone()
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"cannot decode image file {path} ({error}); the file is corrupt, truncated or not an image: "
            "re-export it or delete it from the dataset folder."
        ) from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


#: PIL modes of 16-bit (greyscale) images, which ``convert("RGB")`` would clip to white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


Size = tuple[int, int]


def _check_size_parameter(size: Size | None) -> Size | None:
    if size is None:
        return None
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
    ):
        raise TypeError(f"size must be (height, width) in pixels, two positive ints, got {size!r}; e.g. size=(112, 112).")
    return (size[0], size[1])


def _dataset_size(size: Size | None, first: Path) -> tuple[Size, str]:
    """The size a dataset's images must have, and where it comes from (for error messages)."""
    if size is not None:
        return size, f"size={size} was given"
    height, width = load_image(first).shape[-2:]
    return (height, width), f"the size of its first image, {first}; pass size=(height, width) to choose another"


def _load_sized(path: Path, size: Size, reference: str) -> torch.Tensor:
    """:func:`load_image`, refusing an image whose ``(H, W)`` is not ``size`` (``reference`` says where it came from)."""
    image = load_image(path)
    height, width = image.shape[-2:]
    if (height, width) != size:
        raise ValueError(
            f"image file {path} is {width}x{height} pixels (width x height) but this dataset's images are "
            f"{size[1]}x{size[0]} ({reference}); faces batched together must share one size: align or resize "
            f"every face to {size[1]}x{size[0]} (krtfuap.alignment.detect_and_align), or move this file out."
        )
    return image


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a file that counts as an image: a suffix of :data:`IMAGE_SUFFIXES`, not hidden."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p))


class FaceFolder(Dataset):
    """Aligned faces stored one folder per identity, decoded lazily.

    Parameters
    ----------
    root : str or os.PathLike
        Folder holding ``<identity>/<file>.(jpg|jpeg|png)``. An identity is any
        sub-folder (not starting with ``.``) that holds at least one image file;
        other files directly under ``root`` (such as ``pairs.csv``) are ignored.
    identities : iterable of str, optional
        Keep only these identities (for example one side of :func:`split_identities`).
        Labels still index the sorted list of *all* identities under ``root``, so two
        subsets of the same root agree on every label. ``None`` keeps all.
    transform : callable, optional
        Applied to each ``(3, H, W)`` image tensor after decoding (and after
        the size check).
    size : (int, int), optional
        ``(height, width)`` every image file must have once decoded. ``None``:
        the size of the first image (in ``samples`` order), decoded once here.

    Attributes
    ----------
    root : pathlib.Path
        The dataset folder.
    size : (int, int)
        ``(height, width)`` of every image.
    identities : list of str
        The identities in this dataset, sorted.
    all_identities : list of str
        Every identity under ``root``, sorted; ``label`` indexes this list.
    samples : list of (pathlib.Path, int)
        ``(image path, label)`` for every image, sorted by identity then file name.

    Raises
    ------
    FileNotFoundError
        If ``root`` does not exist or is not a folder.
    ValueError
        If ``root`` holds no identity folder with images, ``identities`` names an
        identity that is not under ``root`` or is empty, or ``size=None`` and the
        first image cannot be decoded.
    TypeError
        If ``identities`` is a single string instead of an iterable of names, or
        ``size`` is not two positive ints.

    Notes
    -----
    ``dataset[i]`` returns ``(image, label)`` with ``image`` of shape ``(3, H, W)``,
    float32 RGB in ``[0, 1]`` and ``label`` an ``int``. A corrupt file, or an
    image of another size than ``size``, raises ``ValueError`` naming the file
    when that item is read (so a ``DataLoader`` never fails in its collate
    without saying which file is wrong).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        identities: Iterable[str] | None = None,
        transform: Transform | None = None,
        size: Size | None = None,
    ) -> None:
        size = _check_size_parameter(size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"face folder not found: {self.root}; pass the folder that holds one "
                "sub-folder of aligned face images per identity."
            )
        files_by_identity: dict[str, list[Path]] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                files = _image_files(folder)
                if files:
                    files_by_identity[folder.name] = files
        if not files_by_identity:
            raise ValueError(
                f"no images found under {self.root}: expected <root>/<identity>/<file> with "
                f"suffix {', '.join(IMAGE_SUFFIXES)}; check the folder or its layout."
            )
        self.all_identities: list[str] = sorted(files_by_identity)
        label_of = {name: label for label, name in enumerate(self.all_identities)}
        if identities is None:
            self.identities = list(self.all_identities)
        else:
            if isinstance(identities, str):
                raise TypeError(
                    f"identities must be an iterable of identity names, got the single string "
                    f"{identities!r}; wrap it in a list: identities=[{identities!r}]."
                )
            self.identities = sorted(set(identities))
            unknown = [name for name in self.identities if name not in label_of]
            if unknown:
                shown = ", ".join(repr(name) for name in unknown[:5])
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                raise ValueError(
                    f"identities {shown}{more} have no image folder under {self.root}; "
                    "pass names of sub-folders that hold images (see FaceFolder(root).identities)."
                )
            if not self.identities:
                raise ValueError("identities is empty; pass at least one identity name, or None for all.")
        self.transform = transform
        self.samples: list[tuple[Path, int]] = [
            (path, label_of[name]) for name in self.identities for path in files_by_identity[name]
        ]
        self.size, self._size_source = _dataset_size(size, self.samples[0][0])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _load_sized(path, self.size, self._size_source)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, identities={len(self.identities)}"
            f"/{len(self.all_identities)}, images={len(self.samples)})"
        )


def split_identities(
    identities: Iterable[str], fraction: float = 0.5, random_state: int = 0
) -> tuple[list[str], list[str]]:
    """Split identity names into two disjoint groups, deterministically.

    Fit the perturbation on the first group and evaluate it on the second, so it is
    judged on people it never saw.

    Parameters
    ----------
    identities : iterable of str
        Distinct identity names (for example ``FaceFolder(root).identities``). The
        result does not depend on their order.
    fraction : float
        Share of identities in the first group, in ``(0, 1)``; the group size is
        ``round(fraction * n)`` clipped so that both groups are non-empty.
    random_state : int
        Seed of the shuffle; the same names and seed always give the same split.

    Returns
    -------
    fit_ids, heldout_ids : list of str
        Disjoint, each sorted, together equal to the input names.

    Raises
    ------
    ValueError
        If fewer than two identities are given, a name repeats, or ``fraction`` is
        outside ``(0, 1)``.
    """
    if isinstance(identities, str):
        raise TypeError("identities must be an iterable of names, not a single string; wrap it in a list.")
    names = list(identities)
    if len(set(names)) != len(names):
        raise ValueError("identities contains repeated names; pass each identity once (e.g. sorted(set(names))).")
    if len(names) < 2:
        raise ValueError(f"need at least 2 identities to split, got {len(names)}; add more identities.")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}; e.g. fraction=0.5 for an even split.")
    names.sort()
    order = np.random.default_rng(random_state).permutation(len(names))
    n_fit = min(max(int(round(fraction * len(names))), 1), len(names) - 1)
    fit_ids = sorted(names[i] for i in order[:n_fit])
    heldout_ids = sorted(names[i] for i in order[n_fit:])
    return fit_ids, heldout_ids


_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read verification pairs from a CSV file with columns ``path_a,path_b,same``.

    Parameters
    ----------
    path : str or os.PathLike
        CSV file such as ``../shared/assets/faces/pairs.csv``. ``same`` is ``1``/``0``
        (``true``/``false`` and ``yes``/``no`` are accepted too).

    Returns
    -------
    list of (str, str, bool)
        ``(path_a, path_b, same)`` with the paths exactly as written in the file, i.e.
        relative to the CSV's folder; resolve them with :class:`PairDataset`
        (``root=Path(path).parent``).

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If a column is missing, a ``same`` value is not boolean, or there are no rows
        (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}; pass the CSV with columns path_a,path_b,same.")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"path_a", "path_b", "same"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {', '.join(sorted(missing))}; its header must be path_a,path_b,same."
            )
        pairs: list[Pair] = []
        for row in reader:
            flag = (row["same"] or "").strip().lower()
            if flag not in _TRUE | _FALSE or not row["path_a"] or not row["path_b"]:
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected two paths and same in {{0, 1}}, "
                    f"got {row['path_a']!r}, {row['path_b']!r}, {row['same']!r}; fix or delete that row."
                )
            pairs.append((row["path_a"].strip(), row["path_b"].strip(), flag in _TRUE))
    if not pairs:
        raise ValueError(f"{path} has a header but no pairs; add rows path_a,path_b,same.")
    return pairs


def _identity_of(path: str) -> str:
    return PurePath(path).parent.name


def filter_pairs(pairs: Iterable[Pair], identities: Iterable[str]) -> list[Pair]:
    """Keep the pairs whose two images both belong to the given identities.

    Use it to calibrate a verification threshold on fit identities only, or to
    evaluate on held-out identities only.

    Parameters
    ----------
    pairs : iterable of (str, str, bool)
        As returned by :func:`read_pairs`. An image's identity is the name of the
        folder that holds it (``<identity>/<file>``).
    identities : iterable of str
        Allowed identity names.

    Returns
    -------
    list of (str, str, bool)
        The kept pairs, in their original order (possibly empty).
    """
    if isinstance(identities, str):
        raise TypeError("identities must be an iterable of names, not a single string; wrap it in a list.")
    allowed = set(identities)
    return [pair for pair in pairs if _identity_of(pair[0]) in allowed and _identity_of(pair[1]) in allowed]


class PairDataset(Dataset):
    """Verification pairs of aligned faces, decoded lazily.

    Parameters
    ----------
    pairs : sequence of (str, str, bool)
        ``(path_a, path_b, same)``, e.g. from :func:`read_pairs` / :func:`filter_pairs`.
    root : str or os.PathLike
        Folder the relative paths in ``pairs`` are relative to (the CSV's folder);
        absolute paths are used as they are.
    transform : callable, optional
        Applied to each ``(3, H, W)`` image tensor after decoding (and after
        the size check).
    size : (int, int), optional
        ``(height, width)`` every image file must have once decoded. ``None``:
        the size of the first pair's first image, decoded once here.

    Attributes
    ----------
    size : (int, int)
        ``(height, width)`` of every image.

    Notes
    -----
    ``dataset[i]`` returns ``(img_a, img_b, same)``: two ``(3, H, W)`` float32 RGB
    tensors in ``[0, 1]`` and a 0-d bool tensor, so a ``DataLoader`` yields
    ``(B, 3, H, W)``, ``(B, 3, H, W)`` and ``(B,)`` batches. A corrupt file, or an
    image of another size than ``size``, raises ``ValueError`` naming the file
    when that pair is read.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a folder, or ``size=None`` and the first image is missing.
    ValueError
        If ``pairs`` is empty or holds a ``same`` that is not a bool, or
        ``size=None`` and the first image cannot be decoded.
    TypeError
        If ``size`` is not two positive ints.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        root: str | os.PathLike[str],
        *,
        transform: Transform | None = None,
        size: Size | None = None,
    ) -> None:
        size = _check_size_parameter(size)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"pairs root folder not found: {self.root}; pass the folder the pair paths are relative to."
            )
        self.pairs = list(pairs)
        if not self.pairs:
            raise ValueError(
                "pairs is empty; check the pairs file, or that filter_pairs kept any pair for those identities."
            )
        for index, pair in enumerate(self.pairs):
            same = pair[2] if isinstance(pair, (tuple, list)) and len(pair) == 3 else None
            if isinstance(same, str) or not (isinstance(same, (bool, np.bool_)) or same in (0, 1)):
                raise ValueError(
                    f"pair {index} must be (path_a, path_b, same) with same a bool (or 0/1), got {pair!r}; "
                    "parse CSV text with read_pairs, which turns '0'/'1' into booleans."
                )
        self.transform = transform
        self.size, self._size_source = _dataset_size(size, self.root / self.pairs[0][0])

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: str) -> torch.Tensor:
        image = _load_sized(self.root / path, self.size, self._size_source)
        return image if self.transform is None else self.transform(image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path_a, path_b, same = self.pairs[index]
        return self._load(path_a), self._load(path_b), torch.tensor(bool(same))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, pairs={len(self.pairs)})"
