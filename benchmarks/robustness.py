"""Does a perturbation survive the way photos travel? Held-out fooling rate after saving and resizing.

Fits ``UAPAttack`` on the faces of one half of the identities in
``../shared/assets/faces`` (threshold calibrated on pairs of those identities),
once without and once with robust fitting (``augment="photo"``,
:mod:`krtfuap.augment`), under the same ``--max-time``. Then sends each
held-out cloaked face (identities never used for fitting) through a real
photo pipeline with Pillow and scores what comes out:

* ``float``: the cloaked face as fitted, no pipeline;
* ``PNG``: rounded to 8 bits;
* ``JPEG q95`` / ``q85`` / ``q75``: saved as JPEG by Pillow (4:2:0) and decoded;
* ``scale 0.75`` / ``scale 0.5``: the 8-bit face resized by Pillow to that
  side scale and back to 112x112 (bilinear; Pillow filters when shrinking).

For each pipeline ``T`` the fooling rate is the share of held-out faces with
``cos(F(T(x + v)), F(x)) < t``: the recogniser compares the photo that
travelled with the clean original. SSIM is that of ``T(x + v)`` against
``T(x)``, the clean face through the same pipeline (what the cloak changes in
the photo that arrives). The ``no cloak`` row gives the share of clean faces
``T(x)`` that the pipeline alone pushes below the threshold.

``photo JPEG q85`` is the full round trip on the raw, unaligned LFW photos of
held-out identities (``../shared/assets/photos``, ``--photos`` of them): every face
the detector finds is cloaked in the photo (:class:`krtfuap.apps.cloak.PhotoCloak`:
the perturbation warped back onto the photo's pixel grid), the photo is saved as
JPEG q85, read back, detected and aligned again, and compared with the same face
of the original photo; FR is the share of faces ``protected``, SSIM that of the
face's box in the photo. Before the table the script prints how large those faces
are in their photos (photo pixels per template pixel; below 1 the paste shrinks the
perturbation and re-alignment enlarges it back).

``--refine-steps N`` adds ``photo JPEG q85 refined N``: the same round trip with a
perturbation made for each face of each photo first (``PhotoCloak(refine_steps=N)``,
:func:`krtfuap.refine.refine_on_photo`, against the attack's model), from zero (the
default) or, with ``--refine-from cloak``, from the scored perturbation (on the ``no
cloak`` row that is zero too); ``--refine-luminance`` learns one change for R, G and B.
``--judges NAME ...`` adds, per judge, the refined photos judged by that other
recogniser (threshold calibrated the same way): a black-box check of the refinement.

``--attacks FILE ...`` scores saved attacks (e.g. the ready cloak and its
counterpart fitted without ``augment``, from ``examples/fit_default_cloak.py``)
instead of fitting; their threshold is the one calibrated here.

Example (2-core CPU)::

    python benchmarks/robustness.py --models insightface_mbf --max-time 600 --target-ssim 0.93 --threads 2
    python benchmarks/robustness.py --attacks cloak_photo.safetensors cloak_none.safetensors --threads 1
    python benchmarks/robustness.py --attacks ../krtfuap/data/default_cloak.safetensors --refine-steps 30 \
        --refine-from cloak --judges foamliu_mobilefacenet --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from _common import SHARED, calibrated_threshold, held_out_split, load_model
from PIL import Image

from krtfuap.alignment import SCRFDDetector, detect_faces
from krtfuap.apps.cloak import PhotoCloak, read_photo, summarise
from krtfuap.attack import UAPAttack
from krtfuap.metrics import embed
from krtfuap.photo_face import face_to_photo_matrix
from krtfuap.scoring import PerturbationScore, score_adversarial

Pipeline = Callable[[Image.Image], Image.Image]


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def _jpeg(quality: int) -> Pipeline:
    def save_and_load(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")

    return save_and_load


def _scale(factor: float) -> Pipeline:
    def down_and_up(image: Image.Image) -> Image.Image:
        width, height = image.size
        small = image.resize((round(width * factor), round(height * factor)), Image.BILINEAR)
        return small.resize((width, height), Image.BILINEAR)

    return down_and_up


#: Name -> pipeline on an 8-bit Pillow image (``None``: the float tensor itself).
PIPELINES: dict[str, Pipeline | None] = {
    "float": None,
    "PNG": lambda image: image,
    "JPEG q95": _jpeg(95),
    "JPEG q85": _jpeg(85),
    "JPEG q75": _jpeg(75),
    "scale 0.75": _scale(0.75),
    "scale 0.5": _scale(0.5),
}


def travel(images: torch.Tensor, pipeline: Pipeline | None) -> torch.Tensor:
    """``(N, 3, H, W)`` faces in ``[0, 1]`` after ``pipeline`` (8-bit Pillow images in between)."""
    if pipeline is None:
        return images
    return torch.stack([_from_pil(pipeline(_to_pil(image))) for image in images])


def score_pipelines(
    model: torch.nn.Module, faces: torch.Tensor, perturbation: torch.Tensor, threshold: float, batch_size: int = 100
) -> dict[str, dict[str, float]]:
    """Per pipeline: fooling rate, mean similarity, SSIM, PSNR of ``T(x + v)`` (see the module docstring)."""
    clean_embeddings = embed(model, faces, batch_size)
    cloaked = (faces + perturbation).clamp(0.0, 1.0)
    scores = {}
    for name, pipeline in PIPELINES.items():
        meter = PerturbationScore(threshold)
        for start in range(0, len(faces), batch_size):
            chunk = slice(start, start + batch_size)
            arrived_clean, arrived = travel(faces[chunk], pipeline), travel(cloaked[chunk], pipeline)
            # Similarity of T(x + v) with the clean original F(x); SSIM and PSNR against T(x).
            meter.update(score_adversarial(model, arrived_clean, arrived, clean_embeddings=clean_embeddings[chunk]))
        scores[name] = meter.compute()
    return scores


class _FixedPerturbation:
    """What :class:`PhotoCloak` needs of an attack: a perturbation, its budget, a model and threshold."""

    def __init__(self, perturbation: torch.Tensor, epsilon: float, model: torch.nn.Module, threshold: float) -> None:
        self.perturbation_, self.epsilon, self.model, self.threshold_ = perturbation, epsilon, model, threshold


def held_out_photos(test_identities: list[str], count: int, seed: int) -> list[Path]:
    """Up to ``count`` raw LFW photos of the held-out identities, drawn reproducibly."""
    folder = SHARED / "photos"
    photos = sorted(p for identity in test_identities for p in (folder / identity).glob("*.jpg"))
    return sorted(random.Random(seed).sample(photos, min(count, len(photos))))


def face_scales(photos: list[Path], detector: SCRFDDetector) -> np.ndarray:
    """Per face found in ``photos``: photo pixels per aligned-template pixel (below 1: smaller than the template).

    Decoded and detected as :class:`PhotoCloak` does (``read_photo``, ``detect_faces`` with its defaults),
    so these are the faces the photo round trip cloaks.
    """
    scales = []
    for path in photos:
        image, _ = read_photo(path)
        for keypoints in detect_faces(image, detector)[2]:
            scales.append(math.sqrt(abs(np.linalg.det(face_to_photo_matrix(keypoints)[:, :2]))))
    return np.asarray(scales)


def photo_round_trip(
    perturbation: torch.Tensor, model: torch.nn.Module, threshold: float, photos: list[Path],
    detector: SCRFDDetector, quality: int = 85, refine_steps: int = 0, refine_from: str = "zero",
    refine_colour: bool = True, judges: dict[str, tuple[torch.nn.Module, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Cloak whole photos, save as JPEG, re-detect and re-align; protected share and face-box SSIM.

    Returns one score under ``"model"`` (the attack's own) and one per judge, all on the same written photos.
    """
    cloak = PhotoCloak(_FixedPerturbation(perturbation, 0.08, model, threshold), detector, refine_steps=refine_steps,
                       refine_from=refine_from, refine_colour=refine_colour)
    scores = {}
    with tempfile.TemporaryDirectory() as folder:
        rows = cloak.cloak_files(photos, folder, file_format="jpeg", quality=quality)
        scores["model"] = _photo_scores(summarise(rows))
        for name, (judge, judge_threshold) in (judges or {}).items():
            referee = PhotoCloak(cloak.attack, detector, model=judge, threshold=judge_threshold, refine_steps=0)
            judged = []
            for row in (row for row in rows if row.status == "cloaked" and row.face == 0):
                original, written = read_photo(row.photo)[0], read_photo(row.output)[0]
                faces = referee.detect(original)
                judged += [replace(row, face=index, **check)
                           for index, check in enumerate(referee.verify(original, written, faces))]
            scores[name] = _photo_scores(summarise(judged))
    return scores


