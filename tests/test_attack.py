import math
from functools import partial

import pytest
import torch
from fakes import TinyEmbedder, tiny_attack, untimed
from fakes import random_faces as faces
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

from krtfuap.attack import UAPAttack
from krtfuap.key_regions import KeyRegions
from krtfuap.masks import KeyRegionMasker
from krtfuap.metrics import psnr, ssim
from krtfuap.optim import OPTIMIZERS

SIZE = 32

# The KRT-FUAP mechanism under test: key regions on (the library's default is a global perturbation).
quick_attack = partial(tiny_attack, UAPAttack, stealth_loss="ssim", key_regions=KeyRegions())


@pytest.fixture(scope="module")
def fitted() -> UAPAttack:
    return quick_attack().fit(faces())


def test_fit_sets_learned_attributes(fitted):
    assert fitted.perturbation_.shape == (3, SIZE, SIZE)
    assert fitted.mask_.shape == fitted.warped_mask_.shape == (SIZE, SIZE)
    assert fitted.flow_.shape == (2, SIZE, SIZE)
    assert fitted.n_iter_ == len(fitted.history_) == 4
    assert set(fitted.history_[0]) >= {"step", "epoch", "loss", "adversarial_loss", "stealth_loss", "fooling_rate", "ssim"}
    assert fitted.threshold_ == 0.9
    assert fitted.stop_reason_ in {"max_epochs", "target_fooling_rate"}


def test_perturbation_within_budget_and_output_in_range(fitted):
    x = faces(5, seed=1)
    adversarial = fitted.transform(x)
    assert fitted.perturbation_.abs().max() <= fitted.epsilon + 1e-7
    assert torch.equal(adversarial, (x + fitted.perturbation_).clamp(0, 1))
    assert (adversarial - x).abs().max() <= fitted.epsilon + 1e-6
    assert adversarial.dtype == x.dtype


@settings(max_examples=8, deadline=None)
@given(epsilon=st.floats(0.005, 0.3), lr=st.floats(0.001, 0.5), seed=st.integers(0, 1000),
       optimizer=st.sampled_from(sorted(OPTIMIZERS)), init=st.sampled_from(["uniform", "singular", "tensor"]))
def test_budget_holds_for_any_epsilon_learning_rate_optimizer_and_start(epsilon, lr, seed, optimizer, init):
    if init == "tensor":  # a start beyond the budget, clipped to it
        init = 4 * epsilon * torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    attack = quick_attack(epsilon=epsilon, lr=lr, max_epochs=1, random_state=seed, stealth_loss=None,
                          optimizer=optimizer, init=init)
    attack.fit(faces(8, seed))
    assert attack.perturbation_.abs().max() <= epsilon * (1 + 1e-6)
    assert attack.flow_.abs().max() <= 1.0
    x = faces(4, seed + 1)
    assert torch.equal(attack.transform(x), (x + attack.perturbation_).clamp(0, 1))


def test_fixed_random_state_is_repeatable():
    a = quick_attack(random_state=3).fit(faces())
    b = quick_attack(random_state=3).fit(faces())
    c = quick_attack(random_state=4).fit(faces())
    assert torch.equal(a.perturbation_, b.perturbation_)
    assert torch.equal(a.flow_, b.flow_)
    assert not torch.equal(a.perturbation_, c.perturbation_)


def test_clone_keeps_parameters():
    attack = quick_attack(epsilon=0.05, lr=0.02, stealth_weight=2.0, key_regions=KeyRegions(learn_flow=False))
    copy = clone(attack)
    assert copy.model is attack.model  # shared, never copied (double memory on a GPU)
    params, copied = attack.get_params(), copy.get_params()
    assert params.keys() == copied.keys()
    assert {k: v for k, v in params.items() if k != "model"} == {k: v for k, v in copied.items() if k != "model"}
    assert not hasattr(copy, "perturbation_")
    assert copy.set_params(epsilon=0.1).epsilon == 0.1


def test_not_fitted_errors():
    attack = quick_attack()
    for call in (lambda: attack.transform(faces(1)), lambda: attack.evaluate(faces(1)), lambda: attack.save("x")):
        with pytest.raises(NotFittedError):
            call()


