"""Tests for krtfuap.stealth: SSIM, feature (VGG16 / SqueezeNet) stealth losses and their resolution."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from krtfuap import stealth
from krtfuap.imagenet import IMAGENET_MEAN, IMAGENET_STD
from krtfuap.stealth import (
    FALLBACK_STEALTH_WEIGHT,
    SQUEEZENET_LAYERS,
    VGG16_LAYERS,
    FeatureStealthLoss,
    SqueezeNetStealthLoss,
    SSIMStealthLoss,
    VGGStealthLoss,
    resolve_stealth_loss,
)

VGG_FILE = "vgg16-397923af.pth"
SQUEEZENET_FILE = "squeezenet1_0_imagenet_deepcompression.pth"


def _pair(batch: int = 2, size: int = 32, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand(batch, 3, size, size, generator=generator)
    adversarial = (clean + noise * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    return adversarial, clean


def _fast_vgg16() -> nn.Module:
    """``torchvision.models.vgg16()`` without its (slow, 138M-parameter) random init.

    Every parameter is overwritten by ``load_state_dict`` right after, so skipping the
    init changes nothing but the time.
    """
    with torch.device("meta"):
        network = torchvision.models.vgg16()
    return network.to_empty(device="cpu")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(stealth, "vgg16", _fast_vgg16)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def vgg_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random torchvision VGG16 weights, and the loss built from it.

    The convolutional features are those of a random ``vgg16()``; the classifier (unused by
    the loss, 120M parameters) is stored as broadcast zeros of the right shapes to keep the
    file small.
    """
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    for module in features:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.normal_(module.bias, std=0.01)
    with torch.device("meta"):
        reference = torchvision.models.vgg16().state_dict()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state.update({k: torch.zeros(()).expand(v.shape) for k, v in reference.items() if not k.startswith("features.")})
    assert set(state) == set(reference)
    torch.save(state, checkpoints / VGG_FILE)

    loads = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        patch.delenv("TORCH_HUB", raising=False)
        patch.setattr(torch, "load", spy_load)
        loss = VGGStealthLoss(download=False)  # the real constructor, real vgg16() included
    return home, state, loss, loads


@pytest.fixture
def vgg_torch_home(vgg_home, monkeypatch):
    home, state, _, _ = vgg_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(stealth, "vgg16", _fast_vgg16)
    return home, state


# --------------------------------------------------------------------------- SSIM


def test_ssim_loss_zero_for_identical_images():
    _, clean = _pair()
    loss = SSIMStealthLoss()(clean.clone(), clean)
    assert loss.ndim == 0
    assert abs(loss.item()) < 1e-5


def test_ssim_loss_grows_with_noise():
    loss = SSIMStealthLoss()
    values = [loss(*_pair(noise=noise)).item() for noise in (0.0, 0.01, 0.05, 0.2, 0.5)]
    assert values == sorted(values)
    assert values[0] < 1e-5 < values[1]
    assert values[-1] > 0.3
    assert all(v <= 2.0 for v in values)  # 1 - SSIM with SSIM in [-1, 1]


def test_ssim_loss_differentiable_wrt_adversarial():
    adversarial, clean = _pair(noise=0.05)
    adversarial.requires_grad_(True)
    loss = SSIMStealthLoss(window_size=7)(adversarial, clean)
    loss.backward()
    assert adversarial.grad is not None
    assert torch.isfinite(adversarial.grad).all()
    assert adversarial.grad.abs().sum() > 0


def test_ssim_loss_window_size_and_default_weight():
    assert SSIMStealthLoss(window_size=5.0).window_size == 5
    assert SSIMStealthLoss.default_weight == 3.0
    adversarial, clean = _pair()
    assert SSIMStealthLoss(3)(adversarial, clean).item() != pytest.approx(SSIMStealthLoss(11)(adversarial, clean).item())


# --------------------------------------------------------------------------- FeatureStealthLoss


