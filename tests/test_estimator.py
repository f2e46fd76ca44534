"""The declared surface of every estimator (krtfuap/estimator.py): parameters, clone, save / load.

The parameter test is driven by each class's ``_parameter_constraints`` table, so a parameter
added to a table is fed a wrong type and a wrong value here without a new line of test.
"""

from __future__ import annotations

import inspect
import json
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from fakes import TinyEmbedder, random_faces, tiny_attack, untimed
from wrong_values import wrong_type, wrong_values
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.base import clone
from torch import nn

import krtfuap
from krtfuap import baselines
from krtfuap.attack import UAPAttack
from krtfuap.engine import STEP_RECORD_KEYS, STOP_REASONS
from krtfuap.estimator import PARAMETER_DOCS, NotSaved, PerturbationEstimator
from krtfuap.key_regions import KeyRegions

SIZE = 16
#: Every public estimator: UAPAttack and each estimator class of krtfuap.baselines.
ESTIMATORS = [UAPAttack] + [
    cls for _, cls in inspect.getmembers(baselines, inspect.isclass)
    if issubclass(cls, PerturbationEstimator) and cls.__module__ == baselines.__name__
]


faces = partial(random_faces, size=SIZE)


def valid_settings(cls: type) -> dict:
    settings = dict(threshold=0.5, batch_size=4, random_state=0)
    if "max_epochs" in cls._parameter_constraints:
        settings["max_epochs"] = 1
    return settings


def bad_cases():
    for cls in ESTIMATORS:
        for name, constraints in cls._parameter_constraints.items():
            kind = wrong_type(constraints)
            if kind is not None:
                yield pytest.param(cls, name, kind, TypeError, id=f"{cls.__name__}-{name}-type")
            for index, value in enumerate(wrong_values(constraints)):
                yield pytest.param(cls, name, value, ValueError, id=f"{cls.__name__}-{name}-value{index}")


@pytest.mark.parametrize("cls, name, value, error", list(bad_cases()))
def test_every_parameter_is_refused_by_name_before_the_model_is_called(cls, name, value, error):
    model = TinyEmbedder()
    # threshold=None: the fit would calibrate it on the pairs first, calling the model.
    settings = {**valid_settings(cls), "threshold": None}
    attack = cls(value, **settings) if name == "model" else cls(model, **{**settings, name: value})
    pairs = [(faces(4), faces(4, seed=1), torch.tensor([True, False, True, False]))]
    with pytest.raises(error, match=rf"^{name}\b") as info:
        attack.fit(faces(), pairs=pairs)
    assert "\n" not in str(info.value)
    assert model.calls == [], "the model was called (calibration, mask fitting or a step) before the check"
    # set_params checks the same table, and leaves the estimator as it was.
    good = cls(model, **valid_settings(cls))
    before = good.get_params()
    with pytest.raises(error, match=rf"^{name}\b"):
        good.set_params(**{name: value})
    assert all(good.get_params()[key] is before[key] for key in before)


def test_the_parameter_test_covers_every_estimator_and_its_whole_signature():
    assert {cls.__name__ for cls in ESTIMATORS} == {"UAPAttack", "RandomNoiseUAP", "DeepFoolUAP", "FGUAP",
                                                     "FrequencyUAP"}
    for cls in ESTIMATORS:
        assert set(cls._parameter_constraints) == set(inspect.signature(cls).parameters), cls
        for name in cls._parameter_constraints:
            assert f"\n    {name} : " in cls.__doc__, f"{cls.__name__}.{name} is undocumented"
        assert "[[" not in cls.__doc__


@pytest.mark.parametrize("field", [f for f in KeyRegions._parameter_constraints])
def test_every_key_region_option_is_refused_by_name_when_made(field):
    constraints = KeyRegions._parameter_constraints[field]
    bad = [(wrong_type(constraints), TypeError)] + [(value, ValueError) for value in wrong_values(constraints)]
    for value, error in bad:
        with pytest.raises(error, match=rf"^KeyRegions\.{field}\b"):
            KeyRegions(**{field: value})


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_shared_parameters_are_declared_and_documented_once_in_the_base(cls):
    for name, constraints in cls._parameter_constraints.items():
        if name in PerturbationEstimator._parameter_constraints:
            assert constraints is PerturbationEstimator._parameter_constraints[name], name
            entry = "\n".join(f"    {line}" for line in PARAMETER_DOCS[name].splitlines())
            assert entry in cls.__doc__, name