def test_save_load_round_trip_exactly(fitted, tmp_path):
    path = tmp_path / "attack.safetensors"
    fitted.save(path)
    loaded = UAPAttack.load(path)
    for name in ("perturbation_", "mask_", "warped_mask_", "flow_", "noise_"):
        assert torch.equal(getattr(loaded, name), getattr(fitted, name)), name
    assert loaded.history_ == fitted.history_
    assert loaded.threshold_ == fitted.threshold_ and loaded.n_iter_ == fitted.n_iter_
    assert loaded.epsilon == fitted.epsilon and loaded.stealth_loss == fitted.stealth_loss
    x = faces(3, seed=7)
    assert torch.equal(loaded.transform(x), fitted.transform(x))


def test_compact_save_keeps_the_perturbation_in_half_the_bytes_and_inside_the_budget(fitted, tmp_path):
    full, compact = tmp_path / "full.safetensors", tmp_path / "compact.safetensors"
    fitted.save(full)
    fitted.save(compact, compact=True)
    assert compact.stat().st_size < 0.3 * full.stat().st_size
    loaded = UAPAttack.load(compact)
    assert loaded.perturbation_.dtype == torch.float32
    assert loaded.perturbation_.abs().max() <= fitted.epsilon
    assert torch.allclose(loaded.perturbation_, fitted.perturbation_, atol=2e-4)
    assert loaded.threshold_ == fitted.threshold_ and loaded.history_ == []
    assert not hasattr(loaded, "flow_")
    x = faces(3, seed=7)
    assert (loaded.transform(x) - fitted.transform(x)).abs().max() <= 2e-4
    with pytest.raises(ValueError, match=r"no mask_, warped_mask_, flow_, noise_ .*save it with compact=True"):
        loaded.save(tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()
    loaded.save(tmp_path / "again.safetensors", compact=True)
    assert torch.allclose(UAPAttack.load(tmp_path / "again.safetensors").perturbation_, loaded.perturbation_, atol=2e-4)


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        UAPAttack.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a krtfuap attack file"):
        UAPAttack.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a krtfuap attack file"):
        UAPAttack.load(other)


def test_evaluate_reports_metrics(fitted):
    x = faces(6, seed=2)
    result = fitted.evaluate(x)
    # The same numbers, computed here from the model and the fitted perturbation.
    adversarial = (x + fitted.perturbation_).clamp(0, 1)
    with torch.no_grad():
        similarity = torch.cosine_similarity(fitted.model(adversarial), fitted.model(x))
    assert result["n_images"] == 6
    assert result["fooling_rate"] == pytest.approx((similarity < fitted.threshold_).double().mean().item())
    assert result["mean_similarity"] == pytest.approx(similarity.mean().item(), abs=1e-6)
    assert result["ssim"] == pytest.approx(ssim(adversarial, x).mean().item(), rel=1e-5)
    assert result["psnr"] == pytest.approx(psnr(adversarial, x).mean().item(), rel=1e-5)
    assert (adversarial - x).abs().max() > 0.01  # the faces did change: the check is not about equal images


def test_model_is_left_untouched():
    model = TinyEmbedder().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quick_attack(model).fit(faces())
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_default_is_a_global_perturbation_and_the_paper_recipe_uses_key_regions():
    x = faces()
    default = UAPAttack(TinyEmbedder(), threshold=0.9, max_epochs=1, batch_size=8, random_state=0).fit(x)
    assert torch.equal(default.mask_, torch.ones(SIZE, SIZE)) and torch.equal(default.flow_, torch.zeros(2, SIZE, SIZE))
    paper = UAPAttack.paper(TinyEmbedder(), threshold=0.9, stealth_loss="ssim", stealth_weight=3, max_epochs=1,
                            batch_size=8, random_state=0, lr=0.2).fit(x)
    assert paper.key_regions == KeyRegions() and paper.key_regions.learn_flow
    assert default.shuffle and not paper.shuffle
    assert 0 < paper.mask_.mean() < 1 and paper.flow_.abs().sum() > 0


def test_ablation_switches_change_the_mechanism():
    x = faces()
    no_regions = quick_attack(key_regions=None).fit(x)
    assert torch.equal(no_regions.mask_, torch.ones(SIZE, SIZE))
    assert torch.equal(no_regions.flow_, torch.zeros(2, SIZE, SIZE))
    fixed = quick_attack(key_regions=KeyRegions(learn_flow=False)).fit(x)
    assert torch.equal(fixed.flow_, torch.zeros(2, SIZE, SIZE))
    assert torch.equal(fixed.warped_mask_, fixed.mask_)
    learned = quick_attack(lr=0.2).fit(x)
    assert learned.flow_.abs().sum() > 0
    assert 0 < learned.mask_.mean() < 1  # the template key regions cover part of the face
    from krtfuap.baselines import RandomNoiseUAP

    noise = RandomNoiseUAP(TinyEmbedder(), threshold=0.9, random_state=0).fit(x).evaluate(x)["mean_similarity"]
    for kind in ("direction", "cosine", "euclidean"):
        # Every adversarial loss must attack: the fitted perturbation moves embeddings further than
        # random noise of the whole budget does.
        attack = quick_attack(adversarial_loss=kind, stealth_loss=None, max_epochs=5, target_fooling_rate=1.0)
        assert attack.fit(x).evaluate(x)["mean_similarity"] < noise - 0.01, kind


def test_lowpass_size_band_limits_the_fitted_perturbation():
    x = faces()
    full = quick_attack(key_regions=None, lr=0.05).fit(x).perturbation_
    coarse = quick_attack(key_regions=None, lr=0.05, lowpass_size=8).fit(x).perturbation_

    def fine_detail(v: torch.Tensor) -> float:  # what differs from the 2x2 block means
        blocks = torch.nn.functional.avg_pool2d(v[None], 2)[0].repeat_interleave(2, 1).repeat_interleave(2, 2)
        return (v - blocks).abs().mean().item()

    assert fine_detail(coarse) < 0.25 * fine_detail(full)
    assert coarse.abs().max() <= 0.08 + 1e-6 and coarse.abs().mean() > 0.01


def test_min_psnr_keeps_every_perturbed_face_at_or_above_it():
    x = faces()
    loud = quick_attack(key_regions=None, lr=0.05, stealth_loss=None, min_psnr=None).fit(x)
    assert loud.evaluate(x)["psnr"] < 30  # without the floor the fit goes far below it
    quiet = quick_attack(key_regions=None, lr=0.05, stealth_loss=None, min_psnr=34.0).fit(x)
    adversarial = (x + quiet.perturbation_).clamp(0, 1)
    assert psnr(adversarial, x).min().item() >= 34.0 - 1e-3
    assert quiet.perturbation_.pow(2).mean().sqrt().item() == pytest.approx(10 ** (-34 / 20), rel=1e-3)
    assert quiet.evaluate(x)["mean_similarity"] < 0.999  # it still attacks, inside the smaller budget


def test_table1_holds_both_stealth_floors_of_the_papers_table():
    x = faces()
    attack = UAPAttack.table1(TinyEmbedder(), threshold=0.9, max_epochs=3, batch_size=8, random_state=0, lr=0.05)
    assert (attack.target_ssim, attack.min_psnr, attack.key_regions) == (0.93, 32.0, None)
    assert UAPAttack.table1(TinyEmbedder(), min_psnr=34.0).min_psnr == 34.0  # every keyword overridable
    adversarial = (x + attack.fit(x).perturbation_).clamp(0, 1)
    assert psnr(adversarial, x).min().item() >= 32.0 - 1e-3


def test_transferable_feeds_the_model_shrunk_faces_at_every_step():
    attack = UAPAttack.transferable(TinyEmbedder(), threshold=0.9)
    assert (attack.input_diversity, attack.diversity_min_scale, attack.key_regions) == (1.0, 0.8, None)
    assert attack.skip_fooled is False  # fooled faces kept, as by default
    assert attack.target_fooling_rate == 0.9  # runs on past the defaults' 0.8
    assert UAPAttack.transferable(TinyEmbedder(), target_fooling_rate=0.8).target_fooling_rate == 0.8
    assert UAPAttack.transferable(TinyEmbedder(), diversity_min_scale=0.7).diversity_min_scale == 0.7
    # The budget and engine its transfer was measured with, not the defaults' wider budget.
    assert (attack.epsilon, attack.init_scale, attack.min_psnr, attack.channels_last, attack.score_size) == (
        0.08, 1.0, None, False, None)
    assert (UAPAttack(None).epsilon, UAPAttack(None).min_psnr, UAPAttack(None).score_size) == (0.16, 30.0, "auto")
    assert (UAPAttack.paper(None).epsilon, UAPAttack.paper(None).min_psnr, UAPAttack.paper(None).score_size) == (
        0.08, None, None)
    x = faces()
    plain = UAPAttack(TinyEmbedder(), threshold=0.9, max_epochs=2, batch_size=8, random_state=0, lr=0.05).fit(x)
    diverse = UAPAttack.transferable(TinyEmbedder(), threshold=0.9, max_epochs=2, batch_size=8, random_state=0,
                                     lr=0.05).fit(x)
    assert not torch.equal(plain.perturbation_, diverse.perturbation_)  # the shrunk batches changed the fit


def test_masker_options():
    x = faces()
    mask = torch.zeros(SIZE, SIZE)
    mask[8:24, 8:24] = 1
    assert torch.equal(quick_attack(key_regions=KeyRegions(masker=mask)).fit(x).mask_, mask)
    masker = KeyRegionMasker(combine="union")
    attack = quick_attack(key_regions=KeyRegions(masker=masker)).fit(x)
    assert not hasattr(masker, "mask_")  # an unfitted masker is cloned, not changed
    assert attack.mask_.shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="mask has shape"):
        quick_attack(key_regions=KeyRegions(masker=torch.ones(5, 5))).fit(x)


