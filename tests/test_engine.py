"""The shared fit loop (krtfuap/engine.py) and the estimator base (krtfuap/estimator.py)."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import TinyEmbedder, tiny_attack, untimed
from fakes import random_faces as faces
from torch import nn

from krtfuap._ops import call_model
from krtfuap.attack import AUTO_WARM_UP, UAPAttack, adapt_stealth_weight
from krtfuap.key_regions import KeyRegions
from krtfuap.baselines import FGUAP, DeepFoolUAP, FrequencyUAP, RandomNoiseUAP
from krtfuap._batches import FitData
from krtfuap.engine import FitLoop, Solver, frozen, in_memory_format, selection_key
from krtfuap.models.ensemble import EnsembleEmbedder
from krtfuap.scoring import score_perturbation

SIZE = 32
ESTIMATORS = [UAPAttack, RandomNoiseUAP, DeepFoolUAP, FGUAP, FrequencyUAP]


def make(cls, model=None, **params):
    settings = dict(threshold=0.99, epsilon=0.08, max_epochs=3)
    if cls is UAPAttack:
        settings.update(key_regions=KeyRegions(masker=torch.full((SIZE, SIZE), 0.5)))
    settings.update(params)
    if cls is RandomNoiseUAP:  # nothing learned: no stopping rules to set
        settings = {key: value for key, value in settings.items() if key not in ("max_epochs", "target_fooling_rate")}
    return tiny_attack(cls, model, **settings)


# --------------------------------------------------------------------------- frozen
class _Mixed(nn.Module):
    """A model whose submodules and parameters start in mixed states."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 4)
        self.backbone.eval()  # eval-mode backbone inside a training-mode model
        self.head.weight.requires_grad_(False)


def _states(model: nn.Module):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_frozen_restores_every_submodule_and_parameter_exactly():
    model = _Mixed()
    before = _states(model)
    with frozen(model):
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
    assert _states(model) == before


def test_frozen_restores_on_error():
    model = _Mixed()
    before = _states(model)
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(model):
            raise RuntimeError("boom")
    assert _states(model) == before


@pytest.mark.parametrize("fails", [False, True])
def test_in_memory_format_converts_the_weights_and_puts_the_originals_back(fails):
    model = _Mixed()
    conv = model.backbone[0]
    weight, storages = conv.weight.detach().clone(), (conv.weight.data_ptr(), conv.bias.data_ptr())
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    try:
        with in_memory_format(model, torch.channels_last):
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(conv.weight, weight, atol=0, rtol=0)
            if fails:
                raise RuntimeError("boom")
    except RuntimeError:
        assert fails
    assert (conv.weight.data_ptr(), conv.bias.data_ptr()) == storages and conv.weight.is_contiguous()
    with in_memory_format(model, None):  # None: the model as it is
        assert conv.weight.data_ptr() == storages[0]


def test_ensemble_members_keep_their_eval_mode_after_fit_and_evaluate():
    members = [TinyEmbedder().eval(), TinyEmbedder().eval()]
    attack = make(UAPAttack, model=members, max_epochs=1).fit(faces())
    attack.evaluate(faces(4, seed=1))
    assert not any(m.training for member in members for m in member.modules())
    assert all(p.requires_grad for member in members for p in member.parameters())
    assert isinstance(attack._embedder(), EnsembleEmbedder)


# ------------------------------------------------------------------- selection key
def test_selection_key_prefers_fooling_rate_then_lower_similarity():
    a = {"fooling_rate": 0.5, "mean_similarity": 0.2, "ssim": 0.9}
    b = {"fooling_rate": 0.5, "mean_similarity": 0.1, "ssim": 0.8}
    c = {"fooling_rate": 0.6, "mean_similarity": 0.3, "ssim": 0.7}
    assert sorted([a, b, c], key=lambda s: selection_key(s, None)) == [a, b, c]


def test_selection_key_with_a_stealth_target():
    meets_low = {"fooling_rate": 0.2, "mean_similarity": 0.5, "ssim": 0.95}
    meets_high = {"fooling_rate": 0.4, "mean_similarity": 0.4, "ssim": 0.94}
    misses_close = {"fooling_rate": 0.9, "mean_similarity": 0.0, "ssim": 0.92}
    misses_far = {"fooling_rate": 1.0, "mean_similarity": -0.1, "ssim": 0.80}
    ranked = sorted([meets_high, misses_far, meets_low, misses_close], key=lambda s: selection_key(s, 0.93))
    assert ranked == [misses_far, misses_close, meets_low, meets_high]


