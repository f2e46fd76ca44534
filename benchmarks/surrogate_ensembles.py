"""Does refining the per-face cloak against several surrogates protect from recognisers it never saw? (issue 20)

Cloaks raw 250x250 LFW photos of held-out identities (``split_identities(identities, 0.5,
random_state=0)[1]`` of ``../shared/assets/faces``; the photos at the same relative paths under
``../shared/assets/photos``) with :class:`krtfuap.apps.cloak.PhotoCloak` and the ready cloak's
defaults, once per surrogate set, writes each as JPEG q85, re-detects and judges every face with:

* ``insightface_mbf`` (w600k_mbf, threshold ``INSIGHTFACE_MBF_THRESHOLD``), ``sface``
  (``SFACE_THRESHOLD``) and ``foamliu_mobilefacenet`` (0.282, ``benchmarks/RESULTS.md``) on the
  112x112 crop aligned from the cloak detector's keypoints: white box (``*``) when a surrogate;
* ``dlib_resnet``: dlib's ResNet on dlib's own detection and 5-point chip, distance > 0.6
  protected (:class:`krtfuap.apps.judges.DlibJudge`), always black box.

Prints one Markdown row per surrogate set: protection per judge, mean face-box SSIM (SCRFD's
box, after the real save), seconds of cloaking per face, and the load average.

Example (2-core CPU)::

    python benchmarks/surrogate_ensembles.py --photos 30 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from _common import SHARED

from krtfuap.apps.cloak import PhotoCloak, summarise
from krtfuap.apps.judges import DlibJudge, ModelJudge
from krtfuap.datasets import FaceFolder, split_identities
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD, SFACE_THRESHOLD, load_face_model
from krtfuap.pretrained import default_cloak

FOAMLIU_THRESHOLD = 0.282  # benchmarks/RESULTS.md, calibrated as the others
FOAMLIU_WEIGHTS = SHARED / "models" / "foamliu_mobilefacenet_128d.pt"

#: Surrogate set name -> the judges' names refined against.
SURROGATE_SETS = {
    "mbf": ["insightface_mbf"],
    "mbf+sface": ["insightface_mbf", "sface"],
    "mbf+sface+foamliu": ["insightface_mbf", "sface", "foamliu_mobilefacenet"],
}


def held_out_photos(count: int, seed: int) -> list[Path]:
    """Up to ``count`` raw photos of identities never used for fitting, drawn reproducibly."""
    identities = FaceFolder(SHARED / "faces").identities
    held_out = split_identities(identities, 0.5, random_state=0)[1]
    photos = sorted(path for identity in held_out for path in (SHARED / "photos" / identity).glob("*.jpg"))
    return sorted(random.Random(seed).sample(photos, min(count, len(photos))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=30)
    parser.add_argument("--sets", nargs="+", default=list(SURROGATE_SETS), choices=list(SURROGATE_SETS))
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    models = {"insightface_mbf": (load_face_model("insightface_mbf"), INSIGHTFACE_MBF_THRESHOLD),
              "sface": (load_face_model("sface"), SFACE_THRESHOLD),
              "foamliu_mobilefacenet": (load_face_model("foamliu_mobilefacenet", FOAMLIU_WEIGHTS), FOAMLIU_THRESHOLD)}
    judges = [ModelJudge(name, model, threshold) for name, (model, threshold) in models.items()] + [DlibJudge()]
    attack = default_cloak(model=models["insightface_mbf"][0])
    photos = held_out_photos(args.photos, args.seed)
    print(f"{len(photos)} held-out photos, JPEG q{args.quality}, torch threads {args.threads}, "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    names = [judge.name for judge in judges]
    print(f"| surrogates | faces | {' | '.join(names)} | face-box SSIM | s / face | load |")
    print("|---|---|" + "---|" * len(names) + "---|---|---|")
    for set_name in args.sets:
        surrogates = [models[name] for name in SURROGATE_SETS[set_name]]
        cloak = PhotoCloak(attack, surrogates=surrogates, judges=judges, num_threads=args.threads)
        seconds = 0.0
        cloak_photo = cloak.cloak

        def timed(image, _cloak=cloak_photo):
            nonlocal seconds
            started = time.perf_counter()
            result = _cloak(image)
            seconds += time.perf_counter() - started
            return result

        cloak.cloak = timed
        with tempfile.TemporaryDirectory() as folder:
            rows = cloak.cloak_files(photos, folder, file_format="jpeg", quality=args.quality)
        summary = summarise(rows)
        cells = []
        for name in names:
            star = "*" if name in SURROGATE_SETS[set_name] else ""
            cells.append(f"{summary[f'protection_rate_{name}']:.3f}{star}")
        print(f"| {set_name} | {summary['faces']} | {' | '.join(cells)} | {summary['mean_ssim_face']:.3f} | "
              f"{seconds / max(summary['faces'], 1):.2f} | {os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
