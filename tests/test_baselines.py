import math
from functools import partial

import pytest
import torch
from fakes import LinearEmbedder, random_faces, tiny_attack, untimed
from sklearn.base import clone

from krtfuap.attack import UAPAttack
from krtfuap.engine import STEP_RECORD_KEYS
from krtfuap.baselines import (
    FGUAP,
    DeepFoolUAP,
    FrequencyUAP,
    RandomNoiseUAP,
    dct2,
    dct_matrix,
    deepfool_steps,
    idct2,
)


SIZE = 32
BASELINES = [RandomNoiseUAP, DeepFoolUAP, FGUAP, FrequencyUAP]
LEARNED = [DeepFoolUAP, FGUAP, FrequencyUAP]
COMMON_KEYWORDS = {
    "model", "threshold", "epsilon", "batch_size", "random_state", "device", "amp", "channels_last", "num_threads",
    "verbose",
}
LOOP_KEYWORDS = {
    "target_fooling_rate", "max_epochs", "max_time", "max_steps", "shuffle", "checkpoint_path", "checkpoint_every",
}

make = partial(tiny_attack, epsilon=0.05)


@pytest.fixture(scope="module")
def fitted() -> dict:
    return {cls: make(cls).fit(random_faces()) for cls in BASELINES}


@pytest.mark.parametrize("cls", BASELINES)
def test_budget_and_output_range(cls, fitted):
    attack = fitted[cls]
    assert attack.perturbation_.shape == (3, SIZE, SIZE)
    assert attack.perturbation_.abs().max() <= attack.epsilon * (1 + 1e-6)
    x = random_faces(4, seed=1)
    adversarial = attack.transform(x)
    assert torch.equal(adversarial, (x + attack.perturbation_).clamp(0, 1))
    assert (adversarial - x).abs().max() <= attack.epsilon + 1e-6
    assert torch.equal(attack.noise_, attack.perturbation_)
    assert torch.equal(attack.mask_, torch.ones(SIZE, SIZE))
    assert not attack.flow_.any()
    x = random_faces(4, seed=2)
    result = attack.evaluate(x)
    with torch.no_grad():
        similarity = torch.cosine_similarity(attack.model(attack.transform(x)), attack.model(x))
    assert result["n_images"] == 4
    assert result["fooling_rate"] == pytest.approx((similarity < attack.threshold_).double().mean().item())
    assert result["mean_similarity"] == pytest.approx(similarity.mean().item(), abs=1e-6)


@pytest.mark.parametrize("cls", BASELINES)
def test_same_random_state_is_bit_identical(cls):
    a = make(cls, random_state=3).fit(random_faces())
    b = make(cls, random_state=3).fit(random_faces())
    assert torch.equal(a.perturbation_, b.perturbation_)
    assert untimed(a.history_) == untimed(b.history_)


@pytest.mark.parametrize("cls", [RandomNoiseUAP, FGUAP, FrequencyUAP])
def test_random_state_changes_the_start(cls):
    one_epoch = {} if cls is RandomNoiseUAP else {"max_epochs": 1}
    a = make(cls, random_state=3, **one_epoch).fit(random_faces())
    b = make(cls, random_state=4, **one_epoch).fit(random_faces())
    assert not torch.equal(a.perturbation_, b.perturbation_)


@pytest.mark.parametrize("cls", BASELINES)
def test_clone_keeps_parameters_and_accepts_uapattack_keywords(cls):
    attack = make(cls, epsilon=0.03, device="cpu", verbose=False)
    params = attack.get_params()
    assert set(params) >= COMMON_KEYWORDS | (set() if cls is RandomNoiseUAP else LOOP_KEYWORDS)
    assert set(params) <= set(UAPAttack(None).get_params()) | {"overshoot", "max_inner", "keep_fraction",
                                                             "coefficient_bound"}
    copy = clone(attack)
    assert copy.model is attack.model
    assert {k: v for k, v in copy.get_params().items() if k != "model"} == {
        k: v for k, v in params.items() if k != "model"
    }
    assert not hasattr(copy, "perturbation_")


@pytest.mark.parametrize("cls", BASELINES)
def test_save_load_round_trip_exactly(cls, fitted, tmp_path):
    attack = fitted[cls]
    path = tmp_path / f"{cls.__name__}.safetensors"
    attack.save(path)
    loaded = cls.load(path, attack.model)
    assert type(loaded) is cls
    for name in ("perturbation_", "mask_", "warped_mask_", "flow_", "noise_"):
        assert torch.equal(getattr(loaded, name), getattr(attack, name)), name
    assert loaded.get_params().keys() == attack.get_params().keys()
    assert loaded.history_ == attack.history_ and loaded.threshold_ == attack.threshold_
    x = random_faces(3, seed=7)
    assert torch.equal(loaded.transform(x), attack.transform(x))
    assert loaded.evaluate(x) == attack.evaluate(x)