def test_numpy_scalars_are_taken_where_python_numbers_are():
    plain = UAPAttack(TinyEmbedder(), threshold=0.5, epsilon=0.05, max_epochs=2, batch_size=4, random_state=0,
                      lowpass_size=8, max_steps=3).fit(faces())
    numpy = UAPAttack(TinyEmbedder(), threshold=np.float64(0.5), epsilon=np.float32(0.05), max_epochs=np.int64(2),
                      batch_size=np.int64(4), random_state=np.int64(0), lowpass_size=np.int32(8),
                      max_steps=np.int64(3), shuffle=np.bool_(True)).fit(faces())
    assert torch.allclose(numpy.perturbation_, plain.perturbation_, atol=1e-7)
    assert numpy.n_iter_ == plain.n_iter_ == 3


def test_a_device_that_is_absent_or_unknown_is_named_before_any_work():
    with pytest.raises(ValueError, match=r"^device must be a device torch knows, such as 'cpu'"):
        UAPAttack(TinyEmbedder(), threshold=0.5, device="banana").fit(faces())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device is 'cuda', but no CUDA GPU is available here"):
            UAPAttack(TinyEmbedder(), threshold=0.5, device="cuda").fit(faces())


def test_rules_between_parameters_are_checked_by_fit_before_the_model():
    model = TinyEmbedder()
    with pytest.raises(ValueError, match="target_ssim needs a stealth loss"):
        UAPAttack(model, threshold=0.5, target_ssim=0.9, stealth_loss=None).fit(faces())
    assert model.calls == []


# -------------------------------------------------------------------------- clone
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_clone_shares_the_face_model_and_copies_the_rest(cls):
    attack = cls(TinyEmbedder(), **valid_settings(cls))
    copy = clone(attack)
    assert copy.model is attack.model
    assert copy.get_params().keys() == attack.get_params().keys()
    ensemble = cls([TinyEmbedder(), TinyEmbedder()], **valid_settings(cls))
    assert all(a is b for a, b in zip(clone(ensemble).model, ensemble.model))


def test_clone_of_key_regions_keeps_the_group():
    regions = KeyRegions(learn_flow=False, flow_bound=0.5)
    assert clone(UAPAttack(TinyEmbedder(), key_regions=regions)).key_regions == regions


# ---------------------------------------------------------------- step records
@pytest.mark.parametrize("cls", [cls for cls in ESTIMATORS if "max_epochs" in cls._parameter_constraints])
def test_every_learning_estimator_records_the_shared_step_keys(cls):
    attack = cls(TinyEmbedder(), **valid_settings(cls)).fit(faces())
    assert attack.history_ and all(set(STEP_RECORD_KEYS) <= set(record) for record in attack.history_)


def test_every_stop_reason_the_loop_sets_is_documented():
    import re

    import krtfuap.engine

    lines = [line for line in inspect.getsource(krtfuap.engine).splitlines() if "stop_reason" in line]
    in_code = {word for line in lines for word in re.findall(r'"(\w+)"', line)}
    assert in_code == set(STOP_REASONS)
    for reason in STOP_REASONS:
        assert f'``"{reason}"``' in PerturbationEstimator.__doc__, reason