def test_threshold_is_calibrated_from_pairs():
    model = TinyEmbedder()
    x = faces(8)
    genuine = (x, (x + 0.01).clamp(0, 1), torch.ones(8, dtype=torch.bool))
    impostor = (x, faces(8, seed=9), torch.zeros(8, dtype=torch.bool))
    attack = quick_attack(model, threshold=None).fit(x, pairs=[genuine, impostor])
    with torch.no_grad():
        genuine_similarity = torch.cosine_similarity(model(genuine[1]), model(x))
        impostor_similarity = torch.cosine_similarity(model(impostor[1]), model(x))
    # These pairs are separable: the calibrated threshold accepts every genuine pair and rejects every impostor.
    assert impostor_similarity.max() < attack.threshold_ <= genuine_similarity.min()
    assert attack.threshold_accuracy_ == 1.0
    with pytest.raises(ValueError, match="threshold=None needs verification pairs"):
        quick_attack(model, threshold=None).fit(x)


def test_stopping_rules():
    assert quick_attack(target_fooling_rate=0.0, max_epochs=5).fit(faces()).stop_reason_ == "target_fooling_rate"
    timed = quick_attack(max_time=0.0, max_epochs=5).fit(faces())
    assert timed.stop_reason_ == "max_time" and timed.n_iter_ == 1
    full = quick_attack(threshold=-1.0, max_epochs=3).fit(faces())  # nothing can be fooled
    assert full.stop_reason_ == "max_epochs" and full.n_epochs_ == 3 and full.fooling_rate_ == 0.0


