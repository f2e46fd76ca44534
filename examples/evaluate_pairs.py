"""Verification accuracy on face pairs, clean and with one photo of each pair cloaked.

Usage
-----
python examples/evaluate_pairs.py cloak.safetensors                    # 400 pairs
python examples/evaluate_pairs.py cloak.safetensors --max-pairs 40     # quick check

Reads ``pairs.csv`` (``path_a,path_b,same``) of the faces folder (default:
``../shared/assets/faces`` next to the repository) with
``krtfuap.datasets.read_pairs`` and keeps pairs of the identities the attack was
not fitted on: the second half of ``split_identities(..., 0.5, random_state=0)``,
as in ``examples/fit_and_save.py`` (``--side fit`` or ``all`` for the others).
A seeded subset of at most ``--max-pairs`` pairs, half genuine and half impostor,
is judged with InsightFace ``w600k_mbf`` at the attack's threshold:

* verification accuracy, genuine pairs matched and impostor pairs rejected, for
  clean pairs and for pairs whose first photo is cloaked (the cloaked photo is
  compared with a clean photo, as when a cloaked upload meets a clean gallery);
* the fooling rate over the distinct photos of those pairs:
  the share with ``cos(F(x + v), F(x)) < t``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from krtfuap import UAPAttack
from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, load_image, read_pairs, split_identities
from krtfuap.metrics import calibrate_threshold, embed, fooling_rate, pair_similarities
from krtfuap.models import load_insightface_mbf

DEFAULT_FACES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "faces"


def balanced_subset(pairs: list, max_pairs: int, seed: int = 0) -> list:
    """At most ``max_pairs`` pairs, half genuine and half impostor, chosen with a seeded shuffle."""
    rng = np.random.default_rng(seed)
    genuine = [pair for pair in pairs if pair[2]]
    impostor = [pair for pair in pairs if not pair[2]]
    keep = [genuine[i] for i in rng.permutation(len(genuine))[: max_pairs // 2]]
    keep += [impostor[i] for i in rng.permutation(len(impostor))[: max_pairs - len(keep)]]
    return keep


def decisions(similarities: torch.Tensor, same: torch.Tensor, threshold: float) -> tuple[float, float, float]:
    """Accuracy, share of genuine pairs matched and share of impostor pairs rejected at ``threshold``."""
    match = similarities >= threshold
    return ((match == same).double().mean().item(), match[same].double().mean().item(),
            (~match[~same]).double().mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attack", type=Path, help="a .safetensors file written by UAPAttack.save")
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES,
                        help="folder of aligned faces with pairs.csv (default: %(default)s)")
    parser.add_argument("--max-pairs", type=int, default=400, help="judge at most this many pairs")
    parser.add_argument("--side", choices=("heldout", "fit", "all"), default="heldout",
                        help="identities whose pairs are judged (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="verification threshold (default: the one stored with the attack)")
    args = parser.parse_args()
    for name in ('max_pairs',):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not (args.faces / "pairs.csv").is_file():
        sys.exit(f"no pairs.csv in {args.faces}; pass --faces DIR with aligned 112x112 faces "
                 "<identity>/<image>.jpg and a pairs.csv (the project's copy is ../shared/assets/faces).")

    pairs = read_pairs(args.faces / "pairs.csv")
    if args.side != "all":
        fit_ids, heldout_ids = split_identities(FaceFolder(args.faces).identities, 0.5, random_state=0)
        pairs = filter_pairs(pairs, heldout_ids if args.side == "heldout" else fit_ids)
    pairs = balanced_subset(pairs, args.max_pairs)
    if not pairs or all(pair[2] for pair in pairs) or not any(pair[2] for pair in pairs):
        sys.exit(f"need genuine and impostor pairs of the {args.side} identities in {args.faces / 'pairs.csv'}")

    attack = UAPAttack.load(args.attack)
    threshold = attack.threshold_ if args.threshold is None else args.threshold
    model = load_insightface_mbf()
    loader = DataLoader(PairDataset(pairs, args.faces), batch_size=64)
    clean, same = pair_similarities(model, loader)
    cloaked, _ = pair_similarities(model, ((attack.transform(a), b, s) for a, b, s in loader))

    n_genuine = int(same.sum())
    print(f"pairs: {len(pairs)} ({n_genuine} genuine, {len(pairs) - n_genuine} impostor) of the {args.side} "
          f"identities; threshold {threshold:.3f}")
    print(f"{'':<16}| accuracy | genuine matched | impostor rejected")
    for name, similarities in (("clean", clean), ("first cloaked", cloaked)):
        accuracy, matched, rejected = decisions(similarities, same, threshold)
        print(f"{name:<16}| {accuracy:>8.3f} | {matched:>15.3f} | {rejected:>17.3f}")
    best, best_accuracy = calibrate_threshold(clean, same)
    print(f"best-accuracy threshold on these clean pairs: {best:.3f} (accuracy {best_accuracy:.3f})")

    photos = sorted({path for pair in pairs for path in pair[:2]})
    faces = torch.stack([load_image(args.faces / path) for path in photos])
    rate = fooling_rate(embed(model, attack.transform(faces)), embed(model, faces), threshold)
    print(f"fooling rate on {len(photos)} photos: {rate:.3f}")


if __name__ == "__main__":
    main()