# ------------------------------------------------------------------ save / load
def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def _rewrite(path, out, **metadata) -> None:
    with safe_open(str(path), framework="pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
        meta = {**handle.metadata(), **metadata}
    save_file(stored, str(out), metadata=meta)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_a_saved_file_carries_every_parameter_a_format_and_the_version(cls, tmp_path):
    attack = cls(TinyEmbedder(), **valid_settings(cls)).fit(faces())
    path = tmp_path / "attack.safetensors"
    attack.save(path)
    metadata = _metadata(path)
    assert metadata["format"] == "krtfuap.UAPAttack/2" and metadata["krtfuap_version"] == krtfuap.__version__
    params = json.loads(metadata["params"])
    assert set(params) == set(attack.get_params())
    assert params["model"] == {"not_saved": "a fakes.TinyEmbedder module"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is taken from today's defaults
        loaded = cls.load(path)
    machine = {"device", "checkpoint_path", "num_threads"}
    assert {k: v for k, v in loaded.get_params().items() if k not in machine | {"model"}} == {
        k: v for k, v in attack.get_params().items() if k not in machine | {"model"}
    }


def test_values_a_file_cannot_hold_come_back_described_and_fit_asks_for_them(tmp_path):
    def my_loss(adversarial, clean):
        return (adversarial - clean).abs().mean()

    mask = torch.full((SIZE, SIZE), 0.5)
    attack = UAPAttack(TinyEmbedder(), threshold=0.5, max_epochs=1, batch_size=4, stealth_loss=my_loss,
                       key_regions=KeyRegions(masker=mask), checkpoint_path=tmp_path / "fit.ckpt",
                       device="cpu").fit(faces())
    path = tmp_path / "attack.safetensors"
    attack.save(path)
    params = json.loads(_metadata(path)["params"])
    assert params["stealth_loss"]["not_saved"].endswith("my_loss")
    assert params["key_regions"]["not_saved"].startswith("KeyRegions(masker=a tensor of shape (16, 16)")
    assert params["checkpoint_path"] == str(tmp_path / "fit.ckpt") and params["device"] == "cpu"
    loaded = UAPAttack.load(path, TinyEmbedder())
    assert isinstance(loaded.stealth_loss, NotSaved) and "my_loss" in loaded.stealth_loss.description
    assert loaded.checkpoint_path is None and loaded.device is None  # where it ran, not what it learned
    assert torch.equal(loaded.mask_, mask)
    with pytest.raises(ValueError, match=r"^key_regions, stealth_loss could not be kept in the file .*stealth_loss "
                                         r"was the callable .*my_loss\); set them again with "
                                         r"set_params\(key_regions=\.\.\., stealth_loss=\.\.\.\)"):
        loaded.fit(faces())
    loaded.set_params(stealth_loss="ssim", key_regions=KeyRegions(masker=mask)).fit(faces())


def test_a_format_1_file_loads_and_names_what_it_takes_from_todays_defaults(tmp_path):
    attack = UAPAttack(TinyEmbedder(), threshold=0.5, max_epochs=1, batch_size=4, random_state=0,
                       key_regions=KeyRegions(learn_flow=False)).fit(faces())
    path, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    attack.save(path)
    params = json.loads(_metadata(path)["params"])
    # What a file of format 1 held: the key-region options flat, no shuffle / num_threads / lowpass_size.
    for name in ("key_regions", "shuffle", "num_threads", "lowpass_size", "model", "device", "checkpoint_path"):
        del params[name]
    params.update(use_key_regions=True, masker=None, learn_flow=False, flow_bound=1.0, flow_unit="pixels",
                  flow_lr=None)
    _rewrite(path, old, format="krtfuap.UAPAttack/1", params=json.dumps(params))
    with pytest.warns(UserWarning, match=r"older krtfuap \(format 1\) without the parameters \['lowpass_size', "
                                         r"'shuffle'\]; .*today's defaults"):
        loaded = UAPAttack.load(old)
    assert loaded.key_regions == KeyRegions(learn_flow=False)
    assert torch.equal(loaded.perturbation_, attack.perturbation_)


@pytest.mark.parametrize(
    "name, fitted_with, value_before",
    [
        ("target_ssim_start", dict(target_ssim=0.9), None),  # files before the warm-up were fitted without one
        ("optimizer", dict(optimizer="tensorwise_adam"), "adam"),  # and before the choice, with Adam
        ("min_psnr", dict(min_psnr=25.0), None),  # and before the l2 budget, without one
        ("score_size", dict(score_size=5), None),  # and before score_size, scored on all their faces
    ],
)
def test_a_file_from_before_a_parameter_loads_as_it_was_fitted(tmp_path, name, fitted_with, value_before):
    attack = UAPAttack(TinyEmbedder(), threshold=0.5, max_epochs=1, batch_size=4, **fitted_with).fit(faces())
    path, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    attack.save(path)
    assert getattr(UAPAttack.load(path), name) == attack.get_params()[name]
    params = json.loads(_metadata(path)["params"])
    del params[name]
    _rewrite(path, old, params=json.dumps(params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the value is the one its fit had
        assert getattr(UAPAttack.load(old), name) == value_before


def test_a_random_noise_file_of_format_1_drops_the_stopping_rules_it_never_used(tmp_path):
    attack = baselines.RandomNoiseUAP(TinyEmbedder(), threshold=0.5, batch_size=4, random_state=0).fit(faces())
    path, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    attack.save(path)
    params = json.loads(_metadata(path)["params"])
    for name in ("num_threads", "amp", "channels_last", "model", "device"):
        del params[name]
    params.update(target_fooling_rate=0.8, max_epochs=50, max_time=None)
    _rewrite(path, old, format="krtfuap.UAPAttack/1", params=json.dumps(params))
    with pytest.warns(UserWarning, match=r"without the parameters \['amp', 'channels_last'\]"):
        loaded = baselines.RandomNoiseUAP.load(old)
    assert torch.equal(loaded.perturbation_, attack.perturbation_)


def test_a_file_of_another_estimator_is_refused_naming_the_class_that_saved_it(tmp_path):
    path = tmp_path / "attack.safetensors"
    UAPAttack(TinyEmbedder(), threshold=0.5, max_epochs=1, batch_size=4, key_regions=KeyRegions()).fit(faces()).save(path)
    with pytest.raises(ValueError, match=r"saved by UAPAttack, another attack class .*'key_regions'.*UAPAttack\.load"):
        baselines.RandomNoiseUAP.load(path)


def test_save_names_a_folder_in_the_place_of_its_partial_file(tmp_path):
    attack = UAPAttack(TinyEmbedder(), threshold=0.5, max_epochs=1, batch_size=4).fit(faces())
    (tmp_path / "attack.safetensors.partial").mkdir()
    with pytest.raises(IsADirectoryError, match=r"attack\.safetensors\.partial is a folder; move or remove"):
        attack.save(tmp_path / "attack.safetensors")
    assert (tmp_path / "attack.safetensors.partial").is_dir() and not (tmp_path / "attack.safetensors").exists()


# ------------------------------------------------------------------ fit threads
class ThreadsSeen(TinyEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def forward(self, x):
        self.threads.add(torch.get_num_threads())
        return super().forward(x)


def test_num_threads_holds_during_fit_and_evaluate_and_is_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = ThreadsSeen()
        attack = UAPAttack(model, threshold=0.5, max_epochs=1, batch_size=4, num_threads=1).fit(faces())
        assert model.threads == {1} and torch.get_num_threads() == 2
        model.threads.clear()
        attack.evaluate(faces())
        assert model.threads == {1} and torch.get_num_threads() == 2
        model.threads.clear()
        attack.set_params(num_threads=None).evaluate(faces())
        assert model.threads == {2}  # None leaves torch's setting
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------- the caller's data
class InPlace(nn.Module):
    """A model that scribbles on its input before embedding it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyEmbedder()

    def forward(self, x):
        x.mul_(0.5)
        return self.inner(x)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_a_model_that_changes_its_input_in_place_never_changes_the_callers_faces(cls):
    X = faces()
    original = X.clone()
    attack = cls(InPlace(), **valid_settings(cls)).fit(X)
    attack.evaluate(X)
    assert torch.equal(X, original)


# ----------------------------------------------------------------------- restarts (n_init)
def restart_key(fitted: dict) -> tuple:
    """What the restarts are ranked by without a stealth target: fooling rate (ties: lower similarity)."""
    return fitted["fooling_rate"], -fitted["mean_similarity"]


@pytest.mark.parametrize("cls", [cls for cls in ESTIMATORS if "n_init" in cls._parameter_constraints])
def test_n_init_keeps_the_best_restart_and_each_restart_refits_alone(cls):
    x = faces(12)
    attack = cls(TinyEmbedder(), **{**valid_settings(cls), "threshold": 0.99, "max_epochs": 2, "n_init": 3}).fit(x)
    assert len(attack.init_scores_) == 3 and attack.best_init_ in (0, 1, 2)
    assert len({entry["random_state"] for entry in attack.init_scores_}) == 3
    alone = []
    for entry in attack.init_scores_:
        restart = cls(TinyEmbedder(), **{**valid_settings(cls), "threshold": 0.99, "max_epochs": 2,
                                         "random_state": entry["random_state"]}).fit(x)
        assert (restart.fooling_rate_, restart.ssim_, restart.n_iter_, restart.stop_reason_) == (
            entry["fooling_rate"], entry["ssim"], entry["n_iter"], entry["stop_reason"])
        score = next(s for s in restart.epoch_scores_ if s["epoch"] == restart.best_epoch_)
        alone.append((restart_key(score), restart))
    best_key, best = alone[attack.best_init_]
    assert best_key == max(key for key, _ in alone)
    assert torch.equal(attack.perturbation_, best.perturbation_)
    assert untimed(attack.history_) == untimed(best.history_) and attack.threshold_ == best.threshold_


def test_one_fit_records_itself_as_the_only_restart():
    attack = tiny_attack(random_state=7).fit(faces())
    assert attack.best_init_ == 0
    assert attack.init_scores_ == [{"random_state": 7, "fooling_rate": attack.fooling_rate_, "ssim": attack.ssim_,
                                    "n_iter": attack.n_iter_, "stop_reason": attack.stop_reason_}]


def test_n_init_splits_max_time_and_keeps_max_steps_per_restart(monkeypatch):
    from krtfuap import estimator
    limits = []

    class RecordingLoop(estimator.FitLoop):
        def __init__(self, **settings):
            limits.append((settings["max_time"], settings["max_steps"]))
            super().__init__(**settings)

    monkeypatch.setattr(estimator, "FitLoop", RecordingLoop)
    attack = tiny_attack(n_init=4, max_time=1000.0, max_steps=2).fit(faces())
    assert limits == [(250.0, 2)] * 4
    assert [entry["n_iter"] for entry in attack.init_scores_] == [2] * 4


def scoring_faces_of_each_loop(monkeypatch) -> list:
    """Patch the fit loop to record, for every run, the faces that score its epochs (``None``: the fit faces)."""
    from krtfuap import estimator
    scored = []

    class RecordingLoop(estimator.FitLoop):
        def run(self, data, solver, *, validation=None, **kwargs):
            scored.append(None if validation is None else validation.data)
            return super().run(data, solver, validation=validation, **kwargs)

    monkeypatch.setattr(estimator, "FitLoop", RecordingLoop)
    return scored


@pytest.mark.parametrize("cls", [cls for cls in ESTIMATORS if "score_size" in cls._parameter_constraints])
def test_score_size_scores_every_epoch_on_one_draw_of_the_fit_faces_and_moves_no_other_draw(cls, monkeypatch):
    scored = scoring_faces_of_each_loop(monkeypatch)
    x = faces(12)
    settings = {**valid_settings(cls), "threshold": 0.99, "max_epochs": 3, "target_fooling_rate": 1.0}
    subset = cls(TinyEmbedder(), **settings, score_size=5).fit(x)
    every = cls(TinyEmbedder(), **settings).fit(x)
    assert {s["n_images"] for s in subset.epoch_scores_} == {5} and every.epoch_scores_[0]["n_images"] == 12
    drawn = scored[0]
    assert len(drawn) == 5 and all(any(torch.equal(face, row) for row in x) for face in drawn)
    assert len({face.sum().item() for face in drawn}) == 5  # five different faces
    assert untimed(subset.history_) == untimed(every.history_)  # the draw has a generator of its own
    assert subset.evaluate(drawn)["fooling_rate"] == subset.fooling_rate_
    again = cls(TinyEmbedder(), **settings, score_size=5).fit(x)
    assert torch.equal(scored[2], drawn) and untimed(again.epoch_scores_) == untimed(subset.epoch_scores_)
    whole = cls(TinyEmbedder(), **settings, score_size=12).fit(x)  # as many as X holds: all of X
    assert scored[3] is None and untimed(whole.epoch_scores_) == untimed(every.epoch_scores_)


def test_score_size_gives_every_restart_the_same_faces(monkeypatch):
    scored = scoring_faces_of_each_loop(monkeypatch)
    attack = tiny_attack(n_init=2, score_size=5).fit(faces(12))
    assert len(scored) == 2 and len(scored[0]) == 5 and torch.equal(scored[0], scored[1])
    assert attack.score_size == 5 and all(s["n_images"] == 5 for s in attack.epoch_scores_)


def test_score_size_is_refused_beside_validation_faces_or_a_loader_naming_the_fix():
    with pytest.raises(ValueError, match=r"score_size and fit\(validation=...\) .*pass one"):
        tiny_attack(score_size=4).fit(faces(12), validation=faces(4, seed=1))
    with pytest.raises(ValueError, match=r"score_size=4 draws its faces from a \(N, 3, H, W\) tensor X; X is a list"):
        tiny_attack(score_size=4).fit(list(faces(12).split(4)))


def test_score_size_auto_draws_from_a_tensor_and_leaves_a_loader_or_validation_faces_whole(monkeypatch):
    from krtfuap import estimator

    monkeypatch.setattr(estimator, "AUTO_SCORE_SIZE", 5)
    scored = scoring_faces_of_each_loop(monkeypatch)
    x, validation = faces(12), faces(4, seed=1)
    assert UAPAttack(None).score_size == "auto"
    auto = tiny_attack(score_size="auto").fit(x)
    five = tiny_attack(score_size=5).fit(x)
    assert len(scored[0]) == 5 and torch.equal(scored[0], scored[1])
    assert untimed(auto.epoch_scores_) == untimed(five.epoch_scores_)
    tiny_attack(score_size="auto").fit(list(x.split(4)))  # a loader: no error, all of its faces score
    tiny_attack(score_size="auto").fit(x, validation=validation)  # the validation faces, all of them
    assert scored[2] is None and torch.equal(scored[3], validation)
    tiny_attack(score_size="auto").fit(x[:5])  # no more faces than the draw: all of X
    assert scored[4] is None


def test_n_init_calibrates_the_threshold_once_from_pairs_read_once():
    model = TinyEmbedder()
    pairs = iter([(faces(8), faces(8, seed=1), torch.tensor([True, False] * 4))])  # an iterator: read once
    attack = tiny_attack(model=model, threshold=None, n_init=2).fit(faces(), pairs=pairs)
    alone = tiny_attack(model=model, threshold=None).fit(
        faces(), pairs=[(faces(8), faces(8, seed=1), torch.tensor([True, False] * 4))])
    assert attack.threshold_ == alone.threshold_ and attack.threshold_accuracy_ == alone.threshold_accuracy_


def test_n_init_tags_each_on_epoch_event_with_its_restart():
    events = []
    tiny_attack(n_init=2, max_epochs=2).fit(faces(), on_epoch=events.append)
    assert [(event["init"], event["epoch"]) for event in events] == [(0, 0), (0, 1), (1, 0), (1, 1)]


class InterruptedEmbedder(TinyEmbedder):
    """A :class:`TinyEmbedder` that raises ``KeyboardInterrupt`` at its forward number ``stop_at`` (from 1)."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.stop_at = stop_at

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.calls) + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().forward(images)


def test_n_init_checkpoints_each_restart_to_its_own_file(tmp_path):
    checkpoint = tmp_path / "fit.ckpt"
    attack = tiny_attack(n_init=2, checkpoint_path=checkpoint).fit(faces())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fit.init0.ckpt", "fit.init1.ckpt"]
    unsaved = tiny_attack(n_init=2).fit(faces())
    assert torch.equal(attack.perturbation_, unsaved.perturbation_)
    assert attack.init_scores_ == unsaved.init_scores_ and attack.best_init_ == unsaved.best_init_


def test_n_init_resume_skips_the_ended_restart_and_continues_the_interrupted_one(tmp_path, capsys):
    """Interrupted in the second restart's third epoch, the fit resumes there and ends as it would have."""
    settings = dict(n_init=2, max_epochs=4, checkpoint_path=tmp_path / "fit.ckpt", random_state=4)
    model, forwards_at = TinyEmbedder(), {}
    reference = tiny_attack(model=model, **settings).fit(
        faces(), on_epoch=lambda event: forwards_at.setdefault((event["init"], event["epoch"]), len(model.calls)))
    for path in tmp_path.iterdir():
        path.unlink()
    # The forward after restart 1's epoch-1 event comes after its checkpoint of two epochs is on disk.
    interrupted = tiny_attack(model=InterruptedEmbedder(stop_at=forwards_at[1, 1] + 1), **settings)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(faces())
    # One message, naming the file the user gave (the call that resumes), not the restart's own file.
    message = capsys.readouterr().err
    assert message.count("interrupted") == 1 and f"resume=True) from {tmp_path / 'fit.ckpt'}." in message
    events = []
    resumed = tiny_attack(**settings).fit(faces(), resume=True, on_epoch=events.append)
    assert [(event["init"], event["epoch"]) for event in events] == [(1, 2), (1, 3)]  # restart 0 ended at once
    assert torch.equal(resumed.perturbation_, reference.perturbation_)
    assert untimed(resumed.history_) == untimed(reference.history_)
    assert resumed.init_scores_ == reference.init_scores_ and resumed.best_init_ == reference.best_init_


def test_n_init_prefers_a_restart_that_meets_the_stealth_target_to_one_that_fools_more():
    attack = tiny_attack(threshold=0.99, target_ssim=0.9, epsilon=0.3, init_scale=1.0, min_psnr=None, n_init=3,
                         random_state=3).fit(faces(12))
    scores, kept = attack.init_scores_, attack.init_scores_[attack.best_init_]
    meeting = [entry for entry in scores if entry["ssim"] >= 0.9]
    assert kept in meeting and kept["fooling_rate"] == max(entry["fooling_rate"] for entry in meeting)
    # The case this seed gives: a restart below the target fooled more, and was passed over.
    assert any(entry["ssim"] < 0.9 and entry["fooling_rate"] > kept["fooling_rate"] for entry in scores)


def test_a_saved_file_keeps_every_restarts_score_and_the_one_kept(tmp_path):
    attack = tiny_attack(n_init=3, max_epochs=2, random_state=5).fit(faces(12))
    path = tmp_path / "attack.safetensors"
    attack.save(path)
    loaded = UAPAttack.load(path)
    assert loaded.init_scores_ == attack.init_scores_ and loaded.best_init_ == attack.best_init_


def test_a_seed_given_as_a_generator_comes_back_described_in_init_scores(tmp_path):
    attack = tiny_attack(random_state=np.random.RandomState(0)).fit(faces())
    path = tmp_path / "attack.safetensors"
    attack.save(path)
    (entry,) = UAPAttack.load(path).init_scores_
    assert isinstance(entry["random_state"], NotSaved) and "RandomState" in entry["random_state"].description
    assert {k: v for k, v in entry.items() if k != "random_state"} == {
        k: v for k, v in attack.init_scores_[0].items() if k != "random_state"}


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda fitted: fitted["init_scores_"][0].pop("ssim"), r"init_scores_ must be a list of entries with the keys"),
        (lambda fitted: fitted.update(best_init_=5), r"best_init_=5 names no entry of init_scores_ \(1 entries\)"),
        (lambda fitted: fitted["init_scores_"][0].update(fooling_rate=7.0), r"fooling_rate_ must be"),
        (lambda fitted: fitted["init_scores_"][0].update(random_state=[1]), r"holds the random_state \[1\]"),
    ],
)
def test_a_file_with_damaged_restart_scores_is_refused_naming_them(tmp_path, change, problem):
    path, damaged = tmp_path / "attack.safetensors", tmp_path / "damaged.safetensors"
    tiny_attack(random_state=0).fit(faces()).save(path)
    fitted = json.loads(_metadata(path)["fitted"])
    change(fitted)
    _rewrite(path, damaged, fitted=json.dumps(fitted))
    with pytest.raises(ValueError, match=r"holds invalid fitted values \(.*" + problem):
        UAPAttack.load(damaged)


def test_a_file_from_before_init_scores_loads_without_them(tmp_path):
    path, old = tmp_path / "attack.safetensors", tmp_path / "old.safetensors"
    tiny_attack(random_state=0).fit(faces()).save(path)
    fitted = json.loads(_metadata(path)["fitted"])
    del fitted["init_scores_"], fitted["best_init_"]
    _rewrite(path, old, fitted=json.dumps(fitted))
    loaded = UAPAttack.load(old)
    assert not hasattr(loaded, "init_scores_") and loaded.fooling_rate_ == fitted["fooling_rate_"]