def _tiny_features() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0
        nn.ReLU(),  # 1
        nn.Conv2d(4, 5, 3, stride=2),  # 2
        nn.ReLU(),  # 3
        nn.Dropout(0.5),  # 4: would make the loss random in train mode
        nn.Conv2d(5, 2, 1),  # 5
        nn.ReLU(),  # 6: after the deepest layer used -> truncated away
    )


def _hand_feature_loss(features: nn.Sequential, indices, adversarial, clean, squared=False) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    total = torch.zeros(len(clean))
    with torch.no_grad():
        a, c = (adversarial - mean) / std, (clean - mean) / std
        for index, layer in enumerate(features):
            a, c = layer(a), layer(c)
            if index in indices:
                for b in range(len(clean)):
                    sum_of_squares = ((a[b] - c[b]) ** 2).sum()
                    total[b] += sum_of_squares if squared else torch.sqrt(sum_of_squares)
            if index == max(indices):
                break
    return total.mean()


def test_feature_loss_matches_hand_computation():
    features = _tiny_features()
    loss = FeatureStealthLoss(features, [1, 5])
    adversarial, clean = _pair(batch=3, size=9, noise=0.2)
    value = loss(adversarial, clean)
    assert value.ndim == 0
    expected = _hand_feature_loss(features.eval(), {1, 5}, adversarial, clean)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # Un-squared norm (paper Eq. 10): the squared-norm version is clearly different here.
    squared = _hand_feature_loss(features.eval(), {1, 5}, adversarial, clean, squared=True)
    assert not torch.isclose(value, squared, rtol=1e-2)


