"""Shared fixtures: where the real models and faces live (``../shared/assets``)."""

from __future__ import annotations

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
