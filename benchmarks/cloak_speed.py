"""Seconds per face of ``PhotoCloak`` (``krtfuap cloak``) for several torch thread counts, batch sizes and surrogate
sets, idle and beside busy work.

The cloak runs the refinement, the detector and the verification on the CPU. ``torch`` takes every core
by default; beside another process that does the same, the threads outnumber the cores and each waits
for the others. This script cloaks the same raw LFW photos (``../shared/assets/photos``; JPEG q85,
verified, as ``krtfuap cloak`` does) once per thread count, ``--batch-faces`` value (faces refined
together) and ``--surrogates`` set (``one``: the ready cloak's ``w600k_mbf``; ``default``: what
``krtfuap cloak`` refines against, :func:`krtfuap.pretrained.default_surrogates`; ``default-float32`` /
``default-bfloat16``: the same with FaceNet's convolutions in that precision) and per neighbour,
side by side in one run:

* ``nothing``: no process started by this script (the machine may still be shared: the load is printed);
* ``a busy core``: one single-threaded Python busy loop;
* ``a torch process``: one process multiplying matrices with torch on all the cores.

Example::

    python benchmarks/cloak_speed.py --photos 10 --threads 1 2
    python benchmarks/cloak_speed.py --photos 20 --threads 2 --beside nothing --batch-faces 1 16 \
        --surrogates default one
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

import torch

from krtfuap.alignment import SCRFDDetector
from krtfuap.apps.cloak import PhotoCloak
from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.pretrained import default_cloak, default_surrogates

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "photos"

NEIGHBOURS = {
    "nothing": None,
    "a busy core": "print('ready', flush=True)\nwhile True:\n    pass\n",
    "a torch process": (
        "import os, torch\n"
        "torch.set_num_threads(len(os.sched_getaffinity(0)))\n"
        "a = torch.randn(512, 512)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    a = torch.tanh(a @ a)\n"
    ),
}

#: ``--surrogates`` choices; each but ``one`` is ``default_surrogates`` with its further models in
#: that :data:`~krtfuap.models.precision.PRECISIONS` choice (``auto``: as the CPU allows).
SURROGATE_SETS = {"one": None, "default": "auto", "default-float32": "float32", "default-bfloat16": "bfloat16"}


def start_neighbour(code: str | None) -> subprocess.Popen | None:
    """Start the neighbour and return once it says it runs (None: no neighbour)."""
    if code is None:
        return None
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise SystemExit("the neighbour process did not start")
    return process


def cloak_rate(cloak: PhotoCloak, photos: list[Path]) -> tuple[float, int]:
    """Seconds to cloak, write and verify ``photos`` (JPEG q85), after one untimed warm-up photo, and the faces."""
    with tempfile.TemporaryDirectory() as folder:
        cloak.cloak_files(photos[:1], Path(folder) / "warm-up", file_format="jpeg", quality=85, report=False)
        started = time.perf_counter()
        rows = cloak.cloak_files(photos, Path(folder) / "out", file_format="jpeg", quality=85, report=False)
        elapsed = time.perf_counter() - started
    if any(row.status == "error" for row in rows):
        raise SystemExit(f"a photo failed: {[row.message for row in rows if row.status == 'error']}")
    return elapsed, sum(row.status == "cloaked" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=10, help="raw LFW photos to cloak per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to compare")
    parser.add_argument("--beside", nargs="+", choices=list(NEIGHBOURS), default=list(NEIGHBOURS),
                        help="what runs beside the cloak")
    parser.add_argument("--refine-steps", type=int, default=CLOAK_DEFAULTS.refine_steps)
    parser.add_argument("--batch-faces", type=int, nargs="+", default=[CLOAK_DEFAULTS.batch_faces],
                        help="faces refined together (PhotoCloak(batch_faces=...)) to compare")
    parser.add_argument("--surrogates", nargs="+", choices=list(SURROGATE_SETS), default=["one"],
                        help="refine against w600k_mbf alone (one) or krtfuap cloak's default surrogates (default: "
                        "FaceNet's convolutions in bfloat16 where the CPU has AMX; -float32 / -bfloat16: forced)")
    args = parser.parse_args()

    photos = sorted(PHOTOS.rglob("*.jpg"))[: args.photos]
    if not photos:
        raise SystemExit(f"no photos in {PHOTOS}: this benchmark needs the shared LFW photos.")
    cores = len(os.sched_getaffinity(0))
    print(f"{len(photos)} raw LFW photos, refine_steps {args.refine_steps}, JPEG q85, verified; {cores} cores; "
          f"torch {torch.__version__}; load average at start {os.getloadavg()[0]:.2f} (1 min)\n")
    detector, attack = SCRFDDetector(), default_cloak()
    surrogate_sets = {name: None if name == "one" else
                      default_surrogates(attack, precision=SURROGATE_SETS[name])
                      for name in args.surrogates}
    print("| beside | surrogates | threads | batch faces | seconds | faces | s/face | s/photo "
          "| load average before -> after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.beside:
        neighbour = start_neighbour(NEIGHBOURS[name])
        try:
            for surrogates, threads, batch_faces in product(args.surrogates, args.threads, args.batch_faces):
                cloak = PhotoCloak(attack, detector, refine_steps=args.refine_steps, num_threads=threads,
                                   batch_faces=batch_faces, surrogates=surrogate_sets[surrogates])
                before = os.getloadavg()[0]
                elapsed, faces = cloak_rate(cloak, photos)
                print(f"| {name} | {surrogates} | {threads} | {batch_faces} | {elapsed:.1f} | {faces} | "
                      f"{elapsed / max(faces, 1):.2f} | {elapsed / len(photos):.2f} | "
                      f"{before:.2f} -> {os.getloadavg()[0]:.2f} |", flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()


if __name__ == "__main__":
    main()
