"""The ready cloak shipped in the package (krtfuap/pretrained.py)."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from safetensors import safe_open

import krtfuap
from krtfuap import pretrained
from krtfuap.attack import UAPAttack
from krtfuap.baselines import RandomNoiseUAP
from krtfuap.datasets import FaceFolder, split_identities
from krtfuap.models import INSIGHTFACE_MBF_THRESHOLD

#: sha256 of the shipped perturbation's float16 bytes, as fitted by examples/fit_default_cloak.py; re-saving
#: the file (format 2, its true parameters) must not change a bit of it.
PERTURBATION_SHA256 = "ff759bfc501d2c13c4e385aefee656cd1322885dad5899c1f1e1a25008e8dd6b"


def test_the_ready_cloak_ships_small_and_loads_inside_its_budget() -> None:
    path = pretrained.default_cloak_path()
    assert path.stat().st_size < 200 * 1024
    cloak = pretrained.default_cloak(model=None)
    assert isinstance(cloak, UAPAttack) and cloak.model is None
    assert cloak.perturbation_.shape == (3, 112, 112) and cloak.perturbation_.dtype == torch.float32
    assert cloak.epsilon == 0.08 and cloak.perturbation_.abs().max() <= cloak.epsilon
    assert cloak.perturbation_.abs().mean() > 0.01  # a fitted perturbation, not zeros
    # Its threshold is w600k_mbf's, calibrated on LFW pairs (to the rounding of the pairs it was calibrated on).
    assert cloak.threshold_ == pytest.approx(INSIGHTFACE_MBF_THRESHOLD, abs=0.005)
    assert cloak.target_ssim == 0.93 and cloak.n_iter_ >= 1000
    faces = torch.rand(2, 3, 112, 112)
    assert torch.equal(cloak.transform(faces), (faces + cloak.perturbation_).clamp(0, 1))


def test_the_ready_cloak_file_carries_its_true_parameters_and_the_fitted_bits() -> None:
    path = pretrained.default_cloak_path()
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        stored = handle.get_tensor("perturbation_")
    assert metadata["format"] == "krtfuap.UAPAttack/2" and metadata["krtfuap_version"] == krtfuap.__version__
    # Every parameter but those added since, which change nothing in a fit saved before them.
    added = {*UAPAttack._silent_defaults, *UAPAttack._values_before}
    assert set(json.loads(metadata["params"])) == set(UAPAttack(None).get_params()) - added
    assert stored.dtype == torch.float16
    assert hashlib.sha256(stored.numpy().tobytes()).hexdigest() == PERTURBATION_SHA256
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file of format 2 leaves no parameter to today's defaults
        cloak = pretrained.default_cloak(model=None)
    # examples/fit_default_cloak.py fitted it with these (shuffle=False: the faces in a fixed order).
    assert cloak.shuffle is False and cloak.key_regions is None and cloak.lowpass_size is None
    assert cloak.target_ssim_start is None  # fitted before the warm-up existed
    assert (cloak.max_steps, cloak.lr_decay_steps, cloak.random_state, cloak.batch_size) == (1200, 1200, 0, 10)
    assert torch.equal(cloak.perturbation_, stored.float())



@pytest.mark.real
def test_the_ready_cloak_comes_with_the_model_it_was_fitted_against(shared_assets) -> None:
    cloak = pretrained.default_cloak()
    # 16 faces of identities the cloak was not fitted on (examples/fit_default_cloak.py fits on the other half).
    identities = FaceFolder(shared_assets / "faces").identities
    held_out = FaceFolder(shared_assets / "faces", identities=split_identities(identities, 0.5, random_state=0)[1])
    faces = torch.stack([held_out[index][0] for index in range(0, 16 * 5, 5)])
    scores = cloak.evaluate(faces)
    # Judged by its model, the cloak moves faces away from themselves far more than noise of its budget does.
    noise = RandomNoiseUAP(cloak.model, threshold=cloak.threshold_, epsilon=cloak.epsilon, random_state=0)
    noise_scores = noise.fit(faces[:2]).evaluate(faces)
    assert scores["n_images"] == 16
    assert scores["fooling_rate"] >= noise_scores["fooling_rate"] + 0.5
    assert scores["mean_similarity"] < noise_scores["mean_similarity"] - 0.3


def test_a_missing_cloak_file_says_how_to_get_it(monkeypatch) -> None:
    monkeypatch.setattr(pretrained, "DEFAULT_CLOAK_FILE", "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="reinstall krtfuap"):
        pretrained.default_cloak()


def test_the_default_surrogates_are_the_cloaks_model_then_facenet_on_casia(monkeypatch) -> None:
    from krtfuap.cloak_defaults import CLOAK_DEFAULTS
    from krtfuap.models import FACENET_CASIA_THRESHOLD

    assert CLOAK_DEFAULTS.surrogates == ("insightface_mbf", "facenet_casia")
    loaded = []
    monkeypatch.setattr("krtfuap.models.load_face_model",
                        lambda name, path=None: loaded.append((name, path)) or torch.nn.Identity())
    cloak = pretrained.default_cloak(model=torch.nn.Flatten())
    (first, first_threshold), (second, second_threshold) = pretrained.default_surrogates(cloak, precision="float32")
    assert first is cloak.model and first_threshold == cloak.threshold_
    assert isinstance(second, torch.nn.Identity) and second_threshold == FACENET_CASIA_THRESHOLD
    assert loaded == [("facenet_casia", None)]
    with pytest.raises(ValueError, match="needs an attack with its model attached"):
        pretrained.default_surrogates(pretrained.default_cloak(model=None))


def test_further_surrogates_run_in_bfloat16_where_the_cpu_does_it_in_hardware(monkeypatch) -> None:
    from krtfuap.models.precision import BFloat16Autocast

    monkeypatch.setattr("krtfuap.models.load_face_model", lambda name, path=None: torch.nn.Identity())
    cloak = pretrained.default_cloak(model=torch.nn.Flatten())
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        (first, _), (second, _) = pretrained.default_surrogates(cloak)
        assert first is cloak.model  # the attack's own model, which verifies, stays as it is
        assert isinstance(second, BFloat16Autocast) is amx
        forced = "float32" if amx else "bfloat16"
        assert isinstance(pretrained.default_surrogates(cloak, precision=forced)[1][0], BFloat16Autocast) is not amx
    with pytest.raises(ValueError, match=r"precision='half' is not one of \('auto', 'bfloat16', 'float32'\)"):
        pretrained.default_surrogates(cloak, precision="half")


def test_further_surrogates_by_name_with_weights_and_thresholds(monkeypatch) -> None:
    from krtfuap.models import SFACE_THRESHOLD

    loaded = []
    monkeypatch.setattr("krtfuap.models.load_face_model",
                        lambda name, path=None: loaded.append((name, path)) or torch.nn.Identity())
    cloak = pretrained.default_cloak(model=torch.nn.Flatten())
    members = pretrained.default_surrogates(cloak, ["sface", "foamliu_mobilefacenet"], weights=[None, "foam.pt"],
                                            thresholds=[0.3, 0.25], precision="float32")
    assert [threshold for _, threshold in members[1:]] == [0.3, 0.25]
    assert loaded == [("sface", None), ("foamliu_mobilefacenet", "foam.pt")]
    assert pretrained.default_surrogates(cloak, ["sface"], precision="float32")[1][1] == SFACE_THRESHOLD
    with pytest.raises(ValueError, match="foamliu_mobilefacenet has no built-in threshold; pass thresholds="):
        pretrained.default_surrogates(cloak, ["foamliu_mobilefacenet"])
    with pytest.raises(ValueError, match=r"one value per further model \(2\), got 1 and 2"):
        pretrained.default_surrogates(cloak, ["sface", "sface"], weights=[None], thresholds=[0.3, 0.3])