def test_accepts_loaders_of_tuples():
    x = faces(12)
    loader = [(x[:6], torch.zeros(6)), (x[6:], torch.zeros(6))]
    attack = quick_attack().fit(loader)
    assert attack.n_iter_ == 4


@pytest.mark.parametrize(
    "data, error, message",
    [
        (torch.rand(4, SIZE, SIZE, 3), ValueError, "channels-last"),
        (torch.rand(3, SIZE, SIZE), ValueError, "unsqueeze"),
        ((torch.rand(4, 3, SIZE, SIZE) * 255).to(torch.uint8), TypeError, "/ 255"),
        (torch.full((4, 3, SIZE, SIZE), float("nan")), ValueError, "NaN"),
        (torch.rand(4, 3, SIZE, SIZE) * 255, ValueError, "divide by 255"),
        ([], ValueError, "empty"),
        ((b for b in [torch.rand(2, 3, SIZE, SIZE)]), TypeError, "one-shot"),
    ],
)
def test_bad_data_gets_a_clear_error(data, error, message):
    with pytest.raises(error, match=message):
        quick_attack().fit(data)


def test_bad_model_output_gets_a_clear_error():
    class WrongShape(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3), keepdim=True)

    with pytest.raises(ValueError, match=r"must have shape \(B, D\)"):
        quick_attack(WrongShape()).fit(faces())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        UAPAttack(lambda x: x, threshold=0.5).fit(faces())