def test_feature_loss_is_batch_mean_of_per_image_norms():
    features = _tiny_features()
    loss = FeatureStealthLoss(features, [3])
    adversarial, clean = _pair(batch=4, size=9, noise=0.2)
    per_image = torch.stack([loss(adversarial[i : i + 1], clean[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(loss(adversarial, clean), per_image.mean(), rtol=1e-5, atol=1e-6)
    # Zero for identical inputs.
    assert loss(clean, clean.clone()).item() == 0.0


def test_feature_loss_truncates_sorts_and_dedups_layers():
    features = _tiny_features()
    loss = FeatureStealthLoss(features, [3, 1, 3])
    assert loss.layer_indices == [1, 3]
    assert len(loss.features) == 4
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureStealthLoss(features, [])


def test_feature_loss_frozen_and_eval_even_after_train():
    features = _tiny_features().train()
    loss = FeatureStealthLoss(features, [1, 5])
    assert not any(p.requires_grad for p in loss.parameters())
    assert not loss.features.training
    assert loss.train() is loss
    assert loss.training and not loss.features.training
    assert not any(m.training for m in loss.features.modules())
    loss.train(True)
    adversarial, clean = _pair(size=9, noise=0.2)
    first, second = loss(adversarial, clean), loss(adversarial, clean)
    assert torch.equal(first, second)  # dropout is off
    loss.eval()
    assert not loss.training and not loss.features.training


def test_feature_loss_gradient_reaches_input_only():
    loss = FeatureStealthLoss(_tiny_features(), [1, 3])
    adversarial, clean = _pair(size=9, noise=0.2)
    adversarial.requires_grad_(True)
    clean.requires_grad_(True)
    loss(adversarial, clean).backward()
    assert adversarial.grad is not None and adversarial.grad.abs().sum() > 0
    assert clean.grad is None  # the clean features are computed without a graph
    assert all(p.grad is None for p in loss.parameters())


# --------------------------------------------------------------------------- VGGStealthLoss


def test_vgg_missing_weights_without_download(empty_torch_home, monkeypatch):
    def no_download(*args, **kwargs):  # pragma: no cover - must not be called
        raise AssertionError("download attempted with download=False")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(FileNotFoundError) as info:
        VGGStealthLoss(download=False)
    message = str(info.value)
    assert VGG_FILE in message
    assert str(empty_torch_home) in message
    assert "download failed" not in message


def test_vgg_offline_download_failure(empty_torch_home, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as info:
        VGGStealthLoss()  # download=True is the default
    message = str(info.value)
    assert "download failed" in message and "Network is unreachable" in message
    assert VGG_FILE in message
    assert str(empty_torch_home) in message
    assert calls == [f"https://download.pytorch.org/models/{VGG_FILE}"]


def test_vgg_explicit_missing_weights(empty_torch_home, tmp_path):
    with pytest.raises(FileNotFoundError, match="my-vgg.pth does not exist"):
        VGGStealthLoss(weights=tmp_path / "my-vgg.pth")


def test_vgg_unknown_layer_lists_choices(empty_torch_home):
    with pytest.raises(ValueError, match=r"Unknown VGG16 layer\(s\) \['relu9_9'\]; choose from \[") as info:
        VGGStealthLoss(("relu1_2", "relu9_9"))
    for name in VGG16_LAYERS:
        assert name in str(info.value)


def test_vgg_loads_cached_weights_weights_only(vgg_home):
    _, state, loss, loads = vgg_home
    assert loads and all(kwargs.get("weights_only") is True for kwargs in loads)
    assert loss.layers == ("relu2_2",)
    assert loss.layer_indices == [VGG16_LAYERS["relu2_2"]] == [8]
    assert len(loss.features) == 9  # truncated after relu2_2
    torch.testing.assert_close(loss.features[0].weight, state["features.0.weight"])
    torch.testing.assert_close(loss.features[7].bias, state["features.7.bias"])
    assert not any(p.requires_grad for p in loss.parameters())
    assert VGGStealthLoss.default_weight == 0.05


def test_vgg_loss_works(vgg_home):
    loss = vgg_home[2]
    adversarial, clean = _pair(size=32, noise=0.05)
    assert loss(clean, clean.clone()).item() == 0.0
    small = loss(adversarial, clean)
    large = loss(*_pair(size=32, noise=0.3))
    assert 0 < small.item() < large.item()
    adversarial.requires_grad_(True)
    loss.train()(adversarial, clean).backward()
    assert not loss.features.training
    assert adversarial.grad is not None and adversarial.grad.abs().sum() > 0


def test_vgg_other_layers(vgg_torch_home):
    loss = VGGStealthLoss(("relu3_3", "relu1_2"), download=False)
    assert loss.layers == ("relu3_3", "relu1_2")
    assert loss.layer_indices == [3, 15]
    assert len(loss.features) == 16
    adversarial, clean = _pair(size=16)
    assert loss(adversarial, clean).item() > 0


def test_vgg_explicit_weights_path(vgg_home, empty_torch_home):
    home, state, _, _ = vgg_home
    loss = VGGStealthLoss(("relu1_1",), weights=home / "hub" / "checkpoints" / VGG_FILE, download=False)
    torch.testing.assert_close(loss.features[0].weight, state["features.0.weight"])


# --------------------------------------------------------------------------- SqueezeNetStealthLoss


@pytest.fixture(scope="module")
def squeezenet_loss(shared_assets):
    return SqueezeNetStealthLoss(shared_assets / "models" / SQUEEZENET_FILE)


@pytest.mark.real
def test_squeezenet_real_weights(shared_assets, squeezenet_loss):
    loss = squeezenet_loss
    assert loss.layers == ("relu1", "fire3")
    assert loss.layer_indices == [SQUEEZENET_LAYERS["relu1"], SQUEEZENET_LAYERS["fire3"]]
    state = torch.load(shared_assets / "models" / SQUEEZENET_FILE, map_location="cpu", weights_only=True)
    torch.testing.assert_close(loss.features[0].weight, state["features.0.weight"])
    assert not any(p.requires_grad for p in loss.parameters())
    assert SqueezeNetStealthLoss.default_weight == 1e-5


@pytest.mark.real
def test_squeezenet_real_loss_behaviour(squeezenet_loss):
    loss = squeezenet_loss
    _, clean = _pair(size=64)
    assert loss(clean, clean.clone()).item() == 0.0
    small = loss(*_pair(size=64, noise=0.02))
    large = loss(*_pair(size=64, noise=0.2))
    assert 0 < small.item() < large.item()
    adversarial, clean = _pair(size=64, noise=0.05)
    adversarial.requires_grad_(True)
    loss(adversarial, clean).backward()
    assert adversarial.grad is not None and torch.isfinite(adversarial.grad).all()
    assert adversarial.grad.abs().sum() > 0


@pytest.mark.real
def test_squeezenet_other_layers(shared_assets):
    loss = SqueezeNetStealthLoss(str(shared_assets / "models" / SQUEEZENET_FILE), layers=("fire5",))
    assert loss.layer_indices == [7] and len(loss.features) == 8


def test_squeezenet_missing_file(tmp_path):
    missing = tmp_path / "squeeze.pth"
    with pytest.raises(FileNotFoundError, match=r"SqueezeNet 1\.0 weights file .*squeeze\.pth does not exist"):
        SqueezeNetStealthLoss(missing)


def test_squeezenet_unknown_layer(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown SqueezeNet layer\(s\) \['fire9'\]; choose from \['relu1', 'fire2'"):
        SqueezeNetStealthLoss(tmp_path / "unused.pth", layers=("fire9",))


# --------------------------------------------------------------------------- resolve_stealth_loss


def test_resolve_none():
    assert resolve_stealth_loss(None, None) == (None, 0.0)
    assert resolve_stealth_loss(None, 0.7) == (None, 0.0)


def test_resolve_ssim_name():
    loss, weight = resolve_stealth_loss("ssim", None)
    assert isinstance(loss, SSIMStealthLoss) and weight == 3.0
    loss, weight = resolve_stealth_loss("ssim", 2)
    assert weight == 2.0 and isinstance(weight, float)


def test_resolve_vgg_name(vgg_torch_home):
    loss, weight = resolve_stealth_loss("vgg", None)
    assert isinstance(loss, VGGStealthLoss) and weight == 0.05
    assert loss.layers == ("relu2_2",)


def test_resolve_vgg_name_offline_error(empty_torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match=VGG_FILE):
        resolve_stealth_loss("vgg", None)


@pytest.mark.parametrize("name", ["VGG", "lpips", "", "squeezenet"])
def test_resolve_unknown_name(name):
    with pytest.raises(ValueError, match=r"stealth_loss must be 'vgg', 'ssim', a callable"):
        resolve_stealth_loss(name, None)


def test_resolve_callable_with_default_weight():
    class Custom(nn.Module):
        default_weight = 0.25

        def forward(self, adversarial, clean):
            return (adversarial - clean).abs().mean()

    custom = Custom()
    assert resolve_stealth_loss(custom, None) == (custom, 0.25)
    assert resolve_stealth_loss(custom, 1.5) == (custom, 1.5)
    squeezenet_like = FeatureStealthLoss(_tiny_features(), [1])
    squeezenet_like.default_weight = 1e-4
    assert resolve_stealth_loss(squeezenet_like, None)[1] == 1e-4


def test_resolve_plain_callable_uses_fallback_weight():
    def l1(adversarial, clean):
        return (adversarial - clean).abs().mean()

    loss, weight = resolve_stealth_loss(l1, None)
    assert loss is l1 and weight == FALLBACK_STEALTH_WEIGHT == 0.05
    assert resolve_stealth_loss(l1, 0) == (l1, 0.0)
    instance = SSIMStealthLoss()
    assert resolve_stealth_loss(instance, None) == (instance, 3.0)


@pytest.mark.parametrize("spec", ["ssim", SSIMStealthLoss(), lambda a, c: (a - c).mean()])
def test_resolve_negative_weight(spec):
    with pytest.raises(ValueError, match=r"stealth_weight must be >= 0, got -0\.1"):
        resolve_stealth_loss(spec, -0.1)


@pytest.mark.parametrize("spec", [3, 0.5, torch.zeros(2), ["ssim"], b"ssim"])
def test_resolve_bad_types(spec):
    with pytest.raises(TypeError, match=r"stealth_loss must be a string, a callable or None, got"):
        resolve_stealth_loss(spec, None)
