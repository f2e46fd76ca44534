"""Apply a saved perturbation to a folder of aligned faces, writing cloaked copies elsewhere.

Usage
-----
python examples/apply_to_folder.py cloak.safetensors my_faces/ my_faces_cloaked/
python examples/apply_to_folder.py cloak.safetensors ../shared/assets/faces /tmp/cloaked --max-images 20

Every image under the input folder (``.jpg``, ``.jpeg``, ``.png``, searched
recursively) must be a face aligned to the size the perturbation was fitted on
(112x112 for the ArcFace template). Each is written to the output folder at the
same relative path, as a PNG: a lossless format keeps the perturbation as it was
learned, while JPEG compression would remove part of it. The output folder must
not be the input folder, nor lie inside it or contain it, so no input file can
be overwritten. No face model is needed: cloaking only adds the stored
perturbation, ``clip(x + v, 0, 1)``.

All or nothing on bad input: every image is decoded and its size checked
before anything is written, so an unreadable, truncated or wrongly sized file
anywhere in the folder stops the script with a one-line error naming it (exit
status 1) and no output at all; fix or remove that file and run again. Each
PNG is written next to its final name and renamed into place when complete,
so a failed write (a full disk, Ctrl-C) never leaves a half-written image:
the images written before it are whole, and the error says how many there are.
Images are decoded twice (once to check, once to cloak), so memory holds one
image at a time, however large the folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from krtfuap import UAPAttack
from krtfuap.datasets import IMAGE_SUFFIXES, load_image
from krtfuap.metrics import psnr, ssim


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth), sorted."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def check_images(images: list[Path], size: tuple[int, int]) -> None:
    """Decode every image and check its ``(H, W)``; exit with a one-line error naming the first bad file."""
    height, width = size
    for path in images:
        try:
            image = load_image(path)
        except (OSError, ValueError) as error:  # load_image names the file and the fix
            sys.exit(f"{' '.join(str(error).split())} Nothing was written.")
        if image.shape[-2:] != size:
            sys.exit(f"{path} is {image.shape[-1]}x{image.shape[-2]} pixels but the perturbation is "
                     f"{width}x{height}; align the faces first (krtfuap.alignment.detect_and_align). "
                     "Nothing was written.")


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a ``(3, H, W)`` RGB image in ``[0, 1]`` as an 8-bit PNG, atomically (write, then rename)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(partial, format="PNG")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attack", type=Path, help="a .safetensors file written by UAPAttack.save")
    parser.add_argument("input", type=Path, help="folder of aligned face photos")
    parser.add_argument("output", type=Path, help="folder for the cloaked copies (created if missing)")
    parser.add_argument("--max-images", type=int, default=None, help="cloak at most this many images")
    args = parser.parse_args()
    for name in ('max_images',):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")

    source, target = args.input.resolve(), args.output.resolve()
    if not source.is_dir():
        sys.exit(f"input folder not found: {args.input}")
    if target == source or source in target.parents or target in source.parents:
        sys.exit(f"refusing to write into {args.output}: the output folder must lie outside the input folder "
                 f"{args.input} (and not contain it), so that no input photo is overwritten.")
    images = find_images(source)[: args.max_images]
    if not images:
        sys.exit(f"no {', '.join(IMAGE_SUFFIXES)} images found under {args.input}")

    outputs = [(target / path.relative_to(source)).with_suffix(".png") for path in images]
    if len(set(outputs)) < len(outputs):
        sys.exit(f"two input images under {args.input} differ only in their suffix and would both be written "
                 "to the same PNG; rename one of them.")

    try:
        attack = UAPAttack.load(args.attack)
    except (OSError, ValueError) as error:
        sys.exit(str(error))
    check_images(images, tuple(attack.perturbation_.shape[-2:]))
    ssims, psnrs = [], []
    for path, output in zip(images, outputs):
        clean = load_image(path)
        cloaked = attack.transform(clean[None])
        try:
            save_png(cloaked[0], output)
        except OSError as error:
            sys.exit(f"cannot write {output} ({error}); the {len(ssims)} cloaked images written before it are "
                     f"complete, none is half-written. Free disk space or choose another output folder.")
        ssims.append(ssim(cloaked, clean[None]))
        psnrs.append(psnr(cloaked, clean[None]))
    print(f"wrote {len(images)} cloaked images to {args.output} "
          f"(mean SSIM {torch.cat(ssims).mean():.3f}, PSNR {torch.cat(psnrs).mean():.2f} dB)")


if __name__ == "__main__":
    main()