@pytest.mark.parametrize(
    "params, message",
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": 2.0}, "epsilon"),
        ({"threshold": 1.5}, "threshold"),
        ({"target_fooling_rate": 1.2}, "target_fooling_rate"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_time": -1.0}, "max_time"),
        ({"batch_size": 0}, "batch_size"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"adversarial_loss": "hinge"}, "adversarial_loss must be one of"),
        ({"stealth_loss": "blur"}, r"stealth_loss must be one of \['ssim', 'vgg'\], a callable"),
        ({"lowpass_size": 0}, "lowpass_size"),
        ({"lowpass_size": -3}, "lowpass_size"),
    ],
)
def test_bad_parameters_get_a_clear_error(params, message):
    with pytest.raises(ValueError, match=message):
        quick_attack(**params).fit(faces())


def test_transform_checks_its_input(fitted):
    with pytest.raises(ValueError, match="fitted on"):
        fitted.transform(torch.rand(2, 3, SIZE + 1, SIZE))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fitted.transform(torch.rand(2, 3, SIZE, SIZE) + 1)


def test_fit_transform_matches_fit_then_transform():
    x = faces()
    assert torch.equal(quick_attack().fit_transform(x), quick_attack().fit(x).transform(x))


@pytest.mark.real
def test_real_model_fools_held_out_identities_far_better_than_noise(shared_assets):
    from krtfuap.datasets import FaceFolder, split_identities
    from krtfuap.metrics import fooling_rate
    from krtfuap.models import load_foamliu_mobilefacenet

    folder = shared_assets / "faces"
    fit_ids, test_ids = split_identities(FaceFolder(folder).identities, 0.5, random_state=0)
    fit_set, test_set = FaceFolder(folder, identities=fit_ids), FaceFolder(folder, identities=test_ids)
    assert not set(fit_set.identities) & set(test_set.identities)
    fit_faces = torch.stack([fit_set[i][0] for i in range(64)])
    test_faces = torch.stack([test_set[i][0] for i in range(64)])
    model = load_foamliu_mobilefacenet(shared_assets / "models" / "foamliu_mobilefacenet_128d.pt")
    # t = 0.275: best-accuracy threshold of this model on the LFW pairs (benchmarks/attack_quality.py).
    attack = UAPAttack(
        model, threshold=0.275, stealth_loss=None, target_fooling_rate=0.95, max_epochs=12, batch_size=16,
        random_state=0,
    ).fit(fit_faces)
    result = attack.evaluate(test_faces)

    noise = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1) * attack.epsilon
    with torch.no_grad():
        noise_rate = fooling_rate(model((test_faces + noise).clamp(0, 1)), model(test_faces), 0.275)
    assert result["fooling_rate"] >= noise_rate + 0.4, (result, noise_rate)
    assert not math.isnan(result["ssim"])


def test_resume_from_checkpoint_equals_uninterrupted_fit(tmp_path):
    x = faces(16)
    loader = torch.utils.data.DataLoader(x, batch_size=8, shuffle=True)
    torch.manual_seed(1)
    whole = quick_attack(threshold=-1.0, max_epochs=4).fit(loader)

    path = tmp_path / "fit.ckpt"
    torch.manual_seed(1)
    quick_attack(threshold=-1.0, max_epochs=2, checkpoint_path=path).fit(loader)  # "killed" after epoch 2
    assert path.is_file() and not (tmp_path / "fit.ckpt.partial").exists()
    torch.manual_seed(123)  # resume must not depend on the global RNG state it starts with
    resumed = quick_attack(threshold=-1.0, max_epochs=4, checkpoint_path=path).fit(loader, resume=True)
    assert torch.equal(resumed.perturbation_, whole.perturbation_)
    assert torch.equal(resumed.flow_, whole.flow_)
    assert untimed(resumed.history_) == untimed(whole.history_) and resumed.n_iter_ == whole.n_iter_ == 8


