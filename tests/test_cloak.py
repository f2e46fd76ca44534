"""Photo cloaking (krtfuap/apps/cloak.py): faces found, only faces changed, files safe, bad input reported."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TinyEmbedder
from PIL import Image

from krtfuap.alignment import sample_photos
from krtfuap.apps.cloak import PhotoCloak, plan_outputs, read_photo, summarise, write_report
from krtfuap.baselines import RandomNoiseUAP
from krtfuap.paste import face_to_photo_matrix


@pytest.fixture(scope="module")
def noise_attack() -> RandomNoiseUAP:
    """A fitted attack with a fake model: enough to test the plumbing, not the protection."""
    return RandomNoiseUAP(TinyEmbedder(), threshold=0.999, random_state=0).fit(torch.rand(4, 3, 112, 112))


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    return {path.name: path for path in sample_photos()}


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
    with pytest.raises(ValueError, match="refine_from must be"):
        PhotoCloak(default_cloak(model=None), detector, refine_steps=0, refine_from="noise")
    with pytest.raises(ValueError, match="target_ssim must be"):
        PhotoCloak(default_cloak(model=None), detector, refine_steps=0, target_ssim=0.0)
    PhotoCloak(default_cloak(model=None), detector, refine_steps=0)  # pasting alone needs no model
