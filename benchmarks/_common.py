"""What the benchmark scripts share: the shared assets, the held-out split of LFW and the models.

A universal perturbation is judged on people it never saw: the identities of
``../shared/assets/faces`` are split in two halves, one to fit on (and to
calibrate the verification threshold on its genuine/impostor pairs), the other
to judge on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities
from krtfuap.metrics import calibrate_threshold, pair_similarities
from krtfuap.models import load_face_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"


def sample(dataset: FaceFolder, count: int, seed: int) -> torch.Tensor:
    """``count`` faces of ``dataset`` drawn without replacement, as one ``(N, 3, H, W)`` tensor."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([dataset[int(i)][0] for i in order])


@dataclass
class HeldOutSplit:
    """Fitting and held-out faces of disjoint identities, and pairs of the fitting identities."""

    fit_faces: torch.Tensor
    test_faces: torch.Tensor
    calibration: DataLoader
    fit_identities: list[str]
    test_identities: list[str]


def held_out_split(fit_count: int, test_count: int, pair_count: int, seed: int) -> HeldOutSplit:
    """Split the shared LFW faces by identity (half and half) and sample faces from each half.

    Parameters
    ----------
    fit_count, test_count : int
        Faces drawn from the fitting and the held-out identities.
    pair_count : int
        Pairs of the fitting identities (shuffled with ``seed``) that calibrate the threshold.
    seed : int
        Seeds the split (``split_identities(..., 0.5, random_state=seed)``) and the draws.
    """
    faces = SHARED / "faces"
    if not faces.is_dir():
        raise SystemExit(f"{faces} not found: this benchmark needs the shared LFW faces.")
    fit_ids, test_ids = split_identities(FaceFolder(faces).identities, 0.5, random_state=seed)
    fit_faces = sample(FaceFolder(faces, identities=fit_ids), fit_count, seed)
    test_faces = sample(FaceFolder(faces, identities=test_ids), test_count, seed + 1)
    pairs = filter_pairs(read_pairs(faces / "pairs.csv"), fit_ids)
    random.Random(seed).shuffle(pairs)
    calibration = DataLoader(PairDataset(pairs[:pair_count], faces), batch_size=100)
    return HeldOutSplit(fit_faces, test_faces, calibration, list(fit_ids), list(test_ids))


def load_model(name: str) -> nn.Module:
    """A face model of :data:`krtfuap.models.FACE_MODEL_NAMES` whose weights exist offline."""
    path = SHARED / "models" / "foamliu_mobilefacenet_128d.pt" if name == "foamliu_mobilefacenet" else None
    return load_face_model(name, path)


def calibrated_threshold(model: nn.Module, calibration: DataLoader) -> float:
    """The best-accuracy threshold of ``model`` on the ``calibration`` pairs."""
    threshold, _ = calibrate_threshold(*pair_similarities(model, calibration))
    return threshold