def test_resume_refuses_foreign_or_malicious_checkpoints(tmp_path):
    path = tmp_path / "fit.ckpt"

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": "something else", "x": Payload()}, path)
    with pytest.raises(ValueError, match="Refused to load checkpoint"):
        quick_attack(checkpoint_path=path).fit(faces(), resume=True)
    torch.save({"format": "other"}, path)
    with pytest.raises(ValueError, match="not written by UAPAttack"):
        quick_attack(checkpoint_path=path).fit(faces(), resume=True)


def test_max_steps_stops_mid_epoch_scores_that_state_and_repeats_exactly():
    x = faces(16)
    first = quick_attack(max_epochs=5, max_steps=3, target_fooling_rate=1.0).fit(x)  # 2 steps per epoch
    again = quick_attack(max_epochs=5, max_steps=3, target_fooling_rate=1.0).fit(x)
    assert first.n_iter_ == 3 and first.n_epochs_ == 2 and first.stop_reason_ == "max_steps"
    assert len(first.epoch_scores_) == 2  # the cut epoch is scored too
    assert torch.equal(first.perturbation_, again.perturbation_)
    assert first.fooling_rate_ == first.evaluate(x)["fooling_rate"]
    with pytest.raises(ValueError, match="max_steps"):
        quick_attack(max_steps=0).fit(x)