# --------------------------------------------------------------- the loop itself
class _ScriptedSolver(Solver):
    """Each step adds 1 to a constant perturbation; a scripted scorer scores epoch k."""

    def __init__(self) -> None:
        self.value = torch.zeros(3, SIZE, SIZE)

    def step(self, images, clean_embeddings):
        self.value = self.value + 1
        return {"value": float(self.value[0, 0, 0])}

    def perturbation(self):
        return self.value


def _loop(**params) -> FitLoop:
    model = TinyEmbedder()
    settings = dict(embed=model, threshold=0.5, device=torch.device("cpu"), max_epochs=4, target_fooling_rate=1.0)
    settings.update(params)
    return FitLoop(**settings)


def _scripted(loop: FitLoop, fooling_rates: list[float], monkeypatch) -> None:
    scores = iter(fooling_rates)

    def scorer(data, cache):
        return lambda perturbation, epoch: {"fooling_rate": next(scores), "mean_similarity": 0.0, "ssim": 1.0,
                                     "psnr": 40.0, "n_images": 16}

    monkeypatch.setattr(loop, "_scorer", scorer)


class _RecordingSolver(Solver):
    """Learns nothing; keeps every batch and clean embedding it is given."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(self, images, clean_embeddings):
        self.batches.append((images.clone(), clean_embeddings.clone()))
        return {}

    def perturbation(self):
        return torch.zeros(3, SIZE, SIZE)


def _epochs_seen(shuffle: bool, n_faces: int = 10, batch_size: int = 4, epochs: int = 3):
    data = faces(n_faces)
    loop = _loop(max_epochs=epochs, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    solver = _RecordingSolver()
    loop.run(FitData(data, batch_size, shuffle=shuffle), solver)
    per_epoch = -(-n_faces // batch_size)
    assert len(solver.batches) == per_epoch * epochs
    orders = []
    for epoch in range(epochs):
        batches = solver.batches[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert [len(images) for images, _ in batches] == [4, 4, 2]
        images = torch.cat([images for images, _ in batches])
        clean = torch.cat([clean for _, clean in batches])
        # Which face each row is: its index in data (every face exactly once).
        order = [int((data == face).flatten(1).all(1).nonzero()) for face in images]
        assert sorted(order) == list(range(n_faces))
        with torch.no_grad():
            assert torch.allclose(clean, loop.embed(images), atol=1e-6)  # each face keeps its own embedding
        orders.append(order)
    return orders


def test_shuffled_epochs_visit_every_face_once_in_a_new_order_with_its_own_clean_embedding():
    orders = _epochs_seen(shuffle=True)
    assert len({tuple(order) for order in orders}) == len(orders)
    assert _epochs_seen(shuffle=True) == orders  # the generator decides the order


def test_without_shuffle_every_epoch_keeps_the_data_order():
    assert _epochs_seen(shuffle=False) == [list(range(10))] * 3


def test_loop_returns_the_best_scored_state_and_the_earliest_tie(monkeypatch):
    loop = _loop()
    _scripted(loop, [0.2, 0.6, 0.6, 0.1], monkeypatch)
    result = loop.run(FitData(faces(), 8), _ScriptedSolver())
    assert result.best_epoch == 1 and result.n_epochs == 4 and result.stop_reason == "max_epochs"
    assert result.score["fooling_rate"] == 0.6
    # Two steps per epoch: the state after epoch 1 is 4 steps in.
    assert torch.equal(result.snapshot["perturbation_"], torch.full((3, SIZE, SIZE), 4.0))
    assert [s["fooling_rate"] for s in result.epoch_scores] == [0.2, 0.6, 0.6, 0.1]


def test_loop_stops_on_the_scored_fooling_rate(monkeypatch):
    loop = _loop(target_fooling_rate=0.5)
    _scripted(loop, [0.2, 0.6, 0.9], monkeypatch)
    result = loop.run(FitData(faces(), 8), _ScriptedSolver())
    assert result.stop_reason == "target_fooling_rate" and result.n_epochs == 2 and result.n_iter == 4


def test_loop_max_time_zero_takes_one_step_and_scores_it(monkeypatch):
    loop = _loop(max_time=0.0)
    _scripted(loop, [0.3], monkeypatch)
    result = loop.run(FitData(faces(), 8), _ScriptedSolver())
    assert result.stop_reason == "max_time" and result.n_iter == 1 and len(result.epoch_scores) == 1
    assert torch.equal(result.snapshot["perturbation_"], torch.ones(3, SIZE, SIZE))


# ------------------------------------------------------------------ honest numbers
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_reported_fooling_rate_is_that_of_the_returned_perturbation(cls):
    X = faces(24)
    attack = make(cls, threshold=0.995, max_epochs=3, target_fooling_rate=0.5).fit(X)
    result = attack.evaluate(X)
    assert attack.fooling_rate_ == result["fooling_rate"]
    assert attack.ssim_ == pytest.approx(result["ssim"], abs=1e-6)
    assert attack.epoch_scores_[attack.best_epoch_]["fooling_rate"] == attack.fooling_rate_


def test_issue_case_stealth_on_fooled_faces_cannot_fake_the_stop():
    # The old loop stopped on per-batch rates measured before each update while the stealth term
    # kept pulling already-fooled faces back: it reported 0.875 for a perturbation fooling none.
    X = faces(8)
    attack = make(UAPAttack, threshold=0.999, stealth_loss="ssim", stealth_weight=50.0, skip_fooled=True,
                  init_scale=1.0, max_epochs=5, batch_size=4).fit(X)
    assert attack.fooling_rate_ == attack.evaluate(X)["fooling_rate"]
    if attack.stop_reason_ == "target_fooling_rate":
        assert attack.fooling_rate_ >= attack.target_fooling_rate


def test_fitting_beats_its_starting_point_on_a_small_fixed_network():
    X = faces(32)
    start = make(UAPAttack, threshold=0.98, max_time=0.0, stealth_loss=None, init_scale=1.0).fit(X)
    fitted = make(UAPAttack, threshold=0.98, max_epochs=15, stealth_loss=None, init_scale=1.0,
                  target_fooling_rate=1.0, lr=0.01).fit(X)
    assert fitted.fooling_rate_ >= start.fooling_rate_ + 0.3
    assert fitted.evaluate(faces(32, seed=9))["mean_similarity"] < start.evaluate(faces(32, seed=9))["mean_similarity"]


# --------------------------------------------------------------------- stealth target
def test_adapt_stealth_weight_moves_toward_the_target():
    assert adapt_stealth_weight(1.0, 0.90, 0.93, 0.05) == pytest.approx(math.exp(0.15))
    assert adapt_stealth_weight(1.0, 0.96, 0.93, 0.05) == pytest.approx(math.exp(-0.15))
    assert adapt_stealth_weight(1.0, 0.50, 0.93, 0.0) == 1.0
    assert adapt_stealth_weight(1e4, 0.0, 0.99, 1.0) == 1e4  # clipped


@pytest.mark.parametrize("stealth_loss", ["ssim", lambda adversarial, clean: (adversarial - clean).abs().mean()])
def test_target_ssim_holds_on_the_fit_faces(stealth_loss):
    # Smooth images: full-budget noise drops their SSIM far below the target, so the target binds.
    coarse = torch.rand(24, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    X = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    attack = make(UAPAttack, threshold=0.98, stealth_loss=stealth_loss, stealth_weight=0.01, target_ssim=0.9,
                  init_scale=1.0, min_psnr=None, max_epochs=12, target_fooling_rate=1.0).fit(X)
    assert attack.ssim_ >= 0.9
    assert attack.evaluate(X)["ssim"] >= 0.9
    assert attack.stealth_weight_ > 0.01  # the weight had to grow to meet the target
    weights = [record["stealth_weight"] for record in attack.history_]
    assert weights[0] == 0.01 and len(set(weights)) > 1


def test_target_ssim_start_aims_lower_first_and_still_returns_a_perturbation_that_meets_the_target():
    coarse = torch.rand(24, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    X = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    common = dict(threshold=0.98, stealth_loss="ssim", stealth_weight=0.01, target_ssim=0.9, init_scale=1.0,
                  max_steps=48, max_epochs=100, target_fooling_rate=1.0, random_state=0)
    direct = make(UAPAttack, target_ssim_start=None, **common).fit(X)
    warmed = make(UAPAttack, target_ssim_start=0.8, **common).fit(X)
    same = make(UAPAttack, target_ssim_start=0.9, **common).fit(X)
    second_weights = [fit.history_[1]["stealth_weight"] for fit in (direct, warmed)]
    assert second_weights[1] < second_weights[0]  # the same first batch, a lower aim: a smaller weight after it
    assert warmed.ssim_ >= 0.9 and warmed.evaluate(X)["ssim"] >= 0.9  # the result meets the target itself
    assert untimed(same.history_) == untimed(direct.history_)  # a start at the target is no warm-up


def test_the_default_warm_up_starts_0_06_below_the_target_and_needs_no_target():
    X = faces(16)
    common = dict(threshold=0.98, stealth_loss="ssim", stealth_weight=0.01, target_ssim=0.9, max_steps=6,
                  target_fooling_rate=1.0, random_state=0)
    auto = make(UAPAttack, **common).fit(X)
    assert auto.target_ssim_start == "auto" and AUTO_WARM_UP == 0.06
    explicit = make(UAPAttack, target_ssim_start=0.9 - AUTO_WARM_UP, **common).fit(X)
    assert untimed(auto.history_) == untimed(explicit.history_)
    assert untimed(auto.history_) != untimed(make(UAPAttack, target_ssim_start=None, **common).fit(X).history_)
    make(UAPAttack, target_ssim=None, max_steps=2).fit(X)  # "auto" without a target: no warm-up, no error
    # Limited by max_epochs alone, the fit's length is unknown: no warm-up, so a short fit still aims at the target.
    by_epochs = {**common, "max_steps": None, "max_epochs": 1}
    assert untimed(make(UAPAttack, **by_epochs).fit(X).history_) == untimed(
        make(UAPAttack, target_ssim_start=None, **by_epochs).fit(X).history_)


def test_target_ssim_start_needs_a_target_at_or_above_it():
    X = faces(8)
    for bad in (dict(target_ssim_start=0.9), dict(target_ssim=0.9, target_ssim_start=0.95)):
        with pytest.raises(ValueError, match="target_ssim_start"):
            make(UAPAttack, **bad).fit(X)


# ----------------------------------------------------------------- fitted state
def test_a_failed_refit_leaves_the_previous_fit_whole(monkeypatch):
    X = faces(16)
    attack = make(UAPAttack).fit(X)
    before = {k: getattr(attack, k) for k in ("perturbation_", "history_", "threshold_", "n_iter_", "fooling_rate_")}
    calls = {"n": 0}
    from krtfuap import attack as attack_module

    real_step = attack_module._KeyRegionSolver.step

    def failing_step(self, images, clean):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_step(self, images, clean)

    monkeypatch.setattr(attack_module._KeyRegionSolver, "step", failing_step)
    with pytest.raises(RuntimeError, match="simulated"):
        attack.set_params(threshold=0.5, lr=0.05).fit(X)
    for name, value in before.items():
        assert getattr(attack, name) is value, name


def test_interrupt_prints_one_line_and_keeps_the_previous_fit(monkeypatch, capsys, tmp_path):
    X = faces(16)
    attack = make(UAPAttack, checkpoint_path=tmp_path / "fit.ckpt").fit(X)
    previous = attack.perturbation_
    from krtfuap import attack as attack_module

    def interrupted(self, images, clean):
        raise KeyboardInterrupt

    monkeypatch.setattr(attack_module._KeyRegionSolver, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attack.fit(X)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume=True" in err[0] and "fit.ckpt" in err[0]
    assert attack.perturbation_ is previous


# ------------------------------------------------------------------ resume safety
@pytest.mark.parametrize("change, named", [
    (dict(lr=0.05), "lr"), (dict(epsilon=0.05), "epsilon"), (dict(random_state=1), "random_state"),
    (dict(batch_size=4), "batch_size"), (dict(key_regions=KeyRegions(masker=torch.full((SIZE, SIZE), 0.25))), "data_digest"),
])
def test_resume_refuses_a_checkpoint_of_another_fit(tmp_path, change, named):
    path = tmp_path / "fit.ckpt"
    make(UAPAttack, checkpoint_path=path, max_epochs=2).fit(faces())
    assert path.exists()
    with pytest.raises(ValueError, match=rf"other settings or data; differs in .*{named}"):
        make(UAPAttack, checkpoint_path=path, max_epochs=3, **change).fit(faces(), resume=True)


def test_resume_refuses_other_data(tmp_path):
    path = tmp_path / "fit.ckpt"
    make(UAPAttack, checkpoint_path=path, max_epochs=2).fit(faces())
    with pytest.raises(ValueError, match="data_digest"):
        make(UAPAttack, checkpoint_path=path, max_epochs=3).fit(faces(seed=3), resume=True)


def test_resume_may_extend_max_epochs_and_max_time(tmp_path):
    path = tmp_path / "fit.ckpt"
    # A decay of fixed length: "auto" would follow max_time, and so the clock.
    steps = dict(lr_decay_steps=600, target_fooling_rate=1.0)
    make(UAPAttack, checkpoint_path=path, max_epochs=2, **steps).fit(faces())
    resumed = make(UAPAttack, checkpoint_path=path, max_epochs=4, max_time=1e6, **steps)
    resumed.fit(faces(), resume=True)
    straight = make(UAPAttack, max_epochs=4, **steps).fit(faces())
    assert resumed.n_epochs_ == 4
    assert torch.equal(resumed.perturbation_, straight.perturbation_)


@pytest.mark.parametrize("cls", [DeepFoolUAP, FGUAP, FrequencyUAP])
def test_baselines_checkpoint_and_resume_like_uapattack(cls, tmp_path):
    path = tmp_path / "fit.ckpt"
    never = dict(threshold=-1.0, target_fooling_rate=1.0)  # cos < -1 never happens: every epoch runs
    make(cls, checkpoint_path=path, max_epochs=2, **never).fit(faces())
    resumed = make(cls, checkpoint_path=path, max_epochs=3, **never).fit(faces(), resume=True)
    straight = make(cls, max_epochs=3, **never).fit(faces())
    assert resumed.n_iter_ == straight.n_iter_ == 6
    assert torch.equal(resumed.perturbation_, straight.perturbation_)


# ------------------------------------------------------------------ parameter checks
@pytest.mark.parametrize("params, error, message", [
    (dict(stealth_weight=float("nan")), ValueError, "stealth_weight must be a finite number"),
    (dict(max_time=float("nan")), ValueError, "max_time .*finite"),
    (dict(epsilon="0.08"), TypeError, "epsilon .*must be a number"),
    (dict(max_epochs=2.5), TypeError, "max_epochs must be an int"),
    (dict(batch_size=True), TypeError, "batch_size must be an int"),
    (dict(target_ssim=1.0), ValueError, r"target_ssim must be a number in \(0, 1\) or None, got 1\.0"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number"),
    (dict(shuffle="yes"), TypeError, "shuffle must be True or False"),
])
def test_mistyped_or_non_finite_parameters_are_refused_before_any_work(params, error, message):
    model = TinyEmbedder()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(error, match=message):
        make(UAPAttack, model=model, **params).fit(faces())
    assert calls == []


# ---------------------------------------------------------------- model outputs
class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyEmbedder()

    def forward(self, x):
        return self.inner(x).detach()


class _Dead(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 8) * x.sum()


@pytest.mark.parametrize("model, error, message", [
    (_Detached(), ValueError, "does not depend differentiably on its input"),
    (_Dead(), ValueError, "all-zero embedding"),
])
def test_unusable_model_outputs_are_named_on_the_first_batch(model, error, message):
    with pytest.raises(error, match=message):
        make(UAPAttack, model=model).fit(faces())


# ---------------------------------------------------------- low-precision models
def _cpu_runs(dtype: torch.dtype) -> bool:
    """Whether this torch runs a convolution, forward and backward, in ``dtype`` on the CPU."""
    try:
        x = torch.rand(1, 3, 8, 8, dtype=dtype, requires_grad=True)
        nn.Conv2d(3, 2, 3).to(dtype)(x).sum().backward()
    except RuntimeError:
        return False
    return True


# float16 convolution on the CPU exists only in recent torch versions: skipped (and said so) where absent.
LOW_PRECISION = [
    pytest.param(dtype, id=str(dtype).removeprefix("torch."),
                 marks=pytest.mark.skipif(not _cpu_runs(dtype), reason=f"this torch has no {dtype} CPU convolution"))
    for dtype in (torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gradients_reach_a_float32_perturbation_through_a_low_precision_model(dtype):
    images = faces(4)
    gradients = []
    for model in (TinyEmbedder(), TinyEmbedder().to(dtype)):
        perturbation = torch.zeros(3, SIZE, SIZE, requires_grad=True)
        call_model(model, (images + perturbation).clamp(0, 1)).float().square().sum().backward()
        gradients.append(perturbation.grad)
    assert gradients[1].dtype == torch.float32
    assert torch.cosine_similarity(gradients[0].flatten(), gradients[1].flatten(), dim=0) > 0.99


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_a_low_precision_model_fits_transforms_and_evaluates(cls, dtype):
    X = faces(8)
    pairs = [(X[:4], torch.cat([X[:2], X[4:6]]), torch.tensor([True, True, False, False]))]
    model = TinyEmbedder().to(dtype)
    attack = make(cls, model=model, threshold=None, max_epochs=2).fit(X, pairs=pairs)  # calibrates too
    assert all(p.dtype == dtype for p in model.parameters())  # the model is not converted
    for name in ("perturbation_", "noise_", "mask_", "warped_mask_", "flow_"):
        assert getattr(attack, name).dtype == torch.float32, name  # learned state stays float32
    assert attack.perturbation_.abs().max() <= attack.epsilon + 1e-6
    cloaked = attack.transform(X)
    assert cloaked.dtype == torch.float32 and (cloaked - X).abs().max() <= attack.epsilon + 1e-6
    result = attack.evaluate(X)
    assert result["fooling_rate"] == attack.fooling_rate_  # evaluate and the fit score alike in low precision
    # The same perturbation judged by the float32 twin of the model: the same numbers, to low precision.
    reference = score_perturbation(TinyEmbedder(), X, attack.perturbation_, attack.threshold_)
    assert 1 - result["mean_similarity"] == pytest.approx(1 - reference["mean_similarity"], rel=0.25)


def test_an_ensemble_may_mix_precisions():
    X = faces(8)
    members = [TinyEmbedder().to(torch.bfloat16), TinyEmbedder()]
    attack = make(UAPAttack, model=members, max_epochs=1).fit(X)
    assert attack.evaluate(X)["fooling_rate"] == attack.fooling_rate_
    assert members[0].net[0].weight.dtype == torch.bfloat16 and members[1].net[0].weight.dtype == torch.float32


# ------------------------------------------------------------------- loading
def _resave(path, tmp_path, *, params=None, fitted=None, tensors=None):
    """Rewrite a saved attack with some metadata or tensors replaced."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    if params:
        metadata["params"] = json.dumps({**json.loads(metadata["params"]), **params})
    if fitted:
        metadata["fitted"] = json.dumps({**json.loads(metadata["fitted"]), **fitted})
    stored.update(tensors or {})
    out = tmp_path / "edited.safetensors"
    save_file(stored, out, metadata=metadata)
    return out


