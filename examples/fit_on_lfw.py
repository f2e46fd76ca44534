"""Fit a KRT-FUAP perturbation on aligned faces and judge it on other people.

Usage
-----
python examples/fit_on_lfw.py ../shared/assets/faces --max-faces 200 --output cloak.safetensors

The folder holds aligned 112x112 faces as ``<identity>/<image>.jpg`` and, optionally,
``pairs.csv`` (``path_a,path_b,same``) used to calibrate the verification threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from krtfuap import UAPAttack
from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.models import load_insightface_mbf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("faces", type=Path)
    parser.add_argument("--max-faces", type=int, default=200, help="faces per half (fit / held-out)")
    parser.add_argument("--max-time", type=float, default=300.0, help="seconds of fitting at most")
    parser.add_argument("--output", type=Path, default=Path("cloak.safetensors"))
    args = parser.parse_args()
    for name in ('max_faces', 'max_time'):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")

    fit_ids, held_out_ids = split_identities(FaceFolder(args.faces).identities, 0.5, random_state=0)
    fit_set = FaceFolder(args.faces, identities=fit_ids)
    held_out = FaceFolder(args.faces, identities=held_out_ids)
    fit_loader = DataLoader(Subset(fit_set, range(min(args.max_faces, len(fit_set)))), batch_size=32)
    test_loader = DataLoader(Subset(held_out, range(min(args.max_faces, len(held_out)))), batch_size=64)

    pairs = None
    if (args.faces / "pairs.csv").is_file():
        fit_pairs = filter_pairs(read_pairs(args.faces / "pairs.csv"), fit_ids)[:1000]
        pairs = DataLoader(PairDataset(fit_pairs, args.faces), batch_size=64)
    threshold = None if pairs is not None else 0.202  # w600k_mbf best-accuracy threshold on LFW

    torch.manual_seed(0)
    attack = UAPAttack(
        load_insightface_mbf(), threshold=threshold, stealth_loss="ssim", target_fooling_rate=0.8,
        max_time=args.max_time, random_state=0, verbose=True,
    )
    attack.fit(fit_loader, pairs=pairs)
    print(f"threshold {attack.threshold_:.3f}; {attack.n_iter_} steps, stopped by {attack.stop_reason_}")
    print("held-out identities:", attack.evaluate(test_loader))
    attack.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
