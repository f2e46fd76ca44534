"""Attack your own face model: wrap an ``nn.Module`` with ``FaceEmbedder``, calibrate, fit, judge.

Usage
-----
python examples/custom_model.py                                            # 128 faces and 400 pairs
python examples/custom_model.py --max-faces 16 --max-pairs 40 --max-epochs 2   # quick check

The backbone stands in for your network: the MobileFaceNet architecture
(``krtfuap.models.MobileFaceNet``) with the foamliu weights loaded as a plain
``state_dict`` (default ``../shared/assets/models/foamliu_mobilefacenet_128d.pt``).
It expects 112x112 RGB faces normalised with the ImageNet mean and standard
deviation and returns 128-d embeddings. ``FaceEmbedder`` puts that normalisation
inside the model, so the attack sees a model taking ``(B, 3, H, W)`` RGB in
``[0, 1]`` and returning ``(B, D)``, the only contract ``UAPAttack`` needs.

The faces folder (default ``../shared/assets/faces``) is split by identity with
``split_identities(..., 0.5, random_state=0)``; the verification threshold is
calibrated (best accuracy) on genuine and impostor pairs of the fitting
identities, the perturbation is fitted on faces of the fitting identities and
judged on faces of the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from krtfuap import UAPAttack
from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.imagenet import IMAGENET_MEAN, IMAGENET_STD
from krtfuap.models import FaceEmbedder, MobileFaceNet

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"


def build_model(weights: Path) -> FaceEmbedder:
    """Your backbone with its weights, wrapped to take ``[0, 1]`` RGB; frozen and in eval mode."""
    backbone = MobileFaceNet()  # replace with your own nn.Module: normalised (B, 3, 112, 112) -> (B, D)
    backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = FaceEmbedder(backbone, input_size=(112, 112), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         channel_order="RGB").eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=SHARED / "faces",
                        help="folder of aligned faces <identity>/<image>.jpg with pairs.csv (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=SHARED / "models" / "foamliu_mobilefacenet_128d.pt",
                        help="state_dict of the backbone (default: %(default)s)")
    parser.add_argument("--max-faces", type=int, default=128, help="faces to fit on, and to judge on")
    parser.add_argument("--max-pairs", type=int, default=400, help="pairs to calibrate the threshold on")
    parser.add_argument("--max-epochs", type=int, default=20, help="most passes over the fitting faces")
    parser.add_argument("--output", type=Path, default=None, help="also save the attack to this file")
    args = parser.parse_args()
    for name in ('max_faces', 'max_pairs', 'max_epochs'):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not (args.faces / "pairs.csv").is_file():
        sys.exit(f"no pairs.csv in {args.faces}; pass --faces DIR with aligned 112x112 faces "
                 "<identity>/<image>.jpg and a pairs.csv (the project's copy is ../shared/assets/faces).")
    if not args.weights.is_file():
        sys.exit(f"weights not found: {args.weights}; pass --weights with your backbone's state_dict.")

    model = build_model(args.weights)
    print(f"model: (B, 3, H, W) in [0, 1] -> {tuple(model(torch.rand(2, 3, 112, 112)).shape)}")

    fit_ids, heldout_ids = split_identities(FaceFolder(args.faces).identities, 0.5, random_state=0)
    pairs = filter_pairs(read_pairs(args.faces / "pairs.csv"), fit_ids)
    rng = np.random.default_rng(0)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[: args.max_pairs]]
    fit_set = FaceFolder(args.faces, identities=fit_ids)
    heldout_set = FaceFolder(args.faces, identities=heldout_ids)
    fit_faces = Subset(fit_set, sorted(rng.permutation(len(fit_set))[: args.max_faces].tolist()))
    heldout_faces = Subset(heldout_set, sorted(rng.permutation(len(heldout_set))[: args.max_faces].tolist()))

    attack = UAPAttack(model, threshold=None, stealth_loss="ssim", target_fooling_rate=0.8,
                       max_epochs=args.max_epochs, random_state=0)
    attack.fit(DataLoader(fit_faces, batch_size=32), pairs=DataLoader(PairDataset(pairs, args.faces), batch_size=64))
    print(f"threshold {attack.threshold_:.3f}, calibrated on {len(pairs)} pairs of fitting identities")
    print(f"fitted on {len(fit_faces)} faces: {attack.n_iter_} steps, stopped by {attack.stop_reason_}, "
          f"fit-set fooling rate {attack.fooling_rate_:.3f}")
    scores = attack.evaluate(DataLoader(heldout_faces, batch_size=64))
    print(f"held-out identities ({scores['n_images']} faces): fooling rate {scores['fooling_rate']:.3f}, "
          f"SSIM {scores['ssim']:.3f}, PSNR {scores['psnr']:.2f} dB")
    if args.output is not None:
        attack.save(args.output)
        print(f"saved {args.output}")


if __name__ == "__main__":
    main()