def test_uapattack_load_reads_a_random_noise_file(fitted, tmp_path):
    attack = fitted[RandomNoiseUAP]
    path = tmp_path / "random.safetensors"
    attack.save(path)
    with pytest.warns(UserWarning, match=r"written by RandomNoiseUAP without the parameters \[.*'target_ssim'\]"):
        loaded = UAPAttack.load(path, attack.model)  # UAPAttack's own parameters take their defaults, said
    assert type(loaded) is UAPAttack
    x = random_faces(3, seed=8)
    assert torch.equal(loaded.transform(x), attack.transform(x))


def test_load_with_the_wrong_class_names_the_problem(fitted, tmp_path):
    path = tmp_path / "freq.safetensors"
    fitted[FrequencyUAP].save(path)
    with pytest.raises(ValueError, match="saved by FrequencyUAP, another attack class"):
        DeepFoolUAP.load(path)
    with pytest.raises(FileNotFoundError):
        FGUAP.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("cls", LEARNED)
def test_max_time_stops_after_the_first_step(cls):
    attack = make(cls, max_time=0.0, max_epochs=5).fit(random_faces())
    assert attack.stop_reason_ == "max_time"
    assert attack.n_epochs_ == 1 and len(attack.history_) == 1
    assert len(attack.epoch_scores_) == 1  # the cut epoch is still scored
    assert attack.perturbation_.abs().max() <= attack.epsilon * (1 + 1e-6)


@pytest.mark.parametrize("cls", LEARNED)
def test_target_and_max_epochs_rules(cls):
    reached = make(cls, threshold=1.0, target_fooling_rate=0.0, max_epochs=5).fit(random_faces())
    assert reached.stop_reason_ == "target_fooling_rate" and reached.n_epochs_ == 1
    # cos < -1 is impossible: the target is never reached.
    exhausted = make(cls, threshold=-1.0, target_fooling_rate=1.0, max_epochs=2).fit(random_faces())
    assert exhausted.stop_reason_ == "max_epochs"
    assert exhausted.fooling_rate_ == 0.0
    assert exhausted.n_epochs_ == 2


@pytest.mark.parametrize("cls", LEARNED)
def test_max_steps_stops_mid_epoch_like_uapattack(cls):
    attack = make(cls, threshold=-1.0, target_fooling_rate=1.0, max_epochs=5, max_steps=3).fit(random_faces())
    assert attack.stop_reason_ == "max_steps" and attack.n_iter_ == 3 and attack.n_epochs_ == 2


@pytest.mark.parametrize("cls", LEARNED)
def test_shuffle_visits_the_faces_in_a_new_order_each_epoch(cls):
    x = random_faces()
    kept = make(cls, threshold=-1.0, target_fooling_rate=1.0, shuffle=False).fit(x)
    shuffled = make(cls, threshold=-1.0, target_fooling_rate=1.0, shuffle=True).fit(x)
    again = make(cls, threshold=-1.0, target_fooling_rate=1.0, shuffle=True).fit(x)
    assert [r["ssim"] for r in shuffled.history_] != [r["ssim"] for r in kept.history_]
    assert untimed(shuffled.history_) == untimed(again.history_)  # the order is drawn from random_state


def test_random_noise_is_drawn_once_and_says_so():
    attack = make(RandomNoiseUAP, threshold=1.0).fit(random_faces())
    assert attack.stop_reason_ == "not_learned" and attack.n_epochs_ == 1 and attack.n_iter_ == 0
    assert attack.fooling_rate_ == 1.0  # cos < 1 holds for every perturbed face


@pytest.mark.parametrize("cls", LEARNED)
def test_history_has_one_record_per_batch(cls, fitted):
    attack = fitted[cls]
    assert attack.n_iter_ == len(attack.history_) == 2 * attack.n_epochs_
    assert set(STEP_RECORD_KEYS) <= set(attack.history_[0])


def test_random_noise_records_one_measurement(fitted):
    attack = fitted[RandomNoiseUAP]
    assert attack.n_iter_ == 0 and attack.n_epochs_ == 1 and attack.history_ == []
    assert len(attack.epoch_scores_) == 1 and attack.epoch_scores_[0]["fooling_rate"] == attack.fooling_rate_
    assert attack.perturbation_.abs().max() > 0.9 * attack.epsilon