def _photo_scores(summary: dict[str, float]) -> dict[str, float]:
    return {"fooling_rate": summary["protection_rate"], "ssim": summary["mean_ssim_face"], "faces": summary["faces"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["insightface_mbf"])
    parser.add_argument("--augments", nargs="+", default=["none", "photo"], choices=["none", "photo"],
                        help="fit once per value: UAPAttack(augment=None) and/or augment='photo'")
    parser.add_argument("--max-time", type=float, default=600.0, help="seconds of fitting per fit (0: none)")
    parser.add_argument("--max-epochs", type=int, default=10_000)
    parser.add_argument("--fit-faces", type=int, default=600)
    parser.add_argument("--test-faces", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=600, help="fitting-identity pairs that calibrate t")
    parser.add_argument("--target-ssim", type=float, default=0.93, help="UAPAttack(target_ssim=...); 0: none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--photos", type=int, default=150, help="held-out raw photos for the round trip (0: none)")
    parser.add_argument("--attacks", type=Path, nargs="+", default=None,
                        help="score these saved attacks instead of fitting (--augments is then ignored)")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="add the photo round trip with PhotoCloak(refine_steps=N) (0: not)")
    parser.add_argument("--refine-from", choices=("zero", "cloak"), default="zero",
                        help="PhotoCloak(refine_from=...): start from zero or from the scored perturbation")
    parser.add_argument("--refine-luminance", action="store_true", help="PhotoCloak(refine_colour=False)")
    parser.add_argument("--judges", nargs="+", default=[], help="other models that judge the refined photos")
    parser.add_argument("--json", type=Path, default=None, help="write every score here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    split = held_out_split(args.fit_faces, args.test_faces, args.pairs, args.seed)
    print(f"fit: {len(split.fit_faces)} faces of {len(split.fit_identities)} identities; held-out: "
          f"{len(split.test_faces)} faces of {len(split.test_identities)} other identities; "
          f"epsilon {UAPAttack(None).epsilon:g} (the defaults'); "
          f"target_ssim {args.target_ssim or None}; max_time {args.max_time:.0f} s; torch threads "
          f"{torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}\n")
    refined = f"photo JPEG q85 refined {args.refine_steps}"
    names = list(PIPELINES) + (["photo JPEG q85"] if args.photos else [])
    if args.photos and args.refine_steps:
        names += [refined] + [f"{refined}, judged by {judge}" for judge in args.judges]
    photos = held_out_photos(split.test_identities, args.photos, args.seed)
    detector = SCRFDDetector()
    if photos:
        scales = face_scales(photos, detector)
        quartiles = " / ".join(f"{q:.2f}" for q in np.percentile(scales, [25, 50, 75]))
        print(f"photos: {len(photos)}, {len(scales)} faces; photo pixels per template pixel, quartiles "
              f"{quartiles} (the paste shrinks the perturbation by this, re-alignment enlarges it back)\n")

    judges = {}
    for judge in args.judges if args.refine_steps else []:
        judge_model = load_model(judge)
        judges[judge] = (judge_model, calibrated_threshold(judge_model, split.calibration))
        print(f"judge {judge}: threshold {judges[judge][1]:.4f}")

    def score(model: torch.nn.Module, perturbation: torch.Tensor, threshold: float) -> dict[str, dict[str, float]]:
        scores = score_pipelines(model, split.test_faces, perturbation, threshold)
        if photos:
            scores["photo JPEG q85"] = photo_round_trip(perturbation, model, threshold, photos, detector)["model"]
        if photos and args.refine_steps:
            found = photo_round_trip(perturbation, model, threshold, photos, detector,
                                     refine_steps=args.refine_steps, refine_from=args.refine_from,
                                     refine_colour=not args.refine_luminance, judges=judges)
            scores[refined] = found.pop("model")
            scores.update({f"{refined}, judged by {name}": value for name, value in found.items()})
        return scores

    print(f"| model | t | fit | steps | fit s | {' | '.join(f'{name}: FR / SSIM' for name in names)} |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    runs = []

    def report(model_name: str, threshold: float, label: str, steps: int | None, seconds: float | None,
               scores: dict[str, dict[str, float]]) -> None:
        cells = " | ".join(f"{scores[name]['fooling_rate']:.3f} / {scores[name]['ssim']:.4f}" for name in names)
        fit = f"{steps} | {seconds:.0f}" if steps is not None else "- | -"
        print(f"| {model_name} | {threshold:.3f} | {label} | {fit} | {cells} |", flush=True)
        runs.append({"model": model_name, "threshold": threshold, "fit": label, "steps": steps,
                     "seconds": seconds, "scores": scores})

    for model_name in args.models:
        model = load_model(model_name)
        threshold = calibrated_threshold(model, split.calibration)
        zero = torch.zeros(split.test_faces.shape[1:])
        report(model_name, threshold, "no cloak", None, None, score(model, zero, threshold))
        for path in args.attacks or []:
            attack = UAPAttack.load(path, model=model)
            report(model_name, threshold, path.stem, attack.n_iter_, attack.fit_time_, score(model, attack.perturbation_, threshold))
        for augment in [] if args.attacks else args.augments:
            attack = UAPAttack(
                model, threshold=threshold, target_ssim=args.target_ssim or None,
                augment=None if augment == "none" else augment, max_time=args.max_time or None,
                max_epochs=args.max_epochs, target_fooling_rate=1.0, random_state=args.seed,
            )
            started = time.perf_counter()
            attack.fit(split.fit_faces)
            seconds = time.perf_counter() - started
            scores = score(model, attack.perturbation_, threshold)
            report(model_name, threshold, f"augment={augment}", attack.n_iter_, seconds, scores)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
