"""The example scripts run end to end (real model, real faces) on a tiny subset.

Each example runs as a subprocess, as a user would run it; the tests check what it
wrote and printed, not only its exit status.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import TinyEmbedder, random_faces
from PIL import Image
from processes import TIMEOUT_S
from torch.utils.data import DataLoader

from krtfuap.attack import UAPAttack
from krtfuap.datasets import FaceFolder, PairDataset, filter_pairs, load_image, read_pairs, split_identities
from krtfuap.metrics import calibrate_threshold, pair_similarities

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


def _run_example(script: str, *args: object, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` with this checkout on the path; by default require exit status 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / script), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    if check:
        assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _is_share_of(rate: float, count: int) -> bool:
    """Whether ``rate``, printed with 3 decimals, is ``k / count`` for a whole ``k``."""
    return abs(rate * count - round(rate * count)) <= 0.0005 * count


def _require_insightface() -> None:
    pytest.importorskip("onnx2torch", reason="the examples load InsightFace w600k_mbf through onnx2torch")
    try:
        from krtfuap.models import insightface_model_path

        insightface_model_path()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(f"InsightFace w600k_mbf is unavailable: {error}")


@pytest.fixture(scope="module")
def tiny_faces(shared_assets, tmp_path_factory) -> Path:
    """8 identities x 3 real aligned faces with their own ``pairs.csv``."""
    return _tiny_face_folder(shared_assets / "faces", tmp_path_factory.mktemp("data") / "faces")


@pytest.fixture(scope="module")
def fitted(tiny_faces, tmp_path_factory) -> tuple[Path, str]:
    """Run ``fit_and_save.py`` once on the tiny folder: (saved file, stdout)."""
    _require_insightface()
    output = tmp_path_factory.mktemp("fit") / "out" / "cloak.safetensors"
    result = _run_example("fit_and_save.py", "--faces", tiny_faces, "--max-faces", 8, "--max-epochs", 2,
                          "--output", output, cwd=output.parent.parent)
    return output, result.stdout


def _tiny_attack_file(path: Path, size: int = 112) -> UAPAttack:
    """Fit and save an attack against a tiny random model on random faces (no real assets needed)."""
    attack = UAPAttack(TinyEmbedder(), threshold=0.5, stealth_loss=None, max_epochs=1, init_scale=1.0, random_state=0)
    attack.fit(random_faces(4, size=size))
    attack.save(path)
    return attack


def _photo_folder(root: Path, names: tuple[str, ...] = ("alice/a.png", "alice/b.jpg", "bob/c.png")) -> Path:
    """Random 112x112 photos at ``names`` under ``root``."""
    generator = torch.Generator().manual_seed(1)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        array = (torch.rand(112, 112, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(root / name)
    return root


@pytest.mark.real
def test_fit_on_lfw_example_runs_and_saves_a_loadable_attack(shared_assets, tiny_faces, tmp_path):
    _require_insightface()
    output = tmp_path / "out" / "cloak.safetensors"
    output.parent.mkdir()
    result = _run_example("fit_on_lfw.py", tiny_faces, "--max-faces", 8, "--max-time", 5, "--output", output,
                          cwd=tmp_path)
    assert f"saved {output}" in result.stdout
    assert "held-out identities:" in result.stdout

    attack = UAPAttack.load(output)
    assert attack.perturbation_.shape == (3, 112, 112)
    assert attack.perturbation_.abs().max() <= attack.epsilon + 1e-6
    assert attack.n_iter_ >= 1 and len(attack.history_) == attack.n_iter_
    assert attack.stop_reason_ in {"max_time", "target_fooling_rate", "max_epochs"}
    # The threshold is the best-accuracy one on the pairs of the fitting identities, as the example says.
    from krtfuap.models import load_insightface_mbf

    fit_identities, _ = split_identities(FaceFolder(tiny_faces).identities, 0.5, random_state=0)
    fit_pairs = filter_pairs(read_pairs(tiny_faces / "pairs.csv"), fit_identities)
    loader = DataLoader(PairDataset(fit_pairs, tiny_faces), batch_size=64)
    similarities, same = pair_similarities(load_insightface_mbf(), loader)
    assert attack.threshold_ == pytest.approx(calibrate_threshold(similarities, same)[0], abs=1e-5)
    assert f"threshold {attack.threshold_:.3f};" in result.stdout
    faces_batch = random_faces(2, size=112)
    assert torch.equal(attack.transform(faces_batch), (faces_batch + attack.perturbation_).clamp(0, 1))


@pytest.mark.real
def test_fit_and_save_fits_on_the_fitting_identities_and_saves(fitted):
    output, stdout = fitted
    attack = UAPAttack.load(output)
    match = re.search(r"fitted on (\d+) faces of (\d+) identities: (\d+) steps, stopped by (\w+)", stdout)
    assert match, stdout
    n_faces, n_people, steps, reason = int(match[1]), int(match[2]), int(match[3]), match[4]
    assert n_faces == 8 and n_people == 3  # the first 8 faces of fitting identities with 3 faces each
    assert steps == attack.n_iter_ and reason == attack.stop_reason_ and attack.n_epochs_ <= 2
    assert f"saved {output}" in stdout
    assert attack.perturbation_.shape == (3, 112, 112)
    assert attack.perturbation_.abs().max() <= 0.16 + 1e-6 and attack.epsilon == 0.16  # the example's default
    assert attack.threshold_ == pytest.approx(0.202)


def test_fit_and_save_says_when_the_faces_are_missing(tmp_path):
    result = _run_example("fit_and_save.py", "--faces", tmp_path / "absent", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "faces folder not found" in result.stderr and "--faces" in result.stderr


def test_apply_to_folder_writes_cloaked_pngs_and_keeps_the_inputs(tmp_path):
    attack = _tiny_attack_file(tmp_path / "cloak.safetensors")
    photos = _photo_folder(tmp_path / "photos")
    before = {path: path.read_bytes() for path in photos.rglob("*") if path.is_file()}

    result = _run_example("apply_to_folder.py", tmp_path / "cloak.safetensors", photos, tmp_path / "cloaked",
                          cwd=tmp_path)
    assert re.search(r"wrote 3 cloaked images to .*cloaked \(mean SSIM 0\.\d+, PSNR \d+\.\d+ dB\)", result.stdout)
    written = sorted(p.relative_to(tmp_path / "cloaked").as_posix() for p in (tmp_path / "cloaked").rglob("*.png"))
    assert written == ["alice/a.png", "alice/b.png", "bob/c.png"]
    clean = load_image(photos / "alice" / "b.jpg")
    cloaked = load_image(tmp_path / "cloaked" / "alice" / "b.png")
    expected = attack.transform(clean[None])[0]
    assert (cloaked - expected).abs().max() <= 0.5 / 255 + 1e-6  # only 8-bit rounding
    assert (cloaked - clean).abs().max() > 0.01
    assert before == {path: path.read_bytes() for path in photos.rglob("*") if path.is_file()}

    for output in (photos, photos / "alice" / "out", tmp_path):
        refused = _run_example("apply_to_folder.py", tmp_path / "cloak.safetensors", photos, output, cwd=tmp_path,
                               check=False)
        assert refused.returncode != 0 and "refusing to write" in refused.stderr
    assert before == {path: path.read_bytes() for path in photos.rglob("*") if path.is_file()}


def test_apply_to_folder_rejects_faces_of_another_size(tmp_path):
    _tiny_attack_file(tmp_path / "cloak.safetensors")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (100, 120)).save(tmp_path / "photos" / "big.png")
    result = _run_example("apply_to_folder.py", tmp_path / "cloak.safetensors", tmp_path / "photos",
                          tmp_path / "cloaked", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "100x120 pixels" in result.stderr
    assert not (tmp_path / "cloaked").exists() or not list((tmp_path / "cloaked").rglob("*.png"))


def test_apply_to_folder_checks_every_image_before_writing_any(tmp_path):
    _tiny_attack_file(tmp_path / "cloak.safetensors")
    photos = _photo_folder(tmp_path / "photos", ("alice/a.png", "alice/b.jpg", "bob/c.png", "bob/z_cut.jpg"))
    cut = photos / "bob" / "z_cut.jpg"  # read last: the good images come first
    cut.write_bytes(cut.read_bytes()[:1500])
    result = _run_example("apply_to_folder.py", tmp_path / "cloak.safetensors", photos, tmp_path / "cloaked",
                          cwd=tmp_path, check=False)
    assert result.returncode == 1
    error = result.stderr.strip()
    assert "\n" not in error and str(cut) in error and "truncated" in error and "Nothing was written" in error
    assert not (tmp_path / "cloaked").exists()


def test_apply_to_folder_never_leaves_a_half_written_image(tmp_path):
    _tiny_attack_file(tmp_path / "cloak.safetensors")
    photos = _photo_folder(tmp_path / "photos")
    blocked = tmp_path / "cloaked" / "alice" / "b.png"
    blocked.mkdir(parents=True)  # a folder where the second PNG should go: its rename fails
    result = _run_example("apply_to_folder.py", tmp_path / "cloak.safetensors", photos, tmp_path / "cloaked",
                          cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert f"cannot write {blocked}" in result.stderr and "the 1 cloaked images written before it" in result.stderr
    files = sorted(p.relative_to(tmp_path / "cloaked").as_posix() for p in (tmp_path / "cloaked").rglob("*")
                   if p.is_file())
    assert files == ["alice/a.png"]  # complete, and no .partial file left behind
    assert load_image(tmp_path / "cloaked" / "alice" / "a.png").shape == (3, 112, 112)


@pytest.mark.real
def test_evaluate_pairs_reports_clean_and_cloaked_accuracy_and_fooling_rate(fitted, tiny_faces, tmp_path):
    output, _ = fitted
    result = _run_example("evaluate_pairs.py", output, "--faces", tiny_faces, "--max-pairs", 12, cwd=tmp_path)
    stdout = result.stdout
    # 4 held-out identities x 3 faces: 12 genuine pairs and 6 impostor pairs, 6 + 6 kept.
    assert "pairs: 12 (6 genuine, 6 impostor) of the heldout identities; threshold 0.202" in stdout, stdout
    rows = {}
    for name in ("clean", "first cloaked"):
        match = re.search(rf"^{name} +\| +([\d.]+) \| +([\d.]+) \| +([\d.]+)$", stdout, flags=re.MULTILINE)
        assert match, stdout
        rows[name] = [float(value) for value in match.groups()]
        accuracy, matched, rejected = rows[name]
        assert _is_share_of(matched, 6) and _is_share_of(rejected, 6)
        assert accuracy == pytest.approx((matched + rejected) / 2, abs=1e-3)  # 6 genuine, 6 impostor
    assert rows["clean"][0] >= 0.9  # a real ArcFace model on real LFW pairs
    match = re.search(r"fooling rate on (\d+) photos: ([\d.]+)", stdout)
    assert match and 2 <= int(match[1]) <= 12  # distinct photos of the 4 held-out identities
    assert _is_share_of(float(match[2]), int(match[1]))


@pytest.mark.real
def test_custom_model_wraps_a_backbone_calibrates_and_fits(shared_assets, tiny_faces, tmp_path):
    weights = shared_assets / "models" / "foamliu_mobilefacenet_128d.pt"
    if not weights.is_file():
        pytest.skip(f"foamliu MobileFaceNet weights not found at {weights}")
    output = tmp_path / "custom.safetensors"
    result = _run_example("custom_model.py", "--faces", tiny_faces, "--weights", weights, "--max-faces", 8,
                          "--max-pairs", 40, "--max-epochs", 2, "--output", output, cwd=tmp_path)
    stdout = result.stdout
    assert "model: (B, 3, H, W) in [0, 1] -> (2, 128)" in stdout
    # 4 fitting identities x 3 faces: 12 genuine and 6 impostor pairs, all kept.
    match = re.search(r"threshold (-?[\d.]+), calibrated on 18 pairs of fitting identities", stdout)
    assert match, stdout
    attack = UAPAttack.load(output)
    assert attack.threshold_ == pytest.approx(float(match[1]), abs=5e-4)
    assert re.search(rf"fitted on 8 faces: {attack.n_iter_} steps, stopped by {attack.stop_reason_}", stdout)
    match = re.search(r"held-out identities \((\d+) faces\): fooling rate ([\d.]+), SSIM ([\d.]+), PSNR ([\d.]+)",
                      stdout)
    assert match and int(match[1]) == 8 and _is_share_of(float(match[2]), 8)
    # The defaults' PSNR floor (min_psnr=30) holds every face at 30 dB or above, so their mean too.
    assert float(match[4]) >= 30 - 1e-3 and float(match[3]) < 1


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
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"example failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert "2 process(es), global batch 4" in result.stdout
    assert result.stdout.count("held-out identities:") == 1  # rank 0 only
    attack = UAPAttack.load(output)
    assert attack.n_epochs_ == 1 and attack.n_iter_ == len(attack.history_) >= 1
    assert attack.perturbation_.abs().max() <= attack.epsilon + 1e-6


@pytest.mark.parametrize(
    "script,arguments",
    [
        ("apply_to_folder.py", ["a.safetensors", "in", "out", "--max-images", "-1"]),
        ("fit_on_lfw.py", ["faces", "--max-faces", "0"]),
        ("fit_and_save.py", ["--max-time", "nan"]),
        ("fit_default_cloak.py", ["faces", "--max-steps", "0"]),
        ("fit_default_cloak.py", ["faces", "--lr-decay-steps", "-1"]),
    ],
)
def test_examples_refuse_counts_and_times_that_are_not_positive(script, arguments):
    result = subprocess.run([sys.executable, str(REPO / "examples" / script), *arguments],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2
    assert "must be positive" in result.stderr and "Traceback" not in result.stderr
