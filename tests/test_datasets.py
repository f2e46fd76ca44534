"""Tests for krtfuap.datasets: identity folders, identity splits and verification pairs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from krtfuap.datasets import (
    FaceFolder,
    PairDataset,
    filter_pairs,
    load_image,
    read_pairs,
    split_identities,
)


def _write_image(path: Path, value: int, size: tuple[int, int] = (8, 6)) -> np.ndarray:
    """Write an RGB image with a per-channel gradient; returns its (H, W, 3) uint8 pixels."""
    height, width = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = value
    pixels[..., 1] = np.arange(width, dtype=np.uint8)[None, :] * 10
    pixels[..., 2] = np.arange(height, dtype=np.uint8)[:, None] * 20
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def face_root(tmp_path: Path) -> Path:
    """A tiny face folder: bob (2 PNG), alice (1 PNG), carol (1 JPG), plus things to ignore."""
    root = tmp_path / "faces"
    _write_image(root / "bob" / "bob_0002.png", 30)
    _write_image(root / "bob" / "bob_0001.png", 20)
    _write_image(root / "alice" / "alice_0001.png", 10)
    _write_image(root / "carol" / "carol_0001.JPG", 40)
    (root / "empty_person").mkdir()
    (root / ".cache").mkdir()
    _write_image(root / ".cache" / "hidden.png", 0)
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "pairs.csv").write_text("path_a,path_b,same\n")
    return root


def test_face_folder_labels_follow_sorted_identities(face_root: Path) -> None:
    dataset = FaceFolder(face_root)
    assert dataset.identities == ["alice", "bob", "carol"]
    assert dataset.all_identities == ["alice", "bob", "carol"]
    assert [(path.name, label) for path, label in dataset.samples] == [
        ("alice_0001.png", 0),
        ("bob_0001.png", 1),
        ("bob_0002.png", 1),
        ("carol_0001.JPG", 2),
    ]
    assert len(dataset) == 4


def test_face_folder_items_are_float_rgb_in_unit_range(face_root: Path) -> None:
    image, label = FaceFolder(face_root)[1]
    assert label == 1 and isinstance(label, int)
    assert image.shape == (3, 8, 6) and image.dtype == torch.float32
    expected = torch.from_numpy(np.array(Image.open(face_root / "bob" / "bob_0001.png"))).permute(2, 0, 1)
    torch.testing.assert_close(image, expected.float() / 255.0)  # PNG is lossless: exact pixels


def test_face_folder_subset_keeps_global_labels(face_root: Path) -> None:
    subset = FaceFolder(face_root, identities=["carol", "bob"])
    assert subset.identities == ["bob", "carol"]
    assert sorted({label for _, label in subset.samples}) == [1, 2]
    other = FaceFolder(face_root, identities=["carol"])
    assert other.samples == [s for s in subset.samples if s[1] == 2]


def test_face_folder_rejects_unknown_or_empty_identity(face_root: Path) -> None:
    with pytest.raises(ValueError, match="'dave'"):
        FaceFolder(face_root, identities=["alice", "dave"])
    with pytest.raises(ValueError, match="'empty_person'"):
        FaceFolder(face_root, identities=["empty_person"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        FaceFolder(face_root, identities="alice")


def test_face_folder_applies_transform(face_root: Path) -> None:
    dataset = FaceFolder(face_root, transform=lambda image: image[:, :4, :4] * 0.5)
    image, _ = dataset[0]
    assert image.shape == (3, 4, 4) and image.max() <= 0.5


def test_face_folder_batches_with_dataloader(face_root: Path) -> None:
    images, labels = next(iter(DataLoader(FaceFolder(face_root), batch_size=4)))
    assert images.shape == (4, 3, 8, 6)
    assert labels.tolist() == [0, 1, 1, 2]


def test_face_folder_corrupt_file_names_the_file(face_root: Path) -> None:
    bad = face_root / "bob" / "bob_0003.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    dataset = FaceFolder(face_root)
    index = [path for path, _ in dataset.samples].index(bad)
    with pytest.raises(ValueError, match="bob_0003.jpg"):
        dataset[index]


def test_face_folder_missing_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        FaceFolder(tmp_path / "nowhere")
    (tmp_path / "person").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images found"):
        FaceFolder(tmp_path)


def test_load_image_converts_grey_and_rgba_to_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((5, 7), 51, dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((5, 7, 4), 102, dtype=np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    for name, value in (("grey.png", 0.2), ("rgba.png", 0.4)):
        image = load_image(tmp_path / name)
        assert image.shape == (3, 5, 7)
        torch.testing.assert_close(image, torch.full((3, 5, 7), value))
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


@settings(max_examples=50, deadline=None)
@given(
    names=st.lists(st.text("abcdefghij_", min_size=1, max_size=8), min_size=2, max_size=40, unique=True),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_identities_is_deterministic_disjoint_and_complete(names: list[str], fraction: float, seed: int) -> None:
    fit_ids, heldout_ids = split_identities(names, fraction, random_state=seed)
    assert fit_ids and heldout_ids
    assert not set(fit_ids) & set(heldout_ids)
    assert sorted(fit_ids + heldout_ids) == sorted(names)
    assert split_identities(list(reversed(names)), fraction, random_state=seed) == (fit_ids, heldout_ids)


def test_split_identities_sizes_and_errors() -> None:
    names = [f"id{i:02d}" for i in range(10)]
    fit_ids, heldout_ids = split_identities(names, fraction=0.3)
    assert (len(fit_ids), len(heldout_ids)) == (3, 7)
    assert split_identities(names, random_state=1) != split_identities(names, random_state=2)
    with pytest.raises(ValueError, match="at least 2"):
        split_identities(["solo"])
    with pytest.raises(ValueError, match="repeated"):
        split_identities(["a", "a", "b"])
    with pytest.raises(ValueError, match="fraction"):
        split_identities(names, fraction=1.0)


def _write_pairs(path: Path, rows: list[list[str]], header: str = "path_a,path_b,same") -> Path:
    path.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return path


def test_read_pairs_and_filter(face_root: Path) -> None:
    rows = [
        ["bob/bob_0001.png", "bob/bob_0002.png", "1"],
        ["alice/alice_0001.png", "carol/carol_0001.JPG", "0"],
        ["bob/bob_0002.png", "alice/alice_0001.png", "false"],
    ]
    pairs = read_pairs(_write_pairs(face_root / "pairs.csv", rows))
    assert pairs == [
        ("bob/bob_0001.png", "bob/bob_0002.png", True),
        ("alice/alice_0001.png", "carol/carol_0001.JPG", False),
        ("bob/bob_0002.png", "alice/alice_0001.png", False),
    ]
    assert filter_pairs(pairs, ["bob"]) == pairs[:1]
    assert filter_pairs(pairs, {"alice", "bob"}) == [pairs[0], pairs[2]]
    assert filter_pairs(pairs, []) == []


def test_pair_dataset_batches(face_root: Path) -> None:
    rows = [["bob/bob_0001.png", "bob/bob_0002.png", "1"], ["alice/alice_0001.png", "carol/carol_0001.JPG", "0"]]
    csv_path = _write_pairs(face_root / "pairs.csv", rows)
    dataset = PairDataset(read_pairs(csv_path), root=csv_path.parent)
    img_a, img_b, same = next(iter(DataLoader(dataset, batch_size=2)))
    assert img_a.shape == img_b.shape == (2, 3, 8, 6)
    assert same.dtype == torch.bool and same.tolist() == [True, False]
    torch.testing.assert_close(img_a[1], load_image(face_root / "alice" / "alice_0001.png"))
    with pytest.raises(ValueError, match="pairs is empty"):
        PairDataset([], root=face_root)


def test_read_pairs_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="same"):
        read_pairs(_write_pairs(tmp_path / "a.csv", [["x/1.jpg", "y/2.jpg"]], header="path_a,path_b"))
    with pytest.raises(ValueError, match="line 3"):
        read_pairs(_write_pairs(tmp_path / "b.csv", [["x/1.jpg", "y/2.jpg", "1"], ["x/1.jpg", "y/2.jpg", "maybe"]]))
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(_write_pairs(tmp_path / "c.csv", []))


PAIRS_TEXT = "path_a,path_b,same\nJosé/José_0001.png,Zoë/Zoë_0002.png,0\nbob/1.png,bob/2.png,1\n"
PAIRS = [("José/José_0001.png", "Zoë/Zoë_0002.png", False), ("bob/1.png", "bob/2.png", True)]


def test_read_pairs_accepts_a_utf8_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(PAIRS_TEXT.encode("utf-8-sig"))  # as Excel's "CSV UTF-8" saves it
    assert read_pairs(path) == PAIRS
    path.write_bytes(PAIRS_TEXT.replace("\n", "\r\n").encode("utf-8-sig"))
    assert read_pairs(path) == PAIRS


def test_read_pairs_refuses_latin1_naming_the_byte_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(PAIRS_TEXT.encode("latin-1"))
    offset = PAIRS_TEXT.index("é")  # the header is ASCII, so characters and bytes line up until the first é
    with pytest.raises(ValueError) as error:
        read_pairs(path)
    message = str(error.value)
    assert str(path) in message and "not UTF-8" in message and "save it as UTF-8" in message
    assert f"b'\\xe9' at byte offset {offset} (line 2)" in message


def test_read_pairs_refuses_nul_bytes(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"path_a,path_b,same\nbob/1.png\x00,bob/2.png,1\n")
    with pytest.raises(ValueError, match=r"pairs.csv holds a NUL byte at byte offset 28 \(line 2\).*save it as UTF-8"):
        read_pairs(path)
    path.write_bytes(PAIRS_TEXT.encode("utf-16"))  # Windows' "Unicode text": a BOM, then a NUL after every ASCII byte
    with pytest.raises(ValueError, match=r"NUL byte at byte offset 3 \(line 1\).*UTF-16"):
        read_pairs(path)


@pytest.mark.real
def test_real_shared_faces(shared_assets: Path) -> None:
    root = shared_assets / "faces"
    dataset = FaceFolder(root)
    assert len(dataset) == 2407
    assert len(dataset.identities) == 407
    with (root / "manifest.csv").open(newline="") as handle:
        manifest = {row["path"]: int(row["label"]) for row in csv.DictReader(handle)}
    assert {path.relative_to(root).as_posix(): label for path, label in dataset.samples} == manifest
    image, _ = dataset[0]
    with Image.open(dataset.samples[0][0]) as decoded:
        expected = torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert image.shape == (3, 112, 112) and torch.equal(image, expected)

    pairs = read_pairs(root / "pairs.csv")
    assert len(pairs) == 12988 and sum(same for *_, same in pairs) == 6494
    fit_ids, heldout_ids = split_identities(dataset.identities)
    heldout_pairs = filter_pairs(pairs, heldout_ids)
    assert heldout_pairs and not filter_pairs(heldout_pairs, fit_ids)
    img_a, img_b, same = PairDataset(heldout_pairs, root)[0]
    assert img_a.shape == img_b.shape == (3, 112, 112) and same.dtype == torch.bool


# ------------------------------------------------------------- decoding edge cases
def test_sixteen_bit_grey_png_keeps_its_values(tmp_path):
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    assert image.shape == (3, 64, 64)
    assert image.mean().item() == pytest.approx(values.mean() / 65535, abs=1e-4)
    # Every pixel keeps its 16-bit value (not cut to 8 bits), in all three channels.
    expected = torch.from_numpy(values / 65535).float().expand(3, -1, -1)
    torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    image = load_image(path)
    assert image.shape == (3, 10, 20) and image[0].mean() > 0.9 and image[1].mean() < 0.1


# How a viewer shows the stored (H, W, 3) pixels for each EXIF orientation (tag 0x0112, EXIF 2.3).
SHOWN_AS = {
    1: lambda a: a,  # as stored
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # turned 180 degrees
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored about the main diagonal: stored top-left stays top-left
    6: lambda a: np.rot90(a, k=-1),  # turned 90 degrees clockwise: stored top-left goes top-right
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored about the other diagonal: top-left goes bottom-right
    8: lambda a: np.rot90(a, k=1),  # turned 90 degrees counter-clockwise: stored top-left goes bottom-left
}


@pytest.mark.parametrize("orientation", sorted(SHOWN_AS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    # 2 x 3 blocks of 8 x 8 pixels in six colours: no two orientations give the same picture, and blocks
    # on JPEG's 8-pixel grid come back within a few levels.
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[255, 255, 0], [0, 255, 255], [255, 0, 255]]])
    stored = colours.repeat(8, axis=0).repeat(8, axis=1).astype(np.uint8)  # (16, 24, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95, subsampling=0)
    shown = np.ascontiguousarray(SHOWN_AS[orientation](stored))
    image = load_image(path)
    assert image.shape == (3, *shown.shape[:2])
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, shown, atol=8)


def test_oversized_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ValueError, match=r"big\.png is 300x200 pixels, more than the 1000 allowed"):
        load_image(path, max_pixels=1000)


@pytest.mark.parametrize("content", [b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_text_or_truncated_file_named_jpg_gets_an_error_naming_it(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot decode image file .*broken\.jpg"):
        load_image(path)


def test_truncated_real_jpeg_is_refused(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated"):
        load_image(path)


@pytest.mark.parametrize("same", ["0", "1", None, 2])
def test_pair_dataset_refuses_non_boolean_same(tmp_path, same):
    with pytest.raises(ValueError, match="same a bool"):
        PairDataset([("a.png", "b.png", same)], tmp_path)


# ------------------------------------------------------------- one size per dataset
@pytest.fixture
def mixed_sizes(tmp_path: Path) -> Path:
    """alice: two 112x112 faces; bob: one 250x250 face (an unaligned photo), read last."""
    root = tmp_path / "faces"
    _write_image(root / "alice" / "a1.png", 10, size=(112, 112))
    _write_image(root / "alice" / "a2.jpg", 20, size=(112, 112))
    _write_image(root / "bob" / "b1.png", 30, size=(250, 250))
    return root


def test_face_folder_names_the_image_of_another_size(mixed_sizes: Path) -> None:
    dataset = FaceFolder(mixed_sizes)
    assert dataset.size == (112, 112)
    with pytest.raises(ValueError) as info:
        list(DataLoader(dataset, batch_size=3))  # default collate would fail without naming a file
    message = str(info.value)
    assert str(mixed_sizes / "bob" / "b1.png") in message
    assert "250x250 pixels" in message and "112x112" in message and str(mixed_sizes / "alice" / "a1.png") in message
    assert "align or resize every face to 112x112" in message
    FaceFolder(mixed_sizes, identities=["alice"])[1]  # a folder of one size batches as before


def test_face_folder_size_parameter(mixed_sizes: Path) -> None:
    dataset = FaceFolder(mixed_sizes, size=(250, 250))
    assert dataset[2][0].shape == (3, 250, 250)
    with pytest.raises(ValueError, match=r"a1\.png is 112x112 pixels .*\(size=\(250, 250\) was given"):
        dataset[0]
    with pytest.raises(TypeError, match=r"size must be \(height, width\).*size=\(112, 112\)"):
        FaceFolder(mixed_sizes, size=112)
    with pytest.raises(TypeError, match="two positive ints"):
        FaceFolder(mixed_sizes, size=(112, 0))


def test_face_folder_checks_the_size_before_the_transform(mixed_sizes: Path) -> None:
    dataset = FaceFolder(mixed_sizes, identities=["alice"], transform=lambda image: image[:, :50, :60])
    assert dataset.size == (112, 112) and dataset[0][0].shape == (3, 50, 60)


def test_pair_dataset_names_the_image_of_another_size(mixed_sizes: Path) -> None:
    pairs = [("alice/a1.png", "alice/a2.jpg", True), ("alice/a1.png", "bob/b1.png", False)]
    dataset = PairDataset(pairs, mixed_sizes)
    assert dataset.size == (112, 112)
    next(iter(DataLoader(dataset, batch_size=1)))
    with pytest.raises(ValueError, match=r"b1\.png is 250x250 pixels .*images are 112x112 .*a1\.png"):
        list(DataLoader(dataset, batch_size=2))
    assert PairDataset(pairs[1:], mixed_sizes, size=(112, 112)).size == (112, 112)
