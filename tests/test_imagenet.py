"""Tests for krtfuap.imagenet: normalisation and safe loading of ImageNet backbone weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from krtfuap import imagenet
from krtfuap.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENET_WEIGHTS,
    imagenet_normalize,
    load_imagenet_state_dict,
)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; returns its ``hub/checkpoints`` folder (not created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def offline(monkeypatch) -> list:
    """Make torchvision's download fail as it does without network; records the calls."""
    calls = []

    def fail(url, *args, **kwargs):
        calls.append((url, kwargs))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    return calls


class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def _malicious_file(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features.0.weight": torch.zeros(1), "evil": _Payload(marker)}, path)
    assert not marker.exists()  # saving alone runs nothing
    return path


# --------------------------------------------------------------------------- normalisation


def test_imagenet_normalize_matches_hand_computation():
    images = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    out = imagenet_normalize(images)
    assert out.dtype == torch.float64 and out.shape == images.shape
    for c in range(3):
        expected = (images[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], expected)


def test_imagenet_normalize_is_differentiable():
    images = torch.rand(1, 3, 2, 2, requires_grad=True)
    imagenet_normalize(images).sum().backward()
    expected = torch.tensor([1 / s for s in IMAGENET_STD]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(images.grad, expected)


# --------------------------------------------------------------------------- argument errors


def test_unknown_backbone():
    with pytest.raises(ValueError, match=r"backbone must be one of \['alexnet', 'squeezenet1_1', 'vgg16'\], got 'resnet50'"):
        load_imagenet_state_dict("resnet50")


def test_unknown_backbone_checked_before_path(tmp_path):
    with pytest.raises(ValueError, match="backbone must be one of"):
        load_imagenet_state_dict("vgg19", tmp_path / "missing.pth")


@pytest.mark.parametrize("download", [False, True])
def test_explicit_missing_path(tmp_path, offline, download):
    missing = tmp_path / "nowhere" / "vgg.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_imagenet_state_dict("vgg16", missing, download=download)
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert IMAGENET_WEIGHTS["vgg16"][1] in message  # where to get it
    assert not offline  # an explicit path never falls back to a download


def test_explicit_path_that_is_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagenet_state_dict("alexnet", tmp_path)


def test_explicit_path_loads(tmp_path, torch_home):
    state = {"features.0.weight": torch.randn(4, 3, 3, 3), "features.0.bias": torch.randn(4)}
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    loaded = load_imagenet_state_dict("alexnet", str(path))  # str works as well as Path
    assert set(loaded) == set(state)
    for key in state:
        assert torch.equal(loaded[key], state[key])
        assert loaded[key].device.type == "cpu"


# --------------------------------------------------------------------------- hub cache


@pytest.mark.parametrize("backbone", sorted(IMAGENET_WEIGHTS))
def test_hub_cache_lookup(torch_home, offline, backbone):
    file_name = IMAGENET_WEIGHTS[backbone][0]
    torch_home.mkdir(parents=True)
    state = {"w": torch.arange(6.0).view(2, 3)}
    torch.save(state, torch_home / file_name)
    loaded = load_imagenet_state_dict(backbone, download=True)
    assert torch.equal(loaded["w"], state["w"])
    assert not offline  # found in the cache, so no download attempted


def test_hub_cache_follows_torch_home_at_call_time(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for home, value in ((first, 1.0), (second, 2.0)):
        (home / "hub" / "checkpoints").mkdir(parents=True)
        torch.save({"w": torch.tensor(value)}, home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(first))
    assert load_imagenet_state_dict("alexnet")["w"].item() == 1.0
    monkeypatch.setenv("TORCH_HOME", str(second))
    assert load_imagenet_state_dict("alexnet")["w"].item() == 2.0


def test_explicit_path_wins_over_hub_cache(tmp_path, torch_home):
    torch_home.mkdir(parents=True)
    torch.save({"w": torch.tensor(1.0)}, torch_home / "vgg16-397923af.pth")
    torch.save({"w": torch.tensor(2.0)}, tmp_path / "explicit.pth")
    assert load_imagenet_state_dict("vgg16", tmp_path / "explicit.pth")["w"].item() == 2.0


def test_cache_file_under_wrong_name_is_not_found(torch_home):
    torch_home.mkdir(parents=True)
    torch.save({"w": torch.tensor(1.0)}, torch_home / "vgg16.pth")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_imagenet_state_dict("vgg16", download=False)


@pytest.mark.parametrize("backbone", sorted(IMAGENET_WEIGHTS))
def test_missing_without_download_names_file_folder_and_url(torch_home, offline, backbone):
    file_name, url = IMAGENET_WEIGHTS[backbone]
    with pytest.raises(FileNotFoundError) as info:
        load_imagenet_state_dict(backbone, download=False)
    message = str(info.value)
    assert file_name in message
    assert str(torch_home) in message
    assert url in message
    assert "TORCH_HOME" in message
    assert "download failed" not in message
    assert not offline


def test_missing_with_failed_download_says_so(torch_home, offline):
    with pytest.raises(FileNotFoundError) as info:
        load_imagenet_state_dict("alexnet", download=True)
    message = str(info.value)
    assert "download failed" in message
    assert "Temporary failure in name resolution" in message
    assert "alexnet-owt-7be5be79.pth" in message
    assert str(torch_home) in message
    assert len(offline) == 1
    url, kwargs = offline[0]
    assert url == IMAGENET_WEIGHTS["alexnet"][1]
    assert kwargs.get("weights_only") is True


def test_successful_download_is_returned(torch_home, monkeypatch):
    state = {"w": torch.ones(2)}
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kwargs: state)
    assert load_imagenet_state_dict("vgg16", download=True) is state


def test_default_is_no_download(torch_home, offline):
    with pytest.raises(FileNotFoundError):
        load_imagenet_state_dict("vgg16")
    assert not offline


# --------------------------------------------------------------------------- weights_only safety


def test_weights_only_refuses_malicious_pickle_at_explicit_path(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = _malicious_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match="Refused to load .*could run code"):
        load_imagenet_state_dict("vgg16", path)
    assert not marker.exists()


def test_weights_only_refuses_malicious_pickle_in_hub_cache(tmp_path, torch_home, offline):
    marker = tmp_path / "pwned.txt"
    _malicious_file(torch_home / "alexnet-owt-7be5be79.pth", marker)
    with pytest.raises(ValueError, match="Refused to load .*could run code"):
        load_imagenet_state_dict("alexnet", download=True)
    assert not marker.exists()
    assert not offline  # a bad cached file is an error, not a reason to download


def test_malicious_payload_would_really_run_without_weights_only(tmp_path):
    """Control: the payload is live, so the refusal above is what protects us."""
    marker = tmp_path / "pwned.txt"
    path = _malicious_file(tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text().strip() == "pwned"


def test_hub_checkpoint_dir_uses_torch_hub(torch_home):
    assert imagenet._hub_checkpoint_dir() == torch_home