def test_cosine_decay_runs_from_one_to_its_final_factor_and_holds():
    from krtfuap.attack import cosine_decay

    assert cosine_decay(0.0) == 1.0
    assert cosine_decay(0.5) == pytest.approx(0.55)
    assert cosine_decay(1.0) == pytest.approx(0.1) and cosine_decay(9.9) == pytest.approx(0.1)
    assert cosine_decay(1.0, final=0.0) == pytest.approx(0.0)
    factors = [cosine_decay(step / 10) for step in range(12)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_decay_progress_follows_the_nearer_limit_of_the_fit():
    from krtfuap.attack import AUTO_DECAY_STEPS, decay_progress

    assert decay_progress(30, 5.0, None, max_steps=100) is None
    assert decay_progress(30, 5.0, 60, max_steps=100, max_time=10.0) == 0.5  # a number of steps ignores the limits
    assert decay_progress(30, 5.0, "auto", max_steps=100) == 0.3
    assert decay_progress(30, 5.0, "auto", max_time=20.0) == 0.25
    assert decay_progress(30, 5.0, "auto", max_steps=100, max_time=10.0) == 0.5  # time runs out first
    assert decay_progress(30, 5.0, "auto", max_steps=40, max_time=10.0) == 0.75  # steps run out first
    assert decay_progress(30, 5.0, "auto") == 30 / AUTO_DECAY_STEPS
    assert decay_progress(1, 0.1, "auto", max_time=0.0) == math.inf  # no time at all: decayed at once


def test_lr_decay_steps_lowers_both_learning_rates_and_survives_a_resume(tmp_path):
    from krtfuap.attack import cosine_decay

    x = faces()
    regions = KeyRegions(flow_lr=0.02)
    attack = quick_attack(lr=0.05, key_regions=regions, lr_decay_steps=3, max_epochs=3, target_fooling_rate=1.0).fit(x)
    assert attack.n_iter_ == 6  # 16 faces, batches of 8
    constant = quick_attack(lr=0.05, key_regions=regions, lr_decay_steps=None, max_epochs=3,
                            target_fooling_rate=1.0).fit(x)
    assert not torch.equal(attack.perturbation_, constant.perturbation_)
    path = tmp_path / "fit.ckpt"
    settings = dict(lr=0.05, key_regions=regions, lr_decay_steps=3, target_fooling_rate=1.0, checkpoint_path=path)
    quick_attack(max_epochs=1, **settings).fit(x)
    state = torch.load(path, map_location="cpu", weights_only=True)
    lrs = [group["lr"] for group in state["solver"]["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([0.05 * cosine_decay(2 / 3), 0.02 * cosine_decay(2 / 3)])
    resumed = quick_attack(max_epochs=3, **settings).fit(x, resume=True)
    assert torch.equal(resumed.perturbation_, attack.perturbation_)
    with pytest.raises(ValueError, match="lr_decay_steps"):
        quick_attack(lr_decay_steps=0).fit(x)


def test_tensorwise_adam_fits_resumes_exactly_and_differs_from_adam(tmp_path):
    x = faces()
    settings = dict(optimizer="tensorwise_adam", key_regions=KeyRegions(), max_epochs=3, target_fooling_rate=1.0)
    attack = quick_attack(**settings).fit(x)
    assert attack.n_iter_ == 6 and attack.optimizer == "tensorwise_adam"
    adam = quick_attack(**{**settings, "optimizer": "adam"}).fit(x)
    assert not torch.equal(attack.perturbation_, adam.perturbation_)
    path = tmp_path / "fit.ckpt"
    quick_attack(checkpoint_path=path, **{**settings, "max_epochs": 1}).fit(x)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["solver"]["optimizer"]["state"][0]["exp_avg_sq"].ndim == 0  # one second moment per tensor
    resumed = quick_attack(checkpoint_path=path, **settings).fit(x, resume=True)
    assert torch.equal(resumed.perturbation_, attack.perturbation_)
    assert torch.equal(resumed.flow_, attack.flow_)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        quick_attack(optimizer="sgd").fit(x)


def test_the_singular_start_lies_along_the_top_direction_of_the_first_faces():
    from krtfuap.attack import SINGULAR_INIT_FACES
    from krtfuap.singular import top_singular_direction

    model, x = TinyEmbedder(), faces(SINGULAR_INIT_FACES + 6, seed=3)
    common = dict(threshold=0.9, stealth_loss=None, max_steps=1, lr=1e-9, epsilon=0.3, init_scale=1.0, min_psnr=None,
                  batch_size=8, random_state=0)
    start = UAPAttack(model, init="singular", **common).fit(x).perturbation_
    direction = top_singular_direction(model, x[:SINGULAR_INIT_FACES], generator=torch.Generator().manual_seed(5))
    rms = 0.3 / math.sqrt(3)  # the uniform start's, then clipped to epsilon
    expected = (direction * rms / direction.pow(2).mean().sqrt()).clamp(-0.3, 0.3)
    sign = torch.sign((start * expected).sum())  # a singular direction's sign is arbitrary
    torch.testing.assert_close(start, sign * expected, atol=0.01, rtol=0)  # both from 15 power iterations
    uniform = UAPAttack(model, **common).fit(x).perturbation_
    assert abs(torch.nn.functional.cosine_similarity(uniform.flatten(), expected.flatten(), dim=0)) < 0.1
    assert UAPAttack(None).init == "uniform" and UAPAttack.paper(None).init == "uniform"


def test_a_resumed_singular_start_keeps_its_state_and_equals_the_uninterrupted_fit(tmp_path, monkeypatch):
    import krtfuap.attack as attack_module

    calls = []
    real = attack_module.top_singular_direction
    monkeypatch.setattr(attack_module, "top_singular_direction", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = faces(16)
    settings = dict(init="singular", threshold=-1.0, random_state=0)
    whole = quick_attack(max_epochs=4, **settings).fit(x)
    path = tmp_path / "fit.ckpt"
    quick_attack(max_epochs=2, checkpoint_path=path, **settings).fit(x)
    assert len(calls) == 2
    resumed = quick_attack(max_epochs=4, checkpoint_path=path, **settings).fit(x, resume=True)
    assert len(calls) == 2  # the resumed fit starts from its checkpoint, not from a new direction
    assert torch.equal(resumed.perturbation_, whole.perturbation_)
    assert untimed(resumed.history_) == untimed(whole.history_)


def test_a_tensor_start_is_where_the_fit_begins_clipped_to_epsilon():
    from krtfuap.perturbation import masked_perturbation

    x = faces(10, seed=2)
    start = (torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.6
    assert (start.abs() > 0.2).any()  # some values are clipped
    common = dict(threshold=0.9, stealth_loss=None, max_steps=1, lr=1e-9, epsilon=0.2, min_psnr=None, batch_size=5,
                  random_state=0)
    begun = UAPAttack(TinyEmbedder(), init=start, **common).fit(x)
    torch.testing.assert_close(begun.perturbation_, start.clamp(-0.2, 0.2), atol=1e-6, rtol=0)
    regions = UAPAttack(TinyEmbedder(), init=start, key_regions=KeyRegions(), **common).fit(x)
    expected = masked_perturbation(start.clamp(-0.2, 0.2), regions.warped_mask_, 0.2)  # the mask times it
    torch.testing.assert_close(regions.perturbation_, expected, atol=1e-6, rtol=0)
    again = UAPAttack(TinyEmbedder(), init=begun.perturbation_, **{**common, "lr": 0.01, "max_steps": 4}).fit(x)
    assert torch.equal(again.init, begun.perturbation_)  # a parameter: stored, not changed by the fit


@pytest.mark.parametrize("start, problem", [
    (torch.zeros(3, SIZE, SIZE + 1), rf"init must be a tensor of shape \(3, {SIZE}, {SIZE}\), the faces' size, got "
                                     rf"\(3, {SIZE}, {SIZE + 1}\); pass a finite float tensor, e.g. a perturbation_ "
                                     "fitted on faces of this size"),
    (torch.zeros(1, 3, SIZE, SIZE), r"init must be a tensor of shape .* got \(1, 3, "),
    (torch.full((3, SIZE, SIZE), math.nan), r"init holds NaN or infinite values; pass a finite float tensor"),
    (torch.zeros(3, SIZE, SIZE, dtype=torch.int64), r"init must be a float tensor of shape .* got dtype torch.int64; "),
])
def test_a_tensor_start_not_a_finite_float_tensor_of_the_faces_size_is_refused(start, problem):
    with pytest.raises(ValueError, match=problem):
        UAPAttack(TinyEmbedder(), threshold=0.9, init=start, max_steps=1).fit(faces(4))


def test_a_checkpoint_resumes_only_with_the_tensor_start_it_was_fitted_from(tmp_path):
    x, path = faces(16), tmp_path / "fit.ckpt"
    start = torch.full((3, SIZE, SIZE), 0.02)
    whole = quick_attack(max_epochs=4, init=start, threshold=-1.0, random_state=0).fit(x)
    quick_attack(max_epochs=2, init=start, threshold=-1.0, random_state=0, checkpoint_path=path).fit(x)
    with pytest.raises(ValueError, match=r"other settings or data; differs in data_digest"):
        quick_attack(max_epochs=4, init=-start, threshold=-1.0, random_state=0, checkpoint_path=path).fit(
            x, resume=True)
    resumed = quick_attack(max_epochs=4, init=start.clone(), threshold=-1.0, random_state=0,
                           checkpoint_path=path).fit(x, resume=True)
    assert torch.equal(resumed.perturbation_, whole.perturbation_)


def test_the_default_decays_the_learning_rate_over_the_fits_budget_and_the_paper_keeps_it_constant(tmp_path):
    from krtfuap.attack import AUTO_DECAY_STEPS, cosine_decay

    x = faces()
    common = dict(threshold=0.9, max_epochs=1, batch_size=8, random_state=0, target_fooling_rate=1.0)

    def learning_rates(**settings):
        path = tmp_path / "fit.ckpt"
        path.unlink(missing_ok=True)
        UAPAttack(TinyEmbedder(), checkpoint_path=path, **common, **settings).fit(x)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return [group["lr"] for group in state["solver"]["optimizer"]["param_groups"]]

    # Two steps done (16 faces, batches of 8) of a decay over the default's 600 steps, ...
    assert learning_rates() == pytest.approx([0.01 * cosine_decay(2 / AUTO_DECAY_STEPS)], rel=1e-12)
    assert learning_rates()[0] < 0.01
    # ... over max_steps when it is set, and by the share of max_time used when that is nearer.
    assert learning_rates(max_steps=4) == pytest.approx([0.01 * cosine_decay(2 / 4)], rel=1e-12)
    assert learning_rates(max_steps=4, max_time=1e9) == pytest.approx([0.01 * cosine_decay(2 / 4)], rel=1e-12)
    assert 0.01 * cosine_decay(2 / AUTO_DECAY_STEPS) < learning_rates(max_time=1e9)[0] <= 0.01
    path = tmp_path / "paper.ckpt"
    UAPAttack.paper(TinyEmbedder(), stealth_loss="ssim", stealth_weight=3, checkpoint_path=path, **common).fit(x)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert [group["lr"] for group in state["solver"]["optimizer"]["param_groups"]] == [0.01, 0.01]  # never decayed