@pytest.mark.parametrize("edit, message", [
    (dict(fitted={"threshold_": "x"}), "invalid fitted values"),
    (dict(fitted={"transform": 1}), None),  # unknown keys are ignored, never set as attributes
    (dict(params={"epsilon": "abc"}), "invalid parameters"),
    (dict(tensors={"perturbation_": torch.full((3, SIZE, SIZE), 5.0)}), "above its budget"),
    (dict(tensors={"flow_": torch.zeros(5, 5)}), "damaged flow_"),
    (dict(tensors={"mask_": torch.full((SIZE, SIZE), float("nan"))}), "damaged mask_"),
])
def test_load_validates_what_it_reads(tmp_path, edit, message):
    path = tmp_path / "attack.safetensors"
    make(UAPAttack, max_epochs=1, checkpoint_path=tmp_path / "x.ckpt").fit(faces()).save(path)
    edited = _resave(path, tmp_path, **edit)
    if message is None:
        loaded = UAPAttack.load(edited)
        assert callable(loaded.transform) and loaded.checkpoint_path is None
        return
    with pytest.raises(ValueError, match=message):
        UAPAttack.load(edited)


@pytest.mark.parametrize("where, error, message", [
    ("", ValueError, "is not a file path"),
    ("folder", ValueError, "is not a file path"),
    ("missing/fit.ckpt", FileNotFoundError, "does not exist; create it first"),
])
def test_unwritable_checkpoint_paths_are_refused_before_any_work(tmp_path, where, error, message):
    (tmp_path / "folder").mkdir()
    target = "" if where == "" else tmp_path / where
    model = TinyEmbedder()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(error, match=message):
        make(UAPAttack, model=model, checkpoint_path=target).fit(faces())
    assert calls == [] and not list(tmp_path.glob("**/*.partial")) and not (tmp_path / ".partial").exists()