@pytest.mark.parametrize("cls, message", [
    (DeepFoolUAP, dict(overshoot=-0.1)), (DeepFoolUAP, dict(max_inner=0)),
    (FGUAP, dict(lr=0.0)), (FrequencyUAP, dict(keep_fraction=0.0)),
    (FrequencyUAP, dict(coefficient_bound=-1.0)), (RandomNoiseUAP, dict(epsilon=0.0)),
    (RandomNoiseUAP, dict(batch_size=0)),
])
def test_invalid_parameters_are_refused(cls, message):
    with pytest.raises(ValueError, match=next(iter(message))):
        make(cls, **message).fit(random_faces(2))


# ---------------------------------------------------------------- frequency / DCT
def test_dct_is_orthonormal_and_inverts():
    d = dct_matrix(7, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(7, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-12)
    constant = torch.full((5, 4), 0.5, dtype=torch.float64)
    coefficients = dct2(constant)
    assert coefficients[0, 0].item() == pytest.approx(0.5 * math.sqrt(20))
    assert coefficients.flatten()[1:].abs().max() < 1e-12


@pytest.mark.parametrize("keep_fraction", [0.25, 0.5])
def test_frequency_perturbation_stays_in_the_kept_band(keep_fraction):
    attack = make(FrequencyUAP, keep_fraction=keep_fraction, lr=0.2, max_epochs=2).fit(random_faces())
    rows, columns = attack.band_shape_
    assert (rows, columns) == (math.ceil(keep_fraction * SIZE),) * 2
    coefficients = dct2(attack.perturbation_.double())
    inside = coefficients[:, :rows, :columns].abs().max()
    outside = torch.cat([coefficients[:, rows:, :].flatten(), coefficients[:, :, columns:].flatten()]).abs().max()
    assert inside > 1e-3
    assert outside < 1e-5 * inside
    assert attack.perturbation_.abs().max() <= attack.epsilon * (1 + 1e-6)


def test_frequency_coefficient_bound_holds():
    attack = make(FrequencyUAP, coefficient_bound=0.01, lr=0.5, epsilon=1.0).fit(random_faces())
    assert attack.coefficient_bound_ == 0.01
    assert dct2(attack.perturbation_.double()).abs().max() <= 0.01 * (1 + 1e-5)


# ------------------------------------------------------------------------ DeepFool
def test_deepfool_steps_cross_the_threshold_on_a_linear_model():
    model = LinearEmbedder().eval()
    images = 0.4 + 0.2 * random_faces(6, seed=3, size=8)
    clean = model(images).detach()
    perturbation = torch.zeros(3, 8, 8)
    steps = deepfool_steps(model, images, clean, perturbation, 0.5, overshoot=0.02)
    with torch.no_grad():
        before = torch.cosine_similarity(model(images + perturbation), clean)
        after = torch.cosine_similarity(model((images + steps).clamp(0, 1)), clean)
    assert (before > 0.99).all()
    assert (after < 0.5).all()
    # Minimal-ish: the step stops near the target, not far beyond it.
    assert (after > 0.5 - 0.2).all()


def test_deepfool_uap_fools_a_single_face_within_budget():
    model = LinearEmbedder()
    face = 0.4 + 0.2 * random_faces(1, seed=4, size=8)
    attack = DeepFoolUAP(model, threshold=0.5, epsilon=0.3, batch_size=1, max_epochs=3, random_state=0).fit(face)
    assert attack.perturbation_.abs().max() <= 0.3 + 1e-7
    assert attack.evaluate(face)["fooling_rate"] == 1.0
    assert attack.history_[0]["n_updated"] == 1


# --------------------------------------------------------------------------- FG-UAP
def test_fguap_returns_the_best_scored_epoch_not_the_last():
    attack = make(FGUAP, threshold=0.99, max_epochs=4, target_fooling_rate=1.0, lr=0.05).fit(random_faces())
    keys = [(s["fooling_rate"], -s["mean_similarity"]) for s in attack.epoch_scores_]
    assert attack.best_epoch_ == keys.index(max(keys))
    assert attack.fooling_rate_ == attack.epoch_scores_[attack.best_epoch_]["fooling_rate"]
    assert attack.evaluate(random_faces())["fooling_rate"] == attack.fooling_rate_


def test_validation_faces_score_the_epochs():
    faces, validation = random_faces(16), random_faces(8, seed=5)
    attack = make(FGUAP, threshold=0.99, max_epochs=2, target_fooling_rate=1.0).fit(faces, validation=validation)
    assert all(s["n_images"] == 8 for s in attack.epoch_scores_)
    assert attack.evaluate(validation)["fooling_rate"] == attack.fooling_rate_
