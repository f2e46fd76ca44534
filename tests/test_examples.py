"""The example scripts run end to end (real model, real faces) on a tiny subset."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from krtfuap.attack import UAPAttack

REPO = Path(__file__).resolve().parents[1]
N_IDENTITIES, IMAGES_PER_IDENTITY = 8, 3


def _tiny_face_folder(faces: Path, root: Path) -> Path:
    """Copy a few identities of ``faces`` to ``root`` with a small ``pairs.csv``.

    The full ``pairs.csv`` has ~13k pairs; the example calibrates its threshold on up
    to 1000 of them, which alone takes minutes on a CPU. Here every within-identity
    pair is genuine and one pair per two identities is an impostor pair, so both
    halves of the identity split have genuine and impostor pairs.
    """
    identities = sorted(p for p in faces.iterdir() if p.is_dir())[:N_IDENTITIES]
    images: dict[str, list[str]] = {}
    for folder in identities:
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:IMAGES_PER_IDENTITY]:
            shutil.copyfile(image, root / folder.name / image.name)
            images.setdefault(folder.name, []).append(f"{folder.name}/{image.name}")
    rows = [(a, b, 1) for paths in images.values() for a, b in itertools.combinations(paths, 2)]
    rows += [(images[x][0], images[y][0], 0) for x, y in itertools.combinations(sorted(images), 2)]
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path_a", "path_b", "same"])
        writer.writerows(rows)
    return root


@pytest.mark.real
def test_fit_on_lfw_example_runs_and_saves_a_loadable_attack(shared_assets, tmp_path):
    pytest.importorskip("onnx2torch", reason="the example loads InsightFace w600k_mbf through onnx2torch")
    try:
        from krtfuap.models import insightface_model_path

        insightface_model_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(f"InsightFace w600k_mbf is unavailable: {error}")

    faces = _tiny_face_folder(shared_assets / "faces", tmp_path / "faces")
    output = tmp_path / "out" / "cloak.safetensors"
    output.parent.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "fit_on_lfw.py"), str(faces),
         "--max-faces", "8", "--max-time", "5", "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"example failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert f"saved {output}" in result.stdout
    assert "held-out identities:" in result.stdout

    attack = UAPAttack.load(output)
    assert attack.perturbation_.shape == (3, 112, 112)
    assert attack.perturbation_.abs().max() <= attack.epsilon + 1e-6
    assert attack.n_iter_ >= 1 and len(attack.history_) == attack.n_iter_
    assert attack.stop_reason_ in {"max_time", "target_fooling_rate", "max_epochs"}
    assert -1.0 <= attack.threshold_ <= 1.0
    faces_batch = torch.rand(2, 3, 112, 112)
    out = attack.transform(faces_batch)
    assert out.shape == faces_batch.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.real
def test_fit_distributed_example_runs_under_torchrun_with_two_processes(shared_assets, tmp_path):
    pytest.importorskip("onnx2torch", reason="the example loads InsightFace w600k_mbf through onnx2torch")
    try:
        from krtfuap.models import insightface_model_path

        insightface_model_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(f"InsightFace w600k_mbf is unavailable: {error}")

    faces = _tiny_face_folder(shared_assets / "faces", tmp_path / "faces")
    output = tmp_path / "cloak.safetensors"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "examples" / "fit_distributed.py"), str(faces), "--max-faces", "8", "--batch-size", "2",
         "--max-epochs", "1", "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"example failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert "2 process(es), global batch 4" in result.stdout
    assert result.stdout.count("held-out identities:") == 1  # rank 0 only
    attack = UAPAttack.load(output)
    assert attack.n_epochs_ == 1 and attack.n_iter_ == len(attack.history_) >= 1
    assert attack.perturbation_.abs().max() <= attack.epsilon + 1e-6
