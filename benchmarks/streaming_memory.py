"""Memory of fitting from a folder of JPEGs (streamed) against fitting from an in-memory tensor.

What is measured
----------------
1. ``--n`` synthetic aligned-face-sized JPEGs (``--size`` square, smooth random
   colour fields, ``--per-identity`` files per identity folder) are written to a
   temporary folder in :class:`krtfuap.datasets.FaceFolder` layout
   (``<identity>/<file>.jpg``), or reused from ``--folder``.
2. **streamed**: ``UAPAttack.fit`` on a ``DataLoader`` over ``FaceFolder`` for
   ``--steps`` steps (``0``: one whole epoch), the process's resident set size
   (RSS) sampled every ``--every`` steps.
3. **in memory**: the first ``--tensor-n`` faces decoded into one
   ``(N, 3, H, W)`` float32 tensor, then ``fit`` on batches of that tensor, RSS
   sampled the same way. Its RSS grows with ``N`` (``3 * H * W * 4`` bytes per
   face); the streamed RSS does not.

The fit uses the SSIM stealth loss and ``threshold=-1`` (nothing is ever fooled,
so every run takes the same number of steps). RSS is read with ``psutil`` when it
is installed, else from ``/proc/self/status`` (``VmRSS``); with ``--workers > 0``
the DataLoader worker processes are added (``psutil`` only).

Examples
--------
python benchmarks/streaming_memory.py                       # 20000 faces, 100 steps, tiny model
python benchmarks/streaming_memory.py --n 500000 --steps 0 --batch-size 128 --workers 8 --model insightface_mbf
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from krtfuap.attack import UAPAttack
from krtfuap.datasets import FaceFolder

try:
    import psutil
except ModuleNotFoundError:
    psutil = None

MiB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process (plus its children with psutil), in bytes."""
    if psutil is not None:
        process = psutil.Process()
        return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("neither psutil nor /proc/self/status is available to read the RSS")


class TinyEmbedder(nn.Module):
    """A small fixed conv net, ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B, 32)``: keeps the timing on data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x - 0.5)


def write_faces(root: Path, n: int, size: int, per_identity: int, seed: int = 0) -> float:
    """Write ``n`` JPEGs of ``size x size`` as ``root/<identity>/<file>.jpg``; returns seconds taken."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    for index in range(n):
        folder = root / f"id{index // per_identity:06d}"
        if index % per_identity == 0:
            folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)  # a smooth colour field, JPEG-friendly
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{index:07d}.jpg", quality=90)
    return time.perf_counter() - started


class MeteredBatches:
    """Re-iterable view of ``batches`` that stops after ``steps`` and samples RSS every ``every`` steps.

    ``UAPAttack.fit`` opens the data more than once (its first batch sets the
    image size); the log is reset at each pass, so after ``fit(max_epochs=1)`` it
    holds the training pass.
    """

    def __init__(self, batches: Iterable, steps: int | None, every: int) -> None:
        self.batches = batches
        self.steps = steps
        self.every = every
        self.log: list[tuple[int, int, float]] = []

    def __iter__(self) -> Iterator:
        self.log = []
        seen, step = 0, -1
        for step, batch in enumerate(itertools.islice(self.batches, self.steps)):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if step % self.every == 0:
                self.log.append((step, seen, rss_bytes() / MiB))
            seen += len(images)
            yield batch
        self.log.append((step + 1, seen, rss_bytes() / MiB))


class TensorBatches:
    """Re-iterable batches of one in-memory ``(N, 3, H, W)`` tensor."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        self.images = images
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.images.split(self.batch_size))


def fit(model: nn.Module, data: MeteredBatches, batch_size: int) -> float:
    """One epoch of ``UAPAttack.fit`` over ``data``; returns seconds taken."""
    started = time.perf_counter()
    UAPAttack(
        model, threshold=-1.0, stealth_loss="ssim", target_fooling_rate=1.0, max_epochs=1, batch_size=batch_size,
        shuffle=False,  # these metered batches stream in their own order
        random_state=0,
    ).fit(data)
    return time.perf_counter() - started


def print_table(title: str, log: list[tuple[int, int, float]]) -> None:
    print(f"\n{title}\n")
    print("| steps | images seen | RSS MiB |")
    print("|---|---|---|")
    for step, seen, rss in log:
        print(f"| {step} | {seen} | {rss:.0f} |")
    values = [rss for _, _, rss in log]
    print(
        f"\nRSS before the first step {values[0]:.0f} MiB; after it (the first steps allocate the autograd and "
        f"SSIM buffers): min {min(values[1:]):.0f}, max {max(values[1:]):.0f}, last - second sample "
        f"{values[-1] - values[1]:+.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="JPEGs in the synthetic folder")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--per-identity", type=int, default=50, help="images per identity folder")
    parser.add_argument("--folder", type=Path, default=None, help="reuse (or create) this folder instead of a temp dir")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="steps per fit; 0: one whole epoch")
    parser.add_argument("--every", type=int, default=10, help="sample RSS every this many steps")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--tensor-n", type=int, default=2048, help="faces held in memory for the comparison")
    parser.add_argument("--model", default="tiny", choices=["tiny", "insightface_mbf"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    steps = args.steps or None
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.model == "tiny":
        model: nn.Module = TinyEmbedder()
    else:
        from krtfuap.models import load_insightface_mbf

        model = load_insightface_mbf()
    print(
        f"{date.today()}; {platform.node()} ({os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); RSS from {'psutil' if psutil else '/proc/self/status VmRSS'}; "
        f"model {args.model}; batch {args.batch_size}; {args.workers} DataLoader workers"
    )
    with tempfile.TemporaryDirectory(prefix="krtfuap-streaming-") as temporary:
        root = args.folder or Path(temporary)
        if not (root.is_dir() and any(root.iterdir())):
            seconds = write_faces(root, args.n, args.size, args.per_identity)
            print(f"wrote {args.n} JPEGs of {args.size}x{args.size} to {root} in {seconds:.0f} s")
        dataset = FaceFolder(root)
        print(f"FaceFolder: {len(dataset)} images, {len(dataset.identities)} identities")

        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
        streamed = MeteredBatches(loader, steps, args.every)
        seconds = fit(model, streamed, args.batch_size)
        rate = streamed.log[-1][1] / seconds
        print_table(f"Streamed from FaceFolder ({seconds:.0f} s, {rate:.0f} images/s)", streamed.log)

        before = rss_bytes() / MiB
        tensor_n = min(args.tensor_n, len(dataset))
        subset = torch.utils.data.Subset(dataset, range(tensor_n))
        images = torch.cat([batch for batch, _ in DataLoader(subset, batch_size=256, num_workers=args.workers)])
        held = images.numel() * images.element_size() / MiB
        print(
            f"\nIn-memory tensor {tuple(images.shape)} float32: {held:.0f} MiB "
            f"(RSS {before:.0f} -> {rss_bytes() / MiB:.0f} MiB); the same for all {len(dataset)} faces would be "
            f"{held / tensor_n * len(dataset):.0f} MiB"
        )
        in_memory = MeteredBatches(TensorBatches(images, args.batch_size), steps, args.every)
        seconds = fit(model, in_memory, args.batch_size)
        rate = in_memory.log[-1][1] / seconds
        print_table(f"From the in-memory tensor ({seconds:.0f} s, {rate:.0f} images/s)", in_memory.log)


if __name__ == "__main__":
    main()
